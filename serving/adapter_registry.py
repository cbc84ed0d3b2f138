"""The adapter registry's life cycle: the compatibility check that turns a trained adapter into a
servable version, versions of one fine-tuned model name, promote / rollback, and delete.

A job registers its adapter row (``scheduler.agent``) with ``compatibility`` unset. The check runs once,
explicitly (``POST /v1/adapters/{id}/check``) or on the adapter's first request: the static rules on the
files (``serving.compatibility``), then an engine replica of its base loads it and reproduces the
training side's log-probabilities. A passed check makes the row version N of its versionless name
``ft:{base}:{org}:{suffix}``; the first version becomes that name's active version, later ones wait for
a promote. A request names either a version (its full id, pinned) or the versionless name (the active
version). Delete marks the row deleted, moves the name back to the previous version, and tells every
replica to unload it. Everything is scoped by the caller's org; another org's adapter is a 404.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gpu_worker.storage import open_store
from scheduler.jobs import checkpoint_model_name
from scheduler.models import Adapter, AdapterAlias, Checkpoint, utcnow
from scheduler.tenancy import Principal
from serving.compatibility import Incompatible, check_files
from serving.errors import InvalidRequest, ModelNotFound, ServingError
from serving.vllm_plugin import check as vllm_check
from serving.vllm_plugin import index as lora_index
from serving.protocol import AdapterPublic, AdaptersPublic, AdapterVersionPublic
from serving.settings import ServingSettings

if TYPE_CHECKING:  # serving.engines imports the registry's types
    from serving.engines import EnginePool

log = structlog.get_logger(__name__)
_check_locks: dict[str, asyncio.Lock] = {}


class AdapterIncompatible(ServingError):
    status_code = 400
    type = "invalid_request_error"
    code = "adapter_incompatible"

    def __init__(self, model: str, reason: str):
        super().__init__(f"The model `{model}` cannot be served: {reason}", param="model")


def versionless_name(adapter_id: str) -> str:
    """"ft:{base}:{org}:{suffix}:{job}" -> "ft:{base}:{org}:{suffix}"."""
    return adapter_id.rsplit(":", 1)[0]


def find(session: Session, org_id: str, model: str) -> Adapter | None:
    """The live adapter row ``model`` names in the org: a version id, or a name's active version."""
    row = session.get(Adapter, model)
    if row is None or row.org_id != org_id:
        alias = session.get(AdapterAlias, (org_id, model))
        row = session.get(Adapter, alias.adapter_id) if alias else None
    if row is None or row.org_id != org_id or row.deleted_at is not None:
        return None
    return row


# --- the check ------------------------------------------------------------------------------------


async def ensure_checked(settings: ServingSettings, db, engines: EnginePool, org_id: str, adapter_id: str) -> dict[str, Any]:
    """The adapter's compatibility report, running the check if it never ran (once per adapter at a
    time in this process; the stored report is what every later request reads)."""
    lock = _check_locks.setdefault(adapter_id, asyncio.Lock())
    async with lock:
        row = await db.run(lambda s: _snapshot(s, org_id, adapter_id))
        if row is None:
            raise ModelNotFound(adapter_id)
        if row["compatibility"] is not None:
            return row["compatibility"]
        report = await run_check(settings, engines, row["base_model"], row["storage_key"], adapter_id)
        await db.run(lambda s: record_check(s, org_id, adapter_id, report))
        if report["passed"]:  # vLLM replicas find it by name from now on (serving.vllm_plugin.resolver)
            entry = lora_index.IndexEntry(name=adapter_id, base_model=row["base_model"], key=row["storage_key"])
            await asyncio.to_thread(lora_index.publish, open_store(settings.storage_url), entry)
        log.info("adapter checked", adapter=adapter_id, passed=report["passed"], reason=report.get("reason"))
        return report


def _snapshot(session: Session, org_id: str, adapter_id: str) -> dict | None:
    row = session.get(Adapter, adapter_id)
    if row is None or row.org_id != org_id or row.deleted_at is not None:
        return None
    return {"base_model": row.base_model, "storage_key": row.storage_key, "compatibility": row.compatibility}


async def run_check(settings: ServingSettings, engines: EnginePool, base: str, storage_key: str, adapter_id: str) -> dict[str, Any]:
    store = open_store(settings.storage_url)
    try:
        facts = await asyncio.to_thread(
            check_files, store, storage_key, max_rank=settings.max_lora_rank, supported_modules=settings.supported_target_modules
        )
    except Incompatible as exc:
        return {"passed": False, "reason": exc.reason, "code": exc.code}
    if engines.resolves_adapters:
        return await _check_on_vllm(engines, store, base, storage_key, adapter_id, facts)
    status, body = await engines.check_adapter(base, "store:" + storage_key)
    if status == 404:
        reason = "the engine has no adapter check route (a vLLM engine needs TUNEFORGE_ENGINE_KIND=vllm)"
        return {"passed": False, "static": facts, "reason": reason, "code": "engine_misconfigured"}
    if status != 200:
        return _refused(facts, status, body)
    return _logit_verdict(facts, body, body.get("logits", {}))


