"""A job through real Redis, a real Celery worker process and real PostgreSQL, surviving kill -9.

Objects (the training file, checkpoints, the adapter) live in S3 (moto's server on loopback). The
scheduler nudges the worker over Celery; the worker agent claims the job with a lease and runs
the trainer. Killing the worker with SIGKILL mid-training takes its trainer down with it; the reaper
returns the job to the queue once the lease expires; a new worker resumes from the last checkpoint
and the job succeeds. At no moment do two trainers run the job.
"""

import signal
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from gpu_worker.storage import open_store
from scheduler.db import session_scope
from scheduler.models import Adapter, Checkpoint, Job, JobEvent, JobStatus, UsageRecord
from tests.conftest import REDIS_URL
from tests.e2e.conftest import create_job, spawn, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _trainer_pids(parent: int) -> list[int]:
    """Live trainer processes started by ``parent`` (read from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z" and b"gpu_worker.train" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _job(url: str, job_id: str) -> Job:
    with session_scope(url) as session:
        return session.get(Job, job_id)


def test_job_survives_kill_9_of_its_worker(platform_env, org_and_key, s3_bucket, tmp_path):
    """Production parts throughout: PostgreSQL, Redis + Celery, and S3 for every object."""
    bucket, aws_env = s3_bucket
    env = dict(platform_env, **aws_env, TUNEFORGE_BROKER_URL=REDIS_URL.rsplit("/", 1)[0] + "/7", TUNEFORGE_STORAGE_URL=f"s3://{bucket}/tuneforge")
    store = open_store(env["TUNEFORGE_STORAGE_URL"])
    redis.Redis.from_url(env["TUNEFORGE_BROKER_URL"]).flushdb()
    url = env["TUNEFORGE_DATABASE_URL"]
    org_id, _ = org_and_key
    job_id = create_job(url, org_id, store, status=JobStatus.validating_files)

    scheduler = spawn(["scheduler", "scheduler"], env, tmp_path / "scheduler.log")
    worker = spawn(["scheduler", "worker"], env, tmp_path / "worker1.log")
    try:
        def checkpointed():
            with session_scope(url) as session:
                return session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id))

        first_step = wait_for(checkpointed, 240, "a first checkpoint")
        assert _job(url, job_id).status == JobStatus.running
        trainers = _trainer_pids(worker.pid)
        assert len(trainers) == 1
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        wait_for(lambda: not _alive(trainers[0]), 10, "the orphaned trainer to die with its worker")

        wait_for(lambda: _job(url, job_id).status == JobStatus.queued, 30, "the reaper to requeue the job")
        worker = spawn(["scheduler", "worker"], env, tmp_path / "worker2.log")
        wait_for(lambda: _job(url, job_id).status.terminal, 300, "the job to finish")
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
            proc.wait(30)

    job = _job(url, job_id)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert job.status == JobStatus.succeeded, (job.error, logs[-3000:])
    assert job.attempts == 2
    assert job.fine_tuned_model == f"ft:tuneforge-tiny:acme:e2e:{job_id}"
    with session_scope(url) as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).all()
        resume = next((i for i, e in enumerate(events) if e.message.startswith("Resuming from the checkpoint of step")), None)
        assert resume is not None, [e.message for e in events]
        resumed_at = int(events[resume].message.rsplit(" ", 1)[1])
        assert resumed_at >= first_step
        # training continues from the checkpoint, not from step 0
        next_metrics = next(e for e in events[resume:] if e.type == "metrics")
        assert next_metrics.data["step"] == resumed_at + 1
        assert session.get(Adapter, job.fine_tuned_model) is not None
        usage = session.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id, UsageRecord.kind == "training")).all()
        assert len(usage) == 1 and usage[0].trained_tokens == job.trained_tokens > 0
    adapter_files = store.list(f"orgs/{org_id}/jobs/{job_id}/adapter/")
    assert any(k.endswith("adapter_model.safetensors") for k in adapter_files)
    assert any(k.endswith("adapter_config.json") for k in adapter_files)
