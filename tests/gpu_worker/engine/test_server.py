"""The engine over real HTTP, with the stock ``openai`` SDK as the client (httpx for vLLM's adapter
endpoints): wire shapes, exact usage, streaming, adapters equal to the PEFT reference, concurrent mixed
requests, and clear 4xx errors."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import openai
import pytest

from tests.gpu_worker.engine.conftest import TINY

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "The food was great"}]


@pytest.fixture(scope="module")
def client(engine):
    return openai.OpenAI(base_url=engine.url + "/v1", api_key="unused", max_retries=0)


def load(engine, lora_path, name: str | None = None) -> tuple[httpx.Response, str]:
    name = name or f"lora-{uuid.uuid4().hex[:8]}"
    resp = httpx.post(engine.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(lora_path)}, timeout=60)
    return resp, name


def loaded(engine, lora_path) -> str:
    resp, name = load(engine, lora_path)
    assert resp.status_code == 200, resp.text
    return name


def chat_prompt_ids(reference, messages) -> list[int]:
    text = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return reference.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models_lists_the_base_and_loaded_adapters(engine, client, adapter_dirs):
    name = loaded(engine, adapter_dirs["attn"])
    cards = {m.id: m for m in client.models.list().data}
    assert cards[TINY].model_extra["max_model_len"] == 256
    assert cards[name].model_extra["parent"] == TINY
    httpx.post(engine.url + "/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
    assert name not in {m.id for m in client.models.list().data}


@pytest.mark.parametrize("adapter", [None, "attn", "mlp"])
def test_chat_equals_the_peft_reference_with_exact_usage(engine, client, adapter_dirs, reference, adapter):
    model = loaded(engine, adapter_dirs[adapter]) if adapter else TINY
    resp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0)
    prompt_ids = chat_prompt_ids(reference, MESSAGES)
    expected = reference.generate(adapter_dirs[adapter] if adapter else None, prompt_ids, 10)
    assert resp.choices[0].message.content == reference.text(expected)
    assert resp.choices[0].message.role == "assistant"
    assert resp.model == model and resp.object == "chat.completion"
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(expected)
    assert resp.usage.total_tokens == len(prompt_ids) + len(expected)
    assert resp.choices[0].finish_reason == ("length" if len(expected) == 10 else "stop")


def test_completion_equals_the_peft_reference(engine, client, adapter_dirs, reference):
    model = loaded(engine, adapter_dirs["all"])
    prompt = "The quick brown fox jumps over"
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=9, temperature=0)
    prompt_ids = reference.tokenizer(prompt)["input_ids"]
    expected = reference.generate(adapter_dirs["all"], prompt_ids, 9)
    assert resp.choices[0].text == reference.text(expected)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt_ids), len(expected))
    # A prompt of token ids means the same prompt.
    by_ids = client.completions.create(model=model, prompt=prompt_ids, max_tokens=9, temperature=0)
    assert by_ids.choices[0].text == resp.choices[0].text


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stream_chunks_concatenate_to_the_non_stream_text(engine, client, adapter_dirs, kind):
    model = loaded(engine, adapter_dirs["mlp"])
    if kind == "chat":
        create = lambda **kw: client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, **kw)  # noqa: E731
        text_of = lambda choice: choice.message.content  # noqa: E731
        delta_of = lambda choice: choice.delta.content or ""  # noqa: E731
    else:
        create = lambda **kw: client.completions.create(model=model, prompt="Monday Tuesday", temperature=0, **kw)  # noqa: E731
        text_of = delta_of = lambda choice: choice.text  # noqa: E731
    whole = create(max_tokens=16)
    chunks = list(create(max_tokens=16, stream=True, stream_options={"include_usage": True}))
    body, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(delta_of(c.choices[0]) for c in body) == text_of(whole.choices[0])
    assert len([c for c in body if delta_of(c.choices[0])]) > 1, "streamed token by token, not in one piece"
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_stream_wire_format(engine):
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", engine.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = "".join(resp.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # as OpenAI's: later deltas carry no "role" key at all (not "role": null)
    assert [c for c in chunks[1:] if "role" in c["choices"][0]["delta"]] == []
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert not any(c["usage"] for c in chunks), "no usage chunk unless include_usage"


def test_stop_string_cuts_the_text(engine, client):
    whole = client.completions.create(model=TINY, prompt="One, two", max_tokens=12, temperature=0).choices[0].text
    stop = whole[4:6]
    cut = client.completions.create(model=TINY, prompt="One, two", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # four sequences are OpenAI's limit, still served (a fifth is a 400: test_bad_chat_requests_are_400_in_openai_shape)
    four = client.completions.create(model=TINY, prompt="One, two", max_tokens=12, temperature=0, stop=[stop, "\x01", "\x02", "\x03"])
    assert four.choices[0].text == cut.choices[0].text


def test_seeded_sampling_repeats_and_max_completion_tokens_counts(client):
    kwargs = dict(model=TINY, messages=MESSAGES, temperature=1.0, top_p=0.95, seed=11, max_completion_tokens=8)
    first, second = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.completion_tokens <= 8


def test_concurrent_requests_for_different_adapters_do_not_interfere(engine, client, adapter_dirs, reference):
    names = {key: loaded(engine, adapter_dirs[key]) for key in ["attn", "mlp", "all"]}
    jobs = [(key, f"Review number {i}: the room was dirty") for i, key in enumerate(["attn", "mlp", None, "all"] * 3)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def call(i: int, key: str | None, prompt: str) -> None:
        try:
            resp = client.completions.create(model=names.get(key, TINY), prompt=prompt, max_tokens=12, temperature=0)
            results[i] = resp.choices[0].text
        except BaseException as err:  # surfaced below: a thread's failure must fail the test
            errors.append(err)

    passes_before = engine.models.bases[TINY].runner.stats.mixed_passes
    threads = [threading.Thread(target=call, args=(i, key, prompt)) for i, (key, prompt) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i, (key, prompt) in enumerate(jobs):
        ids = reference.tokenizer(prompt)["input_ids"]
        assert results[i] == reference.text(reference.generate(adapter_dirs[key] if key else None, ids, 12)), (i, key)
    assert engine.models.bases[TINY].runner.stats.mixed_passes > passes_before, "requests were never batched together"


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(n=2), "n"),
        (dict(logprobs=True), "logprobs"),
        (dict(max_tokens=10_000), "max_tokens"),
        (dict(temperature=3), "temperature"),
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "messages.0.content"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
        (dict(messages=[{"role": "user", "content": 5}]), "messages.0.content"),  # not "messages.0.content.str"
        (dict(stream_options={"include_usage": True}), "stream_options"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),  # OpenAI takes at most 4
    ],
)
def test_bad_chat_requests_are_400_in_openai_shape(client, kwargs, param):
    args = {"model": TINY, "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == 400
    assert set(err.value.body) == {"message", "type", "param", "code"}
    assert err.value.body["param"] == param


@pytest.mark.parametrize(
    "body, param, message",
    [(None, None, "The request has no body: send a JSON object."), ({"messages": MESSAGES}, "model", "Missing required parameter: 'model'.")],
)
def test_missing_fields_and_bodies_say_what_is_missing(engine, body, param, message):
    resp = httpx.post(engine.url + "/v1/chat/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param, "code": "missing_required_parameter"}


@pytest.mark.parametrize("prompt", ["", ["a", "b"], [999_999]])
def test_bad_prompts_are_400(client, prompt):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TINY, prompt=prompt)


def test_loading_the_same_name_twice_is_400_and_unknown_unload_is_404(engine, adapter_dirs):
    name = loaded(engine, adapter_dirs["attn"])
    again, _ = load(engine, adapter_dirs["mlp"], name)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    missing = httpx.post(engine.url + "/v1/unload_lora_adapter", json={"lora_name": "never-loaded"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "lora_not_found"


def test_unloaded_adapter_is_404_for_requests(engine, client, adapter_dirs):
    name = loaded(engine, adapter_dirs["attn"])
    httpx.post(engine.url + "/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=name, prompt="hello")


def test_bad_adapter_folders_are_400_and_change_nothing(engine, client, tmp_path, adapter_dirs):
    pickle_only = tmp_path / "pickle-only"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_text((adapter_dirs["attn"] / "adapter_config.json").read_text())
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    before = {m.id for m in client.models.list().data}
    cases = {tmp_path / "missing": "not a folder", pickle_only: "only safetensors", "store:no/such/prefix": "no adapter files"}
    for path, message in cases.items():
        resp, name = load(engine, path)
        assert resp.status_code == 400, resp.text
        assert message in resp.json()["error"]["message"]
    assert {m.id for m in client.models.list().data} == before


def test_health_and_unknown_routes(engine):
    assert httpx.get(engine.url + "/health").json() == {"status": "ok"}
    missing = httpx.get(engine.url + "/v1/nothing-here")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_runtime_adapter_updates_can_be_disabled(tiny_dir, adapter_dirs, tmp_path, monkeypatch):
    from gpu_worker.engine.models import ServedModels
    from tests.gpu_worker.engine.conftest import LiveEngine, engine_settings, tiny_loader

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "false")
    with LiveEngine(ServedModels(engine_settings(tmp_path), loader=tiny_loader(tiny_dir))) as live:
        resp, _ = load(live, adapter_dirs["attn"])
        assert resp.status_code == 404 and "disabled" in resp.json()["error"]["message"]
        assert live.models.adapters == {}


def test_explicit_nulls_mean_defaults(engine):
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 2, "n": None, "stream": None, "seed": None, "temperature": None}
    resp = httpx.post(engine.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=TINY, prompt=list(range(5, 300)), max_tokens=None)
    assert err.value.body["code"] == "context_length_exceeded"


def test_client_that_disconnects_mid_stream_frees_its_row(engine):
    runner = engine.models.bases[TINY].runner
    body = {"model": TINY, "prompt": "One", "max_tokens": 240, "stream": True, "temperature": 0}
    passes_before = runner.stats.forward_passes
    with httpx.stream("POST", engine.url + "/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
    # The response is closed after one chunk: the request must leave the batch long before 240 tokens.
    deadline = time.monotonic() + 10
    while runner._running and time.monotonic() < deadline:  # noqa: SLF001 (the batch is the observable here)
        time.sleep(0.01)
    assert not runner._running
    assert runner.stats.forward_passes - passes_before < 120


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "Monday Tuesday"})])
def test_continuous_usage_counts_every_chunk(engine, path, body):
    """vLLM's ``continuous_usage_stats``: each chunk carries the prompt and the tokens generated so far,
    ending at the final usage; without it no chunk but the last has usage."""
    request = {"model": TINY, **body, "max_tokens": 6, "stream": True, "temperature": 0}
    options = {"include_usage": True, "continuous_usage_stats": True}
    with httpx.stream("POST", engine.url + path, json={**request, "stream_options": options}, timeout=60) as resp:
        chunks = [json.loads(e.removeprefix("data: ")) for e in "".join(resp.iter_text()).split("\n\n")[:-2]]
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages)
    prompt = usages[-1]["prompt_tokens"]
    assert prompt > 0 and all(u["prompt_tokens"] == prompt for u in usages)
    completions = [u["completion_tokens"] for u in usages]
    assert completions == sorted(completions) and completions[-1] == 6 == completions[-2]  # the last token's chunk, then the usage chunk
    if path == "/v1/chat/completions":
        assert completions[0] == 0  # the role chunk, before any token: the prompt is already counted
