"""The SSE relay on its own (no servers): event framing, token counting, the usage chunk, and the
usage record written exactly once however the stream ends, including a client that leaves while
the relay is suspended between two events."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from serving.engines import Replica, Upstream
from serving.metering import Outcome
from serving.streaming import RelayResponse, SSEParser, StreamRelay, generated_tokens, sse_events
from tests.serving.conftest import RecordingMeter


def _chunk(text: str | None = None, usage: dict | None = None) -> str:
    choices = [] if text is None else [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": choices, "usage": usage}) + "\n\n"


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
FULL_STREAM = [_chunk("a"), _chunk(" b"), _chunk(" c"), _chunk(usage=USAGE), "data: [DONE]\n\n"]


class FakeResponse:
    """The part of aiohttp's ``ClientResponse`` that ``Upstream`` and the relay use (``content.readany``
    returns what arrived), over scripted body chunks."""

    def __init__(self, chunks, *, arrived_whole: bool = False):
        self._chunks = chunks
        self._eof = False
        self._arrived_whole = arrived_whole  # the whole body is in the buffer, not read yet
        self.closed = False
        self.content = self
        self.connection = None  # no socket to half-close (aiohttp lets it go once the body arrived)

    async def readany(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._eof = True
            return b""

    def at_eof(self) -> bool:
        return self._eof

    def is_eof(self) -> bool:
        return self._eof or self._arrived_whole

    def release(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


def _upstream(events: list[str], *, hang_after: bool = False, arrived_whole: bool = False) -> Upstream:
    async def body():
        for event in events:
            yield event.encode()
        if hang_after:
            await asyncio.sleep(3600)

    replica = Replica(base="m", url="http://engine", inflight=1)
    return Upstream(replica, FakeResponse(body(), arrived_whole=arrived_whole))


def _serve_until_the_client_leaves(response: RelayResponse, meter: RecordingMeter) -> list[Outcome]:
    """Serve ``response`` to a client that takes the first body, then stops reading and disconnects (so
    the relay is suspended at its ``yield``); the usage recorded."""
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

    return asyncio.run(serve_then_look())


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

    assert _serve_until_the_client_leaves(response, meter) == [Outcome(0, 2, "client_disconnected")]
    assert upstream.replica.inflight == 0


def test_a_client_leaving_after_the_whole_answer_arrived_is_billed_the_engines_count():
    """The engine finished before the client left: its answer waits unread in the buffer and there is no
    connection left to half-close (aiohttp lets it go when the body has arrived). What the engine sent is
    what it bills, so the relay reads the buffer to its end: the final usage chunk, not the two chunks
    it had relayed."""
    meter = RecordingMeter()
    upstream = _upstream(FULL_STREAM, arrived_whole=True)
    response = RelayResponse(StreamRelay(upstream, meter, wants_usage=False))

    assert _serve_until_the_client_leaves(response, meter) == [Outcome(7, 3, "client_disconnected")]
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


def _choice_chunk(index: int, text: str, prompt: int, done: int, *, chat: bool = True) -> str:
    """A vLLM chunk with continuous usage stats: one choice, and that choice's own running count."""
    choice = {"index": index, "delta": {"content": text}, "finish_reason": None} if chat else {"index": index, "text": text, "finish_reason": None}
    usage = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
    return "data: " + json.dumps({"object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice], "usage": usage}) + "\n\n"


def _cut_short(events: list[str], **options) -> RecordingMeter:
    async def broken():
        for event in events:
            yield event.encode()
        raise aiohttp.ClientPayloadError("engine died")

    meter = RecordingMeter()
    upstream = Upstream(Replica(base="m", url="http://engine", inflight=1), FakeResponse(broken()))
    asyncio.run(_collect(StreamRelay(upstream, meter, wants_usage=False, **options)))
    return meter


def test_a_stream_of_several_choices_cut_short_is_billed_every_choice():
    # n=3 on one conversation of 7 tokens: vLLM interleaves the choices, each chunk counting its own
    events = [_choice_chunk(i, "a", 7, 1) for i in range(3)] + [_choice_chunk(0, " b", 7, 2), _choice_chunk(2, " b", 7, 2)]

    meter = _cut_short(events)

    # 2 + 1 + 2 tokens generated, the conversation counted once (the last chunk alone says 7 + 2)
    assert meter.outcomes == [Outcome(7, 5, "engine_error")]
    assert meter.progressed[-1] == (7, 5)


def test_a_completion_of_several_prompts_cut_short_is_billed_each_prompt_once():
    # two prompts (3 and 5 tokens), n=2: choices 0-1 answer prompt 0, choices 2-3 prompt 1
    events = [_choice_chunk(i, "x", 3 if i < 2 else 5, 1, chat=False) for i in range(4)] + [_choice_chunk(3, " y", 5, 2, chat=False)]

    meter = _cut_short(events, choices_per_prompt=2)

    assert meter.outcomes == [Outcome(3 + 5, 1 + 1 + 1 + 2, "engine_error")]


def test_the_final_usage_chunk_is_the_engines_total():
    events = [_choice_chunk(0, "a", 7, 1), _choice_chunk(1, "a", 7, 1), _chunk(usage={"prompt_tokens": 7, "completion_tokens": 9}), "data: [DONE]\n\n"]
    meter = RecordingMeter()

    asyncio.run(_collect(StreamRelay(_upstream(events), meter, wants_usage=False)))

    assert meter.outcomes == [Outcome(7, 9, "ok")]


def test_events_split_anywhere_parse_as_whole_events():
    body = "".join(FULL_STREAM).replace("\n\n", "\r\n\r\n", 1) + ": keep-alive\n\n" + "data: tailé"
    whole = SSEParser()
    expected = whole.feed(body.encode()) + whole.end()
    for size in (1, 2, 7, 64):
        parser = SSEParser()
        events = []
        for i in range(0, len(body), size):
            events += parser.feed(body[i : i + size].encode())
        assert events + parser.end() == expected
    assert [data for _, data in expected][-2:] == [None, "tailé"] and len(expected) == len(FULL_STREAM) + 2
