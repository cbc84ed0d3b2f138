"""Relaying an engine's server-sent events to the client, event by event, while counting tokens.

The gateway always asks the engine for a final usage chunk (``stream_options.include_usage``) and a
running count on every chunk (vLLM's ``continuous_usage_stats``), and drops what the client did not ask
for, so the client sees exactly what OpenAI would send. The count is the engine's, per choice
(serving.metering.StreamTally); the final usage chunk, when it arrives, is authoritative. Chunks are
counted one token each only when the engine sends no counts at all.

The usage record is written once, when the engine's ``[DONE]`` arrives (journaled before it is relayed,
so a client holding its full answer can rely on the record being billed) or when the relay ends without
it: client gone (the response is cancelled or closed while the relay waits) or engine failure. A client
that leaves is billed what the engine sent until it stopped: the relay half-closes the engine connection
(the engine sees the client gone and aborts the generation), reads what the engine still sent before
closing its side (or, when the engine had already finished, what arrived and waited unread), and bills
the last count in it. The upstream is read in raw chunks, split into events by the relay itself, so that
an event is never lost half-read when the client's cancellation interrupts a read. A stream that ends
well is stored for retries of its request id as a transcript (serving.transcript); any other end fails
the claim so that a retry runs again.

An engine's error event after the 200 reaches the client as the same request's error would without
streaming: a generation failure is ``server_error`` with code ``engine_error`` (the 502 body), not the
engine's own wording.
"""

from __future__ import annotations

import collections
import json
from typing import Any, AsyncIterator

import anyio
import structlog
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.engines import Upstream, UpstreamBroken
from serving.errors import error_body
from serving.idempotency import Attempt
from serving.metering import Meter, Outcome, StreamTally, token_counts
from serving.transcript import Transcript

log = structlog.get_logger(__name__)

DONE = "[DONE]"
# An SSE line longer than this (a chunk with huge logprobs) is an engine error, not a gateway crash
# (the same bound as the engine client's, serving.engines).
_MAX_LINE = 1 << 22
# After a client left, how long the engine may take to notice and close its side: the engine aborts at
# its next step (vLLM: milliseconds); an engine that never closes is cut off after this.
_DRAIN_S = 5.0


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str | None]]:
    """Group SSE lines into events: (the event as sent, its ``data`` payload or None)."""
    block: list[str] = []
    async for line in lines:
        if line:
            block.append(line)
            continue
        if block:
            yield _event(block)
            block = []
    if block:
        yield _event(block)


def _event(lines: list[str]) -> tuple[str, str | None]:
    data = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(lines) + "\n\n", ("\n".join(data) if data else None)


class SSEParser:
    """Events out of raw body chunks, split anywhere: the partial line and event wait in the parser."""

    def __init__(self) -> None:
        self._partial = b""
        self._block: list[str] = []

    def feed(self, data: bytes) -> list[tuple[str, str | None]]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_LINE:
            raise UpstreamBroken(f"an event line over {_MAX_LINE} bytes")
        return self._lines(lines)

    def end(self) -> list[tuple[str, str | None]]:
        """The events left when the body ended (a last event without its blank line)."""
        lines, self._partial = [self._partial], b""
        events = self._lines(lines)
        if self._block:
            events.append(_event(self._block))
            self._block = []
        return events

    def _lines(self, lines: list[bytes]) -> list[tuple[str, str | None]]:
        events = []
        for raw in lines:
            try:
                line = raw.rstrip(b"\r").decode()
            except UnicodeDecodeError as exc:
                raise UpstreamBroken(repr(exc)) from exc
            if line:
                self._block.append(line)
            elif self._block:
                events.append(_event(self._block))
                self._block = []
        return events


def generated_tokens(choices: Any) -> int:
    """Chunks with new output in them (one per choice), for both chat and text completions."""
    if not isinstance(choices, list):
        return 0
    count = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            count += bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"))
        elif choice.get("text"):
            count += 1
    return count


