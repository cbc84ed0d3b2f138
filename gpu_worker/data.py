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
import json
import random
from array import array
from typing import Any, Iterable, Iterator

from gpu_worker.storage import ObjectNotFound, ObjectStore, iter_lines

IGNORE_INDEX = -100
_ROLES = frozenset({"system", "developer", "user", "assistant"})


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


def parse_messages(obj: Any, *, param: str, line: int) -> list[dict[str, Any]]:
    """Check one decoded line and return its messages as ``{"role", "content", "weight"}``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise DataError('expected an object with a non-empty "messages" list', param=param, line=line)
    out = []
    for i, msg in enumerate(obj["messages"]):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"{where} is not an object", param=param, line=line)
        role = msg.get("role")
        if role not in _ROLES:
            raise DataError(f"{where}.role {role!r} is not one of {sorted(_ROLES)}", param=param, line=line)
        if msg.get("tool_calls") or msg.get("function_call"):
            raise DataError(f"{where}: tool calls are not supported for fine-tuning yet", param=param, line=line)
        content = _text(msg.get("content"))
        if content is None:
            raise DataError(f"{where}.content must be a string or a list of text parts", param=param, line=line)
        weight = msg.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool) or (weight == 0 and role != "assistant"):
            raise DataError(f"{where}.weight must be 0 or 1, on assistant messages only", param=param, line=line)
        out.append({"role": "system" if role == "developer" else role, "content": content, "weight": int(weight)})
    if not any(m["role"] == "assistant" and m["weight"] for m in out):
        raise DataError("no assistant message to train on (need one with weight 1)", param=param, line=line)
    return out


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content) and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    return None


def iter_messages(lines: Iterable[bytes | str], *, param: str) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Decode JSONL lines into ``(line_number, messages)``; blank lines are skipped."""
    for n, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({err.msg})", param=param, line=n) from None
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
    except UnicodeDecodeError as err:
        raise DataError(f"file is not UTF-8 ({err.reason})", param=param) from None
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
