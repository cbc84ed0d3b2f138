"""Preference, KTO and prompt-only data: JSONL rows to token ids (their batches of prompt + completion:
``recipes.completion_batches``, which needs torch; this module does not, the token counter imports it).

Rows (each is first checked with ``record_checks.CHECKS``, the rules the API applied at upload, a bad
one named by its line; ``data.formats.preference_conversations`` then reads it, as the token counter
does):

- preference (DPO/IPO/ORPO/SimPO): OpenAI's ``{"input": {"messages": [...], "tools": [...]},
  "preferred_output": [assistant message], "non_preferred_output": [assistant message]}`` (the
  input's messages may call its tools and hold their results), or ``{"prompt", "chosen",
  "rejected"}`` where the prompt is a string (one user turn) or a list of messages and each answer a
  string or a one-assistant-message list;
- kto: ``{"prompt", "completion", "label": true|false}``, same prompt/answer shapes;
- prompt (GRPO): ``{"prompt": ...}`` or ``{"messages": [...]}`` (a trailing assistant message is the
  reference answer, exposed to rewards as ``answer`` unless the row has one); every other field of
  the row is kept for the rewards (e.g. the ``answer`` exact_match compares with).

A prompt is rendered with the job's chat template (``data.chat_template``: a named built-in, else
the tokenizer's own) and the generation prompt, its tools listed as the supervised loader lists a
chat example's (``data.templates``); a completion is what rendering the assistant turn adds after
it, up to and including the end-of-turn token (the trailing newline of ChatML is not part of what
the model must generate): the tokens the supervised labelling trains, so ``tokencount`` counts them
exactly. Too long an example keeps the end of its prompt and the start of its completion(s), and is
counted as truncated.
"""

from __future__ import annotations

import dataclasses
import json
from array import array
from typing import Any, Iterator

from gpu_worker.contract import ChatTemplate, DataFormat
from gpu_worker.data.dataset import DataError, tokenizer_view  # not the package: its batches import torch
from gpu_worker.data.encoding import IGNORE_INDEX, TokenizerView, encode_record
from gpu_worker.data.formats import Conversation, answered, preference_conversations, prompt_conversation
from gpu_worker.data.templates import END_OF_TURN_TOKENS, render
from gpu_worker.storage import ObjectNotFound, ObjectStore, iter_lines


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: array  # array('i')
    chosen: array
    rejected: array


@dataclasses.dataclass(frozen=True)
class KTOExample:
    prompt: array
    completion: array
    desirable: bool


@dataclasses.dataclass(frozen=True)
class PromptExample:
    prompt: array
    row: dict[str, Any]  # the row's other fields, for the rewards


@dataclasses.dataclass(frozen=True)
class Loaded:
    examples: tuple
    truncated: int


# --- rows --------------------------------------------------------------------------------------------


def parse_prompt(obj: dict, *, param: str, line: int) -> tuple[Conversation, dict[str, Any]]:
    """A prompt row's conversation and the fields the rewards read (a chat row's trailing assistant
    message is its ``answer`` unless the row has one)."""
    row = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    if "prompt" in obj:
        prompt = prompt_conversation(obj["prompt"])
    elif "messages" in obj:
        messages = list(obj["messages"])
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            row.setdefault("answer", messages.pop().get("content") or "")
        prompt = prompt_conversation(messages)
    else:
        raise DataError("a prompt example needs 'prompt' or 'messages'", param=param, line=line)
    return prompt, row


def _rows(store: ObjectStore, key: str, *, param: str) -> Iterator[tuple[int, dict]]:
    try:
        for n, raw in enumerate(iter_lines(store, key), start=1):
            try:
                text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
                if n == 1:
                    text = text.lstrip("\ufeff")
                if not text.strip():
                    continue
                obj = json.loads(text)
            except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: a number past 4300 digits too
                raise DataError(f"invalid JSON or UTF-8 ({err})", param=param, line=n) from None
            if not isinstance(obj, dict):
                raise DataError("each line must be a JSON object", param=param, line=n)
            yield n, obj
    except ObjectNotFound:
        raise DataError(f"file {key!r} not found in storage", param=param) from None


