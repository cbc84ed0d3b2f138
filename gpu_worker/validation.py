"""Validation of fine-tuning files (JSONL), one line at a time, in every data format the platform reads.

Owned here because both sides need the same rules: the API validates an upload while it streams in
(and refuses a bad file before anything is stored), and the trainer re-checks what it reads back from
the object store, so a file that cannot train never starts a GPU. Standard library and pydantic only:
the API imports this without torch.

A file holds one format (``DataFormat``), declared or detected from its first valid line:

- chat: ``{"messages": [{"role", "content", "weight"?}, ...]}`` ending with the assistant's reply,
  with OpenAI's tool calling: ``"tools": [{"type": "function", "function": {"name", "description",
  "parameters"}}]``, ``"parallel_tool_calls"?``, assistant messages with ``"tool_calls": [{"id",
  "type": "function", "function": {"name", "arguments": "<JSON object>"}}]`` (content null or a
  string), and ``{"role": "tool", "tool_call_id", "content"}`` answering them; or the legacy
  ``functions``/``function_call``/``function`` messages (read as tools by ``tool_calls``);
- sharegpt: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}``, with tool
  turns (``function_call``, answered by ``observation``) and ``tools`` (read as chat by ``tool_calls``);
- alpaca: ``{"instruction", "input"?, "output", "system"?}``;
- completion: ``{"prompt", "completion"}``; text: ``{"text"}`` (continued pretraining);
- preference: ``{"input": {"messages"}, "preferred_output": [msg], "non_preferred_output": [msg]}``
  (OpenAI DPO) or ``{"prompt", "chosen", "rejected"}`` (strings, or message lists);
- kto: ``{"prompt", "completion", "label": true|false}``;
- prompt (GRPO): ``{"prompt": "..."}`` or ``{"messages": [...]}`` (a trailing assistant message is
  the reference answer), plus any reference fields (e.g. ``"answer"``) the rewards read. Detection
  calls a ``messages`` line ending with the assistant's reply chat (GRPO accepts chat files too).

Each bad line is reported with its 1-based number and reason (a line of another format names both
formats); the report also counts exact duplicates (same JSON) and near-duplicates (same text once
lowercased, punctuation stripped and whitespace collapsed). Empty lines are skipped.

    validator = FileValidator()
    for line in lines:
        example = validator.feed(line)  # the parsed example, or None (empty or invalid line)
    report = validator.finish()         # .ok, .message, .format, .examples, .errors, .duplicates
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict

from gpu_worker.tool_calls import (
    SHAREGPT_CALL_TURNS,
    SHAREGPT_RESULT_TURNS,
    check_call_shape,
    check_tool_use,
    legacy_as_tools,
    sharegpt_as_chat,
    sharegpt_uses_tools,
    type_name as _type_name,
    uses_legacy_functions,
)
from gpu_worker.contract import METHOD_FORMATS, DataFormat, Method

MIN_EXAMPLES = 10  # OpenAI's minimum for a training file
MAX_ERRORS_KEPT = 20  # errors beyond this are counted, not kept: a 1M-line file of garbage stays small
_ERRORS_IN_MESSAGE = 5  # how many bad lines the one-line error message names

ROLES = frozenset({"system", "user", "assistant", "tool"})
# ShareGPT speaker names, as the common dumps write them, mapped to chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}
_SHAREGPT_TOOL_TURNS = SHAREGPT_CALL_TURNS | SHAREGPT_RESULT_TURNS

class LineError(BaseModel):
    model_config = ConfigDict(frozen=True)

    line: int  # 1-based, counting empty lines, as an editor shows it
    reason: str


class DuplicateLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    line: int
    first_line: int  # the earlier line it repeats
    exact: bool  # False: the same text up to case, punctuation and whitespace


class ValidationReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    lines: int  # lines seen, empty ones included
    examples: int  # valid, non-empty lines
    error_count: int  # all invalid lines, kept or not
    errors: tuple[LineError, ...]  # the first MAX_ERRORS_KEPT of them, in file order
    min_examples: int
    format: str | None = None  # a DataFormat value; None when no line was valid
    duplicates: int = 0  # valid lines identical (as JSON) to an earlier one
    near_duplicates: int = 0  # valid lines whose normalised text equals an earlier one's (exact ones excluded)
    duplicate_lines: tuple[DuplicateLine, ...] = ()  # the first MAX_ERRORS_KEPT of both kinds

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.examples >= self.min_examples

    @property
    def message(self) -> str:
        """One human sentence naming the first bad lines and why; empty when ``ok``."""
        parts = [f"line {e.line}: {e.reason}" for e in self.errors[:_ERRORS_IN_MESSAGE]]
        more = self.error_count - len(parts)
        if more > 0:
            parts.append(f"and {more} more invalid line{'s' if more > 1 else ''}")
        if self.error_count == 0 and self.examples < self.min_examples:
            parts.append(f"the file has {self.examples} example{'s' if self.examples != 1 else ''}; at least {self.min_examples} are required")
        return "; ".join(parts)


def _weight_reason(where: str, msg: dict) -> str | None:
    if "weight" in msg:
        weight = msg["weight"]
        # bool is an int in Python; OpenAI's weight is the number 0 or 1, not true/false.
        if isinstance(weight, bool) or weight not in (0, 1):
            return f"{where}: 'weight' must be 0 or 1, not {json.dumps(weight)}"
    return None


def _check_message(i: int, msg: Any, roles: frozenset[str] = ROLES, *, tools_ok: bool = False) -> str | None:
    """The reason message ``i`` (0-based) of an example is invalid, or None. The shape of
    ``tool_calls`` and ``tool_call_id`` is checked here; how they refer to the example's tools and to
    each other is ``tool_calls.check_tool_use``'s. ``tools_ok``: tool calls are training data here (chat
    files); elsewhere (preference, KTO, prompt files) no recipe renders them yet."""
    where = f"message {i}"
    if not isinstance(msg, dict):
        return f"{where} is {_type_name(msg)}, not an object"
    if "role" not in msg:
        return f"{where} has no 'role'"
    role = msg["role"]
    if not isinstance(role, str) or role not in roles:
        return f"unknown role {role!r} in {where} (expected one of {', '.join(sorted(roles))})"
    if not tools_ok and (role == "tool" or msg.get("tool_calls") is not None):
        return f"{where}: tool messages and 'tool_calls' are only supported in chat ('messages') training files"
    content = msg.get("content")
    if role == "assistant" and msg.get("tool_calls") is not None:
        if not isinstance(msg["tool_calls"], list) or not msg["tool_calls"]:
            return f"{where}: 'tool_calls' must be a non-empty array"
        if content is not None and not isinstance(content, str):
            return f"{where}: 'content' must be a string or null, not {_type_name(content)}"
        for j, call in enumerate(msg["tool_calls"]):
            if (reason := check_call_shape(call)) is not None:
                return f"{where}: tool_calls[{j}]: {reason}"
    elif "content" not in msg:
        return f"{where} ({role}) has no 'content'"
    elif not isinstance(content, str):
        return f"{where} ({role}): 'content' must be a string, not {_type_name(content)}"
    elif role == "assistant" and not content.strip():
        return f"{where} (assistant): 'content' is empty"
    elif "tool_calls" in msg and role != "assistant":
        return f"{where} ({role}): only assistant messages have 'tool_calls'"
    if role == "tool":
        call_id = msg.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            return f"{where} (tool): 'tool_call_id' must be the id of the call it answers, not {json.dumps(call_id)}"
    return _weight_reason(where, msg)


def _check_messages(messages: Any, field: str = "messages", *, tools_ok: bool = False) -> str | None:
    if not isinstance(messages, list):
        return f"'{field}' must be an array, not {_type_name(messages)}"
    if not messages:
        return f"'{field}' is empty"
    for i, msg in enumerate(messages):
        if (reason := _check_message(i, msg, tools_ok=tools_ok)) is not None:
            return f"{field}: {reason}" if field != "messages" else reason
    return None


def _check_text(obj: dict, field: str, *, allow_empty: bool = False) -> str | None:
    if field not in obj:
        return f"missing '{field}'"
    value = obj[field]
    if not isinstance(value, str):
        return f"'{field}' must be a string, not {_type_name(value)}"
    if not allow_empty and not value.strip():
        return f"'{field}' is empty"
    return None


def _object(obj: Any) -> str | None:
    return None if isinstance(obj, dict) else f"expected a JSON object, got {_type_name(obj)}"


def check_example(obj: Any) -> str | None:
    """The reason a decoded line is not a valid chat example, or None if it is."""
    if (reason := _object(obj)) is not None:
        return reason
    if "messages" not in obj:
        return "missing 'messages'"
    if uses_legacy_functions(obj):  # read as tools/tool_calls (tool_calls.legacy_as_tools)
        obj, reason = legacy_as_tools(obj)
        if reason is not None:
            return reason
    if (reason := _check_messages(obj["messages"], tools_ok=True)) is not None:
        return reason
    if (reason := check_tool_use(obj)) is not None:
        return reason
    return _check_trainable([(m["role"], m) for m in obj["messages"]], "message")


def _check_trainable(turns: list[tuple[str, dict]], noun: str) -> str | None:
    """Per-turn ``weight`` (0 = show, do not train) is the assistant's only, and one must train."""
    if not any(role == "assistant" for role, _ in turns):
        return "no assistant message" if noun == "message" else "no assistant ('gpt') turn"
    for i, (role, turn) in enumerate(turns):
        if role != "assistant" and turn.get("weight", 1) == 0:
            return f"{noun} {i}: 'weight' applies to assistant {noun}s only"
    if all(turn.get("weight", 1) == 0 for role, turn in turns if role == "assistant"):
        return "no assistant message to train on (every one has weight 0)"
    return None


