"""Gateway overhead at a fixed request rate against a local upstream.

Starts the fake vLLM upstream (tests/serving/fake_vllm.py: answers at once, no model) and the gateway
(``serving.app`` on a SQLite database in a temp folder, usage recorded for every request) as separate
uvicorn processes, then sends non-streamed chat completions at a fixed open-loop rate (a request leaves
on schedule whether or not earlier ones returned) first straight to the upstream, then through the
gateway. Added latency = gateway percentile - direct percentile.

    python bench/serving/gateway_overhead.py --rate 500 --seconds 10 --out bench/results/serving-gateway.json
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

import httpx

ROOT = Path(__file__).resolve().parents[2]
KEY = "tf-bench-key-0000000000000000000000"
BASE = "tuneforge-tiny"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


UPSTREAM = """
import sys, uvicorn
sys.path.insert(0, "tests/serving")
from fake_vllm import EngineState, create_engine_app
uvicorn.run(create_engine_app(EngineState(base_model=%r)), host="127.0.0.1", port=%d, log_level="warning", access_log=False)
"""

GATEWAY = """
import uvicorn
from scheduler.migrate import upgrade
from scheduler.db import session_scope
from scheduler.tenancy import ensure_bootstrap_key
from serving.app import create_app
from serving.logs import configure_logging
from serving.settings import ServingSettings
settings = ServingSettings(data_dir=%r, database_url=%r, engines={%r: [%r]}, base_models=[%r])
upgrade(settings.database_url)
with session_scope(settings.database_url) as s:
    ensure_bootstrap_key(s, %r)
configure_logging("warning")
uvicorn.run(create_app(settings), host="127.0.0.1", port=%d, log_level="warning", access_log=False)
"""


async def _load(url: str, headers: dict, rate: float, seconds: float) -> dict:
    body = {"model": BASE, "messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 8}
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        for _ in range(20):  # warm connections and caches
            await client.post("/v1/chat/completions", json=body)

        async def one():
            t = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(str(r.status_code))
                    return
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                return
            latencies.append(time.perf_counter() - t)

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else None  # noqa: E731
    return {"requests": n, "achieved_send_rate": n / sent_s, "ok": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="gw-bench-")
    up_port, gw_port = _port(), _port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", UPSTREAM % (BASE, up_port)], cwd=ROOT, env=env),
        subprocess.Popen(
            [sys.executable, "-c", GATEWAY % (tmp, f"sqlite:///{tmp}/gw.db", BASE, f"http://127.0.0.1:{up_port}", BASE, KEY, gw_port)], cwd=ROOT, env=env
        ),
    ]
    try:
        _wait(f"http://127.0.0.1:{up_port}/v1/models")
        _wait(f"http://127.0.0.1:{gw_port}/metrics")
        direct = asyncio.run(_load(f"http://127.0.0.1:{up_port}", {}, args.rate, args.seconds))
        gateway = asyncio.run(_load(f"http://127.0.0.1:{gw_port}", {"Authorization": f"Bearer {KEY}"}, args.rate, args.seconds))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    load = os.getloadavg()
    result = {
        "bench": "gateway_overhead",
        "rate_rps": args.rate,
        "seconds": args.seconds,
        "direct": direct,
        "gateway": gateway,
        "added_p50_ms": gateway["p50_ms"] - direct["p50_ms"] if gateway["p50_ms"] and direct["p50_ms"] else None,
        "added_p99_ms": gateway["p99_ms"] - direct["p99_ms"] if gateway["p99_ms"] and direct["p99_ms"] else None,
        "machine": {"cpus": os.cpu_count(), "loadavg_after": load, "python": platform.python_version()},
        "setup": "gateway + upstream + load generator as 3 processes on one machine; SQLite; usage recorded per request",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
