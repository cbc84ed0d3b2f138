"""The gateway in front of the real built-in engine (not the fake), with the stock ``openai`` SDK: a
fine-tuned model is loaded on the engine from the object store by the gateway and answers exactly as
the stock PEFT model does; embeddings (base64 on the wire) come through unchanged; every answer is
billed with the engine's own token counts, streams included; extreme sampling parameters decode as
greedy without touching concurrent requests, a failed generation is the same error streamed or not,
and the engine's refusals name their field."""

from __future__ import annotations

import threading

import openai
import pytest
import torch

from gpu_worker.engine import sampling

from gpu_worker.storage import LocalStore, put_dir
from tests.gpu_worker.engine.conftest import (  # noqa: F401 - fixtures used by name
    TINY,
    LiveEngine,
    adapter_dirs,
    reference,
    tiny_dir,
    tiny_loader,
)

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "The food was great"}]


@pytest.fixture
def stack(tiny_dir, adapter_dirs, data_dir, gateway, make_org, make_adapter):  # noqa: F811
    """(gateway, org, key, fine-tuned model name) with the built-in engine behind the gateway, both on
    the same object store, and the "attn" adapter registered for the org."""
    from gpu_worker.engine.models import ServedModels
    from gpu_worker.engine.settings import EngineSettings

    storage = data_dir / "objects"
    settings = EngineSettings(models=[TINY], data_dir=data_dir / "engine", storage_url=str(storage), max_lora_rank=16)
    with LiveEngine(ServedModels(settings, loader=tiny_loader(tiny_dir))) as engine:
        org, key = make_org()
        model = make_adapter(org, base=TINY, storage_key="adapters/attn")
        put_dir(LocalStore(str(storage)), adapter_dirs["attn"], "adapters/attn")
        gw = gateway({TINY: [engine.url]}, base_models=[TINY], storage_url=str(storage))
        yield gw, org, key, model


def _prompt_ids(reference, messages) -> list[int]:  # noqa: F811
    text = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return reference.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_on_base_and_adapter_equals_peft_and_is_billed_exactly(stack, reference, adapter_dirs, usage_rows):  # noqa: F811
    gw, org, key, model = stack
    client = gw.client(key)
    prompt_ids = _prompt_ids(reference, MESSAGES)

    answers = {}
    for name, folder in [(TINY, None), (model, adapter_dirs["attn"])]:
        answer = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0)
        expected = reference.generate(folder, prompt_ids, 8)
        assert answer.choices[0].message.content == reference.text(expected)
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt_ids), len(expected))
        answers[name] = answer
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers[model].choices[0].message.content
    assert all(c.usage is None for c in chunks)  # not asked for: stripped, yet billed below

    rows = [(r.adapter, r.prompt_tokens, r.completion_tokens, r.status) for r in usage_rows(org)]
    tuned = (answers[model].usage.prompt_tokens, answers[model].usage.completion_tokens)
    assert rows == [
        (None, answers[TINY].usage.prompt_tokens, answers[TINY].usage.completion_tokens, "ok"),
        (model, *tuned, "ok"),
        (model, *tuned, "ok"),
    ]


def test_embeddings_through_the_gateway_equal_the_engines(stack, usage_rows):
    gw, org, key, model = stack
    client = gw.client(key)

    via_gateway = client.embeddings.create(model=model, input=["The food was great", "cold coffee"])
    again_as_floats = client.embeddings.create(model=model, input=["The food was great", "cold coffee"], encoding_format="float")

    for a, b in zip(via_gateway.data, again_as_floats.data):
        torch.testing.assert_close(torch.tensor(a.embedding), torch.tensor(b.embedding), atol=1e-6, rtol=0)
        assert abs(float(torch.tensor(a.embedding).norm()) - 1.0) < 1e-5
    assert [(r.prompt_tokens, r.completion_tokens) for r in usage_rows(org)] == [(via_gateway.usage.prompt_tokens, 0)] * 2


def test_vanishing_temperature_or_top_p_decodes_greedily_beside_concurrent_requests(stack):
    gw, _, key, model = stack
    client = gw.client(key)
    greedy = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=6, temperature=0).choices[0].message.content
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def call(name: str, **kwargs) -> None:
        try:
            if kwargs.pop("stream", False):
                chunks = client.chat.completions.create(model=kwargs.pop("model", TINY), messages=MESSAGES, max_tokens=6, stream=True, **kwargs)
                results[name] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                answer = client.chat.completions.create(model=kwargs.pop("model", TINY), messages=MESSAGES, max_tokens=6, **kwargs)
                results[name] = answer.choices[0].message.content
        except BaseException as err:  # surfaced below: a thread's failure must fail the test
            errors.append(err)

    calls = [("temperature", dict(temperature=1e-300)), ("top_p", dict(top_p=1e-300)), ("streamed", dict(stream=True, model=model, seed=1)),
             ("sampled", dict(temperature=1.0, seed=2))]
    threads = [threading.Thread(target=call, args=(name,), kwargs=kwargs) for name, kwargs in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    assert not errors
    assert results["temperature"] == results["top_p"] == greedy
    assert set(results) == {"temperature", "top_p", "streamed", "sampled"}


def test_a_failed_generation_is_the_same_error_streamed_or_not(stack, monkeypatch, usage_rows):
    gw, org, key, model = stack
    client = gw.client(key)
    real_sample = sampling.sample

    def fail_seed_13(logits, output_ids, params, generator):
        if params.seed == 13 and len(output_ids) == 2:
            raise sampling.SamplingFailed("simulated internals")
        return real_sample(logits, output_ids, params, generator)

    monkeypatch.setattr(sampling, "sample", fail_seed_13)
    with pytest.raises(openai.APIStatusError) as plain:
        client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=13)
    with pytest.raises(openai.APIError) as streamed:
        for _ in client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=13, stream=True):
            pass

    assert plain.value.status_code == 502
    for err in (plain.value, streamed.value):
        assert (err.body["type"], err.body["code"]) == ("server_error", "engine_error")
        assert "simulated internals" not in err.body["message"]
    assert client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, temperature=1.0, seed=14).choices[0].message.content
    # Every request that reached the engine is recorded, the 502 as well as the broken stream.
    assert [r.status for r in usage_rows(org)][-3:] == ["engine_error", "engine_error", "ok"]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
        (dict(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
        (dict(temperature=3), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=10_000), "max_tokens"),
    ],
)
def test_the_engines_refusals_name_their_field_through_the_gateway(stack, kwargs, param, usage_rows):
    gw, org, key, _ = stack
    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).chat.completions.create(**{"model": TINY, "messages": MESSAGES, **kwargs})
    assert err.value.body["param"] == param
    assert param in err.value.body["message"] or "context length" in err.value.body["message"]
    # the refusal reached the engine: recorded, with the tokens the engine counted (none)
    assert [(r.status, r.prompt_tokens, r.completion_tokens) for r in usage_rows(org)] == [("engine_rejected", 0, 0)]
