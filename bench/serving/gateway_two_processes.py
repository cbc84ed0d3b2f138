"""Experiment: the same 500 rps load split round-robin over two gateway processes (each with its own caches,
journal and SQLite file) vs one, interleaved, 3 rounds; reuses the bench's pieces. Usage: python gateway_two_processes.py OUT.json"""
import asyncio, json, os, subprocess, sys, tempfile, time, gc
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1])); sys.path.insert(0, str(HERE))
import gateway_overhead as go
import gateway_load as gl

class Both:
    def __init__(self, pools):
        self.pools = pools; self.i = 0
    async def post(self):
        self.i += 1
        return await self.pools[self.i % len(self.pools)].post()

async def load(ports, rate, seconds, conns):
    pools = [gl.Pool(p, {"authorization": f"Bearer {go.KEY}"}) for p in ports]
    for p in pools: await p.fill(conns // len(pools))
    both = Both(pools)
    await gl._send_at_rate(both, rate, int(rate * gl.WARMUP_S), [], [], [])
    samples, errors, late = [], [], []
    gc.collect(); gc.disable()
    try:
        await gl._send_at_rate(both, rate, int(rate * seconds), samples, errors, late)
    finally:
        gc.enable()
    ms = sorted(s[1] for s in samples)
    return {"p50": gl._pct(ms, 50), "p99": gl._pct(ms, 99), "p999": gl._pct(ms, 99.9), "max": round(ms[-1], 2), "errors": len(errors),
            "reopened": sum(p.reopened for p in pools), "waited": sum(p.waited for p in pools)}

def main():
    tmp = tempfile.mkdtemp()
    up_port = go._port()
    procs = [subprocess.Popen([sys.executable, "-c", go.RAW_UPSTREAM % {"base": go.BASE, "port": up_port, "keep_alive": 600}], cwd=go.ROOT)]
    gws = []
    for _ in range(3):
        p, port = go._start_gateway(tmp, up_port, go._variant("g")[1]); procs.append(p); gws.append((p, port))
    out = {"rounds": [], "loadavg_start": os.getloadavg()}
    try:
        go._wait(up_port, "/v1/models")
        for _, port in gws: go._wait(port, "/metrics")
        for i in range(3):
            r = {"loadavg": os.getloadavg()[0]}
            d = gl.run_load(up_port, {}, 500, 10, connections=64)
            r["direct"] = {k: d[k] for k in ("p50_ms", "p99_ms", "p999_ms", "errors")}
            for name, ports in (("one", [gws[0][1]]), ("two", [gws[1][1], gws[2][1]])) if i % 2 == 0 else (("two", [gws[1][1], gws[2][1]]), ("one", [gws[0][1]])):
                c0 = {p.pid: go._cpu_s(p.pid) for p, _ in gws}
                res = asyncio.run(load(ports, 500, 10, 64))
                res["gateway_cpu_s"] = round(sum(go._cpu_s(p.pid) - c0[p.pid] for p, _ in gws), 2)
                res["added_p50"] = round(res["p50"] - d["p50_ms"], 2); res["added_p99"] = round(res["p99"] - d["p99_ms"], 2)
                r[name] = res
            r["loadavg_after"] = os.getloadavg()[0]
            out["rounds"].append(r)
            print(json.dumps(r), flush=True)
    finally:
        for p in procs: p.terminate()
        for p in procs: p.wait(10)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
main()
