"""The inference pass-through against a real HTTP server standing in for the serving gateway: bodies,
streams, status codes, Authorization and the request id all arrive unchanged; an unreachable
gateway is a 503 in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from urllib.parse import quote

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from api.main import create_app


def _fake_gateway() -> FastAPI:
    gw = FastAPI()

    def seen(request: Request) -> dict:
        return {"authorization": request.headers.get("authorization"), "x-request-id": request.headers.get("x-request-id")}

    @gw.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body["model"] == "missing":
            return JSONResponse({"error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}, 404)
        if body.get("stream"):

            async def events():
                for i, word in enumerate(["Hel", "lo"]):
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                             "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None if i == 0 else "stop"}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.01)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {
            "id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(seen(request))}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }

    @gw.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        return {"object": "list", "model": body["model"], "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
                "usage": {"prompt_tokens": 4, "total_tokens": 4}}

    @gw.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "tuneforge-tiny", "object": "model", "created": 1, "owned_by": "tuneforge"}]}

    @gw.get("/v1/models/{model:path}")
    def model(model: str, request: Request):
        return {"id": model, "object": "model", "created": 1, "owned_by": "org", "raw_path": request.scope["raw_path"].decode()}

    @gw.api_route("/v1/adapters/{path:path}", methods=["POST", "DELETE"])
    def adapter_action(path: str, request: Request):
        return {"method": request.method, "path": path}

    return gw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway_url():
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_fake_gateway(), host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake gateway did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def proxied(settings, gateway_url):
    """An openai client whose inference calls go through the API to the fake gateway."""
    app = create_app(settings.model_copy(update={"serving_url": gateway_url}))
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="tf-any-key", http_client=http, max_retries=0), http


def test_chat_completion_passes_through_with_auth_and_request_id(proxied):
    client, _ = proxied
    raw = client.chat.completions.with_raw_response.create(
        model="tuneforge-tiny", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-request-id": "trace-7"}
    )
    completion = raw.parse()
    seen = json.loads(completion.choices[0].message.content)
    assert seen == {"authorization": "Bearer tf-any-key", "x-request-id": "trace-7"}
    assert raw.headers["x-request-id"] == "trace-7"
    assert completion.usage.total_tokens == 5


def test_streamed_completion_arrives_chunk_by_chunk(proxied):
    client, _ = proxied
    stream = client.chat.completions.create(model="tuneforge-tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == "Hello"


def test_gateway_status_codes_and_errors_are_kept(proxied):
    client, _ = proxied
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"


def test_models_are_listed_and_retrieved_through_the_gateway(proxied):
    client, _ = proxied
    assert [m.id for m in client.models.list()] == ["tuneforge-tiny"]
    assert client.models.retrieve("ft:tuneforge-tiny:acme:bot:ftjob-1").id == "ft:tuneforge-tiny:acme:bot:ftjob-1"


def test_unreachable_gateway_is_503_in_openai_shape(http):
    res = http.post("/v1/chat/completions", json={"model": "tuneforge-tiny", "messages": []}, headers={"Authorization": "Bearer tf-x"})
    assert res.status_code == 503
    assert res.json()["error"]["code"] == "service_unavailable" and res.headers["x-request-id"]


def test_adapter_registry_routes_go_to_the_gateway(proxied):
    _, http = proxied
    promoted = http.post("/v1/adapters/ft:tuneforge-tiny:acme:bot/promote", json={"model": "v2"}, headers={"Authorization": "Bearer tf-any-key"})
    assert promoted.json() == {"method": "POST", "path": "ft:tuneforge-tiny:acme:bot/promote"}
    deleted = http.delete("/v1/adapters/ft:tuneforge-tiny:acme:bot:ftjob-1", headers={"Authorization": "Bearer tf-any-key"})
    assert deleted.json() == {"method": "DELETE", "path": "ft:tuneforge-tiny:acme:bot:ftjob-1"}


def test_embeddings_go_to_the_gateway(proxied):
    client, _ = proxied
    out = client.embeddings.create(model="tuneforge-tiny", input="Hello there", encoding_format="float")
    assert out.data[0].embedding == [0.5, -0.25] and out.usage.prompt_tokens == 4


@pytest.mark.parametrize("name", ["org/model", "a?b", "a#b", "100%", "a b", "caf\u00e9"])
def test_model_names_reach_the_gateway_as_the_client_sent_them(proxied, name):
    # the path is forwarded still percent-encoded: rebuilt from the decoded one, "a?b" became a query
    _, http = proxied
    encoded = quote(name, safe="")
    res = http.get(f"/v1/models/{encoded}", headers={"Authorization": "Bearer tf-any-key"})
    assert res.status_code == 200 and res.json()["id"] == name
    assert res.json()["raw_path"] == f"/v1/models/{encoded}"


@pytest.mark.parametrize(("method", "path", "shown"), [
    ("GET", "/v1/models/%00", "\\x00"),
    ("GET", "/v1/models/%7F", "\\x7f"),
    ("GET", "/v1/models/ft:x%1B", "ft:x\\x1b"),
    ("GET", "/v1/models/%0A", "\\n"),  # the router's ``:path`` drops a trailing newline: it was "model ``"
    ("GET", "/v1/models/%09", "\\t"),
    ("DELETE", "/v1/models/%00", "\\x00"),
    ("POST", "/v1/adapters/%00/check", "\\x00/check"),
])
def test_a_name_with_a_control_character_is_a_404_naming_it(proxied, method, path, shown):
    """No model has such a name: a 404 in the gateway's words (the fake gateway would answer 200, so
    the request never left), never the 500 httpx's refusal of the URL made."""
    _, http = proxied
    res = http.request(method, path, headers={"Authorization": "Bearer tf-any-key"})
    assert res.status_code == 404, res.text
    error = res.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert f"`{shown}`" in error["message"]


def test_a_url_httpx_refuses_is_a_404_not_a_500(proxied, monkeypatch):
    _, http = proxied
    client = http.app.state.serving_client

    def refuse(*args, **kwargs):
        raise httpx.InvalidURL("URL too long")

    monkeypatch.setattr(client, "build_request", refuse)
    res = http.get("/v1/models/ft:x", headers={"Authorization": "Bearer tf-any-key"})
    assert res.status_code == 404 and res.json()["error"]["code"] == "model_not_found"
