"""The worker agent: claims jobs, supervises the trainer subprocess, and records what it reports.

One agent runs on each worker (a GPU node's pod, or the embedded scheduler process). For a job it:
1. claims it with a lease (a conditional UPDATE; losing the race means someone else has it);
2. starts ``python -m gpu_worker.train`` with the job spec on stdin, resuming from the job's last
   checkpoint when an earlier attempt left one; a job the scheduler planned across GPUs
   (``worker_kind="multi-gpu"``) gets the plan's placement in ``spec.runtime.distributed`` (GPU
   count, ZeRO stage, optimizer offload, micro-batch), and the trainer starts one DeepSpeed rank per
   GPU under torchrun (``gpu_worker/distributed.py``);
3. heartbeats the lease, and turns a cancel or pause request into SIGTERM (the trainer saves and stops);
4. turns each event line on the trainer's stdout into rows: job events, checkpoints, the adapter
   registration, the training usage record, the final status.

Every write is fenced by the lease token: if the reaper gave the job to another worker (this one
stalled), the stale agent's writes match nothing and it kills its trainer. If the agent itself dies,
the kernel kills the trainer (PR_SET_PDEATHSIG) and the trainer's stdin closes, so a job never runs
twice at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from datetime import timedelta

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gpu_worker import contract
from scheduler import jobs
from scheduler.db import session_scope
from scheduler.fairness import Limits
from scheduler.metering import Usage, record_usage
from scheduler.models import Adapter, Checkpoint, File, Job, JobStatus, Organization, utcnow
from scheduler.routing import Plan, Unplaceable, route
from scheduler.settings import Settings

log = logging.getLogger("tuneforge.agent")

_PR_SET_PDEATHSIG = 1
RESULTS_PURPOSE = "fine-tune-results"  # OpenAI's purpose for a job's result files
FOLDER_ARTIFACTS = frozenset({"adapter", "merged", "report"})  # the artifact key is a folder prefix


def place(spec: contract.JobSpec, plan: Plan | None) -> tuple[contract.JobSpec, str | None]:
    """The spec this worker runs for ``plan``, and a line for the job's events. A ``multi-gpu`` plan
    becomes ``runtime.distributed`` (its memory mode and kernel choice too), whatever the method
    (SFT and the preference loop both run on DeepSpeed ranks); any other plan leaves the spec as it is."""
    if plan is None or plan.worker_kind != "multi-gpu" or spec.runtime.distributed is not None:
        return spec, None
    placement = contract.Distributed(gpus_per_node=plan.gpu_count, zero_stage=plan.zero_stage or 2, offload_optimizer=plan.offload,
                                     micro_batch_size=plan.micro_batch_size)
    runtime = spec.runtime.model_copy(update={"distributed": placement, "memory_mode": contract.MemoryMode(plan.memory_mode),
                                              "use_kernels": spec.runtime.use_kernels and plan.uses_kernels})
    stage = f"ZeRO-{placement.zero_stage}" + (" with optimizer offload" if plan.offload else "")
    return spec.model_copy(update={"runtime": runtime}), f"Training on {plan.gpu_count} GPUs ({plan.gpu_class}) with DeepSpeed {stage}"


def _plan(spec: contract.JobSpec) -> Plan | None:
    """The scheduler's plan for ``spec`` (the same pure function the scheduler nudged it with)."""
    try:
        return route(spec)
    except Unplaceable:  # the fleet changed since the job was queued: run it as it is
        return None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the trainer's stdin watchdog still ends it
        pass


class LeaseLost(Exception):
    pass