def _check_sharegpt(obj: Any) -> str | None:
    if (reason := _object(obj)) is not None:
        return reason
    if "conversations" not in obj:
        return "missing 'conversations'"
    turns = obj["conversations"]
    if not isinstance(turns, list):
        return f"'conversations' must be an array, not {_type_name(turns)}"
    if not turns:
        return "'conversations' is empty"
    if "system" in obj and (reason := _check_text(obj, "system", allow_empty=True)):
        return reason
    for i, turn in enumerate(turns):
        where = f"turn {i}"
        if not isinstance(turn, dict):
            return f"{where} is {_type_name(turn)}, not an object"
        if "from" not in turn:
            return f"{where} has no 'from'"
        speaker = turn["from"]
        if speaker == "function":
            return f"{where}: 'function' turns are ambiguous: write 'function_call' for a call and 'observation' for its result"
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES.keys() | _SHAREGPT_TOOL_TURNS:
            return f"unknown 'from' {speaker!r} in {where} (expected one of {', '.join(sorted(SHAREGPT_ROLES.keys() | _SHAREGPT_TOOL_TURNS))})"
        if "value" not in turn:
            return f"{where} ({speaker}) has no 'value'"
        if not isinstance(turn["value"], str):
            return f"{where} ({speaker}): 'value' must be a string, not {_type_name(turn['value'])}"
        if SHAREGPT_ROLES.get(speaker) == "assistant" and not turn["value"].strip():
            return f"{where} ({speaker}): 'value' is empty"
        if (reason := _weight_reason(where, turn)) is not None:
            return reason
    if sharegpt_uses_tools(obj):  # checked as the chat example it is read as (tool_calls.sharegpt_as_chat)
        record, reason = sharegpt_as_chat(obj, SHAREGPT_ROLES)
        if reason is None and (reason := check_example(record)) is not None:
            reason = f"read as a chat example: {reason}"
        return reason
    return _check_trainable([(SHAREGPT_ROLES[t["from"]], t) for t in turns], "turn")


