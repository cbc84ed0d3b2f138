"""The inference service: one function per request that resolves the model, claims its request id,
opens the request on an engine replica, relays the answer and meters it.

Routes call ``complete``; everything between the parsed request and the HTTP response lives here. A
retry of a request id that already succeeded is answered from its stored response, without an engine
(serving.idempotency). Only ids the client sent are claimed: one the gateway generated cannot come back
in a retry, so such a request costs no database round trip and stores no response. Every run that reached an engine is recorded, whatever its outcome: its status
and the engine's counts, zero when the engine counted nothing (it refused, failed or timed out).
"""

from __future__ import annotations

import asyncio
import enum
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

import structlog
from starlette.responses import Response, StreamingResponse

from scheduler.tenancy import Principal
from serving import adapter_registry, registry
from serving.cache import TTLCache
from serving.database import Database
from serving.engines import EnginePool, Upstream, UpstreamBroken, UpstreamTimeout
from serving.errors import EngineError, EngineRejected, EngineTimeout, EngineUnavailable
from serving.idempotency import Attempt, Stored, begin, body_hash
from serving.metering import Meter, Outcome, token_counts
from serving.metrics import GatewayMetrics
from serving.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from serving.registry import ResolvedModel
from serving.settings import ServingSettings
from serving.streaming import RelayResponse, StreamRelay
from serving.transcript import replay_events
from serving.usage_writer import UsageWriter

log = structlog.get_logger(__name__)


class Endpoint(str, enum.Enum):
    chat = "/v1/chat/completions"
    completions = "/v1/completions"
    embeddings = "/v1/embeddings"


@dataclass(frozen=True)
class InferenceContext:
    """Everything a request needs besides its body: who asks, under which id, and the gateway's parts."""

    principal: Principal
    request_id: str
    settings: ServingSettings
    db: Database
    engines: EnginePool
    metrics: GatewayMetrics
    usage: UsageWriter
    models: TTLCache[tuple[str, str], ResolvedModel]
    client_request_id: bool = True  # the id came in the client's x-request-id (False: generated here)


async def resolve(ctx: InferenceContext, model: str) -> ResolvedModel:
    """What ``model`` runs on for this caller, through the org-scoped cache: a base model the org is
    entitled to, or a fine-tuned name (only checked adapters are cached; misses are never cached)."""
    key = (ctx.principal.org_id, model)
    base_models, default, principal = ctx.settings.base_models, ctx.settings.default_base_models, ctx.principal
    return await ctx.models.get_or_load(
        key,
        lambda: ctx.db.run(lambda session: registry.resolve(session, principal, model, base_models, default)),
        keep=lambda target: target.adapter is None or target.adapter.checked,
    )


Body = ChatCompletionRequest | CompletionRequest | EmbeddingRequest


async def complete(ctx: InferenceContext, endpoint: Endpoint, body: Body) -> Response:
    target = await resolve(ctx, body.model)
    adapter = target.adapter
    if adapter is not None and not adapter.checked:  # a checkpoint: its job's final adapter's check
        report = await adapter_registry.ensure_checked(ctx.settings, ctx.db, ctx.engines, ctx.principal.org_id, adapter.checked_as or adapter.id)
        if not report["passed"]:
            raise adapter_registry.AdapterIncompatible(body.model, report.get("reason", "its compatibility check failed"))
    if adapter is not None and adapter.checked_as is not None:
        await adapter_registry.index_checkpoint(ctx.settings, ctx.engines, target.base, adapter)
    attempt: Attempt | None = None
    usage_id = ctx.request_id
    if ctx.client_request_id:  # an id the gateway generated can never come back in a retry: nothing to claim
        digest = body_hash(endpoint.value, body.model_dump(mode="json", exclude_unset=True))
        claimed = await begin(
            ctx.db, ctx.principal.org_id, ctx.request_id, digest, lease_s=ctx.settings.request_lease_s, ttl_s=ctx.settings.response_store_ttl_s
        )
        if isinstance(claimed, Stored):
            return _replay(claimed, body)
        attempt, usage_id = claimed, claimed.usage_id
    meter = Meter(ctx.usage, ctx.metrics, ctx.principal, usage_id, target, progress_interval_s=ctx.settings.usage_progress_interval_s)
    payload = body.upstream_payload()
    payload["model"] = target.name  # a versionless name runs on its active version's lora_name
    meter.open()
    try:
        # The attempt's own id: an engine may still run an earlier attempt of a request id that expired.
        upstream = await ctx.engines.open(target, endpoint.value, payload, request_id=usage_id)
    except BaseException as exc:
        await _failed(meter, attempt, exc)
        raise
    log.info("forwarding", model=target.name, base=target.base, engine=upstream.replica.url, stream=bool(body.stream))
    if body.stream:
        relay = StreamRelay(
            upstream,
            meter,
            wants_usage=body.wants_usage_chunk,
            wants_continuous=body.wants_continuous_usage,
            attempt=attempt,
            choices_per_prompt=body.choices_per_prompt if endpoint is Endpoint.completions else None,
        )
        return RelayResponse(relay)
    try:
        raw, answer = await _read_answer(upstream)
    except BaseException as exc:
        await _failed(meter, attempt, exc)
        raise
    # An embedding's usage has no completion tokens.
    counts = token_counts(answer.get("usage") if isinstance(answer, dict) else None, completion_optional=endpoint is Endpoint.embeddings)
    if counts is None:
        log.warning("engine response has no usage", model=target.name)
    prompt, completion = counts or (0, 0)
    meter.record(Outcome(prompt, completion, "ok" if counts else "usage_missing"))
    if attempt is not None:
        await attempt.succeed(raw)
    # Relayed as the engine sent it: the gateway adds nothing and loses nothing.
    return Response(raw, media_type="application/json")


async def _read_answer(upstream: Upstream) -> tuple[bytes, Any]:
    """The engine's whole (non-streamed) answer and its JSON, or the gateway's 502/504."""
    try:
        raw = await upstream.read()
    except UpstreamTimeout as exc:
        raise EngineTimeout("The inference engine did not answer in time.") from exc
    except UpstreamBroken as exc:
        raise EngineError("The inference engine stopped in the middle of the response.") from exc
    finally:
        await upstream.aclose()
    try:
        return raw, json.loads(raw)
    except ValueError as exc:
        raise EngineError("The inference engine sent a response that is not JSON.") from exc


def _failure_status(exc: BaseException) -> str:
    if isinstance(exc, EngineRejected):
        return "engine_rejected"
    if isinstance(exc, EngineTimeout):
        return "engine_timeout"
    if isinstance(exc, EngineError):
        return "engine_error"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "client_disconnected"
    return "gateway_error"  # a bug: logged as a 500 by the middleware


async def _failed(meter: Meter, attempt: Attempt | None, exc: BaseException) -> None:
    """A run that ended without an answer: recorded if it reached an engine (no tokens were counted:
    the engine refused, failed, or was cut off before answering), and its request id freed to run again."""
    if isinstance(exc, EngineUnavailable):
        meter.discard()  # no engine took it
    else:
        meter.record(Outcome(0, 0, _failure_status(exc)))
    if attempt is not None:
        await attempt.fail()


def _replay(stored: Stored, body: Body) -> Response:
    """The stored answer of the request id's successful run, as that run answered (not billed again)."""
    if not body.stream:
        return Response(stored.response, media_type="application/json")
    events = list(replay_events(stored.response, wants_usage=body.wants_usage_chunk, wants_continuous=body.wants_continuous_usage))

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
