"""What the gateway process was doing, seen from inside it: a probe the gateway benchmark installs in the
gateway it starts (never part of the product).

``GET /bench/probe`` returns what was seen since the previous call and starts over
(``?ticker=false``: without the loop-stall ticker, whose 200 wake-ups a second cost the gateway CPU):

- every garbage collection: generation, pause, ``time.monotonic`` start (one clock for every process on
  the machine, so the load generator can line its slow requests up with these);
- event-loop stalls: a ticker sleeps 5 ms and records each overshoot over 2 ms, with how much CPU the
  loop's own thread and the whole process used meanwhile: loop-thread CPU ~ wall means the loop was
  busy (a handler, a GC pause); process CPU ~ wall with little loop CPU means another of our threads
  held the GIL (a database call in the worker threads); little of either means the OS ran something
  else (the cores were taken);
- each ``Database.run`` (worker-thread hop: cache misses, usage batches) and each usage batch flush.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import types

from fastapi import FastAPI

from serving.database import Database
from serving import usage_writer
from serving.usage_writer import UsageWriter

# 5 ms: a 2 ms ticker cost the gateway 3.7% of its CPU at 400 rps (py-spy); stalls under 5 ms matter little here.
TICK_S = 0.005
STALL_S = 0.002  # an overshoot over this is recorded


class _Probe:
    def __init__(self) -> None:
        self.reset()
        self._gc_start = 0.0
        self._ticker: asyncio.Task | None = None

    def reset(self) -> None:
        self.gc: list[dict] = []
        self.stalls: list[dict] = []
        self.db: list[dict] = []
        self.flushes: list[dict] = []
        self.slow_writes: list[dict] = []
        self.ticks = 0

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.monotonic()
        else:
            self.gc.append({"generation": info["generation"], "at": self._gc_start, "ms": (time.monotonic() - self._gc_start) * 1000})

    async def tick(self) -> None:
        while True:
            t, thread_cpu, proc_cpu = time.monotonic(), time.thread_time(), time.process_time()
            await asyncio.sleep(TICK_S)
            self.ticks += 1
            over = time.monotonic() - t - TICK_S
            if over > STALL_S:
                self.stalls.append({
                    "at": t + TICK_S, "ms": over * 1000,
                    "loop_cpu_ms": (time.thread_time() - thread_cpu) * 1000, "process_cpu_ms": (time.process_time() - proc_cpu) * 1000,
                })

    def report(self) -> dict:
        gcs, stalls = self.gc, self.stalls
        by_gen = {g: [e["ms"] for e in gcs if e["generation"] == g] for g in (0, 1, 2)}

        def kind(s: dict) -> str:
            if s["loop_cpu_ms"] >= 0.5 * s["ms"]:
                return "loop_busy"
            if s["process_cpu_ms"] >= 0.5 * s["ms"]:
                return "other_thread_held_gil"
            return "process_not_running"

        summary = {
            "gc": {f"gen{g}": {"count": len(v), "total_ms": round(sum(v), 1), "max_ms": round(max(v, default=0), 2)} for g, v in by_gen.items()},
            "loop_ticks": self.ticks,
            "loop_stalls_over_5ms": sum(1 for s in stalls if s["ms"] > 5),
            "loop_stalls_over_10ms": sum(1 for s in stalls if s["ms"] > 10),
            "loop_stall_max_ms": round(max((s["ms"] for s in stalls), default=0), 2),
            "loop_stalls_over_5ms_by_kind": {
                k: sum(1 for s in stalls if s["ms"] > 5 and kind(s) == k) for k in ("loop_busy", "other_thread_held_gil", "process_not_running")
            },
            "db_calls": len(self.db),
            "db_call_max_ms": round(max((d["ms"] for d in self.db), default=0), 2),
            "usage_flushes": len(self.flushes),
            "usage_flush_max_ms": round(max((f["ms"] for f in self.flushes), default=0), 2),
            "journal_writes_over_1ms": len(self.slow_writes),
            "journal_write_max_ms": round(max((w["ms"] for w in self.slow_writes), default=0), 2),
            # Read between phases (listing them takes a while): what a full collection has to scan.
            "gc_tracked_objects": {"frozen": gc.get_freeze_count(), "gen2": len(gc.get_objects(2)), "counts": gc.get_count()},
            "gc_threshold": gc.get_threshold(),
        }
        for s in stalls:
            s["kind"] = kind(s)
        return {"summary": summary, "gc": gcs, "loop_stalls": stalls, "db_calls": [d for d in self.db if d["ms"] >= 5], "slow_writes": self.slow_writes}


def _timed(probe_list_name: str, probe: _Probe, fn):
    async def wrapper(*args, **kwargs):
        started = time.monotonic()
        try:
            return await fn(*args, **kwargs)
        finally:
            # For a database call, what it ran: the unit of work's qualified name says who asked
            # (``authenticate...``: an API-key reload, ``Limiter._limits...``, ``UsageWriter.flush...``).
            what = getattr(args[1], "__qualname__", "?").split(".<locals>")[0] if len(args) > 1 else fn.__qualname__
            getattr(probe, probe_list_name).append({"at": started, "ms": (time.monotonic() - started) * 1000, "what": what})

    return wrapper


def _timed_write(probe: _Probe):
    """``os.write`` as the usage journal calls it on the event loop (one line per request): a write that
    waits for the disk (a filesystem journal commit, dirty-page throttling) stalls the loop."""
    write = os.write

    def timed(fd, data):
        started = time.monotonic()
        try:
            return write(fd, data)
        finally:
            ms = (time.monotonic() - started) * 1000
            if ms >= 1:
                probe.slow_writes.append({"at": started, "ms": ms})

    return timed


def install(app: FastAPI) -> None:
    probe = _Probe()
    gc.callbacks.append(probe.on_gc)
    # The journal module's ``os`` only (a copy with a timed ``write``): the process's own stays as it is.
    usage_writer.os = types.SimpleNamespace(**{**vars(os), "write": _timed_write(probe)})
    Database.run = _timed("db", probe, Database.run)
    UsageWriter.flush = _timed("flushes", probe, UsageWriter.flush)

    async def read_probe(ticker: bool = True) -> dict:
        if ticker and probe._ticker is None:
            probe._ticker = asyncio.create_task(probe.tick())
        elif not ticker and probe._ticker is not None:
            probe._ticker.cancel()
            probe._ticker = None
        out = probe.report()
        probe.reset()
        return out

    app.add_api_route("/bench/probe", read_probe, methods=["GET"])
