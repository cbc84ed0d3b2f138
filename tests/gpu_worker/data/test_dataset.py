"""The data pipeline: which tokens carry a loss, truncation, bad lines, order and batches."""

from __future__ import annotations

import pytest

from gpu_worker.builtin import TINY
from gpu_worker.data import (
    IGNORE_INDEX,
    DataError,
    DataPosition,
    collate,
    epoch_batches,
    load_dataset,
    tokenize_messages,
)


@pytest.fixture(scope="module")
def tok(builtin_data_dir):
    from gpu_worker.loading import load_tokenizer

    return load_tokenizer(TINY, data_dir=builtin_data_dir)


def _labelled_text(tok, example) -> str:
    return tok.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX])


CONVERSATION = [
    {"role": "system", "content": "Be brief.", "weight": 1},
    {"role": "user", "content": "Say hi", "weight": 1},
    {"role": "assistant", "content": "hello there", "weight": 0},
    {"role": "user", "content": "Again", "weight": 1},
    {"role": "assistant", "content": "bye now", "weight": 1},
]


def test_only_trained_assistant_replies_and_their_end_of_turn_are_labelled(tok):
    example, truncated = tokenize_messages(tok, CONVERSATION, 512)
    assert not truncated
    assert _labelled_text(tok, example) == "bye now<|im_end|>"
    # Labels are the input ids themselves where set (the model shifts them).
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(example.input_ids, example.labels))


def test_every_weighted_reply_is_labelled(tok):
    msgs = [dict(m, weight=1) for m in CONVERSATION]
    example, _ = tokenize_messages(tok, msgs, 512)
    assert _labelled_text(tok, example) == "hello there<|im_end|>bye now<|im_end|>"


def test_templates_without_generation_markers_label_the_same_tokens(tok):
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = tok.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    marked, _ = tokenize_messages(tok, CONVERSATION, 512)
    derived, _ = tokenize_messages(plain, CONVERSATION, 512)
    assert list(derived.input_ids) == list(marked.input_ids)
    # The prefix method also takes the newline the template writes after <|im_end|>: nothing more.
    assert _labelled_text(plain, derived) == "bye now<|im_end|>\n"


def test_truncation_cuts_the_end_and_is_counted(tok, store, write_jsonl):
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    late = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "answer " * 100}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    key = write_jsonl(store, "f.jsonl", [long, late, short, ""])
    data = load_dataset(store, key, tok, 64)
    assert data.truncated == 2 and data.dropped == 1  # `long` lost its whole reply
    assert len(data.examples) == 2
    assert all(len(e.input_ids) <= 64 for e in data.examples)
    assert max(len(e.input_ids) for e in data.examples) == 64


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", "invalid JSON"),
        ('{"messages": []}', "'messages' is empty"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}', "weight 0"),
        ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}', "'tool_call_id' must be the id of the call"),
        ('{"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}]}', "assistant messages only"),
    ],
)
def test_a_bad_line_is_reported_with_its_number(tok, store, write_jsonl, line, needle):
    good = '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'
    key = write_jsonl(store, "bad.jsonl", [good, "", line, good])
    with pytest.raises(DataError) as err:
        load_dataset(store, key, tok, 64, param="validation_file")
    assert err.value.line == 3 and needle in str(err.value) and str(err.value).startswith("line 3:")
    assert err.value.param == "validation_file"


def test_missing_and_empty_files_are_data_errors(tok, store, write_jsonl):
    with pytest.raises(DataError, match="not found"):
        load_dataset(store, "nope.jsonl", tok, 64)
    with pytest.raises(DataError, match="no usable example"):
        load_dataset(store, write_jsonl(store, "empty.jsonl", ["", "  "]), tok, 64)


def test_shuffle_depends_only_on_seed_and_epoch():
    a = epoch_batches(10, 3, seed=1, epoch=0)
    assert a == epoch_batches(10, 3, seed=1, epoch=0)
    assert a != epoch_batches(10, 3, seed=1, epoch=1) and a != epoch_batches(10, 3, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(10))  # each example once per epoch
    assert [len(b) for b in a] == [3, 3, 3, 1]
    # Batches of 2 are the batches of 4 cut in half: gradient accumulation sees the same examples.
    assert [i for b in epoch_batches(10, 2, 1, 0) for i in b] == [i for b in epoch_batches(10, 4, 1, 0) for i in b]


def test_collate_pads_right_to_the_longest(tok):
    a, _ = tokenize_messages(tok, CONVERSATION, 512)
    b, _ = tokenize_messages(tok, CONVERSATION[3:], 512)
    batch = collate([a, b], tok.pad_token_id)
    n = len(b.input_ids)
    assert batch["input_ids"].shape == (2, len(a.input_ids))
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(a.input_ids) - n)
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all() and (batch["input_ids"][1, n:] == tok.pad_token_id).all()


def test_data_position_round_trips():
    pos = DataPosition(epoch=2, batch_index=5)
    assert DataPosition.from_dict(pos.to_dict()) == pos
