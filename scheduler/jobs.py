"""The job state machine and the lease protocol.

    validating_files → queued → running → succeeded | failed | cancelled
                         ↑         │
                         └─────────┘  lease expired (worker died): back to the queue, resumes from
                                      its last checkpoint; after max_attempts the job fails.

    queued or running → paused (pause: at once when queued; a running job is flagged, shown as
    "pausing", and its worker stops it at a checkpoint) → queued (resume: from that checkpoint);
    a paused job can also be cancelled.

Every transition is a conditional UPDATE on the current status (and, for a worker, on its lease
token), so two actors can never both move a job: the loser's UPDATE matches no row. Whoever holds the
lease proves it with a token only it knows (fencing): a worker whose lease was taken over can no
longer write the job.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from scheduler.models import File, Job, JobEvent, JobStatus, utcnow


_EVENT_SEQ_RETRIES = 10


class InvalidTransition(Exception):
    pass


def add_event(
    session: Session,
    job: Job,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Append an event to the job's log; ``seq`` orders them (newest first when listed).

    Several processes write one job's events (the API on cancel, the agent, the scheduler): two may
    pick the same next ``seq``. The unique (job, seq) constraint turns that into an IntegrityError
    for the later one, which then takes the next number."""
    for _ in range(_EVENT_SEQ_RETRIES):
        seq = (session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job.id)) or 0) + 1
        event = JobEvent(job_id=job.id, org_id=job.org_id, seq=seq, level=level, type=type, message=message, data=data)
        try:
            with session.begin_nested():
                session.add(event)
        except IntegrityError:
            continue
        return event
    raise RuntimeError(f"could not append an event to job {job.id}: its log is too busy")


def transition(session: Session, job: Job, to: JobStatus, *, frm: tuple[JobStatus, ...], token: str | None = None, **values) -> bool:
    """Move ``job`` to ``to`` if it is in one of ``frm`` (and, given a token, still leased by it)."""
    stmt = update(Job).where(Job.id == job.id, Job.status.in_(frm))
    if token is not None:
        stmt = stmt.where(Job.lease_token == token)
    moved = session.execute(stmt.values(status=to, **values).execution_options(synchronize_session=False)).rowcount == 1
    session.refresh(job)
    return moved


def mark_queued(session: Session, job: Job) -> bool:
    if transition(session, job, JobStatus.queued, frm=(JobStatus.validating_files,)):
        add_event(session, job, "Validated training file; job queued")
        return True
    return False