class StreamRelay:
    def __init__(
        self,
        upstream: Upstream,
        meter: Meter,
        *,
        wants_usage: bool,
        wants_continuous: bool = False,
        attempt: Attempt | None = None,
        choices_per_prompt: int | None = None,
    ):
        self._upstream = upstream
        self._meter = meter
        self._attempt = attempt
        self._wants_usage = wants_usage
        self._wants_continuous = wants_continuous
        self._relayed_tokens = 0
        self._tally = StreamTally(choices_per_prompt)
        self._transcript = Transcript() if attempt is not None else None
        self._parser = SSEParser()
        self._pending: collections.deque[tuple[str, str | None]] = collections.deque()  # parsed, not yet handled
        self._eof = False
        self._engine_error = False
        self._finished = False

    async def events(self) -> AsyncIterator[bytes]:
        status = "client_disconnected"  # unless the loop below runs to its end
        try:
            try:
                async for raw, data in self._upstream_events():
                    if data == DONE:
                        # Bill before the client sees the end: once it has its answer, the record exists.
                        await self._finish("engine_error" if self._engine_error else "ok")
                    if data is None or data == DONE:
                        yield raw.encode()
                        continue
                    forward = self._forward(data)
                    if forward is True:
                        yield raw.encode()
                    elif forward:
                        yield forward.encode()
                status = "engine_error" if self._engine_error else "ok"
            except UpstreamBroken as exc:
                log.warning("engine stream broke", error=repr(exc))
                status = "engine_error"
                body = error_body("The inference engine stopped in the middle of the response.", "server_error", code="engine_error")
                yield f"data: {json.dumps(body)}\n\n".encode()
        finally:
            await self.close(status)

    async def _upstream_events(self) -> AsyncIterator[tuple[str, str | None]]:
        """The engine's events in order. Each is taken off ``_pending`` as it is handed out, and the
        parser's state lives on the relay, so a drain after a cancelled read goes on where it stopped."""
        while True:
            while self._pending:
                yield self._pending.popleft()
            if self._eof:
                return
            chunk = await self._upstream.read_some()
            if chunk:
                self._pending.extend(self._parser.feed(chunk))
            else:
                self._eof = True
                self._pending.extend(self._parser.end())

    async def close(self, status: str = "client_disconnected") -> None:
        """Close the upstream request and record usage; idempotent. Shielded: when the client
        disconnects this runs inside a cancelled scope, and the record must still be written and the
        engine told to stop."""
        with anyio.CancelScope(shield=True):
            try:
                if status == "client_disconnected" and not self._finished and not self._upstream.closed:
                    await self._drain()
                await self._upstream.aclose()
            finally:
                await self._finish(status)

    async def _drain(self) -> None:
        """The client left: stop the engine and count what it sent until it stopped (not relayed)."""
        stopping = self._eof or self._upstream.half_close()
        while self._pending:  # read already, not handled yet
            _, data = self._pending.popleft()
            if data is not None and data != DONE:
                self._forward(data)
        if not stopping:
            return
        with anyio.move_on_after(_DRAIN_S):
            try:
                async for _, data in self._upstream_events():
                    if data is not None and data != DONE:
                        self._forward(data)
            except UpstreamBroken:
                pass  # the engine closed its side mid-stream: what it sent before is counted

    def _forward(self, data: str) -> bool | str:
        """Account for one chunk: True to relay it as sent, False to drop it, or the event to send
        instead (the chunk without the per-chunk usage the gateway asked for and the client did not)."""
        try:
            chunk = json.loads(data)
        except ValueError:
            return True
        if not isinstance(chunk, dict):
            return True
        if "error" in chunk or chunk.get("object") == "error":  # vLLM's current and older error events
            self._engine_error = True
            return _client_error_event(chunk)
        if self._transcript is not None:
            self._transcript.add(chunk)
        counts = token_counts(chunk.get("usage"))
        choices = chunk.get("choices")
        if counts is not None:
            # With continuous usage every chunk has its choice's running count.
            self._tally.add(choices, counts)
            self._meter.progress(*self._tally.counts)
        self._relayed_tokens += generated_tokens(choices)
        if counts is None or self._wants_continuous:
            return True
        if not choices:  # the final usage chunk
            return self._wants_usage
        # A running count the client did not ask for: OpenAI's chunks carry usage null (or none at all).
        if self._wants_usage:
            chunk["usage"] = None
        else:
            chunk.pop("usage", None)
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"

    async def _finish(self, status: str) -> None:
        if self._finished:
            return
        self._finished = True
        succeeded = status == "ok"
        counts = self._tally.counts
        if counts is not None:
            # The engine's own count: final, or (continuous usage) as far as the stream got.
            prompt, completion = counts
        else:
            # No usage at all (an engine without continuous usage, cut short, or broken): bill what was
            # relayed. The prompt's size is not known without the engine's count.
            prompt, completion = 0, self._relayed_tokens
            if status == "ok":
                log.warning("engine sent no usage chunk for a completed stream")
                status = "usage_missing"
        try:
            self._meter.record(Outcome(prompt, completion, status))
        except Exception:  # the response is already gone; losing the record must at least be loud
            log.exception("could not record usage of a stream", status=status, completion_tokens=completion)
        if self._attempt is not None:
            if succeeded and self._transcript is not None:
                await self._attempt.succeed(self._transcript.dump())
            else:
                await self._attempt.fail()


def _client_error_event(chunk: dict[str, Any]) -> str:
    """An engine's error event as the client sees it: the same error the request gets without
    streaming (``EnginePool._rejection``). A 4xx keeps the engine's message and field; any other
    failure is the gateway's 502 ``engine_error`` (``server_error``, as OpenAI types its 5xx, also in
    streams), its details logged rather than shown."""
    error = chunk.get("error") if isinstance(chunk.get("error"), dict) else chunk
    status, type, param = error.get("code"), error.get("type"), error.get("param")
    message = str(error.get("message") or "")
    if (isinstance(status, int) and 400 <= status < 500) or type in ("invalid_request_error", "BadRequestError"):
        code = error.get("code") if isinstance(error.get("code"), str) else None  # vLLM's is the HTTP status
        body = error_body(message, "invalid_request_error", param if isinstance(param, str) else None, code)
    else:
        log.error("engine failed mid-stream", message=message[:300], type=type)
        body = error_body("The inference engine failed in the middle of the response.", "server_error", code="engine_error")
    return f"data: {json.dumps(body)}\n\n"


class RelayResponse(StreamingResponse):
    """A streaming response that always closes its relay: also when the client disconnects while the
    relay is suspended between two events (Starlette then abandons the iterator without closing it),
    or before the first event (the iterator never started, so its clean-up would never run)."""

    def __init__(self, relay: StreamRelay):
        self._relay = relay
        super().__init__(
            relay.events(),
            media_type="text/event-stream",
            # Proxies must not buffer a token stream.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._relay.close()
