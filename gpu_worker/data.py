"""Training data: chat JSONL from the object store to padded, labelled batches.

Each line is an OpenAI chat example, ``{"messages": [{"role", "content"}, ...]}``; an assistant message
may carry ``"weight": 0`` to be shown to the model but not trained on. An example is rendered with the
tokenizer's chat template and labelled ``-100`` everywhere except the tokens of trained assistant
replies, end-of-turn token included (the model must learn to stop). Examples longer than
``max_seq_length`` are cut at the end and counted; one left with no trained token is dropped.

The order is a deterministic shuffle per ``(seed, epoch)``, so a ``DataPosition`` (epoch, index of
the next batch) is all a checkpoint needs to continue exactly where training stopped.
"""

from __future__ import annotations

import dataclasses
import random
from array import array
from typing import Any, Iterable, Iterator

from gpu_worker.storage import ObjectNotFound, ObjectStore, iter_lines
from gpu_worker.validation import FileValidator

IGNORE_INDEX = -100
_ROLES = frozenset({"system", "user", "assistant"})  # tool calling: refused at upload until trained


class DataError(ValueError):
    """A training or validation file is unusable; the message names the line and the problem."""

    def __init__(self, message: str, *, param: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.param = param
        self.line = line


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: array  # array('i')
    labels: array  # array('i'), IGNORE_INDEX where no loss

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclasses.dataclass(frozen=True)
class Dataset:
    examples: tuple[Example, ...]
    truncated: int  # examples cut to max_seq_length
    dropped: int  # examples with no trained token left after truncation


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the data stream is: the next batch to read is ``batch_index`` of epoch ``epoch``."""

    epoch: int = 0
    batch_index: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataPosition":
        return cls(epoch=int(d["epoch"]), batch_index=int(d["batch_index"]))


# --- parsing -----------------------------------------------------------------------------------------


def parse_messages(obj: dict[str, Any], *, param: str, line: int) -> list[dict[str, Any]]:
    """The trainer's rules on top of ``validation.check_example`` (which ``obj`` already passed):
    returns the messages as ``{"role", "content", "weight"}``."""
    out = []
    for i, msg in enumerate(obj["messages"]):
        where = f"message {i}"
        role = msg["role"]
        if role not in _ROLES or msg.get("tool_calls") is not None:
            raise DataError(f"{where}: tool messages and tool calls are not supported by the trainer yet", param=param, line=line)
        weight = msg.get("weight", 1)
        if weight == 0 and role != "assistant":
            raise DataError(f"{where}: 'weight' applies to assistant messages only", param=param, line=line)
        out.append({"role": role, "content": msg["content"], "weight": int(weight)})
    if not any(m["role"] == "assistant" and m["weight"] for m in out):
        raise DataError("no assistant message to train on (every one has weight 0)", param=param, line=line)
    return out


def iter_messages(lines: Iterable[bytes | str], *, param: str) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Decode JSONL lines into ``(line_number, messages)``, failing on the first bad line. The
    platform-wide rules (``validation.py``, the same the API applied at upload) come first, then what
    this trainer additionally needs; blank lines are skipped."""
    validator = FileValidator(min_examples=1)
    for n, raw in enumerate(lines, start=1):
        errors_before = validator.error_count
        obj = validator.feed(raw)
        if validator.error_count > errors_before:
            raise DataError(validator.finish().errors[-1].reason, param=param, line=n)
        if obj is not None:
            yield n, parse_messages(obj, param=param, line=n)


# --- tokenization ------------------------------------------------------------------------------------


def _has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "generation" in template and "endgeneration" in template


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _render(tokenizer, messages, **kw):
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, **kw)


def _assistant_spans(tokenizer, messages) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the token span of each assistant message, in order."""
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if _has_generation_markers(tokenizer):
        enc = _render(tokenizer, messages, return_assistant_tokens_mask=True)
        spans = _spans(enc["assistant_masks"])
        if len(spans) == n_assistant:
            return list(enc["input_ids"]), spans
    # Templates without generation markers: an assistant reply is what rendering it adds to the
    # conversation before it (with the generation prompt).
    ids = list(_render(tokenizer, messages)["input_ids"])
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)["input_ids"]) if i else 0
            end = len(_render(tokenizer, messages[: i + 1])["input_ids"])
            spans.append((start, end))
    return ids, spans


def tokenize_messages(tokenizer, messages, max_seq_length: int) -> tuple[Example, bool]:
    """Tokenize one conversation; returns the example and whether it was truncated."""
    ids, spans = _assistant_spans(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    weights = [m["weight"] for m in messages if m["role"] == "assistant"]
    for (start, end), weight in zip(spans, weights):
        if weight:
            labels[start:end] = ids[start:end]
    truncated = len(ids) > max_seq_length
    return Example(array("i", ids[:max_seq_length]), array("i", labels[:max_seq_length])), truncated


def load_dataset(store: ObjectStore, key: str, tokenizer, max_seq_length: int, *, param: str = "training_file") -> Dataset:
    """Read, check and tokenize a whole chat JSONL file. Raises ``DataError``."""
    examples, truncated, dropped = [], 0, 0
    try:
        for _, messages in iter_messages(iter_lines(store, key), param=param):
            example, cut = tokenize_messages(tokenizer, messages, max_seq_length)
            truncated += cut
            if example.trained_tokens:
                examples.append(example)
            else:
                dropped += 1
    except ObjectNotFound:
        raise DataError(f"file {key!r} not found in storage", param=param) from None
    if not examples:
        why = f" ({dropped} lost every assistant token to max_seq_length={max_seq_length})" if dropped else ""
        raise DataError(f"the file has no usable example{why}", param=param)
    return Dataset(tuple(examples), truncated, dropped)


# --- order and batches -------------------------------------------------------------------------------


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each batch of ``epoch``: a shuffle that depends only on (seed, epoch)."""
    order = list(range(n_examples))
    random.Random(f"tuneforge-data:{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def sequential_batches(n_examples: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n_examples))) for i in range(0, n_examples, batch_size)]


def collate(examples: list[Example], pad_token_id: int, device=None) -> dict[str, Any]:
    """Right-pad a batch to its longest example: ``input_ids``, ``attention_mask``, ``labels``."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.frombuffer(e.input_ids, dtype=torch.int32).long()
        labels[row, :n] = torch.frombuffer(e.labels, dtype=torch.int32).long()
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