class Agent:
    def __init__(self, settings: Settings, *, slots: int = 1, owner: str | None = None):
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._slots = threading.BoundedSemaphore(slots)
        self._running: dict[str, _Supervision] = {}
        self._lock = threading.Lock()

    # --- claiming ----------------------------------------------------------------------------
    def offer(self, job_id: str) -> bool:
        """Take the job if this agent has a free slot and the job is still queued."""
        if not self._slots.acquire(blocking=False):
            return False
        try:
            with session_scope(self.settings.database_url) as session:
                job = session.get(Job, job_id)
                if job is None or job.status != JobStatus.queued or self._org_at_limit(session, job.org_id):
                    self._slots.release()
                    return False
                token = jobs.claim(session, job, self.owner, self.settings.lease_seconds)
                if token is None:
                    self._slots.release()
                    return False
                jobs.add_event(session, job, f"Job started on {self.owner} (attempt {job.attempts})")
        except BaseException:
            self._slots.release()
            raise
        supervision = _Supervision(self.settings, job_id, token)
        with self._lock:
            self._running[job_id] = supervision
        threading.Thread(target=self._run, args=(supervision,), name=f"job-{job_id}", daemon=True).start()
        return True

    def _org_at_limit(self, session: Session, org_id: str) -> bool:
        """The org already runs as many jobs as it may (the scheduler only nudges within the limit,
        but a nudge may be stale by the time it arrives)."""
        limit = Limits.from_settings(self.settings).limit(org_id)
        if limit is None:
            return False
        running = session.scalar(select(func.count()).select_from(Job).where(Job.org_id == org_id, Job.status == JobStatus.running))
        return running >= limit

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._running)

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.busy:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    # --- supervising -------------------------------------------------------------------------
    def shutdown(self, timeout: float = 60.0) -> None:
        """Preempt running trainers (they checkpoint and the jobs go back to the queue) and wait."""
        with self._lock:
            active = list(self._running.values())
        for supervision in active:
            supervision.preempt()
        self.wait_idle(timeout)

    def _run(self, supervision: "_Supervision") -> None:
        job_id, token = supervision.job_id, supervision.token
        try:
            supervision.run()
        except Exception:
            log.exception("supervising job %s failed", job_id)
            with session_scope(self.settings.database_url) as session:
                job = session.get(Job, job_id)
                if job is not None:
                    jobs.fail(session, job, "internal_error", "the worker agent failed; see its logs", token=token)
        finally:
            with self._lock:
                self._running.pop(job_id, None)
            self._slots.release()


def _gate_line(r: contract.EvalReport) -> tuple[str, str]:
    """The gate's event (message, level). ``passed`` None: nothing was compared (no validation example),
    said as such and only a warning: the job completed, and a gate that compared nothing neither
    passed nor failed it."""
    if r.passed is None:
        return f"Evaluation gate not evaluated: {r.reason or 'no validation examples'}", "warn"
    return f"Evaluation gate {'passed' if r.passed else 'failed'}: base vs tuned on {r.examples} validation examples", "info"


