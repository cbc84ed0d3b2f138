"""load_sft_data end to end: several files, weights, dedupe, held-out split, packing; and every
supervised format teaches a model its toy task."""

from __future__ import annotations

import pytest

from gpu_worker.contract import DataFormat, DataOptions, TrainingFile
from gpu_worker.data import DataError, collate, epoch_batches, load_sft_data
from gpu_worker.data.mixing import hold_out

PAIRS = [("apple", "red"), ("banana", "yellow"), ("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("lemon", "yellow"), ("plum", "purple")]

ROWS = {
    DataFormat.chat: lambda t, c: {"messages": [{"role": "user", "content": f"Color of {t}?"}, {"role": "assistant", "content": c}]},
    DataFormat.sharegpt: lambda t, c: {"conversations": [{"from": "human", "value": f"Color of {t}?"}, {"from": "gpt", "value": c}]},
    DataFormat.alpaca: lambda t, c: {"instruction": "Name the color.", "input": t, "output": c},
    DataFormat.completion: lambda t, c: {"prompt": f"The color of {t} is", "completion": f" {c}"},
    DataFormat.text: lambda t, c: {"text": f"The color of {t} is {c}."},
}


@pytest.fixture(scope="module")
def micro_tok(micro_model_dir):
    from gpu_worker.loading import load_tokenizer

    return load_tokenizer(str(micro_model_dir), data_dir=micro_model_dir)


def test_files_are_mixed_deduplicated_split_and_packed(tok, store, write_jsonl, make_spec):
    chat = [ROWS[DataFormat.chat](t, c) for t, c in PAIRS]
    chat += [chat[0], ROWS[DataFormat.chat]("Apple", "red!")]  # an exact and a near duplicate
    write_jsonl(store, "files/train.jsonl", chat)
    write_jsonl(store, "files/extra.jsonl", [ROWS[DataFormat.sharegpt](f"thing {i}", "grey") for i in range(4)])
    data_opts = DataOptions(extra_training_files=(TrainingFile(key="files/extra.jsonl", weight=2.0),), validation_split=0.2, packing=True)
    spec = make_spec("tiny", data=data_opts)
    data = load_sft_data(store, spec, tok)
    s = data.stats
    assert [(f.param, f.format, f.examples) for f in s.files] == [("training_file", "chat", 10), ("extra_training_files[0]", "sharegpt", 4)]
    assert (s.dedupe.removed, s.dedupe.near) == (1, 1)
    assert s.held_out == round(0.2 * 13) and len(data.valid.examples) == s.held_out
    # 9 chat + 4 sharegpt left after dedupe; the split holds out of that pool, the extra file then counts twice.
    kept, _ = hold_out(list(range(13)), 0.2, spec.seed)
    assert s.train_examples == sum(1 for i in kept if i < 9) + 2 * sum(1 for i in kept if i >= 9)
    assert s.packed_rows == len(data.train.examples) < s.train_examples
    assert sum(len(r.seq_lens) for r in data.train.examples) == s.train_examples
    messages = " | ".join(e.message for e in s.log_events())
    for needle in ("1 exact duplicate training examples removed", "1 near-duplicate", "held out 3", "packed into"):
        assert needle in messages
    again = load_sft_data(store, spec, tok)
    assert [list(r.input_ids) for r in again.train.examples] == [list(r.input_ids) for r in data.train.examples]


def test_a_preference_file_cannot_train_a_supervised_job(tok, store, write_jsonl, make_spec):
    write_jsonl(store, "files/train.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}])
    with pytest.raises(DataError) as err:
        load_sft_data(store, make_spec("tiny"), tok)
    assert err.value.line == 1 and "cannot train method 'supervised'" in str(err.value)


def test_declared_format_is_enforced_per_file(tok, store, write_jsonl, make_spec):
    write_jsonl(store, "files/train.jsonl", [ROWS[DataFormat.chat]("apple", "red")])
    write_jsonl(store, "files/extra.jsonl", [ROWS[DataFormat.chat]("plum", "purple")])
    opts = DataOptions(extra_training_files=(TrainingFile(key="files/extra.jsonl", format=DataFormat.alpaca),))
    with pytest.raises(DataError) as err:
        load_sft_data(store, make_spec("tiny", data=opts), tok)
    assert err.value.param == "extra_training_files[0]" and err.value.line == 1 and "the file was declared alpaca" in str(err.value)


def _mean_loss(model, rows, pad_id) -> float:
    import torch

    with torch.no_grad():
        batch = collate(list(rows), pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        return model(**batch, num_items_in_batch=n).loss.item()


@pytest.mark.parametrize("fmt, packing", [(f, False) for f in ROWS] + [(DataFormat.sharegpt, True)])
def test_each_format_trains_and_the_loss_falls(micro_model_dir, micro_tok, store, write_jsonl, make_spec, fmt, packing):
    import torch
    from transformers import AutoModelForCausalLM

    write_jsonl(store, "files/train.jsonl", [ROWS[fmt](t, c) for t, c in PAIRS])
    data = load_sft_data(store, make_spec(str(micro_model_dir), data=DataOptions(packing=packing)), micro_tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    rows = data.train.examples
    before = _mean_loss(model, rows, micro_tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(12):
        for idx in epoch_batches(len(rows), 4, seed=0, epoch=epoch):
            batch = collate([rows[i] for i in idx], micro_tok.pad_token_id)
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after = _mean_loss(model, rows, micro_tok.pad_token_id)
    assert after < 0.5 * before, (before, after)


def test_without_a_validation_file_a_hundred_examples_get_an_automatic_split(micro_tok, store, write_jsonl, make_spec):
    rows = [ROWS[DataFormat.chat](f"thing {i}", c) for i, (_, c) in enumerate(PAIRS * 15)]  # 120 distinct examples
    write_jsonl(store, "files/train.jsonl", rows)
    data = load_sft_data(store, make_spec("m"), micro_tok)  # validation_split unset: automatic
    assert data.stats.held_out == len(data.valid.examples) == 6 and data.stats.train_examples == 114
    messages = [e.message for e in data.stats.log_events()]
    assert any(m.startswith("held out 6 training examples for validation (automatic: 5% of the training examples") for m in messages), messages
    off = load_sft_data(store, make_spec("m", data=DataOptions(validation_split=0)), micro_tok)
    assert off.valid is None and off.stats.held_out == 0 and off.stats.train_examples == 120
    write_jsonl(store, "files/train.jsonl", rows[:99])
    assert load_sft_data(store, make_spec("m"), micro_tok).valid is None  # too few for the automatic split
