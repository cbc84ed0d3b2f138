"""Packing: a packed row gives every example the losses it has alone, and examples never see each other."""

from __future__ import annotations

import pytest

from gpu_worker.data import IGNORE_INDEX, collate, pack, tokenize_messages


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(micro_model_dir)


def _examples(tok, n=5):
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": "word " * (i + 1) + "count"}, {"role": "assistant", "content": "one two three"[: 3 + 2 * i]}]
        out.append(tokenize_messages(tok, msgs, 512)[0])
    return out


def _token_losses(model, batch):
    """Per-position next-token loss (0 where unlabelled), shape (rows, width)."""
    import torch

    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(losses), losses), logits


def test_pack_fills_rows_with_whole_examples_and_is_deterministic(tok):
    examples = _examples(tok, 7)
    rows = pack(examples, 64, seed=3)
    assert rows == pack(examples, 64, seed=3)
    assert all(len(r.input_ids) <= 64 and sum(r.seq_lens) == len(r.input_ids) for r in rows)
    assert sorted(n for r in rows for n in r.seq_lens) == sorted(len(e.input_ids) for e in examples)
    assert sum(r.trained_tokens for r in rows) == sum(e.trained_tokens for e in examples)
    assert len(rows) < len(examples)


def test_collate_of_packed_rows_restarts_positions_and_has_no_attention_mask(tok):
    rows = pack(_examples(tok, 3), 512)
    batch = collate(rows, tok.pad_token_id)
    assert "attention_mask" not in batch and not batch["use_cache"]
    lens = rows[0].seq_lens
    assert batch["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)  # never predict across examples


def test_packed_rows_padded_to_the_packing_width_train_the_same_tokens(micro):
    # the SFT recipe pads packed rows to max_seq_length (one shape every step, for the CUDA graphs): the
    # tail is its own document without labels, so every real token's loss is unchanged
    import torch

    model, tok = micro
    model.set_attn_implementation("sdpa")
    rows = pack(_examples(tok, 4), 256)
    tight, wide = collate(rows, tok.pad_token_id), collate(rows, tok.pad_token_id, width=200)
    n = tight["input_ids"].shape[1]
    assert n < 200 and wide["input_ids"].shape == (len(rows), 200)
    assert (wide["labels"][:, n:] == IGNORE_INDEX).all()
    used = len(rows[0].input_ids)
    assert wide["position_ids"][0, used:].tolist() == list(range(200 - used))  # the padding: one document
    assert collate(rows, tok.pad_token_id, width=8)["input_ids"].shape[1] == n  # never cut
    a, _ = _token_losses(model, tight)
    b, _ = _token_losses(model, wide)
    torch.testing.assert_close(b[:, : n - 1], a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_gives_the_padded_batch_per_example_losses(micro, attn):
    import torch

    model, tok = micro
    model.set_attn_implementation(attn)
    examples = _examples(tok, 5)
    padded, _ = _token_losses(model, collate(examples, tok.pad_token_id))
    rows = pack(examples, 256)
    assert len(rows) == 1
    packed, _ = _token_losses(model, collate(rows, tok.pad_token_id))
    # Which example sits where in the row: pack keeps each example's tokens contiguous.
    offset = 0
    by_ids = {tuple(e.input_ids): i for i, e in enumerate(examples)}
    for n in rows[0].seq_lens:
        i = by_ids[tuple(rows[0].input_ids[offset : offset + n])]
        # float32 on CPU; differences come only from summation order in attention (measured ~1e-6).
        torch.testing.assert_close(packed[0, offset : offset + n - 1], padded[i, : n - 1], rtol=1e-4, atol=1e-5)
        offset += n
    assert torch.isclose(packed.sum(), padded.sum(), rtol=1e-5)


def test_no_attention_across_examples_in_a_packed_row(micro):
    import torch

    model, tok = micro
    model.set_attn_implementation("sdpa")
    a, b = _examples(tok, 2)
    row = pack([a, b], 256)[0]
    first = row.seq_lens[0]
    batch = collate([row], tok.pad_token_id)
    _, logits = _token_losses(model, batch)
    perturbed = dict(batch, input_ids=batch["input_ids"].clone())
    perturbed["input_ids"][0, 1:first] = (perturbed["input_ids"][0, 1:first] + 7) % 100 + 10  # change the first example
    _, logits2 = _token_losses(model, perturbed)
    assert not torch.allclose(logits[0, :first], logits2[0, :first])  # the change is real
    torch.testing.assert_close(logits[0, first:], logits2[0, first:], rtol=0, atol=0)  # the second example never saw it
