"""Gateway overhead at a fixed request rate against a fast local upstream.

Three processes on one machine: a minimal OpenAI-shaped upstream (a bare ASGI app under uvicorn that
answers a chat completion, with usage, as soon as it has read the request; ``--upstream fake_vllm``
uses the tests' FastAPI stand-in instead), the gateway (``serving.server.serve``, exactly as
``python -m serving`` runs it; SQLite in a temp folder, one usage record per request through the usage
writer) and this open-loop load generator (``bench/serving/gateway_load.py``): a request leaves on schedule
whether or not earlier ones returned, over a fixed pool of keep-alive connections opened before the
clock starts, and its latency counts from when it was due.

Each round sends ``--seconds`` of non-streamed chat completions first straight to the upstream, then
through the gateway, with the same client code and pool size; added latency = gateway percentile -
direct percentile. Also recorded, so that a slow tail can be traced to a process and a moment:

- CPU seconds each process spent per request (``/proc``), the machine's load average and its CPU time
  by kind (user, system, idle, iowait, softirq, steal: ``/proc/stat``) per phase;
- the gateway's own request-duration histogram (its ``/metrics``: time inside the handler only);
- from inside the gateway process (a probe this script adds, not part of the product): every garbage
  collection with its generation and pause, event-loop stalls (a 5 ms ticker's overshoot; off with ``--no-ticker``), each usage
  batch insert and database call, with ``time.monotonic`` stamps (one clock for all processes here);
- the load generator's slow requests grouped into episodes, each marked with what the gateway was
  doing then (a GC pause, a loop stall, nothing), and the load generator's own lateness and GC pauses.

    python bench/serving/gateway_overhead.py --rate 500 --seconds 10 --rounds 3 --out bench/results/serving-gateway-500rps.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_load import BASE, run_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KEY = "tf-bench-key-0000000000000000000000"

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
# Keep-alive longer than any pause between phases: the direct path must not lose connections mid-run.
uvicorn.run(app, host="127.0.0.1", port=%(port)d, log_level="warning", access_log=False, timeout_keep_alive=%(keep_alive)d)
"""

FAKE_VLLM_UPSTREAM = """
import sys, uvicorn
sys.path.insert(0, "tests/serving")
from fake_vllm import EngineState, create_engine_app
uvicorn.run(create_engine_app(EngineState(base_model=%(base)r)), host="127.0.0.1", port=%(port)d, log_level="warning",
    access_log=False, timeout_keep_alive=%(keep_alive)d)
"""

GATEWAY = """
import sys
sys.path.insert(0, %(bench_dir)r)
import gateway_probe
from scheduler.migrate import upgrade
from scheduler.db import session_scope
from scheduler.tenancy import ensure_bootstrap_key
from serving.app import create_app
from serving.logs import configure_logging
from serving.server import serve
from serving.settings import ServingSettings
settings = ServingSettings(data_dir=%(tmp)r, database_url=%(db)r, engines={%(base)r: [%(upstream)r]}, base_models=[%(base)r],
    **%(overrides)r)
upgrade(settings.database_url)
with session_scope(settings.database_url) as s:
    ensure_bootstrap_key(s, %(key)r)
configure_logging(%(log_level)r)
app = create_app(settings)
gateway_probe.install(app)
if %(gc_threshold)r:
    import gc
    gc.set_threshold(*%(gc_threshold)r)
if %(switch_interval)r:
    sys.setswitchinterval(%(switch_interval)r)
if %(refresh_ahead)r is not None:
    import serving.cache
    serving.cache.REFRESH_AHEAD = %(refresh_ahead)r
serve(app, settings, host="127.0.0.1", port=%(port)d, log_level="warning", **({} if %(http)r == "default" else {"http": %(http)r}))
"""


def _child_env() -> dict[str, str]:
    """This environment with the repository first on the path (and whatever the path already had: on the
    GPU machine that is where the packed site folder lives)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_ms() -> dict[str, float]:
    """The machine's CPU time by kind since boot (/proc/stat), in ms: steal is time the hypervisor
    gave our virtual CPUs to someone else, idle is what nobody here used."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    return {k: int(v) * tick_ms for k, v in zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), fields)}


