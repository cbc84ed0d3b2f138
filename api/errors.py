"""The one place errors become HTTP responses, all in OpenAI's shape:

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Services raise ``ApiError`` subclasses (or domain errors of the scheduler, mapped here); request
validation failures become 400 ``invalid_request_error`` naming the offending field in ``param``.
Unknown exceptions are not handled here: the request middleware (``api.middleware``) logs them and
answers a plain 500 in the same shape, never dressed up as a 4xx.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpu_worker.engine.errors import param_from_loc  # torch-free: one param spelling everywhere
from scheduler.jobs import InvalidTransition


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    status_code = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status_code, headers=headers)


class InvalidRequest(ApiError):
    pass


class Unauthorized(ApiError):
    # OpenAI answers a bad key with type invalid_request_error and code invalid_api_key.
    status_code = 401


class PermissionDenied(ApiError):
    status_code = 403
    type = "permission_error"


class NotFound(ApiError):
    """Also what a tenant gets for another tenant's id: the two are indistinguishable."""

    status_code = 404


class PayloadTooLarge(ApiError):
    status_code = 413


class ServiceUnavailable(ApiError):
    status_code = 503
    type = "service_unavailable_error"


class GatewayError(ApiError):
    status_code = 502
    type = "api_error"


class GatewayTimeout(ApiError):
    status_code = 504
    type = "timeout_error"


_INVALID_JSON = "invalid_json"  # the code of every body that is not JSON, whichever layer noticed
_UNPARSABLE_BODY = "We could not parse the JSON body of your request: send a JSON object, encoded as UTF-8."
# What FastAPI's HTTPException says when decoding the body failed other than as malformed JSON (fastapi.routing).
_FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = param_from_loc(tuple(first.get("loc", ())))
    # A union reports one error per branch for the same field: list each field once.
    reasons = [e["msg"] for e in errors if param_from_loc(tuple(e.get("loc", ()))) == param]
    where = f"Invalid value for '{param}'" if param else "Invalid request"
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    if first.get("type") == "json_invalid":
        message, param, code = _UNPARSABLE_BODY, None, _INVALID_JSON  # its loc is a character offset, not a field
    elif first.get("type") == "missing" and param is None:
        # A missing whole (the body itself): there is no field name to quote, and "'None'" helps nobody.
        message = "The request has no body: send a JSON object" if _is_body(first) else "Missing required parameter"
    elif first.get("type") in ("model_attributes_type", "dict_type") and param is None and _is_body(first):
        message = "The request body must be a JSON object, sent with 'Content-Type: application/json'"
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'"
    elif first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"{where}: {' or '.join(dict.fromkeys(reasons))}"
    return JSONResponse(error_body(message, "invalid_request_error", param, code), 400)


def _is_body(error: dict) -> bool:
    loc = tuple(error.get("loc", ()))
    return not loc or loc[0] == "body"


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _invalid_transition(_: Request, exc: InvalidTransition) -> JSONResponse:
    return JSONResponse(error_body(str(exc), "invalid_request_error", None, "invalid_job_status"), 400)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Routing-level errors (unknown path, wrong method) still answer in the OpenAI shape.
    if exc.status_code == 400 and exc.detail == _FASTAPI_BODY_PARSE_ERROR:
        # A JSON body FastAPI could not even decode (not UTF-8): the same answer as for malformed JSON.
        return JSONResponse(error_body(_UNPARSABLE_BODY, "invalid_request_error", None, _INVALID_JSON), 400, headers=exc.headers)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code), exc.status_code, headers=exc.headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(InvalidTransition, _invalid_transition)
    app.add_exception_handler(StarletteHTTPException, _http_error)
