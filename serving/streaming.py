"""Relaying an engine's server-sent events to the client, event by event, while counting tokens.

The gateway always asks the engine for a final usage chunk (``stream_options.include_usage``) and
drops it when the client did not ask for it, so the client sees exactly what OpenAI would send. Each
relayed chunk carrying generated text counts as one token (vLLM emits one chunk per decoding step),
which is what a stream abandoned before the usage chunk is billed for; the engine's own usage, when
it arrives, is authoritative.

The usage record is written once, when the engine's ``[DONE]`` arrives (journaled before it is
relayed, so a client holding its full answer can rely on the record being billed) or when the relay
ends without it:
client gone (the response is cancelled or closed while the relay waits) or engine failure. Closing
the relay closes the upstream request, so an engine stops generating for a client that left.

An engine's error event after the 200 reaches the client as the same request's error would without
streaming: a generation failure is ``server_error`` with code ``engine_error`` (the 502 body), not the
engine's own wording.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import anyio
import structlog
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.engines import Upstream, UpstreamBroken
from serving.errors import error_body
from serving.metering import Meter, Outcome, token_counts

log = structlog.get_logger(__name__)

DONE = "[DONE]"


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
    def __init__(self, upstream: Upstream, meter: Meter, *, wants_usage: bool, wants_continuous: bool = False):
        self._upstream = upstream
        self._meter = meter
        self._wants_usage = wants_usage
        self._wants_continuous = wants_continuous
        self._relayed_tokens = 0
        self._usage: tuple[int, int] | None = None
        self._engine_error = False
        self._finished = False

    async def events(self) -> AsyncIterator[bytes]:
        status = "client_disconnected"  # unless the loop below runs to its end
        try:
            try:
                async for raw, data in sse_events(self._upstream.aiter_lines()):
                    if data == DONE:
                        # Bill before the client sees the end: once it has its answer, the record exists.
                        self._finish("engine_error" if self._engine_error else "ok")
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

    async def close(self, status: str = "client_disconnected") -> None:
        """Close the upstream request and record usage; idempotent. Shielded: when the client
        disconnects this runs inside a cancelled scope, and the record must still be written and the
        engine told to stop."""
        with anyio.CancelScope(shield=True):
            try:
                await self._upstream.aclose()
            finally:
                self._finish(status)

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
        counts = token_counts(chunk.get("usage"))
        if counts is not None:
            # With continuous usage every chunk has the running count: the latest is what was generated.
            self._usage = counts
        choices = chunk.get("choices")
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

    def _finish(self, status: str) -> None:
        if self._finished:
            return
        self._finished = True
        if self._usage is not None:
            # The engine's own count: final, or (continuous usage) as far as the stream got.
            prompt, completion = self._usage
        else:
            # No usage chunk (the client left first, or the engine broke): bill what was relayed.
            # The prompt's size is not known without the engine's count.
            prompt, completion = 0, self._relayed_tokens
            if status == "ok":
                log.warning("engine sent no usage chunk for a completed stream")
                status = "usage_missing"
        try:
            self._meter.record(Outcome(prompt, completion, status))
        except Exception:  # the response is already gone; losing the record must at least be loud
            log.exception("could not record usage of a stream", status=status, completion_tokens=completion)


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
