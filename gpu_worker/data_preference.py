"""Preference, KTO and prompt-only data: JSONL rows to token ids, and batches of prompt + completion.

Rows (each is first checked with ``validation.CHECKS``, the rules the API applied at upload; this
module then re-checks what it needs to read a row, naming the line when it cannot):

- preference (DPO/IPO/ORPO/SimPO): OpenAI's ``{"input": {"messages": [...]}, "preferred_output":
  [assistant message], "non_preferred_output": [assistant message]}``, or ``{"prompt", "chosen",
  "rejected"}`` where the prompt is a string (one user turn) or a list of messages and each answer a
  string or a one-assistant-message list;
- kto: ``{"prompt", "completion", "label": true|false}``, same prompt/answer shapes;
- prompt (GRPO): ``{"prompt": ...}`` or ``{"messages": [...]}`` (a trailing assistant message is the
  reference answer, exposed to rewards as ``answer`` unless the row has one); every other field of
  the row is kept for the rewards (e.g. the ``answer`` exact_match compares with).

A prompt is rendered with the chat template and the generation prompt; a completion is what
rendering the assistant turn adds after it, up to and including the end-of-turn token (the trailing
newline of ChatML is not part of what the model must generate). Too long an example keeps the end
of its prompt and the start of its completion(s), and is counted as truncated.
"""

from __future__ import annotations

import dataclasses
import json
from array import array
from typing import Any, Iterator

from gpu_worker.contract import DataFormat
from gpu_worker.data import IGNORE_INDEX, DataError
from gpu_worker.storage import ObjectNotFound, ObjectStore, iter_lines

_PROMPT_ROLES = frozenset({"system", "user", "assistant"})


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


def _messages(value: Any, where: str, *, param: str, line: int) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a string or a non-empty list of messages", param=param, line=line)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _PROMPT_ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{i}] must be a message with role system/user/assistant and string content", param=param, line=line)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(value: Any, where: str, *, param: str, line: int) -> str:
    """An assistant reply given as a string or as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    raise DataError(f"{where} must be a string or a list of exactly one assistant message with string content", param=param, line=line)


def parse_preference(obj: dict, *, param: str, line: int) -> tuple[list[dict], str, str]:
    if "input" in obj or "preferred_output" in obj:
        inp = obj.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise DataError("'input' must be an object with 'messages'", param=param, line=line)
        prompt = _messages(inp["messages"], "input.messages", param=param, line=line)
        chosen = _answer(obj.get("preferred_output"), "preferred_output", param=param, line=line)
        rejected = _answer(obj.get("non_preferred_output"), "non_preferred_output", param=param, line=line)
    elif {"prompt", "chosen", "rejected"} <= obj.keys():
        prompt = _messages(obj["prompt"], "prompt", param=param, line=line)
        chosen = _answer(obj["chosen"], "chosen", param=param, line=line)
        rejected = _answer(obj["rejected"], "rejected", param=param, line=line)
    else:
        raise DataError("a preference example needs input/preferred_output/non_preferred_output or prompt/chosen/rejected", param=param, line=line)
    if chosen == rejected:
        raise DataError("the preferred and non-preferred answers are identical", param=param, line=line)
    return prompt, chosen, rejected


def parse_kto(obj: dict, *, param: str, line: int) -> tuple[list[dict], str, bool]:
    missing = [k for k in ("prompt", "completion", "label") if k not in obj]
    if missing:
        raise DataError(f"a KTO example needs prompt, completion and label (missing {', '.join(missing)})", param=param, line=line)
    if not isinstance(obj["label"], bool):
        raise DataError("'label' must be true (desirable) or false (undesirable)", param=param, line=line)
    return _messages(obj["prompt"], "prompt", param=param, line=line), _answer(obj["completion"], "completion", param=param, line=line), obj["label"]


def parse_prompt(obj: dict, *, param: str, line: int) -> tuple[list[dict], dict[str, Any]]:
    row = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    if "prompt" in obj:
        messages = _messages(obj["prompt"], "prompt", param=param, line=line)
    elif "messages" in obj:
        messages = _messages(obj["messages"], "messages", param=param, line=line)
        if messages[-1]["role"] == "assistant":
            row.setdefault("answer", messages.pop()["content"])
    else:
        raise DataError("a prompt example needs 'prompt' or 'messages'", param=param, line=line)
    if not messages or messages[-1]["role"] == "assistant":
        raise DataError("the prompt must end with a user (or system) turn for the model to answer", param=param, line=line)
    return messages, row


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


def _render(tokenizer, messages, **kw):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)


def encode_prompt(tokenizer, messages) -> list[int]:
    return list(_render(tokenizer, messages, add_generation_prompt=True)["input_ids"])


def encode_completion(tokenizer, prompt_messages, prompt_ids: list[int], answer: str) -> list[int]:
    """The tokens rendering ``answer`` as the assistant's reply adds after ``prompt_ids``."""
    template = getattr(tokenizer, "chat_template", None) or ""
    markers = "generation" in template and "endgeneration" in template
    conversation = [*prompt_messages, {"role": "assistant", "content": answer}]
    enc = _render(tokenizer, conversation, return_assistant_tokens_mask=True) if markers else _render(tokenizer, conversation)
    full = list(enc["input_ids"])
    end = len(full)
    if markers and any(enc["assistant_masks"]):
        end = max(i for i, m in enumerate(enc["assistant_masks"]) if m) + 1
    start = 0
    while start < min(len(prompt_ids), len(full)) and full[start] == prompt_ids[start]:
        start += 1
    if start < len(prompt_ids):  # a template that renders the prompt differently once answered
        raise ValueError("the chat template does not render the prompt as a prefix of the answered conversation")
    return full[start:end]


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


