"""Inference pass-through: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models`` go to the serving gateway unchanged, so one base URL serves both fine-tuning and inference.

The gateway does its own authentication and metering; this layer forwards the Authorization header
and the request id, streams the answer back as it comes (server-sent events included) and keeps the
gateway's status code. One shared ``httpx.AsyncClient`` (``app.state.serving_client``) pools
connections across requests.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from api.errors import GatewayError, GatewayTimeout, NotFound, ServiceUnavailable
from scheduler.jobs import unnameable

log = logging.getLogger("api.proxy")
router = APIRouter(tags=["inference"])

# Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are never forwarded.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "content-length", "x-request-id"}
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar and "/": left as they are in a forwarded path


def build_client(base_url: str, connect_timeout: float, read_timeout: float) -> httpx.AsyncClient:
    timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, limits=httpx.Limits(max_connections=200))


def _upstream_path(request: Request) -> str:
    """The path as the client sent it, still percent-encoded. Rebuilt from the decoded path, a model
    name with a control character ("%00") made httpx refuse the URL (a 500), and one with a newline or
    tab ("%0A") reached the gateway with it silently dropped, asking for a different model."""
    raw = request.scope.get("raw_path")
    if raw is None:  # an ASGI server need not provide it
        return quote(request.url.path, safe=_PATH_SAFE)
    # Any byte outside printable ASCII is escaped; "%" is kept, so the client's escapes travel unchanged.
    return quote(raw, safe=_PATH_SAFE + "%")


def _model_not_found(name: str) -> NotFound:
    # The gateway's wording (serving.errors.ModelNotFound), the name escaped so that a control character shows.
    shown = name.encode("unicode_escape").decode("ascii")[:256]
    return NotFound(f"The model `{shown}` does not exist or you do not have access to it.", param="model", code="model_not_found")


def _refuse_control_characters(request: Request, prefix: str) -> None:
    """No model or adapter name has a control character (names are ``ft:{base}:{org}:{suffix}:{job}``
    or a hub id), so one asked for with "%00" or "%0A" is answered here: a 404 naming it, never
    forwarded (the router drops a trailing newline from a ``:path`` parameter, a NUL reaches the
    gateway's database)."""
    name = request.scope["path"].partition(prefix)[2]
    if unnameable(name):
        raise _model_not_found(name)


async def _forward(request: Request) -> StreamingResponse:
    client: httpx.AsyncClient = request.app.state.serving_client
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
    headers.append(("x-request-id", request.state.request_id))
    body = await request.body()
    try:
        upstream = client.build_request(request.method, _upstream_path(request), params=request.query_params, headers=headers,
                                        content=body)
    except httpx.InvalidURL:  # e.g. over httpx's length limit: no model has a name that cannot be forwarded
        raise _model_not_found(request.url.path.rpartition("/")[2]) from None
    try:
        response = await client.send(upstream, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as err:
        log.warning("serving gateway unreachable", extra={"url": str(upstream.url), "error": repr(err)})
        raise ServiceUnavailable("The inference service is unavailable; try again shortly.", code="service_unavailable") from None
    except httpx.TimeoutException:
        raise GatewayTimeout("The inference service did not answer in time.", code="upstream_timeout") from None
    except httpx.TransportError as err:
        log.warning("serving gateway error", extra={"url": str(upstream.url), "error": repr(err)})
        raise GatewayError("The inference service failed to answer.", code="upstream_error") from None
    out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP | {"x-request-id"}}
    return StreamingResponse(
        response.aiter_raw(), status_code=response.status_code, headers=out_headers, background=BackgroundTask(response.aclose)
    )


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> StreamingResponse:
    return await _forward(request)


@router.post("/v1/completions")
async def completions(request: Request) -> StreamingResponse:
    return await _forward(request)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> StreamingResponse:
    return await _forward(request)


@router.get("/v1/models")
async def list_models(request: Request) -> StreamingResponse:
    return await _forward(request)


@router.get("/v1/models/{model:path}")
async def retrieve_model(request: Request, model: str) -> StreamingResponse:
    _refuse_control_characters(request, "/v1/models/")
    return await _forward(request)


@router.delete("/v1/models/{model:path}")
async def delete_model(request: Request, model: str) -> StreamingResponse:
    _refuse_control_characters(request, "/v1/models/")
    return await _forward(request)


# The adapter registry's admin routes live on the gateway too (versions, promote, rollback, delete).
@router.get("/v1/adapters")
async def list_adapters(request: Request) -> StreamingResponse:
    return await _forward(request)


@router.api_route("/v1/adapters/{path:path}", methods=["POST", "DELETE"])
async def adapter_action(request: Request, path: str) -> StreamingResponse:
    _refuse_control_characters(request, "/v1/adapters/")
    return await _forward(request)
