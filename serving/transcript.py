"""A streamed completion kept as one compact object, and re-emitted as a stream.

A stream that succeeded is stored for retries of its request id (serving.idempotency). Its chunks
(one per token and choice) would take several times the size of the completion, so they are merged:
per choice, text and content are concatenated, tool calls merged by their index (arguments
concatenated), logprobs lists joined, and the last finish reason kept; the engine's final usage is
kept apart. A retry gets the merged completion back as SSE: per choice one chunk with all its output,
then the usage chunk if the client asked for it, then ``[DONE]``.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

# Top-level chunk fields that are the same on every chunk of a stream.
_HEADER = ("id", "object", "created", "model", "system_fingerprint")
# Delta fields named once (the first chunk's role), not concatenated.
_ONCE = ("role", "id", "type", "name")


class _Pieces(list):
    """A string being concatenated (joined once, when dumped)."""


class Transcript:
    def __init__(self) -> None:
        self._header: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        """Merge one chunk as the engine sent it (before the gateway's own changes to its usage)."""
        for key in _HEADER:
            if key in chunk and key not in self._header:
                self._header[key] = chunk[key]
        choices = chunk.get("choices")
        if not choices and isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]  # the final usage chunk
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and isinstance(choice.get("index", 0), int):
                _merge_choice(self._choices.setdefault(choice.get("index", 0), {}), choice)

    def dump(self) -> bytes:
        choices = [{"index": index, **_joined(merged)} for index, merged in sorted(self._choices.items())]
        return json.dumps({**self._header, "choices": choices, "usage": self.usage}, separators=(",", ":")).encode()


def replay_events(stored: bytes, *, wants_usage: bool, wants_continuous: bool) -> Iterator[bytes]:
    """The SSE events of a stored transcript, shaped as the relay shapes a live stream's for this client."""
    completion = json.loads(stored)
    usage = completion.pop("usage", None)
    header = {key: completion[key] for key in _HEADER if key in completion}
    for choice in completion.get("choices", []):
        chunk = {**header, "choices": [choice]}
        if wants_continuous:
            chunk["usage"] = usage
        elif wants_usage:
            chunk["usage"] = None  # as OpenAI's chunks when include_usage is on
        yield _event(chunk)
    if wants_usage and usage is not None:
        yield _event({**header, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _merge_choice(into: dict[str, Any], choice: dict[str, Any]) -> None:
    for key, value in choice.items():
        if key == "index" or value is None:
            continue
        if key == "delta" and isinstance(value, dict):
            _merge_delta(into.setdefault("delta", {}), value)
        elif key == "logprobs" and isinstance(value, dict):
            _merge_lists(into.setdefault("logprobs", {}), value)
        elif isinstance(value, str) and key == "text":
            into.setdefault(key, _Pieces()).append(value)
        elif isinstance(value, list):
            into.setdefault(key, []).extend(value)
        else:
            into[key] = value  # finish_reason, stop_reason: the last one sent


def _merge_delta(into: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            continue
        if key == "tool_calls" and isinstance(value, list):
            calls = into.setdefault("tool_calls", {})
            for call in value:
                if isinstance(call, dict):
                    _merge_call(calls.setdefault(call.get("index", 0), {}), call)
        elif key in _ONCE:
            into.setdefault(key, value)
        elif isinstance(value, str):
            into.setdefault(key, _Pieces()).append(value)
        elif isinstance(value, list):
            into.setdefault(key, []).extend(value)
        else:
            into[key] = value


def _merge_call(into: dict[str, Any], call: dict[str, Any]) -> None:
    for key, value in call.items():
        if value is None:
            continue
        if key == "function" and isinstance(value, dict):
            function = into.setdefault("function", {})
            for name, part in value.items():
                if name == "arguments" and isinstance(part, str):
                    function.setdefault("arguments", _Pieces()).append(part)
                elif part is not None:
                    function.setdefault(name, part)
        else:
            into.setdefault(key, value)


def _merge_lists(into: dict[str, Any], value: dict[str, Any]) -> None:
    for key, part in value.items():
        if isinstance(part, list):
            into.setdefault(key, []).extend(part)
        elif part is not None:
            into[key] = part


def _joined(value: Any) -> Any:
    if isinstance(value, _Pieces):
        return "".join(value)
    if isinstance(value, dict):
        if value and all(isinstance(k, int) for k in value):  # tool calls by index
            return [{"index": k, **_joined(v)} for k, v in sorted(value.items())]
        return {k: _joined(v) for k, v in value.items()}
    return value