async def _check_on_vllm(engines: EnginePool, store, base: str, storage_key: str, adapter_id: str, facts: dict) -> dict[str, Any]:
    """vLLM loads an adapter only through its resolver, which reads the index: publish the entry, score
    the reference prompts with the adapter as the model, and take the entry back (and the adapter off
    every replica) if the check fails."""
    entry = lora_index.IndexEntry(name=adapter_id, base_model=base, key=storage_key)
    await asyncio.to_thread(lora_index.publish, store, entry)
    try:
        prompts = await asyncio.to_thread(vllm_check.read_reference, store, storage_key)
        if prompts is None:  # nothing to compare with: the adapter must still load and answer
            status, body = await engines.post_json(
                base, "/v1/completions", {"model": adapter_id, "prompt": "Hello", "max_tokens": 1}, what="check the adapter", adapter_id=adapter_id
            )
            body = {"engine": "vllm", "logits": {"status": "no_reference"}} if status == 200 else body
        else:
            status, body = await vllm_check.check_on_vllm(engines, base, adapter_id, prompts)
        report = _logit_verdict(facts, body, body["logits"]) if status == 200 else _refused(facts, status, body)
    except vllm_check.BadReference as exc:
        report = {"passed": False, "static": facts, "reason": str(exc), "code": "bad_reference"}
    except BaseException:
        await _withdraw(engines, store, base, adapter_id)
        raise
    if not report["passed"]:
        await _withdraw(engines, store, base, adapter_id)
    return report


# checkpoint models this process put in the adapter index (serving.registry: a checkpoint shares its final
# adapter's check, and a vLLM replica finds an adapter only through the index)
_indexed_checkpoints: set[str] = set()


async def index_checkpoint(settings: ServingSettings, engines: EnginePool, base: str, ref) -> None:
    """Publish a checkpoint model's index entry for vLLM replicas, once per gateway process (idempotent)."""
    if not engines.resolves_adapters or ref.id in _indexed_checkpoints:
        return
    entry = lora_index.IndexEntry(name=ref.id, base_model=base, key=ref.storage_key)
    await asyncio.to_thread(lora_index.publish, open_store(settings.storage_url), entry)
    _indexed_checkpoints.add(ref.id)


def checkpoint_models(session: Session, org_id: str, adapter_ids: list[str]) -> list[tuple[str, str]]:
    """(base model, name) of every checkpoint model of these adapter versions' jobs."""
    rows = session.execute(
        select(Adapter.id, Adapter.base_model, Checkpoint.step)
        .join(Checkpoint, Checkpoint.job_id == Adapter.job_id)
        .where(Adapter.org_id == org_id, Adapter.id.in_(adapter_ids))
    ).all()
    return [(base, checkpoint_model_name(adapter_id, step)) for adapter_id, base, step in rows]


async def _withdraw(engines: EnginePool, store, base: str, adapter_id: str) -> None:
    await asyncio.to_thread(lora_index.withdraw, store, adapter_id)
    await engines.unload_everywhere(base, adapter_id)


def _refused(facts: dict, status: int, body: Any) -> dict[str, Any]:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    return {"passed": False, "static": facts, "reason": str(error.get("message", body)), "code": error.get("code") if isinstance(error.get("code"), str) else "engine_refused"}


def _logit_verdict(facts: dict, body: dict, logits: dict) -> dict[str, Any]:
    if logits.get("status") == "mismatch":
        reason = f"the engine does not reproduce the training-side log-probabilities (max |Δ| {logits.get('max_abs_diff'):.3g})"
        return {"passed": False, "static": facts, "engine": body, "logits": logits, "reason": reason, "code": "logits_mismatch"}
    return {"passed": True, "static": facts, "engine": body, "logits": logits}


def record_check(session: Session, org_id: str, adapter_id: str, report: dict[str, Any]) -> None:
    row = session.get(Adapter, adapter_id)
    if row is None or row.org_id != org_id or row.compatibility is not None:
        return  # deleted meanwhile, or another gateway recorded it first
    row.compatibility, row.checked_at = report, utcnow()
    if not report["passed"]:
        return
    row.name = versionless_name(row.id)
    latest = session.scalar(select(func.max(Adapter.version)).where(Adapter.org_id == org_id, Adapter.name == row.name))
    row.version = (latest or 0) + 1
    if session.get(AdapterAlias, (org_id, row.name)) is None:
        session.add(AdapterAlias(org_id=org_id, name=row.name, adapter_id=row.id, history=[]))
    session.flush()


