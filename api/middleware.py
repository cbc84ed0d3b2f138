"""The request middleware: request id, access log, HTTP metrics, and the last-resort 500.

A plain ASGI middleware (not ``BaseHTTPMiddleware``) so streamed responses — file downloads,
proxied token streams — pass through untouched. It is the outermost application layer: every
response, error responses included, carries ``x-request-id``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from api.logs import request_id_var
from api.metrics import ApiMetrics

log = logging.getLogger("api.request")

REQUEST_ID_HEADER = "x-request-id"
# A caller's id is echoed back and written into logs: accept only something log-safe.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SAFE_ID.match(text) else None
    return None


def _route_label(scope: Scope) -> str:
    # The route template, never the raw path: ids in paths would explode label cardinality.
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or f"req_{secrets.token_hex(12)}"
        token = request_id_var.set(request_id)
        # The proxy forwards the id to the serving gateway; routes read it from the scope.
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"method": scope["method"], "path": scope["path"]})
            if started:
                raise  # half a response is out: only the server can abort the connection now
            else:
                body = json.dumps(error_body("The server had an error while processing your request.", "server_error", None, "internal_error")).encode()
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
            status = 500
        finally:
            elapsed = time.perf_counter() - start
            route = _route_label(scope)
            self.metrics.observe(scope["method"], route, status, elapsed)
            log.info(
                "request",
                extra={"method": scope["method"], "path": scope["path"], "route": route, "status": status, "duration_ms": round(elapsed * 1000, 2)},
            )
            request_id_var.reset(token)
