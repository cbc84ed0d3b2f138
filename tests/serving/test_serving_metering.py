"""Metering and observability: every run of a request on an engine is one usage record, whatever its
outcome; a retry of a request id that succeeded is answered from the stored response and not billed
again, one that failed runs again as its own attempt; an id still running answers 409 and an id
reused for another body 400; an abandoned stream is billed for what was generated; requests show up
in /metrics and in logs under their request id."""

from __future__ import annotations

import json
import time

import openai
import pytest
from sqlalchemy import select

from scheduler.models import StoredResponse
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


def test_retries_of_a_success_are_answered_from_the_stored_response_without_the_engine(engines, gateway, make_org, usage_rows):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    client = gw.client(key)

    answers = [
        client.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=2, extra_headers={"x-request-id": "retry-me"})
        for _ in range(3)
    ]

    assert {a.choices[0].message.content for a in answers} == {f"{BUILTIN_BASE_MODEL} count"}
    assert len({a.model_dump_json() for a in answers}) == 1  # the same answer, id and all
    assert len(engine.state.served) == 1  # the retries never reached the engine
    assert [(r.request_id, r.completion_tokens, r.status) for r in usage_rows(org)] == [("retry-me", 2, "ok")]


def test_a_request_without_a_client_id_claims_and_stores_nothing(engines, gateway, make_org, usage_rows, test_db):
    """An id the gateway generated cannot come back in a retry: no claim, no stored response (no database
    round trip on the request's path), one record per run under its generated id."""
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    client = gw.client(key)

    answers = [client.chat.completions.with_raw_response.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=2)
               for _ in range(2)]

    assert len(engine.state.served) == 2
    ids = [a.headers["x-request-id"] for a in answers]
    assert [(r.request_id, r.completion_tokens, r.status) for r in usage_rows(org)] == [(i, 2, "ok") for i in ids]
    with test_db.scope() as session:
        assert session.scalars(select(StoredResponse).where(StoredResponse.org_id == org.id)).all() == []


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_success_is_replayed_as_a_stream(engines, gateway, make_org, usage_rows, include_usage):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    client = gw.client(key)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}

    def ask() -> list:
        return list(client.chat.completions.create(
            model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=4, stream=True, extra_headers={"x-request-id": "streamed"}, **options
        ))

    first, again = ask(), ask()

    def text(chunks) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert text(again) == text(first) == f"{BUILTIN_BASE_MODEL} count my tokens"
    assert again[0].choices[0].delta.role == "assistant" and again[0].id == first[0].id
    assert [c.choices[0].finish_reason for c in again if c.choices][-1] == "length"
    usages = [(c.usage.prompt_tokens, c.usage.completion_tokens) for c in again if c.usage is not None]
    assert usages == ([(4, 4)] if include_usage else [])
    assert (again[-1].choices == []) is include_usage  # the usage chunk comes last, as in the live stream
    assert len(engine.state.served) == 1
    assert [(r.request_id, r.completion_tokens) for r in usage_rows(org)] == [("streamed", 4)]


def test_a_request_id_reused_for_another_request_is_refused(engines, gateway, make_org, usage_rows):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    client = gw.client(key)
    client.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=2, extra_headers={"x-request-id": "once"})

    other = [{"role": "user", "content": "something else entirely"}]
    for kwargs in (dict(messages=other, max_tokens=2), dict(messages=MESSAGES, max_tokens=3), dict(messages=MESSAGES, max_tokens=2, stream=True)):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=BUILTIN_BASE_MODEL, extra_headers={"x-request-id": "once"}, **kwargs)
        assert (err.value.body["param"], err.value.body["code"]) == ("x-request-id", "request_id_reused")
        assert "x-request-id" in err.value.message

    assert len(engine.state.served) == 1  # nothing free: the other bodies never ran
    assert [r.request_id for r in usage_rows(org)] == ["once"]


def test_a_request_id_still_running_answers_409(engines, gateway, make_org, usage_rows):
    engine = engines(token_delay_s=0.05)
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    client = gw.client(key)
    body = dict(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=8, stream=True, extra_headers={"x-request-id": "busy"})

    stream = client.chat.completions.create(**body)
    next(iter(stream))  # running
    with pytest.raises(openai.ConflictError) as err:
        client.chat.completions.create(**body)
    assert (err.value.status_code, err.value.body["code"], err.value.body["param"]) == (409, "request_in_progress", "x-request-id")
    assert err.value.response.headers["retry-after"] == "1"
    list(stream)

    assert len(engine.state.served) == 1
    assert [(r.request_id, r.status) for r in usage_rows(org)] == [("busy", "ok")]


