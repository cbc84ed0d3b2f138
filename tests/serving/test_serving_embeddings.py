"""Embeddings through the gateway with the stock ``openai`` SDK: base models and adapters (loaded on
the engine like any fine-tuned model), metered with their prompt tokens; a base whose engine serves no
embeddings is the client's 400, not a broken engine, and is not billed."""

from __future__ import annotations

import openai
import pytest

from scheduler.settings import BUILTIN_BASE_MODEL

pytestmark = pytest.mark.integration

TEXTS = ["one two three", "four five"]


def test_embeddings_for_a_base_model_and_an_adapter_are_relayed_and_billed(engines, gateway, make_org, make_adapter, usage_rows):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    adapter = make_adapter(org)
    client = gw.client(key)

    base = client.embeddings.create(model=BUILTIN_BASE_MODEL, input=TEXTS)  # base64 on the wire (the SDK's default)
    tuned = client.embeddings.create(model=adapter, input="six", encoding_format="float")

    assert [d.embedding for d in base.data] == [[3.0, float(len(BUILTIN_BASE_MODEL)), 0.0], [2.0, float(len(BUILTIN_BASE_MODEL)), 1.0]]
    assert tuned.data[0].embedding == [1.0, float(len(adapter)), 0.0]
    assert (base.usage.prompt_tokens, base.usage.total_tokens) == (5, 5)
    assert engine.state.load_calls == {adapter: 1}
    rows = usage_rows(org)
    assert [(r.model, r.adapter, r.prompt_tokens, r.completion_tokens, r.status) for r in rows] == [
        (BUILTIN_BASE_MODEL, None, 5, 0, "ok"),
        (BUILTIN_BASE_MODEL, adapter, 1, 0, "ok"),
    ]


def test_a_base_without_embeddings_is_a_400_recorded_with_no_tokens(engines, gateway, make_org, usage_rows):
    gw = gateway({BUILTIN_BASE_MODEL: [engines(embeddings=False).url]})
    org, key = make_org()

    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).embeddings.create(model=BUILTIN_BASE_MODEL, input="hello")

    assert "does not support embeddings" in err.value.message
    assert [(r.status, r.prompt_tokens, r.completion_tokens) for r in usage_rows(org)] == [("engine_rejected", 0, 0)]


def test_embeddings_cannot_be_streamed(engines, gateway, make_org):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    _, key = make_org()
    with gw.http() as http:
        response = http.post("/v1/embeddings", json={"model": BUILTIN_BASE_MODEL, "input": "x", "stream": True}, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