# --- tokenization ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Renderer:
    """How prompts and answers become tokens: the tokenizer's view and the job's chat template
    (``spec.data.chat_template`` resolved as the supervised loader resolves it), rendered by the one
    renderer every path uses (``data.templates``), so the token counter reads the same tokens."""

    view: TokenizerView
    template: str  # Jinja source

    @classmethod
    def of(cls, tokenizer, chat_template: ChatTemplate | str = ChatTemplate.auto) -> "Renderer":
        return cls(*tokenizer_view(tokenizer, chat_template))

    def prompt(self, prompt: Conversation) -> list[int]:
        """The prompt's tokens, up to and including the generation prompt."""
        text, _ = render(self.template, list(prompt.messages), special_tokens=self.view.special_tokens, tools=prompt.tools, add_generation_prompt=True)
        return self.view.encode(text)[0]

    def completion(self, prompt: Conversation, prompt_ids: list[int], answer: str) -> list[int]:
        """The tokens rendering ``answer`` as the assistant's reply adds after ``prompt_ids``, up to
        the end of the reply's trained span (its end-of-turn token included): the tokens the
        supervised labelling of the answered conversation trains."""
        example, _ = encode_record(self.view, self.template, answered(prompt, answer), _NO_LIMIT)
        ids, labels = list(example.input_ids), example.labels
        end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1) + 1
        if ids[: len(prompt_ids)] != prompt_ids:  # a template that renders the prompt differently once answered
            raise ValueError("the chat template does not render the prompt as a prefix of the answered conversation")
        if end <= len(prompt_ids):
            raise ValueError("the chat template renders no tokens for the answer")
        return ids[len(prompt_ids) : end]

    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end an assistant turn in this template: EOS, and each end-of-turn token the
        template writes that is one token of the vocabulary (``<|eot_id|>`` for llama-3 over a base
        whose EOS is ``<|end_of_text|>``)."""
        ids = [self.view.eos_id] if self.view.eos_id is not None else []
        for token in END_OF_TURN_TOKENS:
            if token in self.template and len(found := self.view.encode(token)[0]) == 1:
                ids.append(found[0])
        return tuple(dict.fromkeys(ids))


def encode_prompt(tokenizer, messages, chat_template: ChatTemplate | str = ChatTemplate.auto) -> list[int]:
    """One prompt's tokens (a string or messages) as a job with ``chat_template`` reads it."""
    return Renderer.of(tokenizer, chat_template).prompt(prompt_conversation(messages))


_NO_LIMIT = 1 << 30  # encode whole; ``fit`` cuts prompt and completions to max_seq_length together


