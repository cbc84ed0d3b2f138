"""Fine-tuning jobs as the API sees them: creating one (validated, resolved, written in one
transaction with its first event), reading, listing, cancelling, pausing and resuming them, and their
events and checkpoints. Every query is scoped by the caller's org. The API never trains: the scheduler picks the
job up from the ``validating_files`` state.
"""

from __future__ import annotations

import logging
import secrets
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.errors import InvalidRequest, NotFound
from api.schemas import (
    CheckpointPublic,
    CheckpointsPublic,
    JobCreate,
    JobError,
    JobEventPublic,
    JobEventsPublic,
    JobPublic,
    JobsPublic,
    unix_seconds,
)
from api.services import hyperparameters, token_counts
from api.services.job_inputs import check_base_model, check_export, check_file_format, check_spec_rules, training_input
from api.services.scoping import owned
from api.settings import ApiSettings
from gpu_worker.contract import (
    DataFormat,
    DataOptions,
    EvalOptions,
    ExportOptions,
    Integrations,
    JobSpec,
    Method,
    Runtime,
    TrainingFile,
)
from gpu_worker.storage import ObjectStore
from scheduler.fleet import Fleet
from scheduler import jobs as lifecycle
from scheduler.jobs import add_event, checkpoint_model_name, fine_tuned_model_name
from scheduler.models import Checkpoint, File, Job, JobEvent, JobStatus, Organization, new_id
from scheduler.routing import Plan, Unplaceable, route
from scheduler.tenancy import Principal

log = logging.getLogger("api.jobs")


def _error(error: dict | None) -> JobError | None:
    # Written by the scheduler and workers; tolerate a missing field rather than fail the read.
    if not error:
        return None
    return JobError(code=str(error.get("code") or "error"), message=str(error.get("message") or ""), param=error.get("param"))


def to_public(job: Job) -> JobPublic:
    hp = (job.method.get(job.method.get("type", "supervised")) or {}).get("hyperparameters") or {}
    return JobPublic(
        id=job.id,
        created_at=unix_seconds(job.created_at),
        finished_at=unix_seconds(job.finished_at),
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        organization_id=job.org_id,
        status="pausing" if job.status == JobStatus.running and job.pause_requested else job.status.value,
        hyperparameters=hp,
        method=job.method,
        training_file=job.training_file_id,
        validation_file=job.validation_file_id,
        result_files=list(job.result_files or []),
        trained_tokens=job.trained_tokens,
        estimated_tokens=job.estimated_tokens,
        error=_error(job.error),
        seed=job.seed,
        suffix=job.suffix,
        user_provided_suffix=job.suffix,
        estimated_finish=unix_seconds(job.estimated_finish),
        integrations=_integrations_public(job.spec.get("integrations") or {}),
        metadata=job.metadata_,
    )


def _integrations_public(spec: dict) -> list[dict]:
    """The job's integrations in OpenAI's form, as the job was created with them (an MLflow URI without
    the credentials it may carry)."""
    out = []
    if spec.get("wandb_project"):
        out.append({"type": "wandb", "wandb": {"project": spec["wandb_project"], "entity": spec.get("wandb_entity"),
                                               "name": spec.get("wandb_name"), "tags": list(spec.get("wandb_tags") or [])}})
    if spec.get("mlflow_tracking_uri"):
        out.append({"type": "mlflow", "mlflow": {"tracking_uri": _without_credentials(spec["mlflow_tracking_uri"])}})
    if spec.get("tensorboard"):
        out.append({"type": "tensorboard"})
    return out


_TRACKING_SCHEMES = ("http", "https", "file")  # what the worker's MLflow client is documented to reach


