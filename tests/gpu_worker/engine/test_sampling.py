"""Sampling one token: greedy is argmax, top_p keeps the smallest nucleus, seeds reproduce, penalties
push repeated tokens down."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.engine.sampling import SamplingParams, apply_penalties, sample


def test_temperature_zero_is_argmax():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=1, temperature=0)
    assert sample(logits, [], params, params.make_generator()) == int(logits.argmax())


def test_top_p_samples_only_from_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.8, seed=0)
    generator = params.make_generator()
    drawn = {sample(logits, [], params, generator) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8; 2 and 3 are outside
    tiny = SamplingParams(max_tokens=1, top_p=1e-6, seed=0)
    assert {sample(logits, [], tiny, tiny.make_generator()) for _ in range(20)} == {0}


def test_same_seed_same_draws():
    logits = torch.zeros(50)
    params = SamplingParams(max_tokens=1, seed=123)
    a, b = params.make_generator(), params.make_generator()
    assert [sample(logits, [], params, a) for _ in range(20)] == [sample(logits, [], params, b) for _ in range(20)]


def test_penalties_lower_generated_tokens_by_count():
    logits = torch.zeros(5)
    params = SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=1.0)
    out = apply_penalties(logits, [1, 1, 3], params)
    assert out.tolist() == [0.0, -2.5, 0.0, -1.5, 0.0]
    assert logits.tolist() == [0.0] * 5  # the caller's logits are untouched


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=1, temperature=-1), dict(max_tokens=1, top_p=0)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