def _check_alpaca(obj: Any) -> str | None:
    if (reason := _object(obj)) is not None:
        return reason
    for field, optional in (("instruction", False), ("input", True), ("output", False), ("system", True)):
        if optional and field not in obj:
            continue
        if (reason := _check_text(obj, field, allow_empty=optional)) is not None:
            return reason
    return None


def _check_completion(obj: Any) -> str | None:
    if (reason := _object(obj)) is not None:
        return reason
    # An empty prompt is legal (OpenAI's legacy format allowed it): the completion is then plain text.
    return _check_text(obj, "prompt", allow_empty=True) or _check_text(obj, "completion")


def _check_text_example(obj: Any) -> str | None:
    return _object(obj) or _check_text(obj, "text")


def _check_reply(value: Any, field: str) -> str | None:
    """A preference/KTO answer: a non-empty string or a list of exactly one assistant message."""
    if isinstance(value, str):
        return None if value.strip() else f"'{field}' is empty"
    if not isinstance(value, list):
        return f"'{field}' must be a string or an array with one assistant message, not {_type_name(value)}"
    if len(value) != 1:
        return f"'{field}' must hold exactly one assistant message, not {len(value)}"
    if (reason := _check_message(0, value[0])) is not None:
        return f"{field}: {reason}"
    if value[0]["role"] != "assistant":
        return f"{field}: message 0 must be the assistant's, not {value[0]['role']!r}"
    return None


