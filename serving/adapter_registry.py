"""The adapter registry's life cycle: the compatibility check that turns a trained adapter into a
servable version, versions of one fine-tuned model name, promote / rollback, and delete.

A job registers its adapter row (``scheduler.agent``) with ``compatibility`` unset. The check runs
explicitly (``POST /v1/adapters/{id}/check``, again with ``?force=true``) or on the adapter's first
request: the static rules on the files (``serving.compatibility``), then an engine replica of its base
loads it and reproduces the training side's log-probabilities. Only verdicts on the adapter are stored
(a broken rule, a logits mismatch, a missing reference, the engine's 400/422 refusal of the adapter); an
engine that cannot answer (5xx, no check route, no replica, a timeout) is a 503 with ``Retry-After`` and
leaves the adapter unchecked. An adapter trained here (its manifest names its job) must reproduce its
reference; one without a reference passes only when imported (no platform manifest), on loading and
answering alone, and its report says ``"reference": "none: imported adapter"``.
A passed check makes the row version N of its versionless name
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
from scheduler import entitlements
from scheduler.jobs import checkpoint_model_name
from scheduler.models import Adapter, AdapterAlias, Checkpoint, utcnow
from scheduler.tenancy import Principal
from serving.compatibility import Incompatible, check_files
from serving.errors import EngineError, EngineTimeout, EngineUnavailable, InvalidRequest, ModelNotFound, ServingError
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


def find_runnable(session: Session, org_id: str, model: str, base_models: list[str], default_base_models: list[str] | None) -> str | None:
    """The version id ``model`` names if it may run: the org's, live, on a base the org is entitled to
    (``scheduler.entitlements``); None otherwise (a 404, as for a model that does not exist)."""
    row = find(session, org_id, model)
    if row is None or not entitlements.is_entitled(session, org_id, row.base_model, base_models, default_base_models):
        return None
    return row.id


# --- the check ------------------------------------------------------------------------------------

# How long a client should wait before asking again when the check could not reach a verdict: an engine
# replica restarts or a transient store failure clears within seconds; a missing route does not, but it
# is the operator's to fix and the error log says so.
CHECK_RETRY_AFTER_S = 5
REFERENCE_FILE = vllm_check.REFERENCE_FILE
# Stored by earlier gateways for an engine without the check route: not a verdict on the adapter.
_LEGACY_INCONCLUSIVE = frozenset({"engine_misconfigured"})


class AdapterCheckUnavailable(ServingError):
    """The check could not reach a verdict now (no replica answered, a timeout, an engine error, a
    missing route): nothing was stored and the same request may succeed later. The engine's own message
    is logged, never sent to the client."""

    status_code = 503
    type = "server_error"
    code = "adapter_check_unavailable"

    def __init__(self, model: str):
        super().__init__(
            f"The compatibility check of `{model}` could not run now; nothing was recorded, try again shortly.",
            param="model",
            headers={"Retry-After": str(CHECK_RETRY_AFTER_S)},
        )


class _Inconclusive(Exception):
    """No verdict: ``detail`` (the engine's status and message) is for the log only."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def verdict(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stored report if it is a verdict on the adapter; None when the check has to run (never ran,
    or an earlier gateway stored an engine problem as a failure)."""
    if report is None or (not report.get("passed") and report.get("code") in _LEGACY_INCONCLUSIVE):
        return None
    return report


def trained_here(manifest: Any) -> bool:
    """Whether the adapter's manifest says a training run of this platform made it: every run writes an
    ``AdapterManifest`` (with its job id) and, next to the adapter, the reference log-probabilities the
    check compares with. An adapter without that provenance (imported) has no reference to compare."""
    return isinstance(manifest, dict) and bool(manifest.get("job_id"))


async def ensure_checked(settings: ServingSettings, db, engines: EnginePool, org_id: str, adapter_id: str, *, force: bool = False) -> dict[str, Any]:
    """The adapter's compatibility report, running the check if it has no verdict yet, or again with
    ``force`` (once per adapter at a time in this process; the stored verdict is what every later request
    reads). ``AdapterCheckUnavailable`` when no verdict could be reached: nothing is stored."""
    lock = _check_locks.setdefault(adapter_id, asyncio.Lock())
    async with lock:
        row = await db.run(lambda s: _snapshot(s, org_id, adapter_id))
        if row is None:
            raise ModelNotFound(adapter_id)
        if not force and verdict(row["compatibility"]) is not None:
            return row["compatibility"]
        try:
            report = await run_check(settings, engines, row["base_model"], row["storage_key"], adapter_id, trained_here=trained_here(row["manifest"]))
        except _Inconclusive as exc:
            log.error("adapter check inconclusive: nothing recorded", adapter=adapter_id, detail=exc.detail)
            raise AdapterCheckUnavailable(adapter_id) from None
        await db.run(lambda s: record_check(s, org_id, adapter_id, report, replace=force))
        store = open_store(settings.storage_url)
        if report["passed"]:  # vLLM replicas find it by name from now on (serving.vllm_plugin.resolver)
            entry = lora_index.IndexEntry(name=adapter_id, base_model=row["base_model"], key=row["storage_key"])
            await asyncio.to_thread(lora_index.publish, store, entry)
        elif force:  # a re-check that no longer passes: no replica keeps serving it
            await _withdraw(engines, store, row["base_model"], adapter_id)
        log.info("adapter checked", adapter=adapter_id, passed=report["passed"], reason=report.get("reason"), forced=force)
        return report


def _snapshot(session: Session, org_id: str, adapter_id: str) -> dict | None:
    row = session.get(Adapter, adapter_id)
    if row is None or row.org_id != org_id or row.deleted_at is not None:
        return None
    return {"base_model": row.base_model, "storage_key": row.storage_key, "compatibility": row.compatibility, "manifest": row.manifest}


async def run_check(settings: ServingSettings, engines: EnginePool, base: str, storage_key: str, adapter_id: str, *, trained_here: bool) -> dict[str, Any]:
    """A verdict (``{"passed": bool, ...}``) or ``_Inconclusive``. Verdicts: the static rules, a missing
    reference of a platform-trained adapter, the engine's 400/422 refusal of the adapter, the logit
    comparison. Everything else the engines answer (5xx, 404: no route or the resolver found nothing,
    401/403, timeouts, no replica) says nothing about the adapter."""
    store = open_store(settings.storage_url)
    try:
        facts = await asyncio.to_thread(
            check_files, store, storage_key, max_rank=settings.max_lora_rank, supported_modules=settings.supported_target_modules
        )
    except Incompatible as exc:
        return {"passed": False, "reason": exc.reason, "code": exc.code}
    key = f"{storage_key.rstrip('/')}/{REFERENCE_FILE}"
    if trained_here and not await asyncio.to_thread(store.exists, key):
        reason = f"it was trained on this platform but has no {REFERENCE_FILE}: the engine's output cannot be compared with training's"
        return {"passed": False, "static": facts, "reason": reason, "code": "reference_missing"}
    try:
        if engines.resolves_adapters:
            return await _check_on_vllm(engines, store, base, storage_key, adapter_id, facts, trained_here)
        status, body = await engines.check_adapter(base, "store:" + storage_key)
    except (EngineUnavailable, EngineTimeout, EngineError) as exc:
        raise _Inconclusive(f"{type(exc).__name__}: {exc.message}") from None
    if status == 404:
        raise _Inconclusive("the engine has no adapter check route (a vLLM engine needs TUNEFORGE_ENGINE_KIND=vllm)")
    return _engine_verdict(facts, status, body, trained_here)


def _engine_verdict(facts: dict, status: int, body: Any, trained_here: bool) -> dict[str, Any]:
    if status in _ADAPTER_REFUSALS:
        return _refused(facts, body)
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("logits"), dict):
        raise _Inconclusive(f"the engine answered {status}: {_engine_text(body)}")
    return _logit_verdict(facts, body, body["logits"], trained_here)


# The engine's refusal of this adapter (its files, its shapes, its base, its reference): a verdict. Any
# other error status is the engine's or the deployment's problem.
_ADAPTER_REFUSALS = (400, 422)


async def _check_on_vllm(engines: EnginePool, store, base: str, storage_key: str, adapter_id: str, facts: dict, trained_here: bool) -> dict[str, Any]:
    """vLLM loads an adapter only through its resolver, which reads the index: publish the entry, score
    the reference prompts with the adapter as the model, and take the entry back (and the adapter off
    every replica) unless the check passes."""
    entry = lora_index.IndexEntry(name=adapter_id, base_model=base, key=storage_key)
    await asyncio.to_thread(lora_index.publish, store, entry)
    try:
        prompts = await asyncio.to_thread(vllm_check.read_reference, store, storage_key)
        if prompts is None:  # an imported adapter (run_check): it must still load and answer
            status, body = await engines.post_json(
                base, "/v1/completions", {"model": adapter_id, "prompt": "Hello", "max_tokens": 1}, what="check the adapter", adapter_id=adapter_id
            )
            body = {"engine": "vllm", "logits": {"status": "no_reference"}} if status == 200 else body
        else:
            status, body = await vllm_check.check_on_vllm(engines, base, adapter_id, prompts)
        report = _engine_verdict(facts, status, body, trained_here)
    except vllm_check.BadReference as exc:
        report = {"passed": False, "static": facts, "reason": str(exc), "code": "bad_reference"}
    except vllm_check.UnusableAnswer as exc:
        await _withdraw(engines, store, base, adapter_id)
        raise _Inconclusive(str(exc)) from None
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


def _engine_text(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message if message is not None else body)[:500]


def _refused(facts: dict, body: Any) -> dict[str, Any]:
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return {"passed": False, "static": facts, "reason": _engine_text(body), "code": code if isinstance(code, str) else "engine_refused"}


def _logit_verdict(facts: dict, body: dict, logits: dict, trained_here: bool) -> dict[str, Any]:
    status = logits.get("status")
    if status == "match":
        return {"passed": True, "static": facts, "engine": body, "logits": logits}
    if status == "mismatch":
        diff = logits.get("max_abs_diff")
        shown = f"{diff:.3g}" if isinstance(diff, (int, float)) else "unknown"
        reason = f"the engine does not reproduce the training-side log-probabilities (max |Δ| {shown})"
        return {"passed": False, "static": facts, "engine": body, "logits": logits, "reason": reason, "code": "logits_mismatch"}
    if status == "no_reference":
        if trained_here:  # the file was there when run_check looked: gone since, or the engine did not read it
            reason = f"it was trained on this platform but the engine found no {REFERENCE_FILE} to compare with"
            return {"passed": False, "static": facts, "engine": body, "logits": logits, "reason": reason, "code": "reference_missing"}
        # Imported (no platform provenance): it loads and answers, which is all that can be checked.
        return {"passed": True, "static": facts, "engine": body, "logits": logits, "reference": "none: imported adapter"}
    raise _Inconclusive(f"the engine's check answer has no known logits status: {_engine_text(body)}")


def record_check(session: Session, org_id: str, adapter_id: str, report: dict[str, Any], *, replace: bool = False) -> None:
    """Store a verdict. Without ``replace`` a verdict already there wins (another gateway recorded it
    first). A version keeps its number when re-checked; a first pass makes it the next version of its
    name (the name's active one if it has none)."""
    row = session.get(Adapter, adapter_id)
    if row is None or row.org_id != org_id or row.deleted_at is not None:
        return  # deleted meanwhile
    if verdict(row.compatibility) is not None and not replace:
        return
    row.compatibility, row.checked_at = report, utcnow()
    if not report["passed"] or row.version is not None:
        session.flush()
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
    status = "unchecked" if verdict(report) is None else ("active" if row.id == active else "ready") if report.get("passed") else "incompatible"
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
