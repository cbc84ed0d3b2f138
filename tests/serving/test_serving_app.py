"""The gateway at its edges: settings from the environment, unexpected failures answered as logged
OpenAI-shaped 500s with the request id, slow engines as 504s, non-JSON bodies and unknown routes in
the same error shape, and hub-style model ids with slashes."""

from __future__ import annotations

import contextlib
import json

import openai
import pytest
from pydantic import ValidationError

from scheduler.settings import BUILTIN_BASE_MODEL
from serving.database import Database
from serving.deps import get_database
from serving.settings import ServingSettings

MESSAGES = [{"role": "user", "content": "hi"}]


def test_engines_come_from_the_environment_as_json(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFORGE_ENGINES", json.dumps({"tuneforge-tiny": ["http://a:8100/", "http://b:8100", "http://a:8100"]}))
    monkeypatch.setenv("TUNEFORGE_ENGINE_READ_TIMEOUT_S", "42")

    settings = ServingSettings(data_dir=tmp_path)

    assert settings.engines == {"tuneforge-tiny": ["http://a:8100", "http://b:8100"]}
    assert settings.engine_read_timeout_s == 42


def test_engine_urls_must_be_http(tmp_path):
    with pytest.raises(ValidationError, match="must start with http"):
        ServingSettings(data_dir=tmp_path, engines={"m": ["127.0.0.1:8100"]})


def test_production_refuses_to_start_without_engines(tmp_path):
    production = dict(environment="production", data_dir=tmp_path, database_url="postgresql+psycopg://db/x", broker_url="redis://r")
    with pytest.raises(ValidationError, match="TUNEFORGE_ENGINES"):
        ServingSettings(**production)
    assert ServingSettings(**production, engines={"m": ["http://e:8100"]}).engines


@pytest.mark.integration
def test_an_unexpected_failure_is_a_logged_500_in_openai_shape(engines, gateway, caplog):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})

    @contextlib.contextmanager
    def broken_scope():
        raise RuntimeError("database on fire")
        yield

    gw.app.dependency_overrides[get_database] = lambda: Database(broken_scope)

    with caplog.at_level("ERROR"), gw.http() as http:
        response = http.get("/v1/models", headers={"Authorization": "Bearer tf-aaaaaaaaaaaaaaaaaaaaaaaa", "x-request-id": "boom-1"})

    assert response.status_code == 500
    assert response.headers["x-request-id"] == "boom-1"
    assert response.json() == {"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": None, "code": None}}
    assert "database on fire" not in response.text
    [record] = [r for r in caplog.records if r.name == "serving.middleware" and r.levelname == "ERROR"]
    assert json.loads(record.getMessage())["request_id"] == "boom-1"
    assert "database on fire" in record.getMessage()


@pytest.mark.integration
def test_an_engine_that_takes_too_long_is_504(engines, gateway, make_org, usage_rows):
    gw = gateway({BUILTIN_BASE_MODEL: [engines(token_delay_s=0.5).url]}, engine_read_timeout_s=0.3)
    org, key = make_org()

    with pytest.raises(openai.APIStatusError) as err:
        gw.client(key).chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=2)

    assert err.value.status_code == 504 and err.value.body["code"] == "engine_timeout"
    # it reached an engine: recorded with its status, no tokens billed
    assert [(r.status, r.prompt_tokens, r.completion_tokens) for r in usage_rows(org)] == [("engine_timeout", 0, 0)]


@pytest.mark.integration
def test_non_object_bodies_and_unknown_routes_keep_the_error_shape(engines, gateway, make_org):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    _, key = make_org()
    auth = {"Authorization": f"Bearer {key}"}

    with gw.http() as http:
        listed = http.post("/v1/chat/completions", content=b"[1, 2]", headers={**auth, "Content-Type": "application/json"})
        untyped = http.post("/v1/chat/completions", content=json.dumps({"model": BUILTIN_BASE_MODEL, "messages": MESSAGES}), headers=auth)
        unknown = http.get("/v1/nothing-here", headers=auth)

    assert listed.status_code == untyped.status_code == 400
    assert "JSON object" in listed.json()["error"]["message"]
    assert unknown.status_code == 404 and set(unknown.json()["error"]) == {"message", "type", "param", "code"}
    assert unknown.headers["x-request-id"]


@pytest.mark.integration
def test_hub_style_model_ids_with_slashes_are_served_and_retrievable(engines, gateway, make_org):
    hub_id = "acme/tiny-chat-v1"
    gw = gateway({hub_id: [engines(base=hub_id).url]}, base_models=[hub_id])
    _, key = make_org()
    client = gw.client(key)

    assert client.models.retrieve(hub_id).id == hub_id
    assert client.chat.completions.create(model=hub_id, messages=MESSAGES, max_tokens=1).choices[0].message.content == hub_id
