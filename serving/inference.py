"""The inference service: one function per request that resolves the model, opens the request on an
engine replica, relays the answer and meters it.

Routes call ``complete``; everything between the parsed request and the HTTP response lives here.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

import structlog
from starlette.responses import Response

from scheduler.tenancy import Principal
from serving import adapter_registry, registry
from serving.cache import TTLCache
from serving.database import Database
from serving.engines import EnginePool, UpstreamBroken, UpstreamTimeout
from serving.errors import EngineError, EngineTimeout
from serving.metering import Meter, Outcome, token_counts
from serving.metrics import GatewayMetrics
from serving.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from serving.registry import ResolvedModel
from serving.settings import ServingSettings
from serving.streaming import RelayResponse, StreamRelay
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


async def resolve(ctx: InferenceContext, model: str) -> ResolvedModel:
    """What ``model`` runs on for this caller: base models without the database, fine-tuned names
    through the org-scoped cache (only checked adapters are cached; misses are never cached)."""
    if model in ctx.settings.base_models:
        return ResolvedModel(name=model, base=model)
    key = (ctx.principal.org_id, model)
    base_models, principal = ctx.settings.base_models, ctx.principal
    return await ctx.models.get_or_load(
        key,
        lambda: ctx.db.run(lambda session: registry.resolve(session, principal, model, base_models)),
        keep=lambda target: target.adapter is None or target.adapter.checked,
    )


async def complete(ctx: InferenceContext, endpoint: Endpoint, body: ChatCompletionRequest | CompletionRequest | EmbeddingRequest) -> Response:
    target = await resolve(ctx, body.model)
    adapter = target.adapter
    if adapter is not None and not adapter.checked:  # a checkpoint: its job's final adapter's check
        report = await adapter_registry.ensure_checked(ctx.settings, ctx.db, ctx.engines, ctx.principal.org_id, adapter.checked_as or adapter.id)
        if not report["passed"]:
            raise adapter_registry.AdapterIncompatible(body.model, report.get("reason", "its compatibility check failed"))
    if adapter is not None and adapter.checked_as is not None:
        await adapter_registry.index_checkpoint(ctx.settings, ctx.engines, target.base, adapter)
    meter = Meter(ctx.usage, ctx.metrics, ctx.principal, ctx.request_id, target)
    payload = body.upstream_payload()
    payload["model"] = target.name  # a versionless name runs on its active version's lora_name
    upstream = await ctx.engines.open(target, endpoint.value, payload, request_id=ctx.request_id)
    log.info("forwarding", model=target.name, base=target.base, engine=upstream.replica.url, stream=bool(body.stream))
    if body.stream:
        return RelayResponse(StreamRelay(upstream, meter, wants_usage=body.wants_usage_chunk, wants_continuous=body.wants_continuous_usage))
    try:
        raw = await upstream.read()
    except UpstreamTimeout as exc:
        raise EngineTimeout("The inference engine did not answer in time.") from exc
    except UpstreamBroken as exc:
        raise EngineError("The inference engine stopped in the middle of the response.") from exc
    finally:
        await upstream.aclose()
    try:
        answer = json.loads(raw)
    except ValueError as exc:
        raise EngineError("The inference engine sent a response that is not JSON.") from exc
    # An embedding's usage has no completion tokens.
    counts = token_counts(answer.get("usage") if isinstance(answer, dict) else None, completion_optional=endpoint is Endpoint.embeddings)
    if counts is None:
        log.warning("engine response has no usage", model=target.name)
    prompt, completion = counts or (0, 0)
    meter.record(Outcome(prompt, completion, "ok" if counts else "usage_missing"))
    # Relayed as the engine sent it: the gateway adds nothing and loses nothing.
    return Response(raw, media_type="application/json")
