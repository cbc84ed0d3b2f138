"""The scheduler's loop: moves jobs along the state machine and keeps workers nudged.

Each tick, in its own transactions:
1. ``validating_files`` jobs: check their files as a worker would (``scheduler.file_checks``: still
   there, enough examples, lines readable in the declared format, GRPO reward fields, token counts
   where the tokenizer is here) → ``queued`` or failed;
2. ``running`` jobs whose lease expired (their worker died): back to the queue, or failed after
   ``max_attempts``;
3. ``queued`` jobs not nudged recently: route them and nudge their queue in fair order (priorities,
   orgs taking turns, per-org limits, free GPUs: ``scheduler.fairness``). A job stays queued until a
   worker claims it, so a lost nudge costs only a re-nudge;
4. once a minute: pending uploads (files in parts) past their expiry: expired, their parts deleted; files
   past their ``expires_at``: deleted, once no unfinished job reads them.

Ticks are idempotent and every move is conditional, so several scheduler replicas may run at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import func, select

from gpu_worker.contract import JobSpec
from gpu_worker.storage import delete_orphans, open_store
from scheduler import file_checks, jobs
from scheduler.db import session_scope
from scheduler.dispatch import Dispatcher
from scheduler.models import File, Job, JobStatus, Upload, UploadPart, utcnow
from scheduler.fairness import Candidate, Limits, OrgState, fair_order
from scheduler.fleet import Fleet, get_fleet
from scheduler.routing import Plan, Unplaceable, route
from scheduler.settings import Settings

log = logging.getLogger("tuneforge.scheduler")

RENUDGE_SECONDS = 5.0
BATCH = 50


def validate_files(settings: Settings) -> int:
    """Jobs whose files passed ``file_checks`` move to the queue; the others fail, saying why."""
    store = open_store(settings.storage_url)
    moved = 0
    with session_scope(settings.database_url) as session:
        pending = session.scalars(select(Job).where(Job.status == JobStatus.validating_files).order_by(Job.created_at).limit(BATCH)).all()
        for job in pending:
            problem = file_checks.check_job(session, store, settings, job)
            if problem:
                jobs.fail(session, job, problem.code, problem.message, problem.param)
            elif jobs.mark_queued(session, job):
                moved += 1
    return moved


# expiry needs no sub-second timing: once a minute, not every tick (an expired file an hours-long job still
# reads would be looked at twice a second)
EXPIRY_SECONDS = 60.0
_last_expiry = float("-inf")


def expire_files(settings: Settings, now: datetime | None = None) -> int:
    """Files past their ``expires_at`` (OpenAI's ``expires_after``) deleted, the row first, then the object
    (a failure orphans an object, never leaves a row without one); a file an unfinished job still reads
    waits for the job to finish."""
    store = open_store(settings.storage_url)
    with session_scope(settings.database_url) as session:
        due = session.scalars(select(File).where(File.expires_at <= (now or utcnow())).order_by(File.expires_at).limit(BATCH)).all()
        gone = [(f.id, f.storage_key) for f in due if jobs.job_using_file(session, f) is None]
        for file_id, _ in gone:
            session.delete(session.get(File, file_id))
    delete_orphans(store, [key for _, key in gone], "an expired file's object")
    return len(gone)


def expire_uploads(settings: Settings, now: datetime | None = None) -> int:
    """Pending uploads (a file in parts, api.services.uploads) past their ``expires_at``: marked expired,
    their parts' objects deleted after the rows changed (a failure orphans an object, never a file)."""
    store = open_store(settings.storage_url)
    with session_scope(settings.database_url) as session:
        # skip_locked: an upload being completed or cancelled holds its row (api.services.uploads); read
        # unlocked, it would be marked expired over the completion that then commits
        rows = session.scalars(select(Upload).where(Upload.status == "pending", Upload.expires_at <= (now or utcnow()))
                               .limit(BATCH).with_for_update(skip_locked=True)).all()
        for row in rows:
            row.status = "expired"
        keys = session.scalars(select(UploadPart.storage_key).where(UploadPart.upload_id.in_([r.id for r in rows]))).all()
    delete_orphans(store, keys, "an expired upload's part")
    return len(rows)


def reap_expired(settings: Settings) -> int:
    with session_scope(settings.database_url) as session:
        expired = jobs.expired_leases(session)
        for job in expired:
            outcome = jobs.reap(session, job, settings.max_attempts)
            log.warning("job %s: lease expired (owner %s): %s", job.id, job.lease_owner, outcome)
    return len(expired)


def _plan(job: Job, fleet: Fleet) -> Plan | None:
    try:
        return route(JobSpec.model_validate(job.spec), None, fleet)
    except Unplaceable:
        return None


def nudge_queued(settings: Settings, dispatcher: Dispatcher, now: datetime | None = None, fleet: Fleet | None = None) -> int:
    """Offer queued jobs to their queues in fair order (``scheduler.fairness``), only as many as the
    fleet's free GPUs can start. Jobs offered recently and not yet claimed hold their GPUs and count
    toward their org's share until the re-nudge interval passes."""
    now = now or utcnow()
    fleet = fleet or get_fleet()
    cutoff = now - timedelta(seconds=RENUDGE_SECONDS)
    with session_scope(settings.database_url) as session:
        # Each org's oldest BATCH queued jobs: one org's backlog cannot crowd the others out of the batch.
        rank = func.row_number().over(partition_by=Job.org_id, order_by=(Job.created_at, Job.id)).label("rank")
        ranked = select(Job.id, rank).where(Job.status == JobStatus.queued).subquery()
        queued = session.scalars(select(Job).join(ranked, ranked.c.id == Job.id).where(ranked.c.rank <= BATCH)).all()
        running = session.scalars(select(Job).where(Job.status == JobStatus.running)).all()
        offered = [j for j in queued if j.nudged_at is not None and j.nudged_at >= cutoff]
        due = [j for j in queued if j.nudged_at is None or j.nudged_at < cutoff]
        if not due:
            return 0
        capacity = fleet.gpu_capacity()
        busy: dict[str, int] = {}
        holding: dict[str, int] = {}
        for job in [*running, *offered]:
            holding[job.org_id] = holding.get(job.org_id, 0) + 1
            plan = _plan(job, fleet)
            if plan is not None and plan.gpu_class is not None:
                busy[plan.gpu_class] = busy.get(plan.gpu_class, 0) + plan.gpu_count
        orgs = {j.org_id for j in due}
        last_started = dict(session.execute(
            select(Job.org_id, func.max(Job.started_at)).where(Job.org_id.in_(orgs), Job.started_at.is_not(None)).group_by(Job.org_id)
        ).all())
        states = {org: OrgState(running=holding.get(org, 0), last_started=last_started.get(org)) for org in orgs}
        plans, candidates = {}, []
        for job in due:
            try:
                plan = route(JobSpec.model_validate(job.spec), None, fleet)
            except Unplaceable as e:  # the fleet shrank since the job was accepted
                jobs.fail(session, job, "unplaceable", str(e), "model")
                continue
            plans[job.id] = plan
            candidates.append(Candidate(job.id, job.org_id, job.created_at, plan.gpu_class, plan.gpu_count))
        free = None if capacity is None else {c: n - busy.get(c, 0) for c, n in capacity.items()}
        by_id = {j.id: j for j in due}
        order = fair_order(candidates, states, Limits.from_settings(settings), free)
        for c in order:
            job, plan = by_id[c.job_id], plans[c.job_id]
            if job.queue != plan.queue:
                job.queue = plan.queue
            job.nudged_at = now
            dispatcher.nudge(job.id, plan.queue)
    return len(order)


def tick(settings: Settings, dispatcher: Dispatcher) -> None:
    validate_files(settings)
    reap_expired(settings)
    nudge_queued(settings, dispatcher)
    global _last_expiry
    if time.monotonic() - _last_expiry >= EXPIRY_SECONDS:
        expire_uploads(settings)
        expire_files(settings)
        _last_expiry = time.monotonic()


def run_forever(settings: Settings, dispatcher: Dispatcher, stop: threading.Event, interval: float = 0.5, extra: Callable[[], object] | None = None) -> None:
    """Tick until ``stop``; ``extra`` runs after each tick (the Kubernetes backend's reconcile)."""
    while not stop.is_set():
        try:
            tick(settings, dispatcher)
            if extra is not None:
                extra()
        except Exception:  # keep scheduling through a database or API-server blip; the next tick retries
            log.exception("scheduler tick failed")
        stop.wait(interval)
