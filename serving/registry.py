"""Which models a caller may use: the base-model catalog plus the caller organization's fine-tuned
adapters (the ``Adapter`` table). Every lookup is scoped by the caller's org, and a model that exists
only in another org is indistinguishable from one that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.models import Adapter, Organization
from scheduler.tenancy import Principal
from serving.errors import ModelNotFound
from serving.protocol import ModelPublic, ModelsPublic

FINE_TUNED_PREFIX = "ft:"
SYSTEM_OWNER = "system"


@dataclass(frozen=True)
class AdapterRef:
    id: str  # the fine-tuned model name; also the engine's ``lora_name``
    storage_key: str

    @property
    def lora_path(self) -> str:
        # Engines resolve "store:" paths against the shared object store (gpu_worker.storage).
        return "store:" + self.storage_key


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the client asked for; sent to the engine as ``model``
    base: str
    adapter: AdapterRef | None = None


def resolve(session: Session, principal: Principal, model: str, base_models: list[str]) -> ResolvedModel:
    """The model a request runs on, or ModelNotFound."""
    if model in base_models:
        return ResolvedModel(name=model, base=model)
    if model.startswith(FINE_TUNED_PREFIX):
        row = session.scalar(select(Adapter).where(Adapter.id == model, Adapter.org_id == principal.org_id))
        if row is not None:
            return ResolvedModel(name=row.id, base=row.base_model, adapter=AdapterRef(id=row.id, storage_key=row.storage_key))
    raise ModelNotFound(model)


def list_models(session: Session, principal: Principal, base_models: list[str]) -> ModelsPublic:
    # The catalog comes from configuration, which has no creation time: 0 says "unknown" honestly.
    data = [ModelPublic(id=name, created=0, owned_by=SYSTEM_OWNER) for name in base_models]
    rows = session.execute(
        select(Adapter.id, Adapter.created_at, Organization.name)
        .join(Organization, Organization.id == Adapter.org_id)
        .where(Adapter.org_id == principal.org_id)
        .order_by(Adapter.created_at, Adapter.id)
    )
    data += [ModelPublic(id=id, created=int(created.timestamp()), owned_by=org_name) for id, created, org_name in rows]
    return ModelsPublic(data=data)


def get_model(session: Session, principal: Principal, model: str, base_models: list[str]) -> ModelPublic:
    if model in base_models:
        return ModelPublic(id=model, created=0, owned_by=SYSTEM_OWNER)
    row = session.execute(
        select(Adapter.id, Adapter.created_at, Organization.name)
        .join(Organization, Organization.id == Adapter.org_id)
        .where(Adapter.id == model, Adapter.org_id == principal.org_id)
    ).first()
    if row is None:
        raise ModelNotFound(model)
    return ModelPublic(id=row.id, created=int(row.created_at.timestamp()), owned_by=row.name)
