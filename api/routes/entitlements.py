"""/v1/organizations/{org}/entitlements: which base models an organization may call; the platform
operator's admins grant (PUT) and revoke (DELETE) them (api.services.entitlements). The gateway applies a
change within its model cache TTL (TUNEFORGE_MODEL_CACHE_TTL_S)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentPrincipal, SessionDep, SettingsDep
from api.services import entitlements as service

router = APIRouter(prefix="/v1/organizations", tags=["entitlements"])


@router.get("/{org}/entitlements", response_model=service.EntitlementsPublic)
def list_entitlements(org: str, session: SessionDep, principal: CurrentPrincipal, settings: SettingsDep) -> service.EntitlementsPublic:
    return service.list_entitlements(session, principal, org, settings.base_models, settings.default_base_models)


# ``:path`` because hub ids hold slashes ("meta-llama/Llama-3.2-1B").
@router.put("/{org}/entitlements/{model:path}", response_model=service.EntitlementPublic)
def grant(org: str, model: str, session: SessionDep, principal: CurrentPrincipal, settings: SettingsDep) -> service.EntitlementPublic:
    return service.set_entitlement(session, principal, org, model, True, settings.base_models, settings.default_base_models)


@router.delete("/{org}/entitlements/{model:path}", response_model=service.EntitlementPublic)
def revoke(org: str, model: str, session: SessionDep, principal: CurrentPrincipal, settings: SettingsDep) -> service.EntitlementPublic:
    return service.set_entitlement(session, principal, org, model, False, settings.base_models, settings.default_base_models)
