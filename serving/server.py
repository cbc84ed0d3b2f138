"""How a gateway process serves: uvicorn with the options the hot path was measured with, and the
garbage collector set up for a long-lived server. ``python -m serving`` and the gateway benchmark
(``bench/serving/gateway_overhead.py``) both start the gateway through ``serve``, so the benchmark
measures what production runs. Measurements: ``bench/results/serving-results.md``.
"""

from __future__ import annotations

import asyncio
import gc

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.settings import ServingSettings


# A young-generation collection after every 10,000 net new container objects instead of CPython's
# 700. At 700, 500 rps ran ~65 young and ~6 middle collections a second (~6% of the gateway's CPU),
# and once a backlog formed each one found the requests in flight alive, promoted them and ran more
# often: a spiral measured at +50-200 ms p50. At 10,000: 2-3 collections per 10 s, each under 10 ms
# even on the loaded machine (50,000: none at all in 10 s, no better). Memory: a few MB more garbage
# at most between collections.
GC_THRESHOLD = (10_000, 10, 10)


def tune_gc() -> None:
    """Move everything alive after start-up (modules, the app, its settings and caches: ~137,000
    objects) out of the collector's view, so that a full collection scans only what requests created
    since (~7,000), and collect the young generation less often (``GC_THRESHOLD``). Measured at
    500 rps: full collections paused the event loop 120-250 ms each on the loaded 2-core machine,
    7-35 ms after the freeze; every request in flight or arriving meanwhile waits."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


class _CoalescingTransport:
    """A transport whose writes made in one step of the event loop leave as one send.

    uvicorn writes a response's status line and headers, then its body, as two sends; on loopback in a
    VM each send costs the gateway ~0.1-0.2 ms of CPU and wakes the client once more
    (``bench/results/serving-results.md``). Buffered writes leave at the end of the current loop step
    (before the loop waits for I/O again), in order; closing sends what is pending first."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, its responses written through ``_CoalescingTransport`` (flow
    control stays on the real transport)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _CoalescingTransport(transport, self.loop)  # type: ignore[assignment]


def server_config(
    app: FastAPI, settings: ServingSettings, *, host: str, port: int, log_level: str, http: str | type = CoalescingHttpToolsProtocol
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=http,
        loop="uvloop",
        # Longer than any client's or load balancer's idle timeout (httpx and the openai SDK keep an
        # idle connection 5 s, uvicorn's own default): the client, not the gateway, closes an idle
        # connection, so a client never sends a request on a connection the gateway is closing.
        timeout_keep_alive=settings.http_keep_alive_s,
    )


def serve(
    app: FastAPI, settings: ServingSettings, *, host: str, port: int, log_level: str, http: str | type = CoalescingHttpToolsProtocol
) -> None:
    config = server_config(app, settings, host=host, port=port, log_level=log_level, http=http)
    if settings.gc_tuning:
        tune_gc()
    uvicorn.Server(config).run()
