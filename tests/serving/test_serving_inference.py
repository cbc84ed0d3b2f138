"""Chat and text completions through the gateway, for base models and adapters, streamed and not:
what the client gets equals what the engine produced, in OpenAI's wire format."""

from __future__ import annotations

import openai
import pytest

from fake_vllm import reply_words
from scheduler.settings import BUILTIN_BASE_MODEL
from serving.protocol import MAX_DEPTH

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "tell me about tuning"}]


def test_base_model_chat_returns_the_engines_answer_and_usage(engines, gateway, make_org):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    _, key = make_org()

    answer = gw.client(key).chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=3)

    assert answer.choices[0].message.content == " ".join(reply_words(BUILTIN_BASE_MODEL, "tell me about tuning", 3))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (4, 3)
    assert engine.state.served == [BUILTIN_BASE_MODEL]
    assert engine.state.load_calls == {}  # a base model needs no adapter


def test_adapter_chat_loads_the_adapter_and_runs_on_it(engines, gateway, make_org, make_adapter):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    model = make_adapter(org)

    answer = gw.client(key).chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)

    assert answer.choices[0].message.content == f"{model} tell"
    assert answer.model == model
    assert engine.state.loaded[model].startswith("store:adapters/")
    assert engine.state.served == [model]


def test_text_completions_work_for_base_and_adapter(engines, gateway, make_org, make_adapter):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    model = make_adapter(org)
    client = gw.client(key)

    base = client.completions.create(model=BUILTIN_BASE_MODEL, prompt="one two", max_tokens=5)
    tuned = client.completions.create(model=model, prompt="one two", max_tokens=5)

    assert base.choices[0].text == f"{BUILTIN_BASE_MODEL} one two"
    assert tuned.choices[0].text == f"{model} one two"
    assert (tuned.usage.prompt_tokens, tuned.usage.completion_tokens) == (2, 3)


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_has_a_usage_chunk_iff_the_client_asked(engines, gateway, make_org, make_adapter, include_usage):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    model = make_adapter(org)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}

    chunks = list(gw.client(key).chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, stream=True, **options))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(reply_words(model, "tell me about tuning", 4))
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
        assert (usage_chunks[0].usage.prompt_tokens, usage_chunks[0].usage.completion_tokens) == (4, 4)
    else:
        assert usage_chunks == []
        assert all(c.choices for c in chunks)


def test_text_completion_stream_relays_every_token(engines, gateway, make_org):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    _, key = make_org()

    chunks = list(gw.client(key).completions.create(model=BUILTIN_BASE_MODEL, prompt="a b c d", max_tokens=5, stream=True))

    assert [c.choices[0].text for c in chunks] == [BUILTIN_BASE_MODEL, " a", " b", " c", " d"]


def test_engine_rejection_reaches_the_client_as_a_400(engines, gateway, make_org):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    _, key = make_org()

    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=0)

    assert err.value.body["message"] == "max_tokens must be at least 1"
    assert err.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param", "code", "fragment"),
    [
        ("/v1/chat/completions", {"model": BUILTIN_BASE_MODEL}, "messages", "missing_required_parameter", "Missing required parameter: 'messages'"),
        ("/v1/chat/completions", {"messages": MESSAGES}, "model", "missing_required_parameter", "Missing required parameter: 'model'"),
        ("/v1/chat/completions", None, None, "missing_required_parameter", "has no body"),
        ("/v1/chat/completions", {"model": BUILTIN_BASE_MODEL, "messages": []}, "messages", "invalid_value", "at least 1"),
        ("/v1/chat/completions", {"model": BUILTIN_BASE_MODEL, "messages": ["hi"]}, "messages.0", "invalid_value", "'messages.0'"),
        ("/v1/chat/completions", {"model": BUILTIN_BASE_MODEL, "messages": MESSAGES, "stream_options": {"include_usage": True}},
         "stream_options", "invalid_value", "only allowed when stream"),
        ("/v1/completions", {"model": BUILTIN_BASE_MODEL, "prompt": {"a": 1}}, "prompt", "invalid_value", "'prompt'"),
        ("/v1/embeddings", {"model": BUILTIN_BASE_MODEL, "input": "x", "stream": True}, "stream", "invalid_value", "cannot be streamed"),
        # a lone surrogate escape ("\ud800") is JSON but no character: the built-in engine failed on it (a 502)
        # (sent as bytes: httpx cannot encode such a str)
        ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800"}]}',
         "messages.0.content", "invalid_value", "surrogate"),
        ("/v1/completions", b'{"model": "%s", "prompt": ["ok", "\\udfff"]}', "prompt.1", "invalid_value", "surrogate"),
    ],
)
def test_malformed_requests_are_400_naming_the_field_and_never_reach_an_engine(engines, gateway, make_org, path, body, param, code, fragment):
    """The field a message talks about is also the error's ``param``, as a dotted path without
    pydantic's union-branch tags ("prompt", not "prompt.str"), as the management API writes it."""
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    _, key = make_org()

    if isinstance(body, bytes):
        response = gw.http().post(path, content=body % BUILTIN_BASE_MODEL.encode(),
                                  headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    else:
        response = gw.http().post(path, json=body, headers={"Authorization": f"Bearer {key}"})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and fragment in error["message"]
    assert error["code"] == code and "None" not in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert engine.state.served == []


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/models/ft:x%00", None), ("DELETE", "/v1/models/%00", None), ("POST", "/v1/adapters/ft:x%00/check", None),
    ("POST", "/v1/adapters/%0A/rollback", None), ("DELETE", "/v1/adapters/ft:x%1B", None),
    ("POST", "/v1/chat/completions", {"model": "ft:x\x00", "messages": MESSAGES}),
    ("POST", "/v1/embeddings", {"model": BUILTIN_BASE_MODEL + "\x00", "input": "x"}),
])
def test_a_name_with_a_control_character_is_a_404_never_looked_up(engines, gateway, make_org, method, path, body):
    """No model or adapter is named so: a 404 as for any model that does not exist, as the management API's
    proxy answers (the lookups were a 500: PostgreSQL refuses NUL characters)."""
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    _, key = make_org()
    response = gw.http().request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 404, response.text
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("model", "model_not_found")
    assert engine.state.served == []