def _get_json(port: int, path: str) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read())


def _gateway_histogram(port: int) -> dict:
    """Cumulative counts of the gateway's own duration histogram for chat completions."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("tuneforge_serving_request_duration_seconds_bucket") and 'route="/v1/chat/completions"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def _wait(port: int, path: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} did not come up")


def _overlaps(episode: dict, events: list[dict]) -> list[dict]:
    """The gateway events (GC pauses, loop stalls) that overlap an episode of slow requests."""
    lo, hi = episode["first_due"] - 0.005, episode["last_done"] + 0.005
    return [e for e in events if e["at"] + e["ms"] / 1000 >= lo and e["at"] <= hi]


def _attribute(load: dict, probe: dict | None) -> None:
    """Mark each slow episode with what the gateway was doing then (its GC pauses of 1 ms or more, its
    loop stalls, database calls of 5 ms or more that requests wait for), and count slow requests by the
    largest such event: a GC pause, a stall of a given kind (see gateway_probe), a database call, or
    nothing seen inside the gateway."""
    started = load["started_at"]
    if probe is not None:
        events = [{"kind": f"gc{g['generation']}", "at": g["at"], "ms": g["ms"]} for g in probe["gc"] if g["ms"] >= 1.0]
        events += [{"kind": f"stall_{s['kind']}", "at": s["at"], "ms": s["ms"]} for s in probe["loop_stalls"]]
        # Database calls that requests wait for (cache reloads), not the usage batches (nobody waits).
        events += [{"kind": f"db_{d['what']}", "at": d["at"], "ms": d["ms"]} for d in probe.get("db_calls", []) if "flush" not in d["what"]]
        events += [{"kind": "journal_write", "at": w["at"], "ms": w["ms"]} for w in probe.get("slow_writes", [])]
        causes: dict[str, int] = {}
        for ep in load["slow_episodes"]:
            seen = _overlaps(ep, events)
            cause = max(seen, key=lambda e: e["ms"])["kind"] if seen else "nothing_seen_in_gateway"
            causes[cause] = causes.get(cause, 0) + ep["requests"]
            ep["largest_gateway_event"] = cause
            ep["gateway_events"] = [{"kind": e["kind"], "at": round(e["at"] - ep["first_due"], 4), "ms": round(e["ms"], 2)} for e in seen][:20]
        load["slow_requests_by_largest_gateway_event"] = causes
    for ep in load["slow_episodes"]:
        ep["first_due"] = round(ep["first_due"] - started, 3)
        ep["last_done"] = round(ep["last_done"] - started, 3)
    del load["started_at"]


def _phase(pids: dict[str, int], port: int, headers: dict, args, probe_port: int | None) -> dict:
    before = {name: _cpu_s(pid) for name, pid in pids.items()}
    if probe_port is not None:
        # Resets what the probe has seen; starts (or stops) its loop-stall ticker.
        _get_json(probe_port, f"/bench/probe?ticker={str(args.ticker).lower()}")
    load_before = os.getloadavg()[0]
    machine_before = _machine_ms()
    me = time.process_time()
    result = run_load(port, headers, args.rate, args.seconds, connections=args.connections, slow_ms=args.slow_ms,
                      request_ids=args.request_ids)
    n = result["requests"] + result["warmup_requests"]
    cpu = {name: round((_cpu_s(pid) - before[name]) / n * 1000, 3) for name, pid in pids.items()}
    cpu["load_generator"] = round((time.process_time() - me) / n * 1000, 3)
    result["cpu_ms_per_request"] = cpu
    result["loadavg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    machine_after = _machine_ms()
    # CPU time of the whole machine during the phase, in seconds by kind (2 CPUs: at most 2 s per second).
    result["machine_cpu_s"] = {k: round((machine_after[k] - machine_before[k]) / 1000, 2) for k in ("user", "system", "idle", "iowait", "softirq", "steal")}
    probe = _get_json(probe_port, f"/bench/probe?ticker={str(args.ticker).lower()}") if probe_port is not None else None
    _attribute(result, probe)
    if probe is not None:
        result["gateway_probe"] = probe["summary"]
    return result


def _variant(spec: str) -> tuple[str, dict]:
    """``LABEL[:OPTION=VALUE,...]``: options are ``gc`` (tuned|stock), ``gc_threshold`` (e.g. 700/10/10),
    ``switch_interval`` (seconds, sys.setswitchinterval), ``refresh_ahead`` (serving.cache's; 0: off), ``http`` (default: serving.server's; httptools or
    h11: uvicorn's own),
    ``log_level`` and any ServingSettings field (value as JSON)."""
    label, _, rest = spec.partition(":")
    options = {"gc": "tuned", "http": "default", "log_level": "warning", "gc_threshold": None, "switch_interval": None, "refresh_ahead": None, "settings": {}}
    for item in filter(None, rest.split(",")):
        name, _, value = item.partition("=")
        if name in ("gc", "http", "log_level"):
            options[name] = value
        elif name == "gc_threshold":
            options[name] = [int(x) for x in value.split("/")]
        elif name in ("switch_interval", "refresh_ahead"):
            options[name] = float(value)
        else:
            options["settings"][name] = json.loads(value)
    if options["gc"] == "stock":
        options["settings"]["gc_tuning"] = False
    return label, options


def _pinning(gateways: list[str]) -> dict[str, set[int]]:
    """Cores of its own for each process: the load generator one, the upstream two, each gateway two
    (its event loop, and the usage writer's thread and the kernel's network work beside it)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 3 + 2 * len(gateways):
        raise SystemExit(f"--pin needs {3 + 2 * len(gateways)} CPUs for {len(gateways)} gateway(s); this process may use {len(cpus)}")
    plan = {"load_generator": {cpus[0]}, "upstream": set(cpus[1:3])}
    for i, name in enumerate(gateways):
        plan[name] = set(cpus[3 + 2 * i : 5 + 2 * i])
    return plan


def _pin(procs: dict[str, subprocess.Popen], pinning: dict[str, set[int]]) -> None:
    for name, cpus in pinning.items():
        if name in procs:  # every thread: sched_setaffinity on a pid sets only its main thread
            for task in Path(f"/proc/{procs[name].pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), cpus)


def _start_gateway(tmp: str, upstream_port: int, options: dict, database_url: str | None) -> tuple[subprocess.Popen, int]:
    port = _port()
    folder = tempfile.mkdtemp(prefix="gw-", dir=tmp)
    src = GATEWAY % {
        "bench_dir": str(Path(__file__).resolve().parent), "tmp": folder, "db": database_url or f"sqlite:///{folder}/gw.db", "base": BASE,
        "upstream": f"http://127.0.0.1:{upstream_port}", "key": KEY, "log_level": options["log_level"], "port": port,
        "http": options["http"], "overrides": options["settings"], "gc_threshold": options["gc_threshold"],
        "switch_interval": options["switch_interval"], "refresh_ahead": options["refresh_ahead"],
    }
    return subprocess.Popen([sys.executable, "-c", src], cwd=ROOT, env=_child_env()), port


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of direct + each gateway variant; every round is reported")
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections per phase, opened before the clock starts")
    parser.add_argument("--slow-ms", type=float, default=10.0, help="a request slower than this is listed in an episode")
    parser.add_argument("--upstream", choices=["raw", "fake_vllm"], default="raw")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="LABEL[:OPT=VAL,...]",
        help="a gateway process to measure (several: each its own process, measured in turn in every round under the same "
        "load; the order rotates per round). OPT: gc=tuned|stock, http=httptools|h11 (uvicorn's own; default: serving.server's), log_level=..., or a ServingSettings "
        "field, e.g. 'before:gc=stock,http_keep_alive_s=5'. Default: one gateway as configured by default",
    )
    parser.add_argument(
        "--no-ticker", dest="ticker", action="store_false",
        help="no loop-stall ticker in the gateway (it wakes the loop 200 times a second; GC pauses are still recorded)",
    )
    parser.add_argument(
        "--pin", action="store_true",
        help="give each process cores of its own (sched_setaffinity): the load generator one, the upstream two, each gateway "
        "two; needs 3 + 2 x variants CPUs. Measures the gateway without the other processes on its cores",
    )
    parser.add_argument(
        "--request-ids", action="store_true",
        help="each request its own x-request-id: the gateway claims it and stores the answer (serving.idempotency), "
        "two database round trips a request; without it the gateway generates ids and claims nothing",
    )
    parser.add_argument(
        "--database-url", default=None,
        help="the gateways' database (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test: migrated to head, shared by "
        "the variants); default: a SQLite file per gateway",
    )
    parser.add_argument("--label", default="", help="what this run is for, kept in the JSON")
    parser.add_argument("--out")
    args = parser.parse_args()
    variants = dict(_variant(v) for v in (args.variant or ["gateway"]))
    pinning = _pinning(list(variants)) if args.pin else {}
    if pinning:
        os.sched_setaffinity(0, pinning["load_generator"])
    tmp = tempfile.mkdtemp(prefix="gw-bench-")
    up_port = _port()
    upstream_src = (RAW_UPSTREAM if args.upstream == "raw" else FAKE_VLLM_UPSTREAM) % {"base": BASE, "port": up_port, "keep_alive": 600}
    procs = {"upstream": subprocess.Popen([sys.executable, "-c", upstream_src], cwd=ROOT, env=_child_env())}
    ports = {}
    for label, options in variants.items():
        procs[label], ports[label] = _start_gateway(tmp, up_port, options, args.database_url)
    _pin(procs, pinning)
    rounds = []
    loadavg_start = os.getloadavg()
    try:
        _wait(up_port, "/v1/models")
        for port in ports.values():
            _wait(port, "/metrics")
        _pin(procs, pinning)  # again, for threads started before the first call
        for i in range(args.rounds):
            pids = {name: p.pid for name, p in procs.items()}
            direct = _phase(pids, up_port, {}, args, None)
            result = {"direct": direct}
            order = list(ports)[i % len(ports):] + list(ports)[: i % len(ports)]
            for label in order:
                port = ports[label]
                hist_before = _gateway_histogram(port)
                gateway = _phase(pids, port, {"authorization": f"Bearer {KEY}"}, args, port)
                hist_after = _gateway_histogram(port)
                gateway["internal_duration_le_s"] = {le: int(hist_after[le] - hist_before.get(le, 0)) for le in hist_after}
                for p in ("p50", "p90", "p99", "p999"):
                    gateway[f"added_{p}_ms"] = round(gateway[f"{p}_ms"] - direct[f"{p}_ms"], 2) if gateway[f"{p}_ms"] is not None and direct[f"{p}_ms"] is not None else None
                result[label] = gateway
                print(label, json.dumps({k: gateway[k] for k in ("added_p50_ms", "added_p99_ms", "errors")}), file=sys.stderr)
            result["order"] = order
            rounds.append(result)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(10)
    summary = {
        label: [
            {k: r[label][k] for k in ("added_p50_ms", "added_p99_ms", "added_p999_ms", "errors", "reopened", "resent")}
            | {"direct_errors": r["direct"]["errors"], "loadavg_1m": r[label]["loadavg_1m_before_after"]}
            for r in rounds
        ]
        for label in variants
    }
    result = {
        "bench": "gateway_overhead",
        "label": args.label,
        "request_ids": args.request_ids,
        "database": (args.database_url or "sqlite").split(":", 1)[0],
        "rate_rps": args.rate,
        "seconds": args.seconds,
        "connections": args.connections,
        "loop_stall_ticker": args.ticker,
        "upstream": args.upstream,
        "variants": variants,
        "summary": summary,
        "rounds": rounds,
        "machine": {
            "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in loadavg_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        },
        "pinning": {name: sorted(cpus) for name, cpus in pinning.items()},
        "setup": "upstream + gateway(s) + load generator as processes on one machine ("
        + ("each on cores of its own, see pinning" if pinning else "no pinning: they share the machine's cores")
        + "); SQLite; usage recorded per request",
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
