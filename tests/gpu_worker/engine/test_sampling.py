"""Sampling one token: greedy is argmax, top_p keeps the smallest nucleus, seeds reproduce, penalties
push repeated tokens down, and every valid parameter value (however extreme) over any finite logits
gives a token; a row with unusable logits fails alone."""

from __future__ import annotations

import pytest
import torch

import types

from gpu_worker.engine.sampling import GREEDY_BELOW, SamplingFailed, SamplingParams, apply_penalties, sample, sample_rows


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


def _row(params: SamplingParams, output_ids=()):
    return types.SimpleNamespace(params=params, output_ids=list(output_ids), generator=params.make_generator())


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, GREEDY_BELOW / 2])
def test_temperatures_below_the_floor_are_greedy(temperature):
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_tokens=1, temperature=temperature, seed=0)
    assert params.greedy
    assert sample(logits, [], params, params.make_generator()) == int(logits.argmax())


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-45])
def test_a_vanishing_top_p_keeps_the_most_likely_token(top_p):
    # Below float32's smallest value top_p compares as 0: the top token must still be kept.
    logits = torch.randn(100, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, seed=0)
    generator = params.make_generator()
    assert {sample(logits, [], params, generator) for _ in range(20)} == {int(logits.argmax())}


@pytest.mark.parametrize(
    "logits, best",
    [
        (torch.tensor([-3e38, 1e38, 3e38, 0.0]), 2),  # over a small temperature these overflow float32
        (torch.tensor([65504.0, float("inf"), -65504.0], dtype=torch.float16), 1),  # a half-precision overflow
        (torch.tensor([float("-inf"), 5.0, float("-inf")]), 1),  # masked tokens
    ],
)
@pytest.mark.parametrize("temperature, top_p", [(GREEDY_BELOW, 1.0), (1e-4, 0.5), (1.0, 1.0), (2.0, 1e-300)])
def test_huge_logits_give_a_valid_token(logits, best, temperature, top_p):
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, seed=0)
    generator = params.make_generator()
    draws = [sample(logits, [], params, generator) for _ in range(20)]
    assert all(0 <= t < len(logits) for t in draws)
    if temperature <= 1e-4 or top_p < 1:  # the top logit dwarfs the rest: the distribution is one token
        assert set(draws) == {best}


@pytest.mark.parametrize("temperature", [0.0, 1e-300, GREEDY_BELOW, 1e-3, 1.0, 2.0])
@pytest.mark.parametrize("top_p", [1e-300, 1e-8, 0.5, 1.0])
def test_every_valid_parameter_gives_a_token(temperature, top_p):
    logits = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 1e4
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, presence_penalty=2, frequency_penalty=-2, seed=0)
    assert 0 <= sample(logits, [1, 1, 2], params, params.make_generator()) < 64


def test_mixed_rows_in_one_batch_each_follow_their_own_parameters():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(4))
    logits[5, 7] = 1e38  # a huge logit in a sampled row
    rows = [
        _row(SamplingParams(max_tokens=1, temperature=0)),
        _row(SamplingParams(max_tokens=1, temperature=1e-300)),
        _row(SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-300, seed=0)),
        _row(SamplingParams(max_tokens=1, temperature=1.0, seed=0)),
        _row(SamplingParams(max_tokens=1, temperature=1e-300, presence_penalty=2), output_ids=[int(logits[4].argmax())]),
        _row(SamplingParams(max_tokens=1, temperature=1e-4, seed=0)),
    ]
    tokens = sample_rows(logits, rows)
    assert all(isinstance(t, int) and 0 <= t < 50 for t in tokens)
    assert tokens[:3] == [int(logits[i].argmax()) for i in range(3)]
    assert tokens[4] == int(apply_penalties(logits[4], rows[4].output_ids, rows[4].params).argmax())
    assert tokens[5] == 7


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_without_usable_logits_fails_alone(temperature):
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    logits[1, 4] = float("nan")
    logits[2] = float("-inf")
    rows = [_row(SamplingParams(max_tokens=1, temperature=temperature, seed=0)) for _ in range(3)]
    tokens = sample_rows(logits, rows)
    assert isinstance(tokens[0], int)
    assert isinstance(tokens[1], SamplingFailed) and isinstance(tokens[2], SamplingFailed)


def test_nan_temperature_is_refused():
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=1, temperature=float("nan"))
