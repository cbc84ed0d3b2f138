"""Experiment: CPU per request of the gateway app driven in-process over ASGI (no client sockets) vs a bare
FastAPI route with the same body (PROFILE=tottime|cumulative: cProfile of the gateway instead)."""
import asyncio, json, os, socket, subprocess, sys, tempfile, time
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1])); sys.path.insert(0, str(HERE))
import gateway_overhead as go
from gateway_load import BODY
up_port = go._port()
up = subprocess.Popen([sys.executable, "-c", go.RAW_UPSTREAM % {"base": go.BASE, "port": up_port, "keep_alive": 600}], cwd=HERE.parents[1])
go._wait(up_port, "/v1/models")
from scheduler.migrate import upgrade
from scheduler.db import session_scope
from scheduler.tenancy import ensure_bootstrap_key
from serving.app import create_app
from serving.logs import configure_logging
from serving.settings import ServingSettings
tmp = tempfile.mkdtemp()
settings = ServingSettings(data_dir=tmp, database_url=f"sqlite:///{tmp}/gw.db", engines={go.BASE: [f"http://127.0.0.1:{up_port}"]}, base_models=[go.BASE])
upgrade(settings.database_url)
with session_scope(settings.database_url) as s:
    ensure_bootstrap_key(s, go.KEY)
configure_logging("warning")
app = create_app(settings)
from fastapi import FastAPI
from serving.protocol import ChatCompletionRequest
from starlette.responses import Response
bare = FastAPI()
@bare.post("/v1/chat/completions")
async def bare_route(body: ChatCompletionRequest) -> Response:
    return Response(b"{}", media_type="application/json")

def scope():
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"authorization", f"Bearer {go.KEY}".encode()),
                        (b"content-length", str(len(BODY)).encode())], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}

async def call(a):
    sent = []
    async def receive():
        return {"type": "http.request", "body": BODY, "more_body": False}
    async def send(m):
        sent.append(m)
    await a(scope(), receive, send)
    assert sent[0]["status"] == 200, sent

async def main():
    from contextlib import AsyncExitStack
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        if os.environ.get("PROFILE"):
            import cProfile, pstats
            for _ in range(300): await call(app)
            pr = cProfile.Profile(); pr.enable()
            for _ in range(2000): await call(app)
            pr.disable()
            pstats.Stats(pr).sort_stats(os.environ["PROFILE"]).print_stats(45)
            return
        for name, a in (("gateway", app), ("bare_fastapi", bare), ("gateway", app), ("bare_fastapi", bare)):
            for _ in range(300): await call(a)
            n = 3000
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(n): await call(a)
            print(name, "cpu us/request", round((time.process_time() - c0) / n * 1e6), "wall", round((time.perf_counter() - w0) / n * 1e6))
import uvloop
try:
    uvloop.run(main())
finally:
    up.terminate()
