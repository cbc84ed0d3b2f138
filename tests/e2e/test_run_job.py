"""`tuneforge run-job`: what a Kubernetes Job's pod runs. It claims its one job, trains it, records
the result and exits; pointed at a job that is no longer queued it does nothing."""

import subprocess
import sys

import pytest

from scheduler.db import session_scope
from scheduler.models import Adapter, Job, JobStatus
from tests.e2e.conftest import create_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run_job(env: dict, job_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler", "run-job", "--job-id", job_id], env=env, capture_output=True, text=True, timeout=300)


def test_run_job_trains_its_job_and_exits(platform_env, org_and_key, store):
    url = platform_env["TUNEFORGE_DATABASE_URL"]
    job_id = create_job(url, org_and_key[0], store, status=JobStatus.queued, epochs=1)
    done = _run_job(platform_env, job_id)
    assert done.returncode == 0, done.stderr[-2000:]
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.succeeded and job.attempts == 1
        assert session.get(Adapter, job.fine_tuned_model) is not None

    again = _run_job(platform_env, job_id)  # a pod restarted after the job finished
    assert again.returncode == 0 and "nothing to do" in again.stdout
    with session_scope(url) as session:
        assert session.get(Job, job_id).attempts == 1
