"""The gateway's errors and the one place they become HTTP responses.

Every error leaves the gateway in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
so that the stock SDKs raise their usual exception classes. Domain errors carry their status; request
validation failures are 400 ``invalid_request_error``; anything unexpected is logged and answered with
a 500 in the same shape (see ``serving.middleware``), never dressed up as a 4xx.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpu_worker.engine.errors import param_from_loc  # torch-free: one param spelling everywhere


class ServingError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status_code, self.message, self.type, self.param, self.code, self.headers)


class InvalidRequest(ServingError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationFailed(ServingError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PermissionDenied(ServingError):
    status_code = 403
    type = "permission_error"  # as the management API's 403s (api/errors.py)
    code = "insufficient_permissions"


class RateLimited(ServingError):
    """A key's request rate is spent: 429 with the seconds to wait (OpenAI's type ``requests``)."""

    status_code = 429
    type = "requests"

    def __init__(self, message: str, *, retry_after: float, code: str):
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, int(-(-retry_after // 1))))})


class QuotaExceeded(RateLimited):
    """The org's token quota is spent: OpenAI answers a spent quota with a 429 of type and code
    ``insufficient_quota``, which its SDKs tell apart from a rate limit (no point retrying soon)."""

    type = "insufficient_quota"

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message, retry_after=retry_after, code="insufficient_quota")


class RequestInProgress(ServingError):
    """A request with this ``x-request-id`` is still running: 409, which the OpenAI SDKs retry."""

    status_code = 409
    type = "invalid_request_error"
    code = "request_in_progress"

    def __init__(self, request_id: str):
        super().__init__(
            f"A request with x-request-id '{request_id}' is still in progress; retry when it has finished.",
            param="x-request-id",
            headers={"Retry-After": "1"},
        )


class RequestIdReused(ServingError):
    """The ``x-request-id`` names an earlier request with another body: 400 (a retry would not help)."""

    status_code = 400
    type = "invalid_request_error"
    code = "request_id_reused"

    def __init__(self, request_id: str):
        super().__init__(
            f"x-request-id '{request_id}' was already used for a different request; send a new id for a new request.",
            param="x-request-id",
        )


class ModelNotFound(ServingError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str):
        # One message whether the model does not exist or belongs to another organization: a caller
        # must not learn which fine-tuned model names exist elsewhere.
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class EngineRejected(ServingError):
    """The engine refused the request as invalid (e.g. ``max_tokens`` over the context length):
    the client's fault, relayed with the engine's status, message, and the field and code it names."""

    type = "invalid_request_error"

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status_code = status_code


class EngineError(ServingError):
    status_code = 502
    code = "engine_error"


class EngineUnavailable(ServingError):
    status_code = 503
    code = "engine_unavailable"

    def __init__(self, message: str):
        # Replicas come back within seconds after a restart; tell well-behaved clients when to retry.
        super().__init__(message, headers={"Retry-After": "1"})


class DatabaseUnavailable(ServingError):
    """The database is unreachable where a request cannot go on without it (claiming its request id)."""

    status_code = 503
    code = "database_unavailable"

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": "1"})


class EngineTimeout(ServingError):
    status_code = 504
    code = "engine_timeout"


def error_body(message: str, type: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status_code: int, message: str, type: str, param: str | None = None, code: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status_code, headers=headers)


def internal_error_response() -> JSONResponse:
    return error_response(500, "The server had an error while processing your request.", "server_error")


# FastAPI's detail when reading the body raised something other than a JSON syntax error (bytes that
# are not UTF-8, or a RecursionError from nesting deeper than the parser goes).
_BODY_PARSE_FAILED = "There was an error parsing the body"


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return _unparsable_body_response()
    # A whole-body check (protocol's model validators) names its field in the error's context.
    param = param_from_loc(tuple(first.get("loc", ()))) or (first.get("ctx") or {}).get("param")
    message = first.get("msg", "Invalid request")
    code = "invalid_value"
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        message = "The request body must be a JSON object, sent with 'Content-Type: application/json'."
    elif first.get("type") == "missing":
        code = "missing_required_parameter"
        # No field named: the body itself is missing.
        message = f"Missing required parameter: '{param}'." if param else "The request has no body: send a JSON object."
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return error_response(400, message, "invalid_request_error", param=param, code=code)


def _unparsable_body_response(cause: BaseException | None = None) -> JSONResponse:
    if isinstance(cause, RecursionError):
        message = "The request body nests too deeply to be parsed."
    else:
        message = "We could not parse the JSON body of your request. Send valid JSON."
    return error_response(400, message, "invalid_request_error", code="invalid_json")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_FAILED:
            return _unparsable_body_response(exc.__cause__)
        # Unknown routes and wrong methods: keep the OpenAI shape for them too.
        type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type, headers=getattr(exc, "headers", None))
