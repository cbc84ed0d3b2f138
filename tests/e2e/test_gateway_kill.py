"""A gateway process killed with SIGKILL in the middle of a stream: the next gateway started on the same
usage journal bills the stream with the running count it had journaled (status gateway_restarted),
once, and frees its request id so that the client's retry runs again (billed as its own attempt)
instead of answering 409."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import select

from scheduler.db import session_scope
from scheduler.models import StoredResponse, UsageRecord
from scheduler.settings import BUILTIN_BASE_MODEL
from tests.e2e.conftest import spawn, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT_WORDS = 120
ANSWER_TOKENS = PROMPT_WORDS + 1  # the fake engine answers the model's name, then the prompt's words
ENGINE = """
import sys, uvicorn
sys.path.insert(0, "tests/serving")
from fake_vllm import EngineState, create_engine_app
uvicorn.run(create_engine_app(EngineState(base_model=%(base)r, token_delay_s=0.05)), host="127.0.0.1", port=%(port)d, log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gateway(env: dict, port: int, log_path):
    process = spawn(["serving", "--port", str(port), "--log-level", "warning"], env, log_path)
    wait_for(lambda: _answers(port), 60, "the gateway to start", interval=0.2)
    return process


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 401
    except httpx.HTTPError:
        return False


def _records(url: str, org_id: str) -> dict[str, tuple[int, int, str]]:
    with session_scope(url) as session:
        rows = session.scalars(select(UsageRecord).where(UsageRecord.org_id == org_id)).all()
        return {r.request_id: (r.prompt_tokens, r.completion_tokens, r.status) for r in rows}


def test_a_stream_cut_by_a_killed_gateway_is_billed_by_the_next_one(platform_env, org_and_key, tmp_path):
    url = platform_env["TUNEFORGE_DATABASE_URL"]
    org_id, key = org_and_key
    engine_port, gateway_port = _free_port(), _free_port()
    engine = subprocess.Popen([sys.executable, "-c", ENGINE % {"base": BUILTIN_BASE_MODEL, "port": engine_port}],
                              stdout=open(tmp_path / "engine.log", "ab"), stderr=subprocess.STDOUT)
    env = dict(
        platform_env,
        TUNEFORGE_ENGINES=json.dumps({BUILTIN_BASE_MODEL: [f"http://127.0.0.1:{engine_port}"]}),
        TUNEFORGE_USAGE_JOURNAL_DIR=str(tmp_path / "journal"),
        TUNEFORGE_USAGE_PROGRESS_INTERVAL_S="0.1",
    )
    headers = {"Authorization": f"Bearer {key}", "x-request-id": "killed-mid-stream"}
    body = {"model": BUILTIN_BASE_MODEL, "messages": [{"role": "user", "content": " ".join(["w"] * PROMPT_WORDS)}],
            "max_tokens": 200, "stream": True}
    gateway = None
    try:
        wait_for(lambda: _answers_engine(engine_port), 60, "the engine to start", interval=0.2)
        gateway = _gateway(env, gateway_port, tmp_path / "gateway1.log")
        seen = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                assert response.status_code == 200
                lines = response.iter_lines()  # held: a dropped iterator closes the response
                while seen < 10:
                    line = next(lines)
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        seen += 1
                time.sleep(0.5)  # the stream goes on (about 10 tokens more), its count journaled every 0.1 s
                gateway.send_signal(signal.SIGKILL)
                gateway.wait(10)
        assert "killed-mid-stream" not in _records(url, org_id)  # the dead gateway wrote nothing for it

        gateway = _gateway(env, gateway_port, tmp_path / "gateway2.log")  # replays the journal at start
        prompt, completion, status = _records(url, org_id)["killed-mid-stream"]
        assert (prompt, status) == (PROMPT_WORDS, "gateway_restarted")
        assert seen + 5 <= completion < ANSWER_TOKENS  # what the stream had reached, journaled before the kill
        with session_scope(url) as session:
            assert session.get(StoredResponse, (org_id, "killed-mid-stream")).state == "failed"

        # the client retries: its request id runs again at once, billed as its own attempt
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=60) as client:
            retry = client.post("/v1/chat/completions", json=body, headers=headers)
        assert retry.status_code == 200 and "[DONE]" in retry.text
        wait_for(lambda: "killed-mid-stream#2" in _records(url, org_id), 10, "the retry's record", interval=0.1)
        records = _records(url, org_id)
        assert records["killed-mid-stream#2"] == (PROMPT_WORDS, ANSWER_TOKENS, "ok")
        assert len(records) == 2
    finally:
        for process in (gateway, engine):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(30)


def _answers_engine(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
