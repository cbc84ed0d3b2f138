"""The SSE relay on its own (no servers): event framing, token counting, the usage chunk, and the
usage record written exactly once however the stream ends, including a client that leaves while
the relay is suspended between two events."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from serving.engines import Replica, Upstream
from serving.metering import Outcome
from serving.streaming import RelayResponse, StreamRelay, generated_tokens, sse_events


def _chunk(text: str | None = None, usage: dict | None = None) -> str:
    choices = [] if text is None else [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": choices, "usage": usage}) + "\n\n"


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
FULL_STREAM = [_chunk("a"), _chunk(" b"), _chunk(" c"), _chunk(usage=USAGE), "data: [DONE]\n\n"]


class RecordingMeter:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.progressed: list[tuple[int, int]] = []

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def progress(self, prompt: int, completion: int) -> None:
        self.progressed.append((prompt, completion))


class FakeResponse:
    """The part of aiohttp's ``ClientResponse`` that ``Upstream`` and the relay use (``content.readany``
    returns what arrived), over scripted body chunks."""

    def __init__(self, chunks):
        self._chunks = chunks
        self._eof = False
        self.closed = False
        self.content = self
        self.connection = None  # no socket to half-close

    async def readany(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._eof = True
            return b""

    def at_eof(self) -> bool:
        return self._eof

    def release(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


def _upstream(events: list[str], *, hang_after: bool = False) -> Upstream:
    async def body():
        for event in events:
            yield event.encode()
        if hang_after:
            await asyncio.sleep(3600)

    replica = Replica(base="m", url="http://engine", inflight=1)
    return Upstream(replica, FakeResponse(body()))


async def _collect(relay: StreamRelay) -> list[bytes]:
    return [part async for part in relay.events()]


def test_sse_events_group_lines_and_keep_comments():
    async def lines():
        for line in ["data: 1", "", ": keep-alive", "", "event: x", "data: a", "data: b", "", "", "data: tail"]:
            yield line

    async def run():
        return [e async for e in sse_events(lines())]

    assert asyncio.run(run()) == [
        ("data: 1\n\n", "1"),
        (": keep-alive\n\n", None),
        ("event: x\ndata: a\ndata: b\n\n", "a\nb"),
        ("data: tail\n\n", "tail"),
    ]


def test_generated_tokens_counts_chunks_with_output_per_choice():
    assert generated_tokens([{"delta": {"role": "assistant", "content": ""}}]) == 0
    assert generated_tokens([{"delta": {"content": "x"}}, {"delta": {"content": "y"}}]) == 2
    assert generated_tokens([{"delta": {"tool_calls": [{"id": "t"}]}}]) == 1
    assert generated_tokens([{"text": "x"}, {"text": ""}]) == 1
    assert generated_tokens(None) == 0


def test_usage_chunk_is_dropped_unless_asked_and_billing_uses_it_either_way():
    for wants_usage in (False, True):
        meter = RecordingMeter()
        relay = StreamRelay(_upstream(FULL_STREAM), meter, wants_usage=wants_usage)

        sent = b"".join(asyncio.run(_collect(relay))).decode()

        assert (_chunk(usage=USAGE) in sent) is wants_usage
        assert sent.endswith("data: [DONE]\n\n")
        assert meter.outcomes == [Outcome(7, 3, "ok")]


def test_a_stream_cut_by_the_engine_is_billed_for_relayed_tokens_and_told_to_the_client():
    async def broken():
        yield _chunk("a").encode()
        yield _chunk(" b").encode()
        raise aiohttp.ClientPayloadError("engine died")

    meter = RecordingMeter()
    upstream = Upstream(Replica(base="m", url="http://engine", inflight=1), FakeResponse(broken()))

    sent = b"".join(asyncio.run(_collect(StreamRelay(upstream, meter, wants_usage=False)))).decode()

    assert '"code": "engine_error"' in sent
    assert meter.outcomes == [Outcome(0, 2, "engine_error")]
    assert upstream.replica.inflight == 0


def test_a_client_leaving_while_the_relay_waits_between_events_is_billed_once():
    """The disconnect arrives while the response is blocked sending an event (a slow client), so
    the relay is suspended at its ``yield``: RelayResponse must still close it."""
    meter = RecordingMeter()
    upstream = _upstream([_chunk("a"), _chunk(" b"), _chunk(" c")], hang_after=True)
    response = RelayResponse(StreamRelay(upstream, meter, wants_usage=False))
    bodies: list[bytes] = []
    first_body_sent = asyncio.Event()

    async def receive():
        await first_body_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body":
            bodies.append(message["body"])
            if len(bodies) == 1:
                first_body_sent.set()
            else:
                await asyncio.sleep(3600)  # the client stopped reading

    async def serve_then_look() -> list[Outcome]:
        scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/", "headers": []}
        await asyncio.wait_for(response(scope, receive, send), 5)
        # Looked at inside the loop: asyncio.run's final clean-up would close a leaked relay anyway.
        return list(meter.outcomes)

    assert asyncio.run(serve_then_look()) == [Outcome(0, 2, "client_disconnected")]
    assert upstream.replica.inflight == 0


def test_a_client_gone_before_the_first_event_still_closes_the_engine_request():
    meter = RecordingMeter()
    upstream = _upstream([_chunk("a")], hang_after=True)
    response = RelayResponse(StreamRelay(upstream, meter, wants_usage=False))

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(3600)  # not even the status line gets out

    async def serve_then_look() -> list[Outcome]:
        scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/", "headers": []}
        await asyncio.wait_for(response(scope, receive, send), 5)
        return list(meter.outcomes)

    assert asyncio.run(serve_then_look()) == [Outcome(0, 0, "client_disconnected")]
    assert upstream.replica.inflight == 0 and upstream.response.closed


def _error_event(error: dict) -> str:
    return "data: " + json.dumps(error) + "\n\n"


def test_an_engine_failure_event_reads_as_the_same_failure_without_streaming():
    """Without streaming the failure is a 502 ``server_error`` / ``engine_error`` whose message hides the
    engine's internals (``EnginePool._rejection``): the stream's error event says the same."""
    failures = [
        {"error": {"message": "generation failed: secret internals", "type": "server_error", "param": None, "code": None}},
        {"error": {"message": "generation failed: secret internals", "type": "InternalServerError", "param": None, "code": 500}},
        {"object": "error", "message": "generation failed: secret internals", "type": "InternalServerError", "code": 500},  # older vLLM
    ]
    for failure in failures:
        meter = RecordingMeter()
        relay = StreamRelay(_upstream([_chunk("a"), _error_event(failure), "data: [DONE]\n\n"]), meter, wants_usage=False)

        events = [e for e in b"".join(asyncio.run(_collect(relay))).decode().split("\n\n") if e]

        error = json.loads(events[1].removeprefix("data: "))["error"]
        assert (error["type"], error["code"]) == ("server_error", "engine_error"), failure
        assert "secret internals" not in error["message"]
        assert events[-1] == "data: [DONE]"
        assert meter.outcomes == [Outcome(0, 1, "engine_error")]


def test_an_engine_refusal_event_keeps_its_message_and_field():
    refusal = {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": "max_tokens", "code": 400}}
    relay = StreamRelay(_upstream([_error_event(refusal), "data: [DONE]\n\n"]), RecordingMeter(), wants_usage=False)

    sent = b"".join(asyncio.run(_collect(relay))).decode()

    error = json.loads(sent.split("\n\n")[0].removeprefix("data: "))["error"]
    assert error == {"message": "max_tokens is too large", "type": "invalid_request_error", "param": "max_tokens", "code": None}