# --- versions -------------------------------------------------------------------------------------


def _alias(session: Session, principal: Principal, name: str) -> AdapterAlias:
    alias = session.get(AdapterAlias, (principal.org_id, name))
    if alias is None:
        raise ModelNotFound(name)
    return alias


def list_adapters(session: Session, principal: Principal) -> AdaptersPublic:
    rows = session.scalars(
        select(Adapter).where(Adapter.org_id == principal.org_id, Adapter.deleted_at.is_(None)).order_by(Adapter.created_at, Adapter.id)
    ).all()
    aliases = {a.name: a.adapter_id for a in session.scalars(select(AdapterAlias).where(AdapterAlias.org_id == principal.org_id))}
    groups: dict[str, list[Adapter]] = {}
    for row in rows:
        groups.setdefault(row.name or versionless_name(row.id), []).append(row)
    data = []
    for name, versions in groups.items():
        active = aliases.get(name)
        data.append(
            AdapterPublic(
                id=name,
                base_model=versions[0].base_model,
                active_version=next((v.id for v in versions if v.id == active), None),
                versions=[_version_public(v, active) for v in versions],
            )
        )
    return AdaptersPublic(data=data)


def _version_public(row: Adapter, active: str | None) -> AdapterVersionPublic:
    report = row.compatibility
    status = "unchecked" if report is None else ("active" if row.id == active else "ready") if report.get("passed") else "incompatible"
    return AdapterVersionPublic(
        id=row.id, version=row.version, status=status, created=int(row.created_at.timestamp()), compatibility=report
    )


def promote(session: Session, principal: Principal, name: str, model: str) -> str:
    """Make version ``model`` (an id of the name) active; returns the version it replaced."""
    alias = _alias(session, principal, name)
    row = find(session, principal.org_id, model)
    if row is None or row.name != name:
        raise InvalidRequest(f"`{model}` is not a version of `{name}`.", param="model")
    if not (row.compatibility or {}).get("passed"):
        raise AdapterIncompatible(model, "its compatibility check has not passed")
    previous = alias.adapter_id
    if previous != row.id:
        alias.history = [*alias.history, previous]
        alias.adapter_id, alias.updated_at = row.id, utcnow()
    return previous


def rollback(session: Session, principal: Principal, name: str) -> tuple[str, str]:
    """Return the name to the version active before the current one; (from, to)."""
    alias = _alias(session, principal, name)
    history = list(alias.history)
    while history:
        candidate = history.pop()
        row = session.get(Adapter, candidate)
        if row is not None and row.deleted_at is None:
            current = alias.adapter_id
            alias.adapter_id, alias.history, alias.updated_at = candidate, history, utcnow()
            return current, candidate
    raise InvalidRequest(f"`{name}` has no earlier version to roll back to.", param="name", code="no_previous_version")


def delete(session: Session, principal: Principal, model: str) -> list[tuple[str, str]]:
    """Delete a version (its id) or a whole name with all its versions: [(base, version id)] deleted."""
    alias = session.get(AdapterAlias, (principal.org_id, model))
    if alias is not None:
        rows = session.scalars(select(Adapter).where(Adapter.org_id == principal.org_id, Adapter.name == model, Adapter.deleted_at.is_(None))).all()
        session.delete(alias)
    else:
        row = session.get(Adapter, model)
        if row is None or row.org_id != principal.org_id or row.deleted_at is not None:
            raise ModelNotFound(model)
        rows = [row]
        alias = session.get(AdapterAlias, (principal.org_id, row.name)) if row.name else None
        if alias is not None:
            alias.history = [h for h in alias.history if h != row.id]
            if alias.adapter_id == row.id:
                # Back to the version active before it; failing that the newest other ready version.
                fallback = alias.history[-1] if alias.history else session.scalar(
                    select(Adapter.id)
                    .where(Adapter.org_id == principal.org_id, Adapter.name == row.name, Adapter.id != row.id, Adapter.deleted_at.is_(None))
                    .order_by(Adapter.version.desc())
                    .limit(1)
                )
                if fallback is None:
                    session.delete(alias)
                else:
                    alias.adapter_id, alias.history, alias.updated_at = fallback, alias.history[:-1] if alias.history else [], utcnow()
    now = utcnow()
    for row in rows:
        row.deleted_at = now
    session.flush()
    return [(row.base_model, row.id) for row in rows]
