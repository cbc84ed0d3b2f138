"""API test fixtures: the real app on real PostgreSQL (the rolled-back ``db_session`` replaces the
app's session), a LocalStore in ``tmp_path``, and the stock ``openai`` SDK as the client."""

from __future__ import annotations

import json
from typing import Callable

import openai
import pytest
from fastapi.testclient import TestClient

from api.deps import get_session
from api.main import create_app
from api.settings import ApiSettings

MAX_UPLOAD_BYTES = 64 * 1024
MAX_UPLOAD_PART_BYTES, MAX_CHUNKED_UPLOAD_BYTES = 4 * 1024, 256 * 1024


def chat_line(user: str = "Hi", assistant: str = "Hello.") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def jsonl(n: int = 10, **kw) -> bytes:
    return b"".join(json.dumps(chat_line(f"q{i}", f"a{i}")).encode() + b"\n" for i in range(n))


@pytest.fixture
def settings(tmp_path, pg_url) -> ApiSettings:
    return ApiSettings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        storage_url=str(tmp_path / "objects"),
        serving_url="http://127.0.0.1:9",  # discard port: nothing listens
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_upload_part_bytes=MAX_UPLOAD_PART_BYTES,
        max_chunked_upload_bytes=MAX_CHUNKED_UPLOAD_BYTES,
        base_models=["tuneforge-tiny", "meta-llama/Llama-3.2-1B"],
    )


@pytest.fixture
def app(settings, db_session):
    app = create_app(settings)

    def session_override():
        yield db_session

    app.dependency_overrides[get_session] = session_override
    return app


@pytest.fixture
def http(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture
def store(app):
    return app.state.store


@pytest.fixture
def sdk(http) -> Callable[[str], openai.OpenAI]:
    """sdk(api_key) -> an openai.OpenAI client talking to the app in-process."""

    def make(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)

    return make


@pytest.fixture
def org_a(make_org):
    return make_org("org-a")


@pytest.fixture
def client_a(sdk, org_a) -> openai.OpenAI:
    return sdk(org_a[1])


@pytest.fixture
def upload(client_a):
    """upload(content=jsonl(), client=client_a) -> the created file's id."""

    def make(content: bytes | None = None, client: openai.OpenAI | None = None, name: str = "train.jsonl") -> str:
        return (client or client_a).files.create(file=(name, content or jsonl()), purpose="fine-tune").id

    return make