def fail(session: Session, job: Job, code: str, message: str, param: str | None = None, *, token: str | None = None) -> bool:
    frm = (JobStatus.validating_files, JobStatus.queued, JobStatus.running)
    error = {"code": code, "message": message, "param": param}
    if transition(session, job, JobStatus.failed, frm=frm, token=token, error=error, finished_at=utcnow(), lease_token=None, lease_owner=None, lease_expires_at=None):
        add_event(session, job, f"Job failed: {message}", level="error")
        return True
    return False


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a job. Not yet running: cancelled at once. Running: flagged, and its worker stops it
    (saving a checkpoint) at the next heartbeat. Already finished: InvalidTransition."""
    if job.status.terminal:
        raise InvalidTransition(f"job {job.id} is already {job.status.value}")
    if transition(session, job, JobStatus.cancelled, frm=(JobStatus.validating_files, JobStatus.queued, JobStatus.paused), cancel_requested=True,
                  finished_at=utcnow()):
        add_event(session, job, "Job cancelled")
        return job
    _ask_worker(session, job, "Cancellation requested; stopping the running job", cancel_requested=True)
    return job


def request_pause(session: Session, job: Job) -> Job:
    """Pause a job (OpenAI's ``pause``). Queued: paused at once. Running: flagged, and its worker stops
    it at a checkpoint at the next heartbeat (``stopped_by_pause``). Still validating its files (a
    resumed job goes to the queue, so it must have passed), paused, being cancelled or finished:
    InvalidTransition."""
    if job.status.terminal or job.status == JobStatus.paused:
        raise InvalidTransition(f"job {job.id} is already {job.status.value}")
    if job.status == JobStatus.validating_files:
        raise InvalidTransition(f"job {job.id} is still validating its files: pause it once it is queued")
    if job.cancel_requested:
        raise InvalidTransition(f"job {job.id} is being cancelled")
    if transition(session, job, JobStatus.paused, frm=(JobStatus.queued,)):
        add_event(session, job, "Job paused; resume it to continue")
        return job
    if not job.pause_requested:
        _ask_worker(session, job, "Pause requested; stopping the running job at a checkpoint", pause_requested=True)
    return job


def _ask_worker(session: Session, job: Job, message: str, **flag) -> None:
    """Flag a running job for its worker, which sees the flag at its next heartbeat (``heartbeat``)."""
    session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.running).values(**flag))
    session.refresh(job)
    if job.status == JobStatus.running:
        add_event(session, job, message)


def resume(session: Session, job: Job) -> Job:
    """A paused job back to the queue; its next attempt continues from its last checkpoint."""
    if not transition(session, job, JobStatus.queued, frm=(JobStatus.paused,), nudged_at=None):
        raise InvalidTransition(f"job {job.id} is {job.status.value}: only a paused job can be resumed")
    add_event(session, job, "Job resumed; it continues from its last checkpoint")
    return job


def stopped_by_pause(session: Session, job: Job, token: str, detail: str, *, failed: bool = False) -> bool:
    """The attempt of a job whose pause was asked for ended: paused, its lease given up. ``failed``: it
    ended by a crash or a lost worker, which still counts against ``max_attempts``."""
    pauses = Job.pauses if failed else Job.pauses + 1
    if transition(session, job, JobStatus.paused, frm=(JobStatus.running,), token=token, pause_requested=False, pauses=pauses,
                  lease_token=None, lease_owner=None, lease_expires_at=None):
        add_event(session, job, f"Job paused {detail}; resume it to continue from its last checkpoint")
        return True
    return False


# --- the lease protocol used by worker agents and the reaper -----------------------------------


def claim(session: Session, job: Job, owner: str, lease_seconds: float) -> str | None:
    """Try to take a queued job; returns the lease token, or None if someone else moved it first."""
    token = secrets.token_hex(16)
    now = utcnow()
    moved = transition(
        session,
        job,
        JobStatus.running,
        frm=(JobStatus.queued,),
        lease_owner=owner,
        lease_token=token,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        attempts=Job.attempts + 1,
        started_at=func.coalesce(Job.started_at, now),
    )
    return token if moved else None


def heartbeat(session: Session, job_id: str, token: str, lease_seconds: float) -> tuple[bool, str | None]:
    """Renew the lease. Returns (still_ours, what the job was asked to do: "cancel", "pause" or None)."""
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token, Job.status == JobStatus.running)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .returning(Job.cancel_requested, Job.pause_requested)
    ).first()
    if res is None:
        return False, None
    return True, "cancel" if res[0] else "pause" if res[1] else None


def expired_leases(session: Session, now: datetime | None = None) -> list[Job]:
    now = now or utcnow()
    return list(session.scalars(select(Job).where(Job.status == JobStatus.running, Job.lease_expires_at < now)))


def reap(session: Session, job: Job, max_attempts: int) -> str:
    """Return a job whose worker stopped heartbeating to the queue (or fail it after too many tries).
    Conditional on the expired token, so a late heartbeat and the reaper cannot both win."""
    token = job.lease_token
    lost = job.attempts - job.pauses  # attempts that ended in a pause did not fail
    if lost >= max_attempts:
        fail(session, job, "worker_lost", f"the job's worker stopped responding {lost} times", token=token)
        return "failed"
    if job.cancel_requested:
        if transition(session, job, JobStatus.cancelled, frm=(JobStatus.running,), token=token, finished_at=utcnow(), lease_token=None, lease_owner=None, lease_expires_at=None):
            add_event(session, job, "Job cancelled (its worker was lost)")
        return "cancelled"
    if job.pause_requested:
        stopped_by_pause(session, job, token, "(its worker was lost)", failed=True)
        return "paused"
    if transition(session, job, JobStatus.queued, frm=(JobStatus.running,), token=token, lease_token=None, lease_owner=None, lease_expires_at=None, nudged_at=None):
        add_event(session, job, "Worker lost; job returned to the queue and will resume from its last checkpoint", level="warn")
        return "requeued"
    return "moved"


UNFINISHED = (JobStatus.validating_files, JobStatus.queued, JobStatus.running, JobStatus.paused)  # a paused job resumes


def job_using_file(session: Session, file: File) -> str | None:
    """An unfinished job of the file's org that reads it (its training or validation file, or one of its
    extra training files, which the job spec names by storage key), if any."""
    rows = session.execute(select(Job.id, Job.training_file_id, Job.validation_file_id, Job.spec)
                           .where(Job.org_id == file.org_id, Job.status.in_(UNFINISHED)).order_by(Job.created_at)).all()
    for job_id, training, validation, spec in rows:
        extra = ((spec or {}).get("data") or {}).get("extra_training_files") or ()
        if file.id in (training, validation) or any(e.get("key") == file.storage_key for e in extra):
            return job_id
    return None


def unnameable(name: str) -> bool:
    """Whether ``name`` holds a control character: no model or adapter is named so (``fine_tuned_model_name``
    or a hub id), so it is answered as not found before any lookup (PostgreSQL refuses NUL characters)."""
    return any(unicodedata.category(c) == "Cc" for c in name)


def fine_tuned_model_name(base_model: str, org_name: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming: ``ft:{base}:{org}:{suffix}:{job id}`` (an empty suffix stays empty)."""
    return f"ft:{base_model}:{org_name}:{suffix or ''}:{job_id}"


CHECKPOINT_MODEL = re.compile(r"^(ft:.+):ckpt-step-(\d{1,9})$")  # (fine-tuned model, step); the step fits the column


def checkpoint_model_name(fine_tuned_model: str, step: int) -> str:
    """OpenAI's name of a job's checkpoint as a model: ``{fine-tuned model}:ckpt-step-{N}`` (served too:
    serving.registry)."""
    return f"{fine_tuned_model}:ckpt-step-{step}"