def fit(prompt: list[int], completions: list[list[int]], max_len: int) -> tuple[list[int], list[list[int]], bool]:
    """Cut ``prompt + longest completion`` to ``max_len``: completions keep their start (at least half
    the budget when the prompt is long), the prompt keeps its end."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_len:
        return prompt, completions, False
    budget = min(longest, max(max_len - len(prompt), max_len // 2))
    return prompt[len(prompt) - (max_len - budget) :], [c[:budget] for c in completions], True


def _ids(values: list[int]) -> array:
    return array("i", values)


def load_examples(store: ObjectStore, key: str, tokenizer, fmt: DataFormat, *, max_seq_length: int, max_prompt_length: int | None = None, required_fields: tuple[str, ...] = (), param: str = "training_file", chat_template: ChatTemplate | str = ChatTemplate.auto) -> Loaded:
    """Read and tokenize a whole preference / KTO / prompt file with ``chat_template`` (the job's
    ``data.chat_template``). ``max_prompt_length`` applies to prompt files (GRPO: room must be left
    for the completion); ``required_fields`` are row fields each prompt row must have (the rewards'
    references). Raises ``DataError``."""
    from gpu_worker.record_checks import CHECKS  # the platform's rules, the same the API applied at upload

    renderer = Renderer.of(tokenizer, chat_template)
    examples, truncated = [], 0
    for n, obj in _rows(store, key, param=param):
        if (reason := CHECKS[fmt](obj)) is not None:
            raise DataError(reason, param=param, line=n)
        try:
            if fmt in (DataFormat.preference, DataFormat.kto):
                prompt_conv, answers = preference_conversations(fmt, obj)
                prompt = renderer.prompt(prompt_conv)
                prompt, completions, cut = fit(prompt, [renderer.completion(prompt_conv, prompt, a) for a in answers], max_seq_length)
                if fmt == DataFormat.preference:
                    examples.append(PreferencePair(_ids(prompt), _ids(completions[0]), _ids(completions[1])))
                else:
                    examples.append(KTOExample(_ids(prompt), _ids(completions[0]), obj["label"]))
            elif fmt == DataFormat.prompt:
                prompt_conv, row = parse_prompt(obj, param=param, line=n)
                missing = [f for f in required_fields if f not in row]
                if missing:
                    raise DataError(f"missing field {missing[0]!r} that the exact_match reward compares with", param=param, line=n)
                prompt = renderer.prompt(prompt_conv)
                limit = max_prompt_length or max_seq_length
                cut = len(prompt) > limit
                examples.append(PromptExample(_ids(prompt[len(prompt) - limit :] if cut else prompt), row))
            else:
                raise ValueError(f"format {fmt.value!r} is not a preference, KTO or prompt format")
        except ValueError as err:  # TemplateError included: the template refused this row
            if isinstance(err, DataError):
                raise
            raise DataError(str(err), param=param, line=n) from None
        truncated += cut
    if not examples:
        raise DataError("the file has no example", param=param)
    return Loaded(tuple(examples), truncated)


def detect_format(store: ObjectStore, key: str, *, param: str = "training_file") -> DataFormat:
    """The format of a file from its first non-empty row."""
    for n, obj in _rows(store, key, param=param):
        if "preferred_output" in obj or {"chosen", "rejected"} <= obj.keys():
            return DataFormat.preference
        if "label" in obj and "completion" in obj:
            return DataFormat.kto
        if "prompt" in obj or "messages" in obj:
            return DataFormat.prompt
        raise DataError("cannot tell the format of this row (expected preference pairs, KTO rows or prompts)", param=param, line=n)
    raise DataError("the file has no example", param=param)


# --- the data of a run -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunData:
    """What a preference/KTO/GRPO run trains and validates on (``load_run_data``)."""

    train: tuple  # one epoch's pool: every file's examples, resampled to its weight
    valid: tuple | None
    truncated: int  # training examples cut to max_seq_length
    valid_truncated: int
    duplicates: int  # exact duplicates removed (``spec.data.dedupe``)
    held_out: int  # examples moved to the validation set (``validation_split``)
    files: tuple[tuple[str, int], ...]  # (parameter, examples read) per training file


def _example_key(example) -> bytes:
    """Identity of an example for exact-duplicate removal: every field, length-prefixed."""
    parts = []
    for field in dataclasses.fields(example):
        value = getattr(example, field.name)
        data = value.tobytes() if isinstance(value, array) else json.dumps(value, sort_keys=True, default=str).encode()
        parts.append(len(data).to_bytes(8, "little") + data)
    return b"".join(parts)


def load_run_data(spec, read) -> RunData:
    """Every training file of ``spec`` (the primary one and ``data.extra_training_files``) read with
    ``read(key, param) -> Loaded``, exact duplicates dropped across files (when ``data.dedupe``), a
    seeded ``validation_split`` held out when there is no validation file, and the files mixed by
    weight (``mixing.mix``): the same rules as supervised data. Raises ``DataError``."""
    from gpu_worker.data.mixing import hold_out, mix

    sources = [(spec.training_file_key, "training_file", 1.0)]
    sources += [(f.key, f"extra_training_files[{i}]", f.weight) for i, f in enumerate(spec.data.extra_training_files)]
    loaded = [read(key, param) for key, param, _ in sources]
    pool = [(s, ex) for s, data in enumerate(loaded) for ex in data.examples]
    duplicates = 0
    if spec.data.dedupe:
        seen: set[bytes] = set()
        kept = []
        for s, ex in pool:
            key = _example_key(ex)
            if key not in seen:
                seen.add(key)
                kept.append((s, ex))
        duplicates, pool = len(pool) - len(kept), kept
    valid, valid_truncated, held = None, 0, 0
    if spec.validation_file_key:
        data = read(spec.validation_file_key, "validation_file")
        valid, valid_truncated = data.examples, data.truncated
    else:  # validation_split, or the automatic split (mixing.held_out_count)
        pool, held_items = hold_out(pool, spec.data.validation_split, spec.seed)
        valid, held = tuple(ex for _, ex in held_items) or None, len(held_items)
    groups = [[ex for s, ex in pool if s == source] for source in range(len(sources))]
    if not all(groups):
        empty = next(s for s, g in enumerate(groups) if not g)
        raise DataError("no example left after duplicates and the held-out split were removed", param=sources[empty][1])
    train = mix(groups, [w for *_, w in sources], spec.seed)
    files = tuple((param, len(data.examples)) for (_, param, _), data in zip(sources, loaded))
    return RunData(tuple(train), valid, sum(d.truncated for d in loaded), valid_truncated, duplicates, held, files)