def _check_prompt_field(obj: dict, field: str) -> str | None:
    """A prompt: a non-empty string or a list of messages not ending with the assistant's."""
    if field not in obj:
        return f"missing '{field}'"
    value = obj[field]
    if isinstance(value, str):
        return None if value.strip() else f"'{field}' is empty"
    if not isinstance(value, list):
        return f"'{field}' must be a string or an array of messages, not {_type_name(value)}"
    if (reason := _check_messages(value, field)) is not None:
        return reason
    if value[-1]["role"] == "assistant":
        return f"'{field}' must not end with an assistant message (that is the answer to learn)"
    return None


def _check_preference(obj: Any) -> str | None:
    if (reason := _object(obj)) is not None:
        return reason
    if "preferred_output" in obj or "non_preferred_output" in obj or "input" in obj:  # OpenAI DPO
        if "input" not in obj:
            return "missing 'input'"
        if not isinstance(obj["input"], dict):
            return f"'input' must be an object with 'messages', not {_type_name(obj['input'])}"
        if (reason := _check_prompt_field(obj["input"], "messages")) is not None:
            return f"input: {reason}"
        good, bad = "preferred_output", "non_preferred_output"
    else:
        if (reason := _check_prompt_field(obj, "prompt")) is not None:
            return reason
        good, bad = "chosen", "rejected"
    for field in (good, bad):
        if field not in obj:
            return f"missing '{field}'"
        if (reason := _check_reply(obj[field], field)) is not None:
            return reason
    if _reply_text(obj[good]) == _reply_text(obj[bad]):
        return f"'{good}' and '{bad}' are identical: there is no preference to learn"
    return None


def _reply_text(value: Any) -> str:
    return value if isinstance(value, str) else value[0].get("content") or ""


def _check_kto(obj: Any) -> str | None:
    if (reason := _object(obj)) is not None:
        return reason
    if (reason := _check_prompt_field(obj, "prompt")) is not None:
        return reason
    if "completion" not in obj:
        return "missing 'completion'"
    if (reason := _check_reply(obj["completion"], "completion")) is not None:
        return reason
    if "label" not in obj:
        return "missing 'label'"
    if not isinstance(obj["label"], bool):
        return f"'label' must be true or false, not {_type_name(obj['label'])} {json.dumps(obj['label'])}"
    return None