def _without_credentials(uri: str) -> str:
    """The URI as shown on the job: never its ``user:pass@``. A job stored before tracking URIs were
    checked may hold one urlsplit refuses ("http://[::1"); reading the job must not fail on it, so
    there (and wherever no host was parsed) everything up to the last "@" is dropped, which may cut
    more than the credentials but never less."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        parts = None
    if parts is not None and parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if parts is not None and parts.scheme == "file":
        return uri  # "file:/path": no authority, so no credentials, and an "@" in it is part of the path
    scheme, sep, rest = uri.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else uri.rpartition("@")[2]


def _check_tracking_uri(uri: str, param: str) -> None:
    """A tracking URI the worker can use and the job can show (``_without_credentials``), refused with
    a 400 before anything is stored: a malformed one used to be stored and then fail every read."""
    problem = None
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 -- raises ValueError on a port that is not a number from 0 to 65535
    except ValueError as err:
        problem = str(err)
    else:
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in uri):
            problem = "it contains whitespace or control characters"
        elif uri.partition(":")[0] not in _TRACKING_SCHEMES:  # as written: the worker spots "file:" case-sensitively
            problem = f"its scheme must be one of {', '.join(_TRACKING_SCHEMES)}, in lowercase"
        elif parts.scheme != "file" and not parts.hostname:
            problem = "it names no host"
        elif parts.scheme == "file" and not parts.path:
            problem = "it names no path"
    if problem:
        raise InvalidRequest(f"Invalid value for '{param}': {problem}.", param=param, code="invalid_value")


def _integrations(items) -> Integrations:
    values: dict = {}
    for i, item in enumerate(items or []):
        if item.type == "wandb":
            if item.wandb is None:
                raise InvalidRequest("A wandb integration needs a 'wandb' object with 'project'.", param=f"integrations[{i}].wandb", code="missing_required_parameter")
            values |= {"wandb_project": item.wandb.project, "wandb_entity": item.wandb.entity, "wandb_name": item.wandb.name,
                       "wandb_tags": tuple(item.wandb.tags or ())}
        elif item.type == "mlflow":
            if item.mlflow is None:
                raise InvalidRequest("An mlflow integration needs an 'mlflow' object with 'tracking_uri'.", param=f"integrations[{i}].mlflow", code="missing_required_parameter")
            _check_tracking_uri(item.mlflow.tracking_uri, f"integrations[{i}].mlflow.tracking_uri")
            values["mlflow_tracking_uri"] = item.mlflow.tracking_uri
        else:
            values["tensorboard"] = True
    return Integrations(**values)


def _data_options(session: Session, store: ObjectStore, principal: Principal, body: JobCreate, method: Method) -> DataOptions:
    data = body.data
    if data is None:
        return DataOptions()
    extra = []
    for i, item in enumerate(data.extra_training_files or []):
        param = f"data.extra_training_files[{i}].file"
        row = training_input(session, principal, item.file, param)
        check_file_format(store, row, method, item.format, param, f"data.extra_training_files[{i}].format")
        extra.append(TrainingFile(key=row.storage_key, format=item.format, weight=item.weight))
    given = data.model_dump(exclude_none=True, exclude={"extra_training_files"})
    return DataOptions(**given, extra_training_files=tuple(extra))


def build_spec(session: Session, store: ObjectStore, principal: Principal, body: JobCreate, job_id: str, seed: int, training: File,
               validation: File | None) -> tuple[JobSpec, hyperparameters.Resolved]:
    method, hp, method_body = hyperparameters.requested(body)
    declared = body.data.format if body.data is not None and body.data.format is not None else DataFormat.auto
    for row, param in ((training, "training_file"), (validation, "validation_file")):
        if row is not None:
            check_file_format(store, row, method, declared, param, "data.format")
    resolved = hyperparameters.resolve(method, hp, method_body, training.examples)
    check_export(body.model, body.export or ExportOptions())
    runtime = Runtime(**body.runtime.model_dump(exclude_none=True)) if body.runtime else Runtime()
    spec = JobSpec(
        job_id=job_id,
        org_id=principal.org_id,
        base_model=body.model,
        method=method,
        adapter=resolved.adapter,
        quantization=resolved.quantization,
        hyperparameters=resolved.hyperparameters,
        method_params=resolved.method_params,
        data=_data_options(session, store, principal, body, method),
        evaluation=body.evaluation or EvalOptions(),
        export=body.export or ExportOptions(),
        integrations=_integrations(body.integrations),
        runtime=runtime,
        seed=seed,
        training_file_key=training.storage_key,
        validation_file_key=validation.storage_key if validation else None,
        output_prefix=f"orgs/{principal.org_id}/jobs/{job_id}",
    )
    return spec, resolved


def extra_files(session: Session, principal: Principal, spec: JobSpec) -> list[File]:
    """The rows of the spec's extra training files (already checked to be the caller's)."""
    keys = {t.key for t in spec.data.extra_training_files}
    return list(session.scalars(select(File).where(File.org_id == principal.org_id, File.storage_key.in_(keys)))) if keys else []


def placement(spec: JobSpec, fleet: Fleet) -> Plan:
    """Where the job would run; a job that fits nowhere in the fleet is a 400 saying what would."""
    try:
        return route(spec, None, fleet)
    except Unplaceable as e:
        raise InvalidRequest(f"This job does not fit the platform's GPUs: {e}.", param="model", code="unplaceable") from None


def create_job(session: Session, store: ObjectStore, settings: ApiSettings, principal: Principal, body: JobCreate, fleet: Fleet) -> JobPublic:
    check_base_model(session, settings, principal, body.model)
    training = training_input(session, principal, body.training_file, "training_file")
    validation = training_input(session, principal, body.validation_file, "validation_file") if body.validation_file else None
    job_id = new_id("ftjob-")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    spec, resolved = build_spec(session, store, principal, body, job_id, seed, training, validation)
    extra = extra_files(session, principal, spec)
    check_spec_rules(spec, [training, *extra])
    plan = placement(spec, fleet)
    # a file the count shows the worker would refuse is a 400 now, where counting is cheap (the scheduler counts the rest)
    token_counts.count_in_request(store, settings, spec, [training, validation, *extra])
    job = Job(
        id=job_id,
        org_id=principal.org_id,
        model=body.model,
        training_file_id=training.id,
        validation_file_id=validation.id if validation else None,
        suffix=body.suffix or None,
        seed=seed,
        method=resolved.method_object(),
        spec=spec.model_dump(mode="json"),
        status=JobStatus.validating_files,
        result_files=[],
        metadata_=body.metadata or None,
    )
    try:
        session.add(job)
        session.flush()
        add_event(session, job, f"Created fine-tuning job: {job_id}")
        add_event(session, job, f"Planned for a {plan.worker_kind} worker: " + "; ".join(plan.reasons), data={"plan": plan.to_dict()})
        session.commit()
    except BaseException:
        session.rollback()
        raise
    log.info("job created", extra={"job_id": job_id, "org_id": principal.org_id, "model": body.model})
    return to_public(job)


def _job_row(session: Session, principal: Principal, job_id: str) -> Job:
    job = owned(session, Job, job_id, principal)
    if job is None:
        raise NotFound(f"Could not find fine-tuning job {job_id}.", param="fine_tuning_job_id", code="fine_tuning_job_not_found")
    return job


def get_job(session: Session, principal: Principal, job_id: str) -> JobPublic:
    return to_public(_job_row(session, principal, job_id))


def list_jobs(session: Session, principal: Principal, *, after: str | None, limit: int,
              metadata: dict[str, str] | None = None) -> JobsPublic:
    """Newest first; ``after`` is the last id of the previous page (keyset pagination). ``metadata``: only
    the jobs that have each of these pairs (OpenAI's ``metadata[key]=value``); ``{}``: only jobs without
    metadata (OpenAI's ``metadata=null``)."""
    query = select(Job).where(Job.org_id == principal.org_id)
    if metadata == {}:
        query = query.where(Job.metadata_.is_(None))
    for key, value in (metadata or {}).items():
        query = query.where(Job.metadata_[key].as_string() == value)
    if after:
        cursor = owned(session, Job, after, principal)
        if cursor is None:
            raise InvalidRequest(f"Invalid cursor: no fine-tuning job {after!r}.", param="after", code="invalid_value")
        query = query.where(or_(Job.created_at < cursor.created_at, and_(Job.created_at == cursor.created_at, Job.id < cursor.id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return JobsPublic(data=[to_public(j) for j in rows[:limit]], has_more=len(rows) > limit)


def cancel_job(session: Session, principal: Principal, job_id: str) -> JobPublic:
    return _change(session, principal, job_id, lifecycle.request_cancel, "job cancel requested")


def pause_job(session: Session, principal: Principal, job_id: str) -> JobPublic:
    return _change(session, principal, job_id, lifecycle.request_pause, "job pause requested")


def resume_job(session: Session, principal: Principal, job_id: str) -> JobPublic:
    return _change(session, principal, job_id, lifecycle.resume, "job resumed")


def _change(session: Session, principal: Principal, job_id: str, move, what: str) -> JobPublic:
    """One of the tenant's moves of the job's state machine (scheduler.jobs); a move the job's status
    does not allow is an InvalidTransition, a 400 in api.errors."""
    job = _job_row(session, principal, job_id)
    try:
        move(session, job)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    log.info(what, extra={"job_id": job_id, "status": job.status.value})
    return to_public(job)


def list_events(session: Session, principal: Principal, job_id: str, *, after: str | None, limit: int) -> JobEventsPublic:
    """Newest first by ``seq``; ``after`` is the last event id of the previous page."""
    job = _job_row(session, principal, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.org_id == principal.org_id)
    if after:
        cursor = session.scalar(select(JobEvent.seq).where(JobEvent.id == after, JobEvent.job_id == job.id))
        if cursor is None:
            raise InvalidRequest(f"Invalid cursor: no event {after!r} in job {job_id}.", param="after", code="invalid_value")
        query = query.where(JobEvent.seq < cursor)
    rows = list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit + 1)))
    data = [
        JobEventPublic(id=e.id, created_at=unix_seconds(e.created_at), level=e.level, message=e.message, type=e.type, data=e.data)
        for e in rows[:limit]
    ]
    return JobEventsPublic(data=data, has_more=len(rows) > limit)


def list_checkpoints(session: Session, principal: Principal, job_id: str, *, after: str | None, limit: int) -> CheckpointsPublic:
    """Newest (highest step) first; ``after`` is the last checkpoint id of the previous page."""
    job = _job_row(session, principal, job_id)
    org_name = session.scalar(select(Organization.name).where(Organization.id == principal.org_id))
    query = select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.org_id == principal.org_id)
    if after:
        cursor = session.scalar(select(Checkpoint.step).where(Checkpoint.id == after, Checkpoint.job_id == job.id))
        if cursor is None:
            raise InvalidRequest(f"Invalid cursor: no checkpoint {after!r} in job {job_id}.", param="after", code="invalid_value")
        query = query.where(Checkpoint.step < cursor)
    rows = list(session.scalars(query.order_by(Checkpoint.step.desc()).limit(limit + 1)))
    model = fine_tuned_model_name(job.model, org_name or principal.org_id, job.suffix, job.id)
    data = [
        CheckpointPublic(
            id=c.id,
            created_at=unix_seconds(c.created_at),
            fine_tuned_model_checkpoint=checkpoint_model_name(model, c.step),
            fine_tuning_job_id=job.id,
            step_number=c.step,
            metrics={"step": c.step, **(c.metrics or {})},
        )
        for c in rows[:limit]
    ]
    return CheckpointsPublic(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=len(rows) > limit
    )
