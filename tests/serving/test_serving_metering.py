"""Metering and observability: every inference that reached an engine is one usage record (retries
of a request id are not billed twice), an abandoned stream is billed for what was generated, and
requests show up in /metrics and in logs under their request id."""

from __future__ import annotations

import json
import time

import pytest

from scheduler.settings import BUILTIN_BASE_MODEL

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "count my tokens please"}]


def test_a_request_is_recorded_with_its_tokens_model_adapter_and_key(engines, gateway, make_org, make_adapter, usage_rows, db_session):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, key = make_org()
    model = make_adapter(org)

    answer = gw.client(key).chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=3)

    [row] = usage_rows(org)
    assert row.request_id == answer.headers["x-request-id"]
    assert (row.kind, row.model, row.adapter, row.status) == ("inference", BUILTIN_BASE_MODEL, model, "ok")
    assert (row.prompt_tokens, row.completion_tokens) == (4, 3)
    assert row.api_key_id is not None and row.latency_ms > 0


def test_retries_with_one_request_id_get_answers_but_are_billed_once(engines, gateway, make_org, usage_rows):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    client = gw.client(key)

    answers = [
        client.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=2, extra_headers={"x-request-id": "retry-me"})
        for _ in range(3)
    ]
    streamed = list(
        client.chat.completions.create(
            model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=2, stream=True, extra_headers={"x-request-id": "retry-me"}
        )
    )

    assert {a.choices[0].message.content for a in answers} == {f"{BUILTIN_BASE_MODEL} count"}
    assert streamed  # the retry was answered in full
    assert len(engine.state.served) == 4
    assert [(r.request_id, r.completion_tokens) for r in usage_rows(org)] == [("retry-me", 2)]


def test_the_same_request_id_in_two_orgs_is_two_records(engines, gateway, make_org, usage_rows):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    (org_a, key_a), (org_b, key_b) = make_org(), make_org()

    for key in (key_a, key_b):
        gw.client(key).completions.create(model=BUILTIN_BASE_MODEL, prompt="a b", max_tokens=1, extra_headers={"x-request-id": "shared"})

    assert [r.request_id for r in usage_rows(org_a)] == [r.request_id for r in usage_rows(org_b)] == ["shared"]


def test_a_stream_is_billed_from_the_engines_usage_even_when_the_client_did_not_ask(engines, gateway, make_org, usage_rows):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, key = make_org()

    list(gw.client(key).chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=5, stream=True))

    [row] = usage_rows(org)
    assert (row.prompt_tokens, row.completion_tokens, row.status) == (4, 5, "ok")


def test_failed_requests_are_not_billed(engines, gateway, make_org, make_adapter, usage_rows):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    other, _ = make_org()
    foreign = make_adapter(other)

    with gw.http() as http:
        headers = {"Authorization": f"Bearer {key}"}
        assert http.post("/v1/chat/completions", json={"model": foreign, "messages": MESSAGES}, headers=headers).status_code == 404
        assert http.post("/v1/chat/completions", json={"model": BUILTIN_BASE_MODEL, "messages": MESSAGES, "max_tokens": 0}, headers=headers).status_code == 400
        assert http.post("/v1/chat/completions", json={"model": BUILTIN_BASE_MODEL}, headers=headers).status_code == 400

    assert usage_rows(org) == []


def _wait_for_rows(usage_rows, org, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = usage_rows(org)
        if rows:
            return rows
        time.sleep(0.05)
    return []


@pytest.mark.slow
def test_an_abandoned_stream_is_billed_for_the_tokens_generated_so_far(engines, gateway, make_org, make_adapter, usage_rows):
    engine = engines(token_delay_s=0.05)
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    model = make_adapter(org)
    prompt = " ".join(f"w{i}" for i in range(200))  # the engine would echo 200 tokens at 20/s

    received = 0
    with gw.http() as http:
        body = {"model": model, "prompt": prompt, "max_tokens": 200, "stream": True}
        with http.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}", "x-request-id": "gone"}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"]:
                    received += 1
                if received == 3:
                    break  # leaving the block drops the connection

    [row] = _wait_for_rows(usage_rows, org)
    assert (row.request_id, row.status, row.adapter) == ("gone", "client_disconnected", model)
    # Billed for what was relayed: at least what the client read, far less than a full answer.
    assert 3 <= row.completion_tokens < 50
    assert row.completion_tokens <= engine.state.tokens_streamed
    # The engine was told to stop: it aborted the generation instead of finishing it.
    deadline = time.monotonic() + 5
    while engine.state.streams_aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.state.streams_aborted == 1 and engine.state.tokens_streamed < 50


def test_metrics_count_requests_by_route_and_status_and_tokens_by_model(engines, gateway, make_org, make_adapter):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, key = make_org()
    model = make_adapter(org)
    client = gw.client(key)
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
    client.completions.create(model=BUILTIN_BASE_MODEL, prompt="a b", max_tokens=2)
    expected = [
        'tuneforge_serving_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0',
        'tuneforge_serving_requests_total{method="GET",route="/v1/models",status="401"} 1.0',
        f'tuneforge_serving_tokens_total{{kind="prompt",model="{BUILTIN_BASE_MODEL}"}} 6.0',
        f'tuneforge_serving_tokens_total{{kind="completion",model="{BUILTIN_BASE_MODEL}"}} 5.0',
        f'tuneforge_serving_adapter_loads_total{{model="{BUILTIN_BASE_MODEL}"}} 1.0',
        'tuneforge_serving_request_duration_seconds_count{route="/v1/completions"} 1.0',
    ]
    with gw.http() as http:
        http.get("/v1/models")  # no key: 401
        # A request is counted after its last byte went out, so the count may trail the client.
        deadline = time.monotonic() + 5
        while True:
            text = http.get("/metrics").text
            if all(line in text for line in expected) or time.monotonic() > deadline:
                break
            time.sleep(0.02)

    assert [line for line in expected if line not in text] == []


def test_log_lines_carry_the_request_id(engines, gateway, make_org, caplog):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    _, key = make_org()

    def traced() -> set[str]:
        events = [json.loads(r.getMessage()) for r in caplog.records if r.name.startswith("serving")]
        return {e["event"] for e in events if e.get("request_id") == "traced-1"}

    with caplog.at_level("INFO"):
        gw.client(key).completions.create(model=BUILTIN_BASE_MODEL, prompt="a", max_tokens=1, extra_headers={"x-request-id": "traced-1"})
        # The access line is written after the last byte went out, so it may trail the client.
        deadline = time.monotonic() + 5
        while "request" not in traced() and time.monotonic() < deadline:
            time.sleep(0.02)

    assert {"forwarding", "usage recorded", "request"} <= traced()


def test_an_unusable_request_id_is_refused(engines, gateway, make_org):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    _, key = make_org()

    with gw.http() as http:
        response = http.get("/v1/models", headers={"Authorization": f"Bearer {key}", "x-request-id": "x" * 200})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-request-id"
    assert response.headers["x-request-id"].startswith("req_")
