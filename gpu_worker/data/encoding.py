"""Tokenization of supervised records into labelled examples, shared by the trainer and the counter.

Both the trainer (a loaded transformers tokenizer) and ``tokencount`` (a model folder's
``tokenizer.json``, no transformers) go through a ``TokenizerView``: the ``tokenizers`` backend with
truncation and padding off, the tokenizer's own chat template and its special tokens. A record's text
is rendered once (``templates.py``), encoded once, and a token carries a loss when its characters
overlap a trained span, so the two sides agree token for token.

Labels are the input ids where trained and ``IGNORE_INDEX`` elsewhere; position 0 never carries one
(no token predicts it), so ``Example.trained_tokens`` is exactly what the loss averages over. The EOS
or end-of-turn token closing a trained reply is trained: labels come from spans, never from
comparing ids with the padding id, so a tokenizer whose pad equals its EOS still learns to stop.
"""

from __future__ import annotations

import dataclasses
import json
from array import array
from pathlib import Path
from typing import Any

from gpu_worker.data.formats import Conversation, Segments
from gpu_worker.data.templates import assistant_spans

IGNORE_INDEX = -100
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: array  # array('i')
    labels: array  # array('i'), IGNORE_INDEX where no loss
    # A packed row (``packing.pack``): the lengths of the examples laid end to end in it.
    seq_lens: tuple[int, ...] | None = None

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclasses.dataclass(frozen=True)
class TokenizerView:
    backend: Any  # tokenizers.Tokenizer, truncation and padding off
    chat_template: str | None  # the tokenizer's own (None: it has none)
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the chat template sees them
    bos_id: int | None
    eos_id: int | None

    @classmethod
    def from_hf(cls, tokenizer) -> "TokenizerView":
        """From a loaded transformers tokenizer (a fast one: every tokenizer in transformers 5 is)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no `tokenizers` backend")
        special = {k: v for k in _SPECIAL if isinstance(v := getattr(tokenizer, k, None), str)}
        return cls(_detached(backend.to_str()), getattr(tokenizer, "chat_template", None), special, tokenizer.bos_token_id, tokenizer.eos_token_id)

    @classmethod
    def from_dir(cls, folder: str | Path) -> "TokenizerView":
        """From a model folder: ``tokenizer.json``, ``tokenizer_config.json`` and the chat template
        (``chat_template.jinja``, or the config's ``chat_template``)."""
        folder = Path(folder)
        backend = _detached((folder / "tokenizer.json").read_text(encoding="utf-8"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        special = {}
        for key in _SPECIAL:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
        special.setdefault("pad_token", special.get("eos_token", ""))  # as loading.ensure_chat_ready
        ids = {k: backend.token_to_id(special[k]) if special.get(k) else None for k in ("bos_token", "eos_token")}
        return cls(backend, template, special, ids["bos_token"], ids["eos_token"])

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and their character offsets in ``text``; special tokens written in the text
        become their ids, nothing is added around it."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets


def _detached(tokenizer_json: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    return tok


def _label_by_spans(ids, offsets, spans: list[tuple[int, int, bool]], train_on_inputs: bool) -> list[int]:
    """A token is trained if it overlaps a trained span, or (train_on_inputs) overlaps no untrained
    one: a weight-0 reply stays untrained either way."""
    labels = []
    k = 0
    for tok, (start, end) in zip(ids, offsets):
        end = max(end, start + 1)  # an empty offset (trimmed whitespace) still sits at `start`
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        hit = next((trained for s, e, trained in spans[k:k + 2] if s < end and start < e), None)
        trained = hit if hit is not None else train_on_inputs
        labels.append(tok if trained else IGNORE_INDEX)
    return labels


def encode_record(view: TokenizerView, template: str, record: Conversation | Segments, max_seq_length: int, *, train_on_inputs: bool = False) -> tuple[Example, bool]:
    """Tokenize one record; returns the example (cut to ``max_seq_length``) and whether it was cut."""
    if isinstance(record, Conversation):
        text, spans = assistant_spans(template, list(record.messages), special_tokens=view.special_tokens, tools=record.tools)
        weights = [bool(m["weight"]) for m in record.messages if m["role"] == "assistant"]
        ids, offsets = view.encode(text)
        labels = _label_by_spans(ids, offsets, [(s, e, w) for (s, e), w in zip(spans, weights)], train_on_inputs)
    else:
        ids, labels = [], []
        if view.bos_id is not None:
            ids.append(view.bos_id)
            labels.append(IGNORE_INDEX)
        for text, trained in record.parts:
            part = view.encode(text)[0] if text else []
            ids += part
            labels += part if trained or train_on_inputs else [IGNORE_INDEX] * len(part)
        if view.eos_id is not None:
            ids.append(view.eos_id)
            labels.append(view.eos_id)
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
    truncated = len(ids) > max_seq_length
    return Example(array("i", ids[:max_seq_length]), array("i", labels[:max_seq_length])), truncated