def test_an_engines_refusal_keeps_the_field_it_names(engines, gateway, make_org):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    _, key = make_org()

    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=0)

    assert err.value.body["param"] == "max_tokens"
    assert err.value.body["code"] is None  # vLLM's code is the HTTP status, not an OpenAI code


def _nested(depth: int):
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [300, 900])
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", lambda deep: {"model": BUILTIN_BASE_MODEL, "messages": MESSAGES, "x": deep}, "x"),
        ("/v1/chat/completions", lambda deep: {"model": BUILTIN_BASE_MODEL, "messages": [{**MESSAGES[0], "x": deep}]}, "messages.0.x"),
        ("/v1/embeddings", lambda deep: {"model": BUILTIN_BASE_MODEL, "input": "hi", "x": deep}, "x"),
    ],
)
def test_over_deep_bodies_are_400_naming_the_field(engines, gateway, make_org, path, body, param, depth):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    _, key = make_org()

    response = gw.http().post(path, json=body(_nested(depth)), headers={"Authorization": f"Bearer {key}"})

    assert response.status_code == 400
    assert response.json()["error"] == {"message": f"Invalid value for '{param}': Input nests more than {MAX_DEPTH} levels deep",
                                        "type": "invalid_request_error", "param": param, "code": "invalid_value"}
    assert engine.state.served == []


def test_a_body_exactly_at_the_depth_limit_is_relayed(engines, gateway, make_org):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    _, key = make_org()
    body = {"model": BUILTIN_BASE_MODEL, "messages": MESSAGES, "max_tokens": 1, "x": _nested(MAX_DEPTH - 1)}  # the body is level 1

    response = gw.http().post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    body["x"] = _nested(MAX_DEPTH)
    refused = gw.http().post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})

    assert response.status_code == 200, response.text
    assert refused.status_code == 400


@pytest.mark.parametrize(("field", "param"), [(b'"temperature": NaN', "temperature"), (b'"logit_bias": {"50": -Infinity}', "logit_bias.50")])
def test_nan_and_infinity_are_400_naming_the_field(engines, gateway, make_org, field, param):
    """Not JSON, but Python's parser reads them; relayed, they would reach the engine as null (a default)."""
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    _, key = make_org()
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], %s}' % (BUILTIN_BASE_MODEL.encode(), field)

    response = gw.http().post("/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"] == {"message": f"Invalid value for '{param}': Input should be a finite number",
                                        "type": "invalid_request_error", "param": param, "code": "invalid_value"}
    assert engine.state.served == []


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "could not parse the JSON body"),
        (b'{"model": "\xff"}', "could not parse the JSON body"),  # not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),  # deeper than the parser goes
    ],
)
def test_unparsable_bodies_are_a_400_with_a_stable_code(engines, gateway, make_org, content, fragment):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    _, key = make_org()

    response = gw.http().post("/v1/chat/completions", content=content, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_json")
    assert fragment in error["message"]


def test_request_id_is_echoed_and_forwarded_to_the_engine(engines, gateway, make_org):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    _, key = make_org()
    client = gw.client(key)

    given = client.chat.completions.with_raw_response.create(
        model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=1, extra_headers={"x-request-id": "client-id-1"}
    )
    generated = client.chat.completions.with_raw_response.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=1)

    assert given.headers["x-request-id"] == "client-id-1"
    assert generated.headers["x-request-id"].startswith("req_")
    assert engine.state.request_ids == ["client-id-1", generated.headers["x-request-id"]]
