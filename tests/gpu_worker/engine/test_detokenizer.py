"""Incremental detokenisation: the pieces always add up to decoding the whole output at once, and stop
strings cut the text exactly before them, even when they straddle tokens."""

from __future__ import annotations

import random

import pytest

from gpu_worker.engine.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tokenizer(reference):
    return reference.tokenizer


def stream(tokenizer, prompt_ids, output_ids, stop=()):
    detok = Detokenizer(tokenizer, prompt_ids, tuple(stop))
    pieces = []
    for token in output_ids:
        pieces.append(detok.push(token))
        if detok.stopped:
            break
    pieces.append(detok.finish())
    return pieces, detok


@pytest.mark.parametrize("seed", range(20))
def test_pieces_concatenate_to_the_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    # Random ids include byte tokens that are fragments of multi-byte characters.
    output = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
    prompt = tokenizer("Hello there")["input_ids"]
    pieces, _ = stream(tokenizer, prompt, output)
    assert "".join(pieces) == tokenizer.decode(output, skip_special_tokens=True)


def test_incomplete_characters_are_held_back_until_complete(tokenizer):
    output = tokenizer("café ünïcödé ✓", add_special_tokens=False)["input_ids"]
    pieces, _ = stream(tokenizer, [], output)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "café ünïcödé ✓"


def test_stop_string_spanning_tokens_cuts_before_it(tokenizer):
    text = "The quick brown fox jumps over the lazy dog"
    output = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, [], output, stop=["own fox j"])
    assert detok.stopped
    assert "".join(pieces) == "The quick br"
    # Nothing after the cut was ever emitted, not even the part of the stop string seen first.
    assert not any("own" in p for p in pieces)


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer):
    output = tokenizer("one two three", add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, [], output, stop=["two four"])
    assert not detok.stopped
    assert "".join(pieces) == "one two three"
