"""Fixtures for flows across processes: a migrated scratch database, a storage folder, an org with a
key, and a small chat dataset in the store."""

import json
import os
import random
import subprocess
import sys
import time

import pytest

from gpu_worker.contract import Hyperparameters, JobSpec, Runtime
from gpu_worker.storage import LocalStore
from scheduler.db import session_scope
from scheduler.migrate import upgrade
from scheduler.models import File, Job, JobStatus, Role, new_id
from scheduler.tenancy import create_api_key, get_or_create_org


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: answer with the colour of a fruit."""
    colours = {"banana": "yellow", "cherry": "red", "lime": "green", "plum": "purple", "orange": "orange", "kiwi": "brown"}
    rng = random.Random(seed)
    rows = []
    for i in range(n):  # distinct rows: the trainer drops exact duplicates
        fruit = rng.choice(sorted(colours))
        rows.append({"messages": [{"role": "user", "content": f"Question {i}: what colour is a {fruit}?"}, {"role": "assistant", "content": colours[fruit]}]})
    return rows


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def platform_env(scratch_database, tmp_path):
    """Environment for platform processes: PostgreSQL, a local store, fast leases."""
    url = scratch_database("e2e")
    upgrade(url)
    data_dir = tmp_path / "data"
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        TUNEFORGE_DATABASE_URL=url,
        TUNEFORGE_DATA_DIR=str(data_dir),
        TUNEFORGE_STORAGE_URL=str(data_dir / "objects"),
        TUNEFORGE_LEASE_SECONDS="4",
        TUNEFORGE_HEARTBEAT_SECONDS="1",
    )
    return env


@pytest.fixture
def org_and_key(platform_env):
    with session_scope(platform_env["TUNEFORGE_DATABASE_URL"]) as session:
        org = get_or_create_org(session, "acme")
        _, key = create_api_key(session, org, "e2e", Role.admin)
        return org.id, key


def spawn(args: list[str], env: dict, log_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def store(platform_env):
    return LocalStore(platform_env["TUNEFORGE_STORAGE_URL"])


def create_job(url: str, org_id: str, store, status: JobStatus, epochs: int = 4) -> str:
    """A job row (with its training file in the store) as the API would write it."""
    key = f"orgs/{org_id}/files/train.jsonl"
    rows = chat_rows(60)
    store.put_bytes(key, jsonl(rows))
    with session_scope(url) as session:
        f = File(org_id=org_id, filename="train.jsonl", purpose="fine-tune", bytes=1, storage_key=key, examples=len(rows))
        session.add(f)
        session.flush()
        job_id = new_id("ftjob-")
        spec = JobSpec(
            job_id=job_id, org_id=org_id, base_model="tuneforge-tiny", seed=3,
            hyperparameters=Hyperparameters(n_epochs=epochs, batch_size=2, learning_rate=1e-3),
            training_file_key=key, output_prefix=f"orgs/{org_id}/jobs/{job_id}",
            runtime=Runtime(checkpoint_every_steps=5, use_kernels=False),
        )
        session.add(Job(id=job_id, org_id=org_id, model="tuneforge-tiny", training_file_id=f.id, seed=3, suffix="e2e", method={"type": "supervised"}, spec=spec.model_dump(mode="json"), status=status))
    return job_id
