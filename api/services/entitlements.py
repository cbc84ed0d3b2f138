"""Base-model entitlements of an organization (``scheduler.entitlements``): which base models of the
catalog it may call, and the platform operator's grants and revocations.

Entitlements are the platform's to give, not a tenant's to take: only admin keys of the operator's
organization (``default``, the bootstrap key's) grant or revoke, for any organization. An organization's
own admins may read its entitlements. Anyone else is told the organization does not exist (404), as for
any other tenant's resource, or, asking about their own organization without the admin role, 403.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import NotFound, PermissionDenied
from scheduler import entitlements
from scheduler.jobs import unnameable
from scheduler.models import Organization, Role
from scheduler.tenancy import DEFAULT_ORG, Principal


class EntitlementPublic(BaseModel):
    object: Literal["organization.entitlement"] = "organization.entitlement"
    organization: str  # the organization's id
    model: str  # a base model of the catalog
    entitled: bool
    # "default": the platform default applies (TUNEFORGE_DEFAULT_BASE_MODELS); "granted" / "revoked": the
    # organization's own entry, whatever the default says.
    source: Literal["default", "granted", "revoked"]


class EntitlementsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[EntitlementPublic]


def _is_operator(session: Session, principal: Principal) -> bool:
    if not principal.has(Role.admin):
        return False
    org = session.get(Organization, principal.org_id)
    return org is not None and org.name == DEFAULT_ORG


def _organization(session: Session, principal: Principal, org: str, *, change: bool) -> Organization:
    """The organization ``org`` (its id or its name) if the principal may read (or ``change``) its
    entitlements."""
    # no organization is named with a control character (PostgreSQL refuses a NUL as a query value: a 500)
    row = None if unnameable(org) else session.get(Organization, org) or session.scalar(select(Organization).where(Organization.name == org))
    operator = _is_operator(session, principal)
    if row is None or (row.id != principal.org_id and not operator):
        raise NotFound(f"No organization found with id '{org}'.", param="organization", code="organization_not_found")
    if operator:
        return row
    if change:
        raise PermissionDenied(
            "Base-model entitlements are granted by the platform operator: only admin keys of its organization may change them.",
            code="insufficient_permissions",
        )
    if not principal.has(Role.admin):
        raise PermissionDenied("Only admins can read the organization's entitlements.", code="insufficient_permissions")
    return row


def _public(org_id: str, entry: entitlements.Entitlement) -> EntitlementPublic:
    return EntitlementPublic(organization=org_id, model=entry.base_model, entitled=entry.entitled, source=entry.source)


def list_entitlements(session: Session, principal: Principal, org: str, base_models: list[str], default: list[str] | None) -> EntitlementsPublic:
    row = _organization(session, principal, org, change=False)
    return EntitlementsPublic(data=[_public(row.id, e) for e in entitlements.entitlements(session, row.id, base_models, default)])


def set_entitlement(
    session: Session, principal: Principal, org: str, model: str, entitled: bool, base_models: list[str], default: list[str] | None
) -> EntitlementPublic:
    """Grant (``entitled``) or revoke a catalog base model for the organization; idempotent."""
    row = _organization(session, principal, org, change=True)
    if model not in base_models:
        raise NotFound(f"The base model '{model}' is not in this platform's catalog (TUNEFORGE_BASE_MODELS).", param="model", code="model_not_found")
    entitlements.set_entitlement(session, row.id, model, entitled)
    session.commit()
    [entry] = [e for e in entitlements.entitlements(session, row.id, base_models, default) if e.base_model == model]
    return _public(row.id, entry)
