"""The gateway's HTTP routes (OpenAI's API): each reads the request, calls one service function and
returns its answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from serving import inference, registry
from serving.adapter_routes import delete_everywhere
from serving.deps import CurrentPrincipal, DatabaseDep, EnginesDep, InferenceContextDep, MetricsDep, SettingsDep
from serving.errors import PermissionDenied
from serving.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelPublic, ModelsPublic

router = APIRouter()


@router.get("/v1/models", response_model=ModelsPublic)
async def list_models(principal: CurrentPrincipal, db: DatabaseDep, settings: SettingsDep) -> ModelsPublic:
    return await db.run(lambda session: registry.list_models(session, principal, settings.base_models, settings.default_base_models))


# ``:path`` because hub ids contain slashes ("org/model").
@router.get("/v1/models/{model:path}", response_model=ModelPublic)
async def retrieve_model(model: str, principal: CurrentPrincipal, db: DatabaseDep, settings: SettingsDep) -> ModelPublic:
    return await db.run(lambda session: registry.get_model(session, principal, model, settings.base_models, settings.default_base_models))


# OpenAI's ``models.delete``: a fine-tuned model, one version (``ft:…:{job}``) or a name with all its versions,
# deleted and unloaded as ``DELETE /v1/adapters/{model}`` does; a base model is not the tenant's to delete.
@router.delete("/v1/models/{model:path}")
async def delete_model(model: str, request: Request, principal: CurrentPrincipal, db: DatabaseDep, engines: EnginesDep,
                       settings: SettingsDep) -> dict:
    if model in settings.base_models:
        # one the org is not entitled to reads as a model that does not exist, as on every other route
        await db.run(lambda session: registry.get_model(session, principal, model, settings.base_models, settings.default_base_models))
        raise PermissionDenied(f"'{model}' is a base model: only fine-tuned models can be deleted.", param="model")
    await delete_everywhere(model, request, principal, db, engines, settings)
    return {"id": model, "object": "model", "deleted": True}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, ctx: InferenceContextDep) -> Response:
    return await inference.complete(ctx, inference.Endpoint.chat, body)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, ctx: InferenceContextDep) -> Response:
    return await inference.complete(ctx, inference.Endpoint.completions, body)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, ctx: InferenceContextDep) -> Response:
    return await inference.complete(ctx, inference.Endpoint.embeddings, body)


@router.get("/metrics", include_in_schema=False)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)
