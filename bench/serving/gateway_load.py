"""The open-loop load generator of the gateway benchmark (``gateway_overhead.py``).

What it must get right to measure the gateway and not itself:

- A fixed pool of keep-alive HTTP/1.1 connections, all opened (and each used once) before the clock
  starts; a request takes the connection that has been idle longest (FIFO, so none idles long enough
  for a server's keep-alive timeout), or waits for one (counted). A connection is opened during the run
  only to replace one the server closed; that is counted, as is the one resend it allows (only when no
  response byte came back), so neither can hide a failure.
- Open loop: request i is due at ``start + i / rate`` and leaves then whether or not earlier ones came
  back; its latency counts from when it was due, so a late sender (this process descheduled, its own
  GC) counts against the measurement instead of silently thinning the load. The sender's own lateness
  and GC pauses are reported so that they can be told apart; its collector is off while the clock runs.
- The same code, pool size and rate for the direct and the gateway phase.

A small asyncio client rather than httpx/aiohttp: their per-request CPU would compete with the servers
for the same two cores.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import json
import time
import uuid

BASE = "tuneforge-tiny"
BODY = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 8}).encode()
WARMUP_S = 1.0  # at the target rate, over the same pool: every cache and connection behind it is warm
EPISODE_GAP_S = 0.05  # slow requests due closer together than this are one episode


class _Closed(Exception):
    """The server closed the connection (or said it would) before or after answering."""


class Pool:
    def __init__(self, port: int, headers: dict[str, str], *, request_ids: bool = False):
        self.port = port
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{extra}".encode()
        self._tail = f"content-length: {len(BODY)}\r\n\r\n".encode() + BODY
        self.request = self._head + self._tail
        # request_ids: each request its own x-request-id (the gateway then claims it and stores the answer,
        # serving.idempotency); a request resent on a new connection keeps its id, as a retry does
        self._ids = itertools.count() if request_ids else None
        self._run = uuid.uuid4().hex[:8]
        self.idle: collections.deque = collections.deque()
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.reopened = 0  # connections opened after the pool was filled
        self.resent = 0  # requests sent again because their connection closed before any answer
        self.waited = 0  # requests that found no idle connection
        self.server_closed = 0  # connections the server closed

    async def fill(self, n: int) -> None:
        for _ in range(n):
            self.idle.append(await asyncio.open_connection("127.0.0.1", self.port))

    async def _take(self):
        if self.idle:
            return self.idle.popleft()
        self.waited += 1
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def _give(self, conn) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    async def _replace(self):
        conn = await asyncio.open_connection("127.0.0.1", self.port)
        self.reopened += 1
        return conn

    def _next_request(self) -> bytes:
        if self._ids is None:
            return self.request
        return self._head + f"x-request-id: load-{self._run}-{next(self._ids)}\r\n".encode() + self._tail

    async def post(self) -> int:
        request = self._next_request()
        conn = await self._take()
        try:
            status, keep = await self._exchange(conn, request, first_try=True)
        except _Closed:
            # No response byte came back: the server had closed this connection. Send once more on a new
            # one, as HTTP clients do for an idempotent-looking failure; counted.
            self.server_closed += 1
            conn[1].close()
            self.resent += 1
            conn = await self._replace()
            status, keep = await self._exchange(conn, request, first_try=False)
        if keep:
            self._give(conn)
        else:
            self.server_closed += 1
            conn[1].close()
            self._give(await self._replace())
        return status

    async def _exchange(self, conn, request: bytes, *, first_try: bool) -> tuple[int, bool]:
        reader, writer = conn
        writer.write(request)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if first_try and not getattr(exc, "partial", b""):
                raise _Closed() from exc
            raise
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
        await reader.readexactly(int(fields[b"content-length"]))
        return status, fields.get(b"connection", b"").lower() != b"close"

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


class _GcWatch:
    """This process's own GC pauses while it measures."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []
        self._t = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self._t) * 1000))


def _pct(sorted_ms: list[float], p: float) -> float | None:
    if not sorted_ms:
        return None
    return round(sorted_ms[min(len(sorted_ms) - 1, int(p / 100 * len(sorted_ms)))], 2)


