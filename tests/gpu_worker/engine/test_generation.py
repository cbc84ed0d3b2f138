"""The generation loop on its own: batched rows of different adapters decode exactly as the stock PEFT
model decodes each one alone; requests join a running batch; unloading waits for requests in flight."""

from __future__ import annotations

import queue
import threading

import pytest

from gpu_worker.engine import adapters, sampling
from gpu_worker.engine.generation import AdapterGone, ModelRunner, Sequence
from gpu_worker.engine.lora import LoRALinear
from gpu_worker.engine.sampling import SamplingParams

from tests.gpu_worker.engine.conftest import load_tiny

PROMPTS = [
    "The quick brown fox",
    "Classify the sentiment of this review: the food was great",
    "One, two",
    "What is the capital of France? Paris is the capital of France. Who wrote this letter?",
]


class Collector:
    def __init__(self):
        self.deltas = []
        self.done = threading.Event()

    def __call__(self, delta):
        self.deltas.append(delta)
        if delta.final:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)


@pytest.fixture
def runner(tiny_dir, adapter_dirs):
    model, tokenizer = load_tiny(tiny_dir)
    runner = ModelRunner("tiny", model, tokenizer, max_batch_size=8, max_prefill_tokens=4096)
    for name, path in adapter_dirs.items():
        runner.attach_adapter(name, adapters.read_adapter(path, max_rank=64))
    yield runner
    runner.stop()


def _submit(runner, prompt: str, adapter: str | None, max_tokens: int, **params) -> tuple[Sequence, Collector]:
    ids = runner.tokenizer(prompt)["input_ids"]
    sink = Collector()
    seq = Sequence(ids, SamplingParams(max_tokens=max_tokens, **({"temperature": 0} | params)), adapter, sink, runner.tokenizer)
    runner.submit(seq)
    return seq, sink


def test_one_mixed_batch_matches_each_adapter_alone(runner, adapter_dirs, reference):
    # Queued before the loop starts, so all of them are prefilled and decoded as one batch.
    jobs = [(p, a) for p, a in zip(PROMPTS, ["attn", None, "mlp", "all"])] + [(PROMPTS[0], "mlp"), (PROMPTS[1], None)]
    submitted = [(_submit(runner, p, a, 12), p, a) for p, a in jobs]
    runner.start()
    for (seq, sink), prompt, adapter in submitted:
        assert sink.done.wait(60)
        expected = reference.generate(adapter_dirs[adapter] if adapter else None, seq.prompt_ids, 12)
        assert seq.output_ids == expected, (prompt, adapter)
        assert sink.text == reference.text(expected)
        assert sink.deltas[-1].completion_tokens == len(expected)
    assert runner.stats.max_rows == len(jobs)
    assert runner.stats.mixed_passes > 0


def test_adapters_change_the_output(runner, reference, adapter_dirs):
    # Without this, "matches the reference" could hold for adapters that do nothing.
    ids = reference.tokenizer(PROMPTS[1])["input_ids"]
    outputs = {name: tuple(reference.generate(path, ids, 12)) for name, path in adapter_dirs.items()}
    outputs["base"] = tuple(reference.generate(None, ids, 12))
    assert len(set(outputs.values())) == len(outputs)


def test_requests_join_a_running_batch(runner, adapter_dirs, reference):
    runner.start()
    long_seq, long_sink = _submit(runner, PROMPTS[3], "attn", 40)
    while not long_sink.deltas:  # the first request is decoding
        long_sink.done.wait(0.001)
    late = [_submit(runner, p, a, 10) for p, a in [(PROMPTS[0], "mlp"), (PROMPTS[2], None)]]
    for (seq, sink), adapter in [((long_seq, long_sink), "attn"), (late[0], "mlp"), (late[1], None)]:
        assert sink.done.wait(60)
        expected = reference.generate(adapter_dirs[adapter] if adapter else None, seq.prompt_ids, seq.params.max_tokens)
        assert seq.output_ids == expected
    assert runner.stats.max_rows >= 2


def test_finish_reasons_and_stop_strings(runner):
    runner.start()
    seq, sink = _submit(runner, PROMPTS[0], None, 7)
    assert sink.done.wait(60)
    assert sink.deltas[-1].finish_reason == "length" and len(seq.output_ids) == 7
    full = sink.text
    stop = full[3:5]
    assert stop, "need a few characters of output to stop on"
    ids = runner.tokenizer(PROMPTS[0])["input_ids"]
    stopped = Collector()
    runner.submit(Sequence(ids, SamplingParams(max_tokens=7, temperature=0, stop=(stop,)), None, stopped, runner.tokenizer))
    assert stopped.done.wait(60)
    assert stopped.deltas[-1].finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def test_unloaded_adapter_refuses_new_requests_but_finishes_running_ones(runner, reference, adapter_dirs):
    runner.start()
    seq, sink = _submit(runner, PROMPTS[3], "attn", 30)
    while not sink.deltas:
        sink.done.wait(0.001)
    runner.retire_adapter("attn")
    with pytest.raises(AdapterGone):
        _submit(runner, PROMPTS[0], "attn", 5)
    assert sink.done.wait(60)
    assert seq.output_ids == reference.generate(adapter_dirs["attn"], seq.prompt_ids, 30)
    _submit(runner, PROMPTS[0], None, 2)[1].done.wait(60)  # one more step lets the loop detach it
    assert "attn" not in runner.lora


