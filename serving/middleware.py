"""What happens around every request: its request id, its access log line, its metrics, and the last
line of defence that turns an unexpected exception into a logged, OpenAI-shaped 500.

Pure ASGI (not ``BaseHTTPMiddleware``) so that streamed responses pass through untouched and a client
disconnect reaches the streaming response. The request id comes from the client's ``x-request-id``
(a retry carries the same id, which is what makes metering idempotent) or is generated; it is echoed
on every response, errors included, bound to every log line, and forwarded to the engine.
"""

from __future__ import annotations

import re
import time
import uuid

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.jobs import unnameable
from serving.errors import ModelNotFound, error_response, internal_error_response
from serving.metrics import GatewayMetrics

REQUEST_ID_HEADER = "x-request-id"
# Fits UsageRecord.request_id (160: the id and a retry's '#<attempt>') and keeps ids printable in logs and headers.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

log = structlog.get_logger(__name__)


# routes whose path ends in a model or adapter name (``:path`` parameters; a suffix such as "/check" stays on)
_NAMED_PREFIXES = ("/v1/models/", "/v1/adapters/")


def _named_in_path(path: str) -> str | None:
    return next((path[len(p):] for p in _NAMED_PREFIXES if path.startswith(p)), None)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client_id = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = client_id if client_id and _VALID_REQUEST_ID.fullmatch(client_id) else new_request_id()
        scope.setdefault("state", {}).update(request_id=request_id, request_id_from_client=bool(client_id))
        status = {"code": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                if client_id and client_id != request_id:
                    response = error_response(
                        400, "x-request-id must be 1-128 characters of letters, digits and . _ : -", "invalid_request_error", param="x-request-id"
                    )
                    await response(scope, receive, send_with_id)
                elif (name := _named_in_path(scope["path"])) is not None and unnameable(name):
                    await ModelNotFound(name).response()(scope, receive, send_with_id)
                else:
                    await self.app(scope, receive, send_with_id)
            except Exception:
                log.exception("unhandled error", method=scope["method"], path=scope["path"])
                if status["started"]:
                    raise  # the response is half sent; all we can do is drop the connection
                await internal_error_response()(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.observe_request(route, scope["method"], status["code"], elapsed)
                log.info("request", method=scope["method"], route=route, status=status["code"], duration_ms=round(elapsed * 1000, 1))
