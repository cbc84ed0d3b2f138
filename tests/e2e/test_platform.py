"""The whole platform on embedded defaults, driven by the stock openai SDK: upload → job → train →
adapter in the store → chat with the tuned model (plain and streamed) → usage metered once."""

import random
import socket
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import select

from scheduler.db import session_scope
from scheduler.models import UsageRecord
from scheduler.platform import Platform
from scheduler.settings import Settings
from scheduler.tenancy import generate_key
from tests.e2e.conftest import chat_rows, jsonl, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port_block(n: int = 3) -> int:
    """A base port whose ``n`` ports (the API's, serving's and the engine's: Platform) are all free now.
    Below the kernel's ephemeral range: a port from ``bind(0)`` is free, but its neighbours may be the local
    ports of outgoing connections (this session's PostgreSQL and Redis clients), which took serving's port
    once (CI, 2026-12-05)."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(20000, max(20001, low - n))
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no block of {n} free ports")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("platform")
    settings = Settings(data_dir=data_dir, bootstrap_api_key=generate_key())
    p = Platform(settings, port=_free_port_block(), log_dir=data_dir / "logs")
    p.start()
    yield p
    p.stop()


def test_fine_tune_and_chat(platform):
    s = platform.settings
    client = openai.OpenAI(base_url=f"{platform.api_url}/v1", api_key=s.bootstrap_api_key, max_retries=0, timeout=60)
    train = client.files.create(file=("train.jsonl", jsonl(chat_rows(40, seed=1))), purpose="fine-tune")
    valid = client.files.create(file=("valid.jsonl", jsonl(chat_rows(10, seed=2))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tuneforge-tiny", training_file=train.id, validation_file=valid.id, suffix="e2e", seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    )
    assert job.status == "validating_files"
    job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j, 300, "the job to finish", 1.0)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:tuneforge-tiny:default:e2e:") and job.trained_tokens > 0
    # estimated from the files before the job was queued, with the trainer's own tokenization
    assert job.model_extra["estimated_tokens"] == job.trained_tokens
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any(e.type == "metrics" and e.data["train_loss"] > 0 for e in events)
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data

    ids = {m.id: m.owned_by for m in client.models.list().data}
    assert ids["tuneforge-tiny"] == "system" and job.fine_tuned_model in ids

    messages = [{"role": "user", "content": "What colour is a lime?"}]
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=5, temperature=0, extra_headers={"x-request-id": "req-plain"})
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}, extra_headers={"x-request-id": "req-stream"}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    completion = client.completions.create(model="tuneforge-tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens <= 3

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ft:tuneforge-tiny:other:x:ftjob-nope", messages=messages)

    def usage_by_request():
        with session_scope(s.database_url) as session:
            return {r.request_id: r for r in session.scalars(select(UsageRecord)).all()}

    # The gateway writes usage in batches (every 100 ms, journaled first): records land shortly after.
    wait_for(lambda: {"req-plain", "req-stream"} <= usage_by_request().keys(), 10, "the usage records of both chat requests")
    with session_scope(s.database_url) as session:
        rows = session.scalars(select(UsageRecord)).all()
        by_req = {r.request_id: r for r in rows}
        assert by_req["req-plain"].completion_tokens == reply.usage.completion_tokens
        assert by_req["req-plain"].adapter == job.fine_tuned_model
        assert by_req["req-stream"].completion_tokens == chunks[-1].usage.completion_tokens
        assert by_req[f"training:{job.id}"].trained_tokens == job.trained_tokens
    metrics = httpx.get(f"{platform.api_url}/metrics").text
    assert "tuneforge" in metrics


def test_cancel_a_running_job_stops_it_within_seconds_and_keeps_a_checkpoint(platform):
    import time

    client = openai.OpenAI(base_url=f"{platform.api_url}/v1", api_key=platform.settings.bootstrap_api_key, max_retries=0, timeout=60)
    train = client.files.create(file=("long.jsonl", jsonl(chat_rows(40, seed=3))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tuneforge-tiny", training_file=train.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}},
    )

    def training():
        return any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data)

    wait_for(training, 120, "the job to start training", 0.5)
    asked = time.monotonic()
    assert client.fine_tuning.jobs.cancel(job.id).status in ("running", "cancelled")
    job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "cancelled" and j, 20, "the job to stop", 0.25)
    assert time.monotonic() - asked < 20
    assert job.fine_tuned_model is None
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number > 0
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Job cancelled at step") for m in messages), messages


def test_pause_a_running_job_then_resume_it_from_its_checkpoint(platform):
    """OpenAI's pause and resume on a real trainer: the worker stops the job at a checkpoint, the job
    waits paused, and the resumed attempt continues from that checkpoint to a tuned model."""
    client = openai.OpenAI(base_url=f"{platform.api_url}/v1", api_key=platform.settings.bootstrap_api_key, max_retries=0, timeout=60)
    train = client.files.create(file=("pause.jsonl", jsonl(chat_rows(40, seed=4))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tuneforge-tiny", training_file=train.id, metadata={"test": "pause"},
        # 1,000 steps: the tiny model trains ~35 a second here, and the worker sees the pause at its next
        # heartbeat (every 5 s); 160 steps once finished before it (CI, 2026-12-05)
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 25, "batch_size": 1}}},
    )

    def training():
        return any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data)

    wait_for(training, 120, "the job to start training", 0.5)
    assert client.fine_tuning.jobs.pause(job.id).status in ("pausing", "paused")
    try:
        wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "paused", 120, "the job to pause", 0.25)
    except AssertionError as err:  # what the job did instead, for the failure's text
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=15).data]
        raise AssertionError(f"{err}: status {client.fine_tuning.jobs.retrieve(job.id).status}, events {events}") from None
    [last] = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1).data
    assert 0 < last.step_number < 1000
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j, 300,
                    "the resumed job to finish", 1.0)
    assert done.status == "succeeded", done.error
    assert done.metadata == {"test": "pause"} and done.fine_tuned_model
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]  # every page
    assert f"Job paused at step {last.step_number}; resume it to continue from its last checkpoint" in messages, messages[:20]
    assert f"Resuming from the checkpoint of step {last.step_number}" in messages