def test_a_retry_of_a_failed_request_runs_again_and_is_billed_as_its_own_attempt(engines, gateway, make_org, usage_rows):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    client = gw.client(key)
    ask = lambda: client.chat.completions.create(  # noqa: E731
        model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=2, extra_headers={"x-request-id": "flaky"}
    )

    engine.state.fail_status = 500
    with pytest.raises(openai.APIStatusError):
        ask()
    engine.state.fail_status = None
    answer, replayed = ask(), ask()

    assert answer.model_dump() == replayed.model_dump()
    rows = [(r.request_id, r.prompt_tokens, r.completion_tokens, r.status) for r in usage_rows(org)]
    assert rows == [("flaky", 0, 0, "engine_error"), ("flaky#2", 4, 2, "ok")]
    assert engine.state.request_ids == ["flaky", "flaky#2"]  # each attempt under its own id


def test_a_stored_response_expires(engines, gateway, make_org, usage_rows):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]}, response_store_ttl_s=0.2)
    org, key = make_org()
    client = gw.client(key)
    ask = lambda: client.completions.create(  # noqa: E731
        model=BUILTIN_BASE_MODEL, prompt="a b", max_tokens=1, extra_headers={"x-request-id": "short-lived"}
    )

    ask(), ask()
    time.sleep(0.3)
    ask()

    assert len(engine.state.served) == 2  # replayed once, then run again as a new request
    assert [r.request_id for r in usage_rows(org)] == ["short-lived", "short-lived#2"]


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


def test_requests_are_recorded_iff_they_reached_an_engine(engines, gateway, make_org, make_adapter, usage_rows):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url], "unserved-base": ["http://127.0.0.1:9"]},
                 base_models=[BUILTIN_BASE_MODEL, "unserved-base"])
    org, key = make_org()
    other, _ = make_org()
    foreign = make_adapter(other)

    with gw.http() as http:
        headers = {"Authorization": f"Bearer {key}"}

        def post(body: dict, request_id: str) -> int:
            return http.post("/v1/chat/completions", json=body, headers={**headers, "x-request-id": request_id}).status_code

        # refused by the gateway, or no engine took them: no record
        assert post({"model": foreign, "messages": MESSAGES}, "foreign") == 404
        assert post({"model": BUILTIN_BASE_MODEL}, "no-messages") == 400
        assert post({"model": "unserved-base", "messages": MESSAGES}, "unreachable") == 503
        # refused or failed by the engine: recorded with their status and no tokens
        assert post({"model": BUILTIN_BASE_MODEL, "messages": MESSAGES, "max_tokens": 0}, "refused") == 400
        engine.state.fail_status = 500
        assert post({"model": BUILTIN_BASE_MODEL, "messages": MESSAGES}, "failed") == 502
        assert post({"model": BUILTIN_BASE_MODEL, "messages": MESSAGES, "stream": True}, "failed-stream") == 502

    rows = [(r.request_id, r.status, r.prompt_tokens, r.completion_tokens) for r in usage_rows(org)]
    assert rows == [("refused", "engine_rejected", 0, 0), ("failed", "engine_error", 0, 0), ("failed-stream", "engine_error", 0, 0)]


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


def test_a_stream_of_several_choices_cut_off_is_billed_what_the_engine_sent(engines, gateway, make_org, usage_rows):
    engine = engines(token_delay_s=0.05)
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    body = {"model": BUILTIN_BASE_MODEL, "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(30))}],
            "max_tokens": 30, "n": 3, "stream": True}

    seen = 0
    with gw.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    seen += sum(1 for c in json.loads(line[6:])["choices"] if c["delta"].get("content"))
                if seen >= 6:
                    break

    [row] = _wait_for_rows(usage_rows, org)
    [attempt] = engine.state.attempts
    assert row.status == "client_disconnected"
    # every choice's tokens, the conversation once: exactly what the engine reported before it stopped
    assert (row.prompt_tokens, row.completion_tokens) == attempt.counts
    assert row.prompt_tokens == 30 and 6 <= row.completion_tokens < 3 * 30


@pytest.mark.parametrize("stream", [False, True])
def test_several_prompts_and_choices_are_billed_as_the_engine_counts(engines, gateway, make_org, usage_rows, stream):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()

    answer = gw.client(key).completions.create(model=BUILTIN_BASE_MODEL, prompt=["a b c", "d e"], n=2, max_tokens=4, stream=stream)
    if stream:
        texts: dict[int, str] = {}
        for chunk in answer:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
    else:
        texts = {c.index: c.text for c in answer.choices}

    assert len(texts) == 4 and texts[2] == f"{BUILTIN_BASE_MODEL} d e"
    [row] = usage_rows(org)
    assert (row.prompt_tokens, row.completion_tokens) == engine.state.attempts[0].counts == (5, 4 + 3 + 3 + 3)
