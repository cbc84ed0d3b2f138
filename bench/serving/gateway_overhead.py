"""Gateway overhead at a fixed request rate against a fast local upstream.

Three processes on one machine: a minimal OpenAI-shaped upstream (a bare ASGI app under uvicorn that
answers a chat completion, with usage, as soon as it has read the request; ``--upstream fake_vllm``
uses the tests' FastAPI stand-in instead), the gateway (``serving.app`` under uvicorn, SQLite in a temp
folder, one usage record per request through the usage writer) and this open-loop load generator: a
request leaves on schedule whether or not earlier ones returned, over keep-alive HTTP/1.1 connections
(a small asyncio client: httpx's own per-request cost would compete for the same cores).

Each round sends ``--seconds`` of non-streamed chat completions first straight to the upstream, then
through the gateway; added latency = gateway percentile - direct percentile. Also recorded: CPU
seconds each process spent per request (``/proc``), and the gateway's own request-duration histogram
(time inside the gateway, from its ``/metrics``), so a shortfall can be traced to a process.

    python bench/serving/gateway_overhead.py --rate 500 --seconds 10 --out bench/results/serving-gateway-500rps.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEY = "tf-bench-key-0000000000000000000000"
BASE = "tuneforge-tiny"
BODY = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 8}).encode()

RAW_UPSTREAM = """
import json, time, uvicorn
ANSWER = json.dumps({"id": "cmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": %(base)r,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three four"}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": %(base)r, "object": "model", "created": 0, "owned_by": "bench"}]}).encode()
HEADERS = [(b"content-type", b"application/json")]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = MODELS if scope["method"] == "GET" else ANSWER
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=%(port)d, log_level="warning", access_log=False)
"""

FAKE_VLLM_UPSTREAM = """
import sys, uvicorn
sys.path.insert(0, "tests/serving")
from fake_vllm import EngineState, create_engine_app
uvicorn.run(create_engine_app(EngineState(base_model=%(base)r)), host="127.0.0.1", port=%(port)d, log_level="warning", access_log=False)
"""

GATEWAY = """
import uvicorn
from scheduler.migrate import upgrade
from scheduler.db import session_scope
from scheduler.tenancy import ensure_bootstrap_key
from serving.app import create_app
from serving.logs import configure_logging
from serving.settings import ServingSettings
settings = ServingSettings(data_dir=%(tmp)r, database_url=%(db)r, engines={%(base)r: [%(upstream)r]}, base_models=[%(base)r])
upgrade(settings.database_url)
with session_scope(settings.database_url) as s:
    ensure_bootstrap_key(s, %(key)r)
configure_logging(%(log_level)r)
uvicorn.run(create_app(settings), host="127.0.0.1", port=%(port)d, log_level="warning", access_log=False)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class _Connections:
    """Keep-alive HTTP/1.1 connections to one server; a request takes an idle one or opens another."""

    def __init__(self, port: int, headers: dict[str, str]):
        self.port = port
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{extra}"
            f"content-length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0
        self.stale_retries = 0

    async def post(self) -> int:
        conn = self.idle.pop() if self.idle else None
        if conn is not None:
            try:
                return await self._exchange(conn)
            except (asyncio.IncompleteReadError, ConnectionError):
                # The server closed this keep-alive connection while it sat idle (uvicorn's 5 s keep-alive
                # timeout): no response byte came back, so send again on a new one, as HTTP clients do.
                # Counted, so that it can never hide a real failure.
                conn[1].close()
                self.stale_retries += 1
        conn = await asyncio.open_connection("127.0.0.1", self.port)
        self.opened += 1
        return await self._exchange(conn)

    async def _exchange(self, conn) -> int:
        reader, writer = conn
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        self.idle.append(conn)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def _load(port: int, headers: dict, rate: float, seconds: float) -> dict:
    conns = _Connections(port, headers)
    for _ in range(50):  # warm connections and caches
        await conns.post()
    latencies: list[float] = []
    errors: list[str] = []

    async def one(due: float) -> None:
        try:
            status = await conns.post()
        except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as exc:
            errors.append(type(exc).__name__)
            return
        if status != 200:
            errors.append(str(status))
            return
        # From when the request was due, not when it left: a late sender counts against the latency.
        latencies.append(time.perf_counter() - due)

    tasks = []
    n = int(rate * seconds)
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    sent_s = time.perf_counter() - start
    await asyncio.gather(*tasks)
    conns.close()
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000, 2) if latencies else None

    return {
        "requests": n,
        "achieved_send_rate": round(n / sent_s, 1),
        "ok": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "connections": conns.opened,
        "stale_keepalive_retries": conns.stale_retries,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": pct(100),
    }


