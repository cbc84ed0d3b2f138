"""Validation of OpenAI chat fine-tuning files (JSONL), one line at a time.

Owned here because both sides need the same rules: the API validates an upload while it streams in
(and refuses a bad file before anything is stored), and the trainer re-checks what it reads back from
the object store. Standard library and pydantic only: the API imports this without torch.

A valid line is a JSON object ``{"messages": [...]}`` where every message is an object with a known
role and string content (an assistant message carrying ``tool_calls`` may have null content), an
optional ``weight`` is 0 or 1, and at least one message is the assistant's. Empty lines are skipped.

    validator = FileValidator()
    for line in lines:
        example = validator.feed(line)  # the parsed example, or None (empty or invalid line)
    report = validator.finish()
    if not report.ok:
        raise SomeError(report.message)
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict

MIN_EXAMPLES = 10  # OpenAI's minimum for a training file
MAX_ERRORS_KEPT = 20  # errors beyond this are counted, not kept: a 1M-line file of garbage stays small
_ERRORS_IN_MESSAGE = 5  # how many bad lines the one-line error message names

ROLES = frozenset({"system", "user", "assistant", "tool"})


class LineError(BaseModel):
    model_config = ConfigDict(frozen=True)

    line: int  # 1-based, counting empty lines, as an editor shows it
    reason: str


class ValidationReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    lines: int  # lines seen, empty ones included
    examples: int  # valid, non-empty lines
    error_count: int  # all invalid lines, kept or not
    errors: tuple[LineError, ...]  # the first MAX_ERRORS_KEPT of them, in file order
    min_examples: int

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


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _check_message(i: int, msg: Any) -> str | None:
    """The reason message ``i`` (0-based) of an example is invalid, or None."""
    where = f"message {i}"
    if not isinstance(msg, dict):
        return f"{where} is {_type_name(msg)}, not an object"
    if "role" not in msg:
        return f"{where} has no 'role'"
    role = msg["role"]
    if not isinstance(role, str) or role not in ROLES:
        return f"unknown role {role!r} in {where} (expected one of {', '.join(sorted(ROLES))})"
    content = msg.get("content")
    if role == "assistant" and msg.get("tool_calls") is not None:
        if not isinstance(msg["tool_calls"], list) or not msg["tool_calls"]:
            return f"{where}: 'tool_calls' must be a non-empty array"
        if content is not None and not isinstance(content, str):
            return f"{where}: 'content' must be a string or null, not {_type_name(content)}"
    elif "content" not in msg:
        return f"{where} ({role}) has no 'content'"
    elif not isinstance(content, str):
        return f"{where} ({role}): 'content' must be a string, not {_type_name(content)}"
    if "weight" in msg:
        weight = msg["weight"]
        # bool is an int in Python; OpenAI's weight is the number 0 or 1, not true/false.
        if isinstance(weight, bool) or weight not in (0, 1):
            return f"{where}: 'weight' must be 0 or 1, not {json.dumps(weight)}"
    # Well-formed, but the trainer cannot learn from it yet: refuse it here rather than accept a
    # file whose job would fail later.
    if role == "tool" or msg.get("tool_calls") is not None:
        return f"{where}: tool messages and 'tool_calls' are not supported for training yet"
    return None


def check_example(obj: Any) -> str | None:
    """The reason a decoded line is not a valid chat example, or None if it is."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_type_name(obj)}"
    if "messages" not in obj:
        return "missing 'messages'"
    messages = obj["messages"]
    if not isinstance(messages, list):
        return f"'messages' must be an array, not {_type_name(messages)}"
    if not messages:
        return "'messages' is empty"
    for i, msg in enumerate(messages):
        if (reason := _check_message(i, msg)) is not None:
            return reason
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message"
    return None


class FileValidator:
    """Streaming validator: ``feed`` each line (bytes or str, with or without its newline), then
    ``finish``. Memory stays bounded by one line plus the kept errors."""

    def __init__(self, min_examples: int = MIN_EXAMPLES, max_errors_kept: int = MAX_ERRORS_KEPT):
        self.min_examples = min_examples
        self.max_errors_kept = max_errors_kept
        self._lines = 0
        self._examples = 0
        self._error_count = 0
        self._errors: list[LineError] = []

    def _error(self, reason: str) -> None:
        self._error_count += 1
        if len(self._errors) < self.max_errors_kept:
            self._errors.append(LineError(line=self._lines, reason=reason))

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
        if (reason := check_example(obj)) is not None:
            self._error(reason)
            return None
        self._examples += 1
        return obj

    @property
    def error_count(self) -> int:
        return self._error_count

    def finish(self) -> ValidationReport:
        return ValidationReport(
            lines=self._lines,
            examples=self._examples,
            error_count=self._error_count,
            errors=tuple(self._errors),
            min_examples=self.min_examples,
        )


def validate_lines(lines: Iterable[bytes | str], min_examples: int = MIN_EXAMPLES) -> ValidationReport:
    """Validate a whole file given as lines (e.g. ``storage.iter_lines(store, key)`` or an open file)."""
    validator = FileValidator(min_examples=min_examples)
    for line in lines:
        validator.feed(line)
    return validator.finish()