def test_detaching_every_adapter_restores_the_base_model(runner, reference):
    runner.start()
    for name in ["attn", "mlp", "all"]:
        runner.retire_adapter(name)
    seq, sink = _submit(runner, PROMPTS[1], None, 10)
    assert sink.done.wait(60)
    assert len(runner.lora) == 0
    assert all(type(m) is not LoRALinear for m in runner.model.modules())
    assert seq.output_ids == reference.generate(None, seq.prompt_ids, 10)


def test_aborted_request_leaves_the_batch(runner):
    runner.start()
    seq, sink = _submit(runner, PROMPTS[0], "mlp", 200)
    while not sink.deltas:
        sink.done.wait(0.001)
    runner.abort(seq)
    other, other_sink = _submit(runner, PROMPTS[2], None, 3)
    assert other_sink.done.wait(60)
    assert not sink.done.is_set()
    assert len(seq.output_ids) < 200


def test_sampling_is_reproducible_with_a_seed_whatever_the_batch(runner):
    runner.start()
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    results = queue.Queue()
    ids = runner.tokenizer(PROMPTS[0])["input_ids"]

    def run(extra_rows: int) -> list[int]:
        sinks = [Collector() for _ in range(extra_rows + 1)]
        seqs = [Sequence(ids, params if i == 0 else SamplingParams(max_tokens=12, temperature=1.0), "all" if i % 2 else None, s, runner.tokenizer) for i, s in enumerate(sinks)]
        for s in seqs:
            runner.submit(s)
        for s in sinks:
            assert s.done.wait(60)
        return seqs[0].output_ids

    results = [run(0), run(3)]
    assert results[0] == results[1]


def test_a_failing_step_fails_its_requests_and_the_loop_keeps_serving(runner, reference):
    forward = runner.model.forward
    calls = {"n": 0}

    def explode_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return forward(*args, **kwargs)

    runner.model.forward = explode_once
    seq, sink = _submit(runner, PROMPTS[0], "attn", 5)
    runner.start()
    assert sink.done.wait(60)
    assert sink.deltas[-1].error and "simulated device error" in sink.deltas[-1].error
    after, after_sink = _submit(runner, PROMPTS[0], "attn", 5)
    assert after_sink.done.wait(60) and after_sink.deltas[-1].finish_reason
    del runner.model.forward
    assert runner.alive


def test_extreme_sampling_parameters_share_a_batch_with_normal_requests(runner, adapter_dirs, reference):
    # Queued before the loop starts, so all of them share every step. A vanishing temperature or top_p
    # leaves one token to choose: both decode exactly as greedy does.
    extreme = [_submit(runner, PROMPTS[0], None, 8, temperature=1e-300), _submit(runner, PROMPTS[1], "attn", 8, temperature=1.0, top_p=1e-300)]
    normal = [_submit(runner, PROMPTS[2], "mlp", 8), _submit(runner, PROMPTS[3], None, 8, temperature=1.0, seed=3)]
    runner.start()
    for seq, sink in extreme + normal:
        assert sink.done.wait(60)
        assert sink.deltas[-1].error is None and sink.deltas[-1].finish_reason
    for (seq, _), adapter in zip(extreme + normal[:1], [None, "attn", "mlp"]):
        assert seq.output_ids == reference.generate(adapter_dirs[adapter] if adapter else None, seq.prompt_ids, 8)
    assert runner.stats.max_rows == 4


def test_a_row_whose_sampling_fails_fails_alone(runner, adapter_dirs, reference, monkeypatch):
    real_sample = sampling.sample

    def fail_third_token_of_seed_13(logits, output_ids, params, generator):
        if params.seed == 13 and len(output_ids) == 2:
            raise sampling.SamplingFailed("simulated bad row")
        return real_sample(logits, output_ids, params, generator)

    monkeypatch.setattr(sampling, "sample", fail_third_token_of_seed_13)
    doomed, doomed_sink = _submit(runner, PROMPTS[0], "attn", 8, temperature=1.0, seed=13)
    others = [(_submit(runner, p, a, 8), a) for p, a in [(PROMPTS[1], "attn"), (PROMPTS[2], None)]]
    runner.start()
    assert doomed_sink.done.wait(60)
    assert "simulated bad row" in doomed_sink.deltas[-1].error and len(doomed.output_ids) == 2
    for (seq, sink), adapter in others:
        assert sink.done.wait(60) and sink.deltas[-1].finish_reason
        assert seq.output_ids == reference.generate(adapter_dirs[adapter] if adapter else None, seq.prompt_ids, 8)
    assert doomed.done and runner._in_use["attn"] == 0  # its adapter reference was released
    after, after_sink = _submit(runner, PROMPTS[0], None, 4)
    assert after_sink.done.wait(60) and after_sink.deltas[-1].finish_reason
    assert runner.alive
