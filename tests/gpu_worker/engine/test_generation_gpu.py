"""The generation loop on a CUDA device: a mixed-adapter batch in float32 decodes as the PEFT model
does for each request alone there, and bfloat16 (the production dtype) serves mixed batches too."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.contract import DType
from gpu_worker.engine import adapters
from gpu_worker.engine.generation import ModelRunner, Sequence
from gpu_worker.engine.sampling import SamplingParams
from tests.gpu_worker.engine.test_generation import PROMPTS, Collector

pytestmark = pytest.mark.gpu


def _runner(tiny_dir, adapter_dirs, dtype: DType) -> ModelRunner:
    from gpu_worker.loading import load_base_model

    model, tokenizer = load_base_model(str(tiny_dir), data_dir=tiny_dir.parent, device="cuda", dtype=dtype)
    runner = ModelRunner("tiny", model, tokenizer, max_batch_size=8, max_prefill_tokens=4096)
    for name, path in adapter_dirs.items():
        runner.attach_adapter(name, adapters.read_adapter(path, max_rank=64))
    return runner


def _run(runner, jobs, max_tokens: int) -> list[Sequence]:
    seqs = []
    for prompt, adapter in jobs:
        ids = runner.tokenizer(prompt)["input_ids"]
        seqs.append(Sequence(ids, SamplingParams(max_tokens=max_tokens, temperature=0), adapter, Collector(), runner.tokenizer))
        runner.submit(seqs[-1])
    runner.start()
    try:
        for seq in seqs:
            assert seq.sink.done.wait(120)
            assert seq.sink.deltas[-1].error is None
    finally:
        runner.stop()
    return seqs


def _reference(tiny_dir, adapter_dir, prompt_ids, max_new_tokens, dtype: DType) -> list[int]:
    from peft import PeftModel

    from gpu_worker.loading import load_base_model

    model, _ = load_base_model(str(tiny_dir), data_dir=tiny_dir.parent, device="cuda", dtype=dtype)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([prompt_ids], device="cuda")
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_mixed_batch_on_cuda_matches_peft_alone(tiny_dir, adapter_dirs):
    jobs = list(zip(PROMPTS, ["attn", None, "mlp", "all"])) + [(PROMPTS[2], "attn")]
    runner = _runner(tiny_dir, adapter_dirs, DType.float32)
    seqs = _run(runner, jobs, 12)
    assert runner.stats.mixed_passes > 0
    for seq, (_, adapter) in zip(seqs, jobs):
        expected = _reference(tiny_dir, adapter_dirs[adapter] if adapter else None, seq.prompt_ids, 12, DType.float32)
        assert seq.output_ids == expected, adapter


def test_bfloat16_mixed_batch_serves_every_row(tiny_dir, adapter_dirs):
    jobs = list(zip(PROMPTS, ["attn", None, "mlp", "all"]))
    runner = _runner(tiny_dir, adapter_dirs, DType.bfloat16)
    assert next(runner.model.parameters()).dtype == torch.bfloat16
    seqs = _run(runner, jobs, 12)
    assert all(seq.sink.deltas[-1].finish_reason in ("stop", "length") for seq in seqs)
    # Alone, the base row decodes as the stock model does (no adapter can leak into it).
    base = next(seq for seq, (_, adapter) in zip(seqs, jobs) if adapter is None)
    alone = _run(_runner(tiny_dir, adapter_dirs, DType.bfloat16), [(PROMPTS[1], None)], 12)[0]
    assert alone.output_ids == _reference(tiny_dir, None, alone.prompt_ids, 12, DType.bfloat16)
    assert base.sink.deltas[-1].completion_tokens == len(base.output_ids)