class _Supervision:
    """One attempt at one job: the trainer process and the rows it produces."""

    def __init__(self, settings: Settings, job_id: str, token: str):
        self.settings = settings
        self.job_id = job_id
        self.token = token
        self.proc: subprocess.Popen | None = None
        self.stop_reason: str | None = None  # "cancel" | "pause" | "preempt" | "lease_lost"
        self.finished = threading.Event()
        self.ended = False  # the trainer's final event is recorded: the job left ``running`` with our token
        self.stderr_tail: deque[str] = deque(maxlen=40)

    def _session(self):
        return session_scope(self.settings.database_url)

    def _job(self, session: Session) -> Job:
        """The job, if this attempt still holds its lease."""
        job = session.scalar(select(Job).where(Job.id == self.job_id, Job.lease_token == self.token))
        if job is None or job.status != JobStatus.running:
            raise LeaseLost(self.job_id)
        return job

    def run(self) -> None:
        with self._session() as session:
            job = self._job(session)
            last = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step.desc()).limit(1))
            spec = contract.JobSpec.model_validate(job.spec)
            spec, placed = place(spec, _plan(spec))
            if placed:
                jobs.add_event(session, job, placed)
            if last is not None:
                spec = spec.model_copy(update={"resume_from_key": last.storage_key})
                jobs.add_event(session, job, f"Resuming from the checkpoint of step {last.step}")
        env = dict(os.environ, TUNEFORGE_STORAGE_URL=self.settings.storage_url, TUNEFORGE_DATA_DIR=str(self.settings.data_dir), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_worker.train"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self.proc.stdin.write((spec.model_dump_json() + "\n").encode())
        self.proc.stdin.flush()  # stdin stays open: its EOF tells the trainer we are gone
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        beat.start()
        terminal = None
        try:
            for raw in self.proc.stdout:
                try:
                    event = contract.parse_event(raw)
                except ValidationError:
                    log.warning("job %s: unparseable trainer output %r", self.job_id, raw[:200])
                    continue
                if self._record(event):
                    terminal = event
        except LeaseLost:
            self._kill()
        except BaseException:
            self._kill()  # never leave a trainer running unsupervised
            raise
        finally:
            self.finished.set()
            code = self.proc.wait()
            self.proc.stdin.close()
        if terminal is None and self.stop_reason != "lease_lost":
            self._trainer_died(code)

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail.append(text)
            log.info("[%s] %s", self.job_id, text)

    def preempt(self) -> None:
        if self.proc and self.proc.poll() is None and self.stop_reason is None:
            self.stop_reason = "preempt"
            self.proc.send_signal(signal.SIGTERM)

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()

    def _heartbeat(self) -> None:
        while not self.finished.wait(self.settings.heartbeat_seconds):
            try:
                with self._session() as session:
                    ours, asked = jobs.heartbeat(session, self.job_id, self.token, self.settings.lease_seconds)
            except Exception:  # a database blip: the lease has slack for a few misses
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)
                continue
            if not ours and self.ended:  # the job ended (its lease given up with it); the trainer is exiting
                return
            if not ours:
                self.stop_reason = "lease_lost"
                log.warning("job %s: lease lost; killing the trainer", self.job_id)
                self._kill()
                return
            if asked and self.stop_reason is None and self.proc.poll() is None:
                self.stop_reason = asked  # cancel or pause: the trainer checkpoints and stops
                self.proc.send_signal(signal.SIGTERM)

    # --- events → rows -------------------------------------------------------------------------
    def _record(self, event) -> bool:
        """Store one event; True if it ended the job."""
        with self._session() as session:
            job = self._job(session)
            if isinstance(event, contract.LogEvent):
                jobs.add_event(session, job, event.message, level=event.level)
            elif isinstance(event, contract.MetricsEvent):
                self._metrics(session, job, event)
            elif isinstance(event, contract.CheckpointEvent):
                self._checkpoint(session, job, event)
            elif isinstance(event, (contract.CompletedEvent, contract.FailedEvent, contract.StoppedEvent)):
                self.ended = True  # before the commit that gives the lease up (_heartbeat)
                if isinstance(event, contract.CompletedEvent):
                    self._completed(session, job, event)
                elif isinstance(event, contract.FailedEvent):
                    jobs.fail(session, job, event.code, event.message, event.param, token=self.token)
                else:
                    self._stopped(session, job, event)
                return True
        return False

    def _metrics(self, session: Session, job: Job, e: contract.MetricsEvent) -> None:
        data = e.model_dump(exclude={"schema_version", "type"})
        loss = f"{e.train_loss:.4f}" if e.train_loss is not None else "not finite (diverged)"
        parts = [f"Step {e.step}/{e.total_steps}: training loss={loss}"]
        if e.valid_loss is not None:
            parts.append(f"validation loss={e.valid_loss:.4f}")
        jobs.add_event(session, job, ", ".join(parts), type="metrics", data=data)
        job.trained_tokens = e.tokens
        if e.tokens_per_second and e.step:
            elapsed = (utcnow() - job.started_at).total_seconds() if job.started_at else 0.0
            remaining = elapsed / e.step * max(e.total_steps - e.step, 0)
            job.estimated_finish = utcnow() + timedelta(seconds=remaining)

    def _checkpoint(self, session: Session, job: Job, e: contract.CheckpointEvent) -> None:
        exists = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == e.step))
        if exists is None:
            metrics = {k: v for k, v in {"train_loss": e.train_loss, "valid_loss": e.valid_loss}.items() if v is not None}
            session.add(Checkpoint(job_id=job.id, org_id=job.org_id, step=e.step, storage_key=e.key, metrics=metrics))
            jobs.add_event(session, job, f"Checkpoint saved at step {e.step}")

    def _completed(self, session: Session, job: Job, e: contract.CompletedEvent) -> None:
        org = session.get(Organization, job.org_id)
        name = jobs.fine_tuned_model_name(job.model, org.name, job.suffix, job.id)
        moved = jobs.transition(
            session, job, JobStatus.succeeded, frm=(JobStatus.running,), token=self.token,
            fine_tuned_model=name, trained_tokens=e.trained_tokens, finished_at=utcnow(),
            lease_token=None, lease_owner=None, lease_expires_at=None,
        )
        if not moved:
            raise LeaseLost(job.id)
        session.add(Adapter(id=name, org_id=job.org_id, job_id=job.id, base_model=job.model, storage_key=e.manifest.key, manifest=e.manifest.model_dump(mode="json")))
        record_usage(session, Usage(org_id=job.org_id, request_id=f"training:{job.id}", kind="training", model=job.model, adapter=name, trained_tokens=e.trained_tokens))
        self._results(session, job, e)
        jobs.add_event(session, job, f"New fine-tuned model created: {name}")
        jobs.add_event(session, job, "The job has successfully completed")

    def _results(self, session: Session, job: Job, e: contract.CompletedEvent) -> None:
        """Downloadable artifacts become result files of the job; the eval gate's report an event."""
        ids = []
        for artifact in e.artifacts:
            key, filename = artifact.key, artifact.filename
            if artifact.kind in FOLDER_ARTIFACTS:  # downloaded as one tar of the folder
                key, filename = key.rstrip("/") + "/", f"{filename}.tar"
            row = File(org_id=job.org_id, filename=filename, purpose=RESULTS_PURPOSE, bytes=artifact.bytes or 0, storage_key=key, examples=0)
            session.add(row)
            session.flush()
            ids.append(row.id)
            jobs.add_event(session, job, f"Result file {row.id}: {artifact.kind} {artifact.filename}", data={"file_id": row.id, "kind": artifact.kind, **artifact.detail})
        job.result_files = ids
        if e.eval_report is not None:
            message, level = _gate_line(e.eval_report)
            jobs.add_event(session, job, message, level=level, data=e.eval_report.model_dump(mode="json"))

    def _stopped(self, session: Session, job: Job, e: contract.StoppedEvent) -> None:
        done = dict(finished_at=utcnow(), lease_token=None, lease_owner=None, lease_expires_at=None)
        if job.cancel_requested:
            jobs.transition(session, job, JobStatus.cancelled, frm=(JobStatus.running,), token=self.token, **done)
            jobs.add_event(session, job, f"Job cancelled at step {e.step}; its last checkpoint is kept")
        elif job.pause_requested:
            jobs.stopped_by_pause(session, job, self.token, f"at step {e.step}")
        else:  # preempted (SIGTERM from outside): back to the queue, resume from the checkpoint
            jobs.transition(session, job, JobStatus.queued, frm=(JobStatus.running,), token=self.token, lease_token=None, lease_owner=None, lease_expires_at=None, nudged_at=None)
            jobs.add_event(session, job, f"Worker preempted at step {e.step}; job re-queued", level="warn")

    def _trainer_died(self, code: int) -> None:
        """The trainer exited without a final event (crash, OOM kill). Give the attempt back to the
        queue while attempts remain; the next one resumes from the last checkpoint."""
        tail = "\n".join(list(self.stderr_tail)[-5:])
        with self._session() as session:
            try:
                job = self._job(session)
            except LeaseLost:
                return
            if job.cancel_requested:
                jobs.transition(session, job, JobStatus.cancelled, frm=(JobStatus.running,), token=self.token, finished_at=utcnow(), lease_token=None)
                jobs.add_event(session, job, "Job cancelled")
                return
            jobs.add_event(session, job, f"Trainer exited with code {code}: {tail[-500:]}", level="error")
            if job.pause_requested:
                jobs.stopped_by_pause(session, job, self.token, "(its trainer exited)", failed=True)
                return
            jobs.reap(session, job, self.settings.max_attempts)

