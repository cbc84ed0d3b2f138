"""Which models a caller may use: the base models of the catalog its organization is entitled to
(``scheduler.entitlements``) plus the organization's fine-tuned adapters (the ``Adapter`` table) of those
bases and their jobs' checkpoints. Every lookup is scoped by the caller's org, and a model that exists
only in another org, or runs on a base the org is not entitled to, is indistinguishable from one that
does not exist (404 ``model_not_found``).

A checkpoint is a model as in OpenAI's API: ``{fine-tuned model}:ckpt-step-{N}`` (the job's checkpoint
list names it) runs the adapter saved at step N (``gpu_worker.checkpoint``: a PEFT folder), once the job's
final adapter passed its compatibility check, which covers its checkpoints (one configuration, one run).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler import entitlements
from scheduler.jobs import CHECKPOINT_MODEL, unnameable
from scheduler.models import Adapter, AdapterAlias, Checkpoint, Organization
from scheduler.tenancy import Principal
from serving import adapter_registry
from serving.errors import ModelNotFound
from serving.protocol import ModelPublic, ModelsPublic

FINE_TUNED_PREFIX = "ft:"
SYSTEM_OWNER = "system"


@dataclass(frozen=True)
class AdapterRef:
    id: str  # the version's fine-tuned model name; also the engine's ``lora_name``
    storage_key: str
    checked: bool = True  # False until the registry's compatibility check has run
    checked_as: str | None = None  # a checkpoint: the adapter whose check covers it (its job's final one)

    @property
    def lora_path(self) -> str:
        # Engines resolve "store:" paths against the shared object store (gpu_worker.storage).
        return "store:" + self.storage_key


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the client asked for; sent to the engine as ``model``
    base: str
    adapter: AdapterRef | None = None


def resolve(session: Session, principal: Principal, model: str, base_models: list[str], default_base_models: list[str] | None) -> ResolvedModel:
    """The model a request runs on, or ModelNotFound. ``default_base_models``: the platform default of
    ``scheduler.entitlements`` (None: every base model)."""
    if unnameable(model):
        raise ModelNotFound(model)
    entitled = functools.partial(entitlements.is_entitled, session, principal.org_id, base_models=base_models, default=default_base_models)
    if model in base_models:
        if not entitled(model):
            raise ModelNotFound(model)
        return ResolvedModel(name=model, base=model)
    if (found := checkpoint(session, principal.org_id, model)) is not None:
        row, ckpt = found
        if not entitled(row.base_model):
            raise ModelNotFound(model)
        _servable(model, row)
        ref = AdapterRef(id=model, storage_key=ckpt.storage_key, checked=_checked(row), checked_as=row.id)
        return ResolvedModel(name=model, base=row.base_model, adapter=ref)
    if model.startswith(FINE_TUNED_PREFIX):
        # A version id (pinned) or a versionless name (its active version); see serving.adapter_registry.
        row = adapter_registry.find(session, principal.org_id, model)
        if row is not None and entitled(row.base_model):
            _servable(model, row)
            ref = AdapterRef(id=row.id, storage_key=row.storage_key, checked=_checked(row))
            return ResolvedModel(name=row.id, base=row.base_model, adapter=ref)
    raise ModelNotFound(model)


def _checked(row: Adapter) -> bool:
    return adapter_registry.verdict(row.compatibility) is not None


def _servable(model: str, row: Adapter) -> None:
    report = adapter_registry.verdict(row.compatibility)
    if report is not None and not report.get("passed"):
        raise adapter_registry.AdapterIncompatible(model, report.get("reason", "its compatibility check failed"))


def checkpoint(session: Session, org_id: str, model: str) -> tuple[Adapter, Checkpoint] | None:
    """A checkpoint model's (final adapter, checkpoint), if ``model`` names one of the org's: a live
    adapter version's job's checkpoint at that step."""
    match = CHECKPOINT_MODEL.match(model)
    if match is None:
        return None
    row = adapter_registry.find(session, org_id, match[1])
    if row is None or row.id != match[1]:  # a version id, not a versionless name
        return None
    ckpt = session.scalar(select(Checkpoint).where(Checkpoint.job_id == row.job_id, Checkpoint.step == int(match[2])))
    return (row, ckpt) if ckpt is not None else None


def list_models(session: Session, principal: Principal, base_models: list[str], default_base_models: list[str] | None) -> ModelsPublic:
    entitled = entitlements.entitled_bases(session, principal.org_id, base_models, default_base_models)
    # The catalog comes from configuration, which has no creation time: 0 says "unknown" honestly.
    data = [ModelPublic(id=name, created=0, owned_by=SYSTEM_OWNER) for name in entitled]
    rows = session.execute(
        select(Adapter.id, Adapter.created_at, Adapter.compatibility, Organization.name)
        .join(Organization, Organization.id == Adapter.org_id)
        .where(Adapter.org_id == principal.org_id, Adapter.deleted_at.is_(None), Adapter.base_model.in_(entitled))
        .order_by(Adapter.created_at, Adapter.id)
    )
    # A version that failed its check is not listed; one not checked yet is, marked (its first request
    # checks it), as OpenAI lists a fine-tuned model as soon as its job succeeded.
    listed = [(id, created, org_name, _compatibility(report)) for id, created, report, org_name in rows]
    data += [ModelPublic(id=id, created=int(created.timestamp()), owned_by=org_name, compatibility=state)
             for id, created, org_name, state in listed if state != "failed"]
    aliases = session.execute(
        select(AdapterAlias.name, AdapterAlias.updated_at, Organization.name, Adapter.compatibility)
        .join(Organization, Organization.id == AdapterAlias.org_id)
        .join(Adapter, Adapter.id == AdapterAlias.adapter_id)
        .where(AdapterAlias.org_id == principal.org_id, Adapter.base_model.in_(entitled))
        .order_by(AdapterAlias.name)
    )
    data += [ModelPublic(id=name, created=int(updated.timestamp()), owned_by=org_name, compatibility=_compatibility(report))
             for name, updated, org_name, report in aliases]
    return ModelsPublic(data=data)


def _compatibility(report: dict | None) -> str:
    report = adapter_registry.verdict(report)
    return "unchecked" if report is None else "passed" if report.get("passed") else "failed"


def get_model(session: Session, principal: Principal, model: str, base_models: list[str], default_base_models: list[str] | None) -> ModelPublic:
    entitled = functools.partial(entitlements.is_entitled, session, principal.org_id, base_models=base_models, default=default_base_models)
    if model in base_models:
        if not entitled(model):
            raise ModelNotFound(model)
        return ModelPublic(id=model, created=0, owned_by=SYSTEM_OWNER)
    if (found := checkpoint(session, principal.org_id, model)) is not None:
        row, created = found[0], found[1].created_at
    else:
        row = adapter_registry.find(session, principal.org_id, model) if model.startswith(FINE_TUNED_PREFIX) else None
        created = row.created_at if row is not None else None
    if row is None or not entitled(row.base_model):
        raise ModelNotFound(model)
    org = session.get(Organization, row.org_id)
    return ModelPublic(id=model, created=int(created.timestamp()), owned_by=org.name, compatibility=_compatibility(row.compatibility))
