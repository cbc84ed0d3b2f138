"""The scheduler's loop: moves jobs along the state machine and keeps workers nudged.

Each tick, in its own transactions:
1. ``validating_files`` jobs: re-check their files (still there, enough examples) → ``queued`` or failed;
2. ``running`` jobs whose lease expired (their worker died): back to the queue, or failed after
   ``max_attempts``;
3. ``queued`` jobs not nudged recently: route them and nudge their queue, oldest first. A job stays
   queued until a worker claims it, so a lost nudge costs only a re-nudge.

Ticks are idempotent and every move is conditional, so several scheduler replicas may run at once.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import or_, select

from gpu_worker.contract import JobSpec
from gpu_worker.storage import open_store
from scheduler import jobs
from scheduler.db import session_scope
from scheduler.dispatch import Dispatcher
from scheduler.models import File, Job, JobStatus, utcnow
from scheduler.routing import route
from scheduler.settings import Settings

log = logging.getLogger("tuneforge.scheduler")

MIN_EXAMPLES = 10
RENUDGE_SECONDS = 5.0
BATCH = 50


def validate_files(settings: Settings) -> int:
    store = open_store(settings.storage_url)
    moved = 0
    with session_scope(settings.database_url) as session:
        pending = session.scalars(select(Job).where(Job.status == JobStatus.validating_files).order_by(Job.created_at).limit(BATCH)).all()
        for job in pending:
            problem = None
            for param, file_id in (("training_file", job.training_file_id), ("validation_file", job.validation_file_id)):
                if file_id is None:
                    continue
                f = session.get(File, file_id)
                if f is None or f.org_id != job.org_id or not store.exists(f.storage_key):
                    problem = (param, f"file {file_id} no longer exists")
                elif param == "training_file" and f.examples < MIN_EXAMPLES:
                    problem = (param, f"training file has {f.examples} examples; at least {MIN_EXAMPLES} are required")
                if problem:
                    break
            if problem:
                jobs.fail(session, job, "invalid_" + problem[0], problem[1], problem[0])
            elif jobs.mark_queued(session, job):
                moved += 1
    return moved


def reap_expired(settings: Settings) -> int:
    with session_scope(settings.database_url) as session:
        expired = jobs.expired_leases(session)
        for job in expired:
            outcome = jobs.reap(session, job, settings.max_attempts)
            log.warning("job %s: lease expired (owner %s): %s", job.id, job.lease_owner, outcome)
    return len(expired)


def nudge_queued(settings: Settings, dispatcher: Dispatcher) -> int:
    cutoff = utcnow() - timedelta(seconds=RENUDGE_SECONDS)
    with session_scope(settings.database_url) as session:
        due = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.queued, or_(Job.nudged_at.is_(None), Job.nudged_at < cutoff))
            .order_by(Job.created_at)
            .limit(BATCH)
        ).all()
        for job in due:
            plan = route(JobSpec.model_validate(job.spec))
            if job.queue != plan.queue:
                job.queue = plan.queue
            job.nudged_at = utcnow()
            dispatcher.nudge(job.id, plan.queue)
    return len(due)


def tick(settings: Settings, dispatcher: Dispatcher) -> None:
    validate_files(settings)
    reap_expired(settings)
    nudge_queued(settings, dispatcher)


def run_forever(settings: Settings, dispatcher: Dispatcher, stop: threading.Event, interval: float = 0.5) -> None:
    while not stop.is_set():
        try:
            tick(settings, dispatcher)
        except Exception:  # keep scheduling through a database blip; the next tick retries
            log.exception("scheduler tick failed")
        stop.wait(interval)