def _check_prompt(obj: Any) -> str | None:
    if (reason := _object(obj)) is not None:
        return reason
    if "prompt" in obj:
        return _check_prompt_field(obj, "prompt")
    if "messages" in obj:
        messages = obj["messages"]
        # A trailing assistant message is the reference answer the rewards may compare with.
        if isinstance(messages, list) and len(messages) > 1 and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            return _check_messages(messages) or _check_prompt_field({"messages": messages[:-1]}, "messages")
        return _check_prompt_field(obj, "messages")
    return "missing 'prompt' (or 'messages')"


CHECKS: dict[DataFormat, Callable[[Any], str | None]] = {
    DataFormat.chat: check_example,
    DataFormat.sharegpt: _check_sharegpt,
    DataFormat.alpaca: _check_alpaca,
    DataFormat.completion: _check_completion,
    DataFormat.text: _check_text_example,
    DataFormat.preference: _check_preference,
    DataFormat.kto: _check_kto,
    DataFormat.prompt: _check_prompt,
}

_KNOWN_SHAPES = (
    "messages (chat), conversations (sharegpt), instruction/output (alpaca), prompt/completion, text, "
    "input/preferred_output/non_preferred_output or prompt/chosen/rejected (preference), "
    "prompt/completion/label (kto), prompt (prompt-only)"
)


def detect_format(obj: Any) -> DataFormat | None:
    """The format a decoded line looks like, from its keys (whether it is valid is checked after)."""
    if not isinstance(obj, dict):
        return None
    if {"preferred_output", "non_preferred_output", "chosen", "rejected"} & obj.keys():
        return DataFormat.preference
    if "label" in obj and "completion" in obj:
        return DataFormat.kto
    if "conversations" in obj:
        return DataFormat.sharegpt
    if "instruction" in obj:
        return DataFormat.alpaca
    if "messages" in obj:
        msgs = obj["messages"]
        # A conversation ending with the assistant's reply is supervised data; one that stops before
        # it is a prompt for the model to answer (GRPO).
        last = msgs[-1] if isinstance(msgs, list) and msgs else None
        if isinstance(last, dict) and last.get("role") in ("user", "system"):
            return DataFormat.prompt
        return DataFormat.chat
    if "prompt" in obj and "completion" in obj:
        return DataFormat.completion
    if "text" in obj:
        return DataFormat.text
    if "prompt" in obj:
        return DataFormat.prompt
    return None


def check_format_for_method(fmt: DataFormat | str, method: Method | str) -> str | None:
    """Why a file of format ``fmt`` cannot train ``method``, or None."""
    fmt, method = DataFormat(fmt), Method(method)
    allowed = METHOD_FORMATS[method]
    if fmt in allowed:
        return None
    names = ", ".join(sorted(f.value for f in allowed))
    return f"a {fmt.value} file cannot train method '{method.value}' (it needs {names} data)"


# --- duplicates --------------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def normalized_text(obj: Any) -> str:
    """Every string of an example in order, lowercased, punctuation stripped, whitespace collapsed:
    two examples with the same normalised text are near-duplicates."""
    text = " ".join(_strings(obj)).lower()
    return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text)).strip()


