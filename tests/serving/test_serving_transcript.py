"""A streamed completion stored as one object and replayed as a stream: what a client accumulates from
the replay equals what it accumulated from the live stream (text, tool calls, logprobs, finish
reasons, choice by choice), in fewer chunks, shaped for the client's usage options."""

from __future__ import annotations

import json

from serving.transcript import Transcript, replay_events


def _accumulate(chunks: list[dict]) -> dict[int, dict]:
    """What a client makes of chat chunks (the SDKs' stream helpers do the same)."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            acc = out.setdefault(choice["index"], {"content": "", "tool_calls": {}, "logprobs": [], "finish_reason": None, "role": None})
            delta = choice.get("delta") or {}
            acc["role"] = acc["role"] or delta.get("role")
            acc["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                entry = acc["tool_calls"].setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
                entry["id"] = entry["id"] or call.get("id")
                entry["name"] = entry["name"] or (call.get("function") or {}).get("name")
                entry["arguments"] += (call.get("function") or {}).get("arguments") or ""
            acc["logprobs"] += ((choice.get("logprobs") or {}).get("content")) or []
            acc["finish_reason"] = choice.get("finish_reason") or acc["finish_reason"]
    return out


def _live() -> list[dict]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    lp = lambda t: {"content": [{"token": t, "logprob": -0.5, "top_logprobs": []}]}  # noqa: E731
    return [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**head, "choices": [{"index": 1, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "Hel"}, "logprobs": lp("Hel"), "finish_reason": None}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
        {**head, "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                                     "function": {"name": "get", "arguments": "{\"ci"}}]}, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "lo"}, "logprobs": lp("lo"), "finish_reason": "stop"}]},
        {**head, "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ty\": 1}"}}]}, "finish_reason": "tool_calls"}]},
        {**head, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}},
    ]


def _replayed(stored: bytes, **options) -> tuple[list[dict], list[str]]:
    events = [e.decode() for e in replay_events(stored, **options)]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]], events


def test_a_replayed_stream_accumulates_to_what_the_live_stream_did():
    live = _live()
    transcript = Transcript()
    for chunk in live:
        transcript.add(chunk)
    stored = transcript.dump()

    chunks, events = _replayed(stored, wants_usage=False, wants_continuous=False)

    assert events[-1] == "data: [DONE]\n\n"
    assert _accumulate(chunks) == _accumulate(live)
    assert _accumulate(chunks)[1]["tool_calls"] == {0: {"id": "call_1", "name": "get", "arguments": '{"city": 1}'}}
    assert len(chunks) == 2 and all("usage" not in c for c in chunks)  # one chunk per choice; no usage unless asked
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {("chatcmpl-1", 7, "m", "chat.completion.chunk")}
    assert len(stored) < len("".join(json.dumps(c) for c in live))


def test_a_replay_has_the_usage_the_client_asked_for():
    transcript = Transcript()
    for chunk in _live():
        transcript.add(chunk)
    final = {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}

    asked, _ = _replayed(transcript.dump(), wants_usage=True, wants_continuous=False)
    continuous, _ = _replayed(transcript.dump(), wants_usage=True, wants_continuous=True)

    assert [c["usage"] for c in asked] == [None, None, final] and asked[-1]["choices"] == []
    assert [c["usage"] for c in continuous] == [final] * 3


def test_a_text_completion_transcript_joins_text_per_choice():
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    transcript = Transcript()
    for index, text, reason in [(0, "a", None), (1, "x", None), (0, " b", "length"), (1, " y", "stop")]:
        transcript.add({**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]})

    chunks, _ = _replayed(transcript.dump(), wants_usage=False, wants_continuous=False)

    assert [c["choices"] for c in chunks] == [[{"index": 0, "text": "a b", "finish_reason": "length"}],
                                              [{"index": 1, "text": "x y", "finish_reason": "stop"}]]