def load_examples(store: ObjectStore, key: str, tokenizer, fmt: DataFormat, *, max_seq_length: int, max_prompt_length: int | None = None, required_fields: tuple[str, ...] = (), param: str = "training_file") -> Loaded:
    """Read and tokenize a whole preference / KTO / prompt file. ``max_prompt_length`` applies to
    prompt files (GRPO: room must be left for the completion); ``required_fields`` are row fields
    each prompt row must have (the rewards' references). Raises ``DataError``."""
    from gpu_worker.record_checks import CHECKS  # the platform's rules, the same the API applied at upload

    examples, truncated = [], 0
    for n, obj in _rows(store, key, param=param):
        if (reason := CHECKS[fmt](obj)) is not None:
            raise DataError(reason, param=param, line=n)
        try:
            if fmt == DataFormat.preference:
                messages, chosen, rejected = parse_preference(obj, param=param, line=n)
                prompt = encode_prompt(tokenizer, messages)
                prompt, (c, r), cut = fit(prompt, [encode_completion(tokenizer, messages, prompt, a) for a in (chosen, rejected)], max_seq_length)
                examples.append(PreferencePair(_ids(prompt), _ids(c), _ids(r)))
            elif fmt == DataFormat.kto:
                messages, answer, label = parse_kto(obj, param=param, line=n)
                prompt = encode_prompt(tokenizer, messages)
                prompt, (c,), cut = fit(prompt, [encode_completion(tokenizer, messages, prompt, answer)], max_seq_length)
                examples.append(KTOExample(_ids(prompt), _ids(c), label))
            elif fmt == DataFormat.prompt:
                messages, row = parse_prompt(obj, param=param, line=n)
                missing = [f for f in required_fields if f not in row]
                if missing:
                    raise DataError(f"missing field {missing[0]!r} that the exact_match reward compares with", param=param, line=n)
                prompt = encode_prompt(tokenizer, messages)
                limit = max_prompt_length or max_seq_length
                cut = len(prompt) > limit
                examples.append(PromptExample(_ids(prompt[len(prompt) - limit :] if cut else prompt), row))
            else:
                raise ValueError(f"format {fmt.value!r} is not a preference, KTO or prompt format")
        except ValueError as err:
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


# --- batches -----------------------------------------------------------------------------------------


def collate_completions(prompts: list[array], completions: list[array], pad_token_id: int, device=None, *, pack_width: int | None = None) -> dict[str, Any]:
    """``prompt + completion`` sequences as a batch: ``input_ids`` and ``labels`` (the completion's
    tokens; ``IGNORE_INDEX`` on the prompt and the padding), plus

    - unpacked (``pack_width`` None): one right-padded row per sequence and ``attention_mask``;
    - packed: sequences placed first-fit (longest first) into rows of at most ``pack_width`` tokens,
      ``position_ids`` restarting at each sequence (transformers then keeps attention inside each
      one) and ``unpack``: ``[N, L-1]`` indices into the flattened ``[rows, width-1]`` shifted label
      grid giving each sequence's next-token positions in order (-1 past its end), so per-sequence
      log-probs come out exactly as the unpacked batch lays them out (``preference_loop.token_logps``).
    """
    import torch

    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    starts = [len(p) for p in prompts]
    if pack_width is None:
        places = [(row, 0) for row in range(len(seqs))]
        width = max(len(q) for q in seqs)
    else:
        places, fill = [(0, 0)] * len(seqs), []  # (row, offset) of each sequence; tokens used per row
        for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
            if len(seqs[i]) > pack_width:
                raise ValueError(f"a sequence of {len(seqs[i])} tokens does not fit rows of {pack_width}")
            row = next((r for r, used in enumerate(fill) if used + len(seqs[i]) <= pack_width), len(fill))
            if row == len(fill):
                fill.append(0)
            places[i], fill[row] = (row, fill[row]), fill[row] + len(seqs[i])
        width = max(fill)
    rows = 1 + max(r for r, _ in places)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for seq, start, (row, at) in zip(seqs, starts, places):
        ids[row, at : at + len(seq)] = torch.tensor(seq, dtype=torch.long)
        labels[row, at + start : at + len(seq)] = ids[row, at + start : at + len(seq)]
        positions[row, at : at + len(seq)] = torch.arange(len(seq))
        mask[row, at : at + len(seq)] = 1
    batch = {"input_ids": ids, "labels": labels}
    if pack_width is None:
        batch["attention_mask"] = mask
    else:
        longest = max(len(q) for q in seqs) - 1
        unpack = torch.full((len(seqs), longest), -1, dtype=torch.long)
        for n, (seq, (row, at)) in enumerate(zip(seqs, places)):
            unpack[n, : len(seq) - 1] = row * (width - 1) + at + torch.arange(len(seq) - 1)
        batch |= {"position_ids": positions, "unpack": unpack, "tokens": mask.sum()}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def batch_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens of a ``collate_completions`` batch, packed or not."""
    return int(batch["tokens"] if "unpack" in batch else batch["attention_mask"].sum())


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
    elif spec.data.validation_split > 0:
        pool, held_items = hold_out(pool, spec.data.validation_split, spec.seed)
        valid, held = tuple(ex for _, ex in held_items) or None, len(held_items)
    groups = [[ex for s, ex in pool if s == source] for source in range(len(sources))]
    if not all(groups):
        empty = next(s for s, g in enumerate(groups) if not g)
        raise DataError("no example left after duplicates and the held-out split were removed", param=sources[empty][1])
    train = mix(groups, [w for *_, w in sources], spec.seed)
    files = tuple((param, len(data.examples)) for (_, param, _), data in zip(sources, loaded))
    return RunData(tuple(train), valid, sum(d.truncated for d in loaded), valid_truncated, duplicates, held, files)
