"""Validation of fine-tuning files (JSONL), one line at a time, in every data format the platform reads.

Owned here because both sides need the same rules: the API validates an upload while it streams in
(and refuses a bad file before anything is stored), and the trainer re-checks what it reads back from
the object store, so a file that cannot train never starts a GPU. Standard library and pydantic only:
the API imports this without torch.

A file holds one format (``DataFormat``), declared or detected from its first valid line (the rules
for one line of each format are ``gpu_worker.record_checks``'):

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
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict

from gpu_worker.contract import DataFormat
# The per-record rules (record_checks), re-exported: callers read them as part of the validation API.
from gpu_worker.record_checks import (  # noqa: F401
    CHECKS,
    KNOWN_SHAPES,
    check_example,
    check_format_for_method,
    detect_format,
    object_reason,
)
from gpu_worker.tool_calls import json_error

MIN_EXAMPLES = 10  # OpenAI's minimum for a training file
MAX_ERRORS_KEPT = 20  # errors beyond this are counted, not kept: a 1M-line file of garbage stays small
_ERRORS_IN_MESSAGE = 5  # how many bad lines the one-line error message names


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


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# JSON's "\ud800" without its pair is valid JSON that parses to no character: nothing can encode it (hash,
# store, tokenize, relay). The API's requests, the gateway's bodies and uploaded lines say so in these words.
LONE_SURROGATE = "a \\uD800-\\uDFFF escape that is not half of a surrogate pair"


def lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate (a pair's escapes decode to one character)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def json_strings(value: Any) -> Iterable[str]:
    """Every string of a parsed JSON value (lists and tuples, dicts' keys and values), in order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from json_strings(k)
            yield from json_strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from json_strings(v)


def holds_lone_surrogate(value: Any) -> bool:
    """``lone_surrogate`` over a parsed JSON value's strings, keys included."""
    return any(lone_surrogate(s) for s in json_strings(value))


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
                return f"unrecognised example (keys {sorted(obj)[:6]}): expected one of {KNOWN_SHAPES}" if isinstance(obj, dict) else object_reason(obj)
            reason = CHECKS[seen](obj)
            if reason is None:
                self._format, self._format_line = seen, self._lines
            return reason
        reason = CHECKS[self._format](obj)
        # Chat and prompt-only share the "messages" key: a chat line without a reply is a bad chat
        # line, not a different format.
        same_family = {seen, self._format} <= {DataFormat.chat, DataFormat.prompt} and "messages" in obj
        if reason is not None and seen not in (None, self._format) and not same_family and CHECKS[seen](obj) is None:
            origin = (f"was declared {self._format.value}" if self._declared
                      else f"is {self._format.value} (from line {self._format_line})")
            article = "an" if seen.value[0] in "aeiou" else "a"
            reason = f"{reason}: this line is {article} {seen.value} example but the file {origin}; a file holds one format"
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
        except ValueError as err:  # JSONDecodeError, or an integer too long to convert
            self._error(f"invalid JSON ({json_error(err)})")
            return None
        except RecursionError:  # the parser's stack: [[[[... thousands deep
            self._error("invalid JSON (nested too deeply)")
            return None
        if _SURROGATE_ESCAPE.search(line) and holds_lone_surrogate(obj):
            self._error(f"invalid JSON string: {LONE_SURROGATE}")
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