def _digest(text: str) -> bytes:
    # 8 bytes: a collision among a few million lines is ~1e-7 likely, and the sets stay small.
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def exact_key(obj: Any) -> bytes:
    return _digest(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")))


def near_key(obj: Any) -> bytes:
    return _digest(normalized_text(obj))


class FileValidator:
    """Streaming validator: ``feed`` each line (bytes or str, with or without its newline), then
    ``finish``. ``format`` is the declared format (``auto``: the first valid line's). Memory is one
    line, the kept errors and two hash -> line entries per example for duplicate detection (about
    200 bytes each in CPython: ~200 MB for a million-line file)."""

    def __init__(self, min_examples: int = MIN_EXAMPLES, max_errors_kept: int = MAX_ERRORS_KEPT, format: DataFormat | str = DataFormat.auto):
        self.min_examples = min_examples
        self.max_errors_kept = max_errors_kept
        declared = DataFormat(format)
        self._declared = declared != DataFormat.auto
        self._format: DataFormat | None = declared if self._declared else None
        self._format_line = 0
        self._lines = 0
        self._examples = 0
        self._error_count = 0
        self._errors: list[LineError] = []
        self._exact: dict[bytes, int] = {}
        self._near: dict[bytes, int] = {}
        self._duplicates = 0
        self._near_duplicates = 0
        self._duplicate_lines: list[DuplicateLine] = []

    def _error(self, reason: str) -> None:
        self._error_count += 1
        if len(self._errors) < self.max_errors_kept:
            self._errors.append(LineError(line=self._lines, reason=reason))

    def _reason(self, obj: Any) -> str | None:
        seen = detect_format(obj)
        if self._format is None:  # auto, nothing valid yet: this line decides
            if seen is None:
                return f"unrecognised example (keys {sorted(obj)[:6]}): expected one of {_KNOWN_SHAPES}" if isinstance(obj, dict) else _object(obj)
            reason = CHECKS[seen](obj)
            if reason is None:
                self._format, self._format_line = seen, self._lines
            return reason
        reason = CHECKS[self._format](obj)
        # Chat and prompt-only share the "messages" key: a chat line without a reply is a bad chat
        # line, not a different format.
        same_family = {seen, self._format} <= {DataFormat.chat, DataFormat.prompt} and "messages" in obj
        if reason is not None and seen not in (None, self._format) and not same_family and CHECKS[seen](obj) is None:
            origin = "was declared" if self._declared else f"is {self._format.value} (from line {self._format_line})"
            reason = f"{reason}: this line is a {seen.value} example but the file {origin}; a file holds one format"
        return reason

    def _count_duplicates(self, obj: Any) -> None:
        exact, near = exact_key(obj), near_key(obj)
        first = self._exact.setdefault(exact, self._lines)
        if first != self._lines:
            self._duplicates += 1
            self._keep_duplicate(first, exact=True)
            return
        first = self._near.setdefault(near, self._lines)
        if first != self._lines:
            self._near_duplicates += 1
            self._keep_duplicate(first, exact=False)

    def _keep_duplicate(self, first: int, *, exact: bool) -> None:
        if len(self._duplicate_lines) < self.max_errors_kept:
            self._duplicate_lines.append(DuplicateLine(line=self._lines, first_line=first, exact=exact))

    def feed(self, line: bytes | str) -> dict[str, Any] | None:
        """Check one line; returns the parsed example if valid, None if empty or invalid."""
        self._lines += 1
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                self._error(f"invalid UTF-8 at byte {err.start}")
                return None
        if line.startswith("\ufeff") and self._lines == 1:
            line = line[1:]  # a UTF-8 byte-order mark some editors write
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            self._error(f"invalid JSON ({err.msg} at column {err.colno})")
            return None
        if (reason := self._reason(obj)) is not None:
            self._error(reason)
            return None
        self._examples += 1
        self._count_duplicates(obj)
        return obj

    @property
    def error_count(self) -> int:
        return self._error_count

    @property
    def format(self) -> DataFormat | None:
        """The file's format: declared, or detected from the first valid line (None before it)."""
        return self._format

    @property
    def line(self) -> int:
        """The number of the line last fed."""
        return self._lines

    def finish(self) -> ValidationReport:
        return ValidationReport(
            lines=self._lines,
            examples=self._examples,
            error_count=self._error_count,
            errors=tuple(self._errors),
            min_examples=self.min_examples,
            format=self._format.value if self._format is not None else None,
            duplicates=self._duplicates,
            near_duplicates=self._near_duplicates,
            duplicate_lines=tuple(self._duplicate_lines),
        )


def validate_lines(lines: Iterable[bytes | str], min_examples: int = MIN_EXAMPLES, format: DataFormat | str = DataFormat.auto) -> ValidationReport:
    """Validate a whole file given as lines (e.g. ``storage.iter_lines(store, key)`` or an open file)."""
    validator = FileValidator(min_examples=min_examples, format=format)
    for line in lines:
        validator.feed(line)
    return validator.finish()