def _gateway_histogram(port: int) -> dict:
    """Cumulative counts of the gateway's own duration histogram for chat completions."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("tuneforge_serving_request_duration_seconds_bucket") and 'route="/v1/chat/completions"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def _wait(port: int, path: str) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"port {port} did not come up")


def _measure(pid_of: dict[str, int], port: int, headers: dict, rate: float, seconds: float) -> dict:
    before = {name: _cpu_s(pid) for name, pid in pid_of.items()}
    me = time.process_time()
    result = _run(port, headers, rate, seconds)
    n = result["requests"]
    cpu = {name: round((_cpu_s(pid) - before[name]) / n * 1000, 3) for name, pid in pid_of.items()}
    cpu["load_generator"] = round((time.process_time() - me) / n * 1000, 3)
    result["cpu_ms_per_request"] = cpu
    return result


def _run(port: int, headers: dict, rate: float, seconds: float) -> dict:
    try:
        import uvloop

        return uvloop.run(_load(port, headers, rate, seconds))
    except ImportError:
        return asyncio.run(_load(port, headers, rate, seconds))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="direct/gateway pairs, interleaved; the median pair is reported")
    parser.add_argument("--upstream", choices=["raw", "fake_vllm"], default="raw")
    parser.add_argument("--log-level", default="warning", help="the gateway's log level (info: one JSON line per request and event)")
    parser.add_argument("--out")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="gw-bench-")
    up_port, gw_port = _port(), _port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    upstream_src = (RAW_UPSTREAM if args.upstream == "raw" else FAKE_VLLM_UPSTREAM) % {"base": BASE, "port": up_port}
    gateway_src = GATEWAY % {
        "tmp": tmp, "db": f"sqlite:///{tmp}/gw.db", "base": BASE, "upstream": f"http://127.0.0.1:{up_port}", "key": KEY,
        "log_level": args.log_level, "port": gw_port,
    }
    procs = {
        "upstream": subprocess.Popen([sys.executable, "-c", upstream_src], cwd=ROOT, env=env),
        "gateway": subprocess.Popen([sys.executable, "-c", gateway_src], cwd=ROOT, env=env),
    }
    pids = {name: p.pid for name, p in procs.items()}
    rounds = []
    try:
        _wait(up_port, "/v1/models")
        _wait(gw_port, "/metrics")
        for _ in range(args.rounds):
            direct = _measure(pids, up_port, {}, args.rate, args.seconds)
            hist_before = _gateway_histogram(gw_port)
            gateway = _measure(pids, gw_port, {"authorization": f"Bearer {KEY}"}, args.rate, args.seconds)
            hist_after = _gateway_histogram(gw_port)
            inside = {le: int(hist_after[le] - hist_before.get(le, 0)) for le in hist_after}
            added = {
                f"added_{p}_ms": round(gateway[f"{p}_ms"] - direct[f"{p}_ms"], 2) if gateway[f"{p}_ms"] is not None and direct[f"{p}_ms"] is not None else None
                for p in ("p50", "p99")
            }
            rounds.append({"direct": direct, "gateway": gateway, **added, "gateway_internal_duration_le_s": inside})
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(10)
    ranked = sorted(rounds, key=lambda r: (r["added_p99_ms"] is None, r["added_p99_ms"] or 0))
    median = ranked[(len(ranked) - 1) // 2]
    result = {
        "bench": "gateway_overhead",
        "rate_rps": args.rate,
        "seconds": args.seconds,
        "upstream": args.upstream,
        "gateway_log_level": args.log_level,
        "median_round": median,
        "rounds": rounds,
        "machine": {"cpus": os.cpu_count(), "loadavg_after": os.getloadavg(), "python": platform.python_version()},
        "setup": "upstream + gateway + load generator as 3 processes on one machine (no pinning); SQLite; usage recorded per request",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