def _episodes(samples: list[tuple[float, float]], slow_ms: float) -> list[dict]:
    """Slow requests (due time, latency ms) grouped by due time into episodes."""
    out: list[dict] = []
    for due, ms in sorted(s for s in samples if s[1] > slow_ms):
        if out and due - out[-1]["_last_due"] < EPISODE_GAP_S:
            ep = out[-1]
        else:
            ep = {"first_due": due, "_last_due": due, "last_done": due, "requests": 0, "max_ms": 0.0}
            out.append(ep)
        ep["_last_due"] = due
        ep["last_done"] = max(ep["last_done"], due + ms / 1000)
        ep["requests"] += 1
        ep["max_ms"] = round(max(ep["max_ms"], ms), 2)
    for ep in out:
        del ep["_last_due"]
    return out


async def _send_at_rate(pool: Pool, rate: float, n: int, samples: list, errors: list, late: list) -> None:
    async def one(due: float) -> None:
        try:
            status = await pool.post()
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError, _Closed) as exc:
            errors.append(type(exc).__name__)
            return
        if status != 200:
            errors.append(str(status))
            return
        samples.append((due, (time.monotonic() - due) * 1000))

    tasks = []
    start = time.monotonic()
    for i in range(n):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        late.append((time.monotonic() - due) * 1000)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)


async def _load(port: int, headers: dict, rate: float, seconds: float, connections: int, slow_ms: float, request_ids: bool) -> dict:
    pool = Pool(port, headers, request_ids=request_ids)
    await pool.fill(connections)
    await _send_at_rate(pool, rate, int(rate * WARMUP_S), [], [], [])
    opened_in_warmup, resent_in_warmup, waited_in_warmup, closed_in_warmup = pool.reopened, pool.resent, pool.waited, pool.server_closed
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    late: list[float] = []
    # This process's own collections would stall every request in flight and count against both paths
    # alike (measured: up to 56 ms pauses with 5,000 tasks alive): none while the clock runs.
    gc.collect()
    gc.disable()
    watch = _GcWatch()
    gc.callbacks.append(watch)
    started = time.monotonic()
    try:
        await _send_at_rate(pool, rate, int(rate * seconds), samples, errors, late)
    finally:
        gc.enable()
        gc.callbacks.remove(watch)
    elapsed = time.monotonic() - started
    pool.close()
    ms = sorted(s[1] for s in samples)
    late.sort()
    n = int(rate * seconds)
    return {
        "requests": n,
        "warmup_requests": int(rate * WARMUP_S),
        "ok": len(samples),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "pool_connections": connections,
        "reopened": pool.reopened - opened_in_warmup,
        "resent": pool.resent - resent_in_warmup,
        "server_closed": pool.server_closed - closed_in_warmup,
        "waited_for_connection": pool.waited - waited_in_warmup,
        "p50_ms": _pct(ms, 50),
        "p90_ms": _pct(ms, 90),
        "p99_ms": _pct(ms, 99),
        "p999_ms": _pct(ms, 99.9),
        "max_ms": round(ms[-1], 2) if ms else None,
        "over_slow_ms": sum(1 for x in ms if x > slow_ms),
        "slow_ms": slow_ms,
        "sender_late_ms": {"p99": _pct(late, 99), "max": round(late[-1], 2) if late else None},
        "load_generator_gc": {
            "collections": len(watch.pauses),
            "over_1ms": sum(1 for _, p in watch.pauses if p > 1),
            "max_ms": round(max((p for _, p in watch.pauses), default=0.0), 2),
        },
        "elapsed_s": round(elapsed, 2),
        "started_at": started,
        "slow_episodes": _episodes(samples, slow_ms),
    }


def run_load(port: int, headers: dict, rate: float, seconds: float, *, connections: int = 64, slow_ms: float = 10.0,
             request_ids: bool = False) -> dict:
    try:
        import uvloop

        return uvloop.run(_load(port, headers, rate, seconds, connections, slow_ms, request_ids))
    except ImportError:
        return asyncio.run(_load(port, headers, rate, seconds, connections, slow_ms, request_ids))
