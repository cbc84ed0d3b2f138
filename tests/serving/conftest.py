"""Fixtures for the gateway tests: live uvicorn servers on loopback ports (fake vLLM engines and the
gateway itself), the gateway running on the test's rolled-back PostgreSQL session, and adapters in
the registry. The stock ``openai`` SDK is the client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from sqlalchemy import select

from fake_vllm import EngineState, create_engine_app
from scheduler.jobs import fine_tuned_model_name
from scheduler.models import Adapter, Job, JobStatus, UsageRecord
from scheduler.settings import BUILTIN_BASE_MODEL
from serving.adapter_registry import record_check
from serving.app import create_app
from serving.database import Database
from serving.logs import configure_logging
from serving.metering import Outcome
from serving.settings import ServingSettings

# JSON lines through stdlib logging, as in production, so that caplog sees the gateway's records.
configure_logging("info")


class LiveServer:
    """An ASGI app served by uvicorn in a thread, on 127.0.0.1 (a free port, or a given one)."""

    def __init__(self, app, port: int = 0):
        self.app = app
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LiveServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts reuse the port at once
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class FakeEngine:
    state: EngineState
    server: LiveServer

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        """Start a fresh engine (nothing loaded) on the same port."""
        old = self.state
        self.state = EngineState(
            base_model=old.base_model, load_delay_s=old.load_delay_s, token_delay_s=old.token_delay_s,
            resolver_store=old.resolver_store, logprob_shift=old.logprob_shift,
        )
        self.server = LiveServer(create_engine_app(self.state), self.server.port).start()

    def restart(self) -> None:
        self.stop()
        self.start()


class RecordingMeter:
    """A usage meter (serving.metering.Meter's two calls) that keeps what it was told."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.progressed: list[tuple[int, int]] = []

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def progress(self, prompt: int, completion: int) -> None:
        self.progressed.append((prompt, completion))


@pytest.fixture
def engines():
    """engines(base=..., load_delay_s=..., token_delay_s=...) -> a running FakeEngine."""
    started: list[FakeEngine] = []

    def start(base: str = BUILTIN_BASE_MODEL, **options) -> FakeEngine:
        state = EngineState(base_model=base, **options)
        engine = FakeEngine(state, LiveServer(create_engine_app(state)).start())
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.server.stop()


@pytest.fixture
def test_db(db_session) -> Database:
    """The gateway's Database on the test's session. One connection serves the gateway's worker
    threads and the test, so units of work take turns."""
    lock = threading.RLock()

    @contextlib.contextmanager
    def scope():
        with lock:
            # What the test set up (flushed, not committed) is committed data as far as the gateway
            # is concerned; without this a unit of work that rolls back would take it along.
            db_session.commit()
            try:
                yield db_session
                db_session.commit()
            except BaseException:
                db_session.rollback()
                raise

    return Database(scope)


@dataclass
class Gateway:
    server: LiveServer
    app: object

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, key: str, **options) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=self.url + "/v1", max_retries=0, timeout=20, **options)

    def async_client(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url=self.url + "/v1", max_retries=0, timeout=20)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=20)


@pytest.fixture
def gateway(test_db, data_dir, pg_url):
    """gateway({base: [engine urls]}, **settings) -> a running Gateway on the test's session."""
    started: list[LiveServer] = []

    def start(engine_urls: dict[str, list[str]], **settings) -> Gateway:
        settings.setdefault("engine_connect_timeout_s", 2.0)
        settings.setdefault("engine_read_timeout_s", 20.0)
        settings.setdefault("base_models", [BUILTIN_BASE_MODEL])
        # The test and the gateway share one session (test_db): usage batches are written only when the
        # test asks (usage_rows) or at shutdown, never by the timer in the middle of the test's own work.
        settings.setdefault("usage_flush_interval_s", 3600.0)
        config = ServingSettings(data_dir=data_dir, database_url=pg_url, engines=engine_urls, **settings)
        app = create_app(config, database=test_db)
        server = LiveServer(app).start()
        started.append(Gateway(server, app))
        return started[-1]

    start.started = started
    yield start
    for gw in started:
        gw.server.stop()


@pytest.fixture
def make_adapter(db_session):
    """make_adapter(org, base=..., suffix=...) -> the fine-tuned model name, registered for org."""

    def make(org, base: str = BUILTIN_BASE_MODEL, suffix: str = "demo", checked: bool = True, storage_key: str | None = None) -> str:
        """``checked``: registered as version 1 of its name, as if its compatibility check had passed;
        otherwise as the agent leaves it (the check runs at first use)."""
        job = Job(org_id=org.id, model=base, training_file_id="file-test", seed=0, method={"type": "supervised"}, spec={}, status=JobStatus.succeeded)
        db_session.add(job)
        db_session.flush()
        name = fine_tuned_model_name(base, org.name, suffix, job.id)
        adapter = Adapter(id=name, org_id=org.id, job_id=job.id, base_model=base, storage_key=storage_key or f"adapters/{job.id}", manifest={})
        db_session.add(adapter)
        db_session.flush()
        if checked:
            record_check(db_session, org.id, name, {"passed": True, "static": {}, "logits": {"status": "not_checked"}})
        return name

    return make


@pytest.fixture
def usage_rows(test_db, gateway):
    """usage_rows(org) -> the org's usage records, oldest first, once every running gateway has written
    the records it journaled so far (serving.usage_writer batches them behind the responses)."""

    def rows(org) -> list[UsageRecord]:
        for gw in gateway.started:
            if gw.server.thread.is_alive():
                gw.app.state.usage_writer.flush_blocking()
        with test_db.scope() as session:
            return list(session.scalars(select(UsageRecord).where(UsageRecord.org_id == org.id).order_by(UsageRecord.id)))

    return rows
