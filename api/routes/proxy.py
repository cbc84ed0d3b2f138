"""Inference pass-through: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models`` go to the serving gateway unchanged, so one base URL serves both fine-tuning and inference.

The gateway does its own authentication and metering; this layer forwards the Authorization header
and the request id, streams the answer back as it comes (server-sent events included) and keeps the
gateway's status code. One shared ``httpx.AsyncClient`` (``app.state.serving_client``) pools
connections across requests.
"""

from __future__ import annotations

import logging

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from api.errors import GatewayError, GatewayTimeout, ServiceUnavailable

log = logging.getLogger("api.proxy")
router = APIRouter(tags=["inference"])

# Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are never forwarded.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "content-length", "x-request-id"}


def build_client(base_url: str, connect_timeout: float, read_timeout: float) -> httpx.AsyncClient:
    timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, limits=httpx.Limits(max_connections=200))


async def _forward(request: Request) -> StreamingResponse:
    client: httpx.AsyncClient = request.app.state.serving_client
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
    headers.append(("x-request-id", request.state.request_id))
    upstream = client.build_request(
        request.method, request.url.path, params=request.query_params, headers=headers, content=await request.body()
    )
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
    return await _forward(request)


@router.delete("/v1/models/{model:path}")
async def delete_model(request: Request, model: str) -> StreamingResponse:
    return await _forward(request)


# The adapter registry's admin routes live on the gateway too (versions, promote, rollback, delete).
@router.get("/v1/adapters")
async def list_adapters(request: Request) -> StreamingResponse:
    return await _forward(request)


@router.api_route("/v1/adapters/{path:path}", methods=["POST", "DELETE"])
async def adapter_action(request: Request, path: str) -> StreamingResponse:
    return await _forward(request)
