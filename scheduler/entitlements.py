"""Which base models an organization may call: its base-model entitlements.

Every base model of the catalog (``Settings.base_models``) is entitled to an organization by the
platform default (``Settings.default_base_models``: unset means every base model, as before entitlements
existed, so the embedded demo needs no setup; a list means only those), unless the organization has an
entry of its own for that base: a grant (entitled even outside the default) or a revocation (not
entitled even inside it). A base model that is not in the catalog is never entitled, whatever its entry.

The gateway enforces it (``serving.registry``): a base the caller's org is not entitled to is a 404
``model_not_found`` on inference and on ``/v1/models`` list and retrieve, exactly as a model that does not
exist; so are the org's fine-tuned models of that base and their checkpoints (they run on it). They stay
in the adapter registry (``/v1/adapters``: listed, deletable) and serve again once the base is granted.
The platform operator's admins change entries through the API (``api.services.entitlements``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.models import BaseModelEntitlement, utcnow

Source = Literal["default", "granted", "revoked"]


@dataclass(frozen=True)
class Entitlement:
    base_model: str
    entitled: bool
    source: Source  # "default": no entry of the org's own for this base


def _entries(session: Session, org_id: str) -> dict[str, bool]:
    rows = session.execute(select(BaseModelEntitlement.base_model, BaseModelEntitlement.entitled).where(BaseModelEntitlement.org_id == org_id))
    return dict(rows.all())


def by_default(base_model: str, default: Iterable[str] | None) -> bool:
    return default is None or base_model in default


def entitlements(session: Session, org_id: str, base_models: list[str], default: list[str] | None) -> list[Entitlement]:
    """Each catalog base model and whether the org may call it, with why."""
    entries = _entries(session, org_id)
    out = []
    for base in base_models:
        if base in entries:
            out.append(Entitlement(base, entries[base], "granted" if entries[base] else "revoked"))
        else:
            out.append(Entitlement(base, by_default(base, default), "default"))
    return out


def entitled_bases(session: Session, org_id: str, base_models: list[str], default: list[str] | None) -> list[str]:
    """The catalog base models the org may call, in catalog order."""
    return [e.base_model for e in entitlements(session, org_id, base_models, default) if e.entitled]


def is_entitled(session: Session, org_id: str, base_model: str, base_models: list[str], default: list[str] | None) -> bool:
    if base_model not in base_models:
        return False
    entitled = session.scalar(
        select(BaseModelEntitlement.entitled).where(BaseModelEntitlement.org_id == org_id, BaseModelEntitlement.base_model == base_model)
    )
    return by_default(base_model, default) if entitled is None else entitled


def set_entitlement(session: Session, org_id: str, base_model: str, entitled: bool) -> None:
    """Grant (``entitled``) or revoke the base for the org, whatever the default says (idempotent)."""
    row = session.get(BaseModelEntitlement, (org_id, base_model))
    if row is None:
        session.add(BaseModelEntitlement(org_id=org_id, base_model=base_model, entitled=entitled))
    else:
        row.entitled, row.updated_at = entitled, utcnow()
    session.flush()
