"""The gateway process's server options: idle keep-alive connections are kept as long as the settings
say (longer than clients keep theirs), and start-up objects are frozen out of the collector's scans."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from serving.server import server_config, tune_gc
from serving.settings import ServingSettings

REQUEST = b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"


async def _ok(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve(app, settings: ServingSettings) -> tuple[uvicorn.Server, threading.Thread, int]:
    """``app`` served with the gateway's server options on a loopback port: (server, thread, port)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = server_config(app, settings, host="127.0.0.1", port=0, log_level="warning")
    config.lifespan = "off"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    return server, thread, sock.getsockname()[1]


def _stop(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def serve_with_keep_alive(tmp_path):
    servers = []

    def start(keep_alive_s: int) -> int:
        server, thread, port = _serve(_ok, ServingSettings(data_dir=tmp_path, http_keep_alive_s=keep_alive_s))
        servers.append((server, thread))
        return port

    yield start
    for server, thread in servers:
        _stop(server, thread)


def _exchange(conn: socket.socket) -> bytes:
    conn.sendall(REQUEST)
    data = b""
    while not data.endswith(b"ok"):
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    return data


def test_idle_connection_is_kept_for_the_configured_time_then_closed(serve_with_keep_alive):
    port = serve_with_keep_alive(2)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        assert _exchange(conn).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)  # idle, but within the keep-alive time: the same connection still serves
        assert _exchange(conn).startswith(b"HTTP/1.1 200")
        time.sleep(3.0)  # idle past it: the server has closed the connection
        conn.settimeout(1)
        assert conn.recv(1) == b""


def test_default_keep_alive_outlasts_the_clients_idle_pool():
    # If the gateway closed idle connections first, a client (httpx, under the openai SDK) could send a
    # request on a connection the gateway is closing at that moment: a spurious connection error.
    client_idle_s = httpx.Limits().keepalive_expiry
    assert ServingSettings().http_keep_alive_s > client_idle_s
    assert ServingSettings().http_keep_alive_s > uvicorn.Config(_ok).timeout_keep_alive


def test_tune_gc_freezes_what_is_alive_at_start_up_and_collects_young_objects_less_often():
    survivor = [object() for _ in range(1000)]
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() >= len(survivor)
        assert not any(o is survivor for o in gc.get_objects(2))  # out of the full collection's scan
        assert gc.get_threshold()[0] > threshold[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class _RecordingTransport:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default


def test_writes_in_one_loop_step_leave_as_one_send_in_order():
    asyncio.run(_writes_in_one_loop_step())


async def _writes_in_one_loop_step():
    from serving.server import _CoalescingTransport

    real = _RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(memoryview(b"body"))
    assert real.writes == []  # not before the step ends
    await asyncio.sleep(0)
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    transport.write(b"next")
    await asyncio.sleep(0)
    transport.write(b"last")
    transport.close()  # what is pending goes out before the close
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"next", b"last"] and real.closed
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)


async def _stream(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(5):
        await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def test_streamed_and_plain_responses_arrive_whole_through_the_gateway_protocol(tmp_path):
    settings = ServingSettings(data_dir=tmp_path)
    for app, expected in ((_ok, "ok"), (_stream, "".join(f"data: {i}\n\n" for i in range(5)) + "data: [DONE]\n\n")):
        server, thread, port = _serve(app, settings)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                for _ in range(3):  # keep-alive: the same connection serves again
                    response = client.get("/")
                    assert response.status_code == 200 and response.text == expected
        finally:
            _stop(server, thread)
