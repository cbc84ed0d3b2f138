"""The adapter registry's admin routes: list an org's fine-tuned models with their versions, run the
compatibility check, promote a version, roll back, delete (and unload everywhere). Reading is open to
every role of the org; changing needs the admin role. Logic lives in ``serving.adapter_registry``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from gpu_worker.storage import open_store

from scheduler.models import Role
from scheduler.tenancy import Principal
from serving import adapter_registry
from serving.deps import CurrentPrincipal, DatabaseDep, EnginesDep, SettingsDep
from serving.errors import PermissionDenied
from serving.vllm_plugin import index as lora_index
from serving.protocol import AdapterChange, AdapterPromote, AdaptersPublic

router = APIRouter(prefix="/v1/adapters")


def _require_admin(principal: Principal) -> None:
    if not principal.has(Role.admin):
        raise PermissionDenied("Changing the adapter registry needs an admin key of the organization.")


def _forget_models(request: Request, principal: Principal) -> None:
    """The org's names may resolve differently now: drop this gateway's cached resolutions at once."""
    request.app.state.model_cache.discard_where(lambda key: key[0] == principal.org_id)


@router.get("", response_model=AdaptersPublic)
async def list_adapters(principal: CurrentPrincipal, db: DatabaseDep) -> AdaptersPublic:
    return await db.run(lambda s: adapter_registry.list_adapters(s, principal))


# ``:path`` because model names hold slashes ("ft:org/model:..."); the suffix route is matched first.
@router.post("/{model:path}/check")
async def check(
    model: str, request: Request, principal: CurrentPrincipal, db: DatabaseDep, engines: EnginesDep, settings: SettingsDep, force: bool = False
) -> dict:
    """The adapter's verdict, checking it if it has none; ``?force=true`` checks it again and replaces the
    verdict (a version that no longer passes stops serving and is unloaded everywhere)."""
    _require_admin(principal)
    row = await db.run(lambda s: adapter_registry.find_runnable(s, principal.org_id, model, settings.base_models, settings.default_base_models))
    if row is None:
        raise adapter_registry.ModelNotFound(model)
    report = await adapter_registry.ensure_checked(settings, db, engines, principal.org_id, row, force=force)
    _forget_models(request, principal)
    return report


@router.post("/{name:path}/promote", response_model=AdapterChange)
async def promote(name: str, body: AdapterPromote, request: Request, principal: CurrentPrincipal, db: DatabaseDep) -> AdapterChange:
    _require_admin(principal)
    previous = await db.run(lambda s: adapter_registry.promote(s, principal, name, body.model))
    _forget_models(request, principal)
    return AdapterChange(name=name, previous=previous, active=body.model)


@router.post("/{name:path}/rollback", response_model=AdapterChange)
async def rollback(name: str, request: Request, principal: CurrentPrincipal, db: DatabaseDep) -> AdapterChange:
    _require_admin(principal)
    current, active = await db.run(lambda s: adapter_registry.rollback(s, principal, name))
    _forget_models(request, principal)
    return AdapterChange(name=name, previous=current, active=active)


@router.delete("/{model:path}")
async def delete(model: str, request: Request, principal: CurrentPrincipal, db: DatabaseDep, engines: EnginesDep, settings: SettingsDep) -> dict:
    versions = await delete_everywhere(model, request, principal, db, engines, settings)
    return {"id": model, "object": "adapter.deleted", "deleted": True, "versions": versions}


async def delete_everywhere(model: str, request: Request, principal: Principal, db, engines, settings) -> list[str]:
    """Delete a version (its id) or a name with all its versions, and unload them everywhere (this route,
    and OpenAI's ``DELETE /v1/models/{model}``): the version ids deleted. Admin keys only."""
    _require_admin(principal)

    def delete(session):
        versions = adapter_registry.delete(session, principal, model)
        return versions, adapter_registry.checkpoint_models(session, principal.org_id, [v for _, v in versions])

    deleted, checkpoints = await db.run(delete)
    _forget_models(request, principal)
    # The database no longer resolves them (nor their checkpoints), so no gateway sends new requests; now
    # free the engines.
    store = open_store(settings.storage_url)
    for base, name in deleted + checkpoints:
        await asyncio.to_thread(lora_index.withdraw, store, name)  # resolvers stop finding it
        await engines.unload_everywhere(base, name)
    return [adapter_id for _, adapter_id in deleted]
