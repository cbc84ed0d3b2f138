"""The app as a whole: request ids on every response, one error shape (a crash is a logged 500, never
a 4xx), metrics from live traffic and the database, and embedded start-up on SQLite."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from api.settings import ApiSettings
from scheduler.db import session_scope
from scheduler.jobs import mark_queued
from scheduler.models import ApiKey, Job


def test_request_id_is_echoed_or_generated_on_every_response(http, org_a):
    auth = {"Authorization": f"Bearer {org_a[1]}"}
    mine = http.get("/v1/files", headers={**auth, "x-request-id": "trace-123"})
    assert mine.headers["x-request-id"] == "trace-123"
    generated = http.get("/v1/files", headers=auth)
    assert generated.headers["x-request-id"].startswith("req_")
    assert http.get("/v1/files").headers["x-request-id"]  # 401
    assert http.get("/nowhere").headers["x-request-id"]  # 404
    unsafe = http.get("/v1/files", headers={**auth, "x-request-id": "a\tb"})
    assert unsafe.headers["x-request-id"] != "a\tb"


def test_unknown_route_and_method_answer_in_openai_shape(http):
    res = http.get("/v1/nowhere")
    assert res.status_code == 404 and set(res.json()["error"]) == {"message", "type", "param", "code"}
    assert http.put("/v1/files").status_code == 405


def test_bad_json_body_is_400_not_500(http, org_a):
    res = http.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {org_a[1]}", "content-type": "application/json"}, content=b"{oops")
    assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error"
    assert res.json()["error"]["param"] is None  # not pydantic's location, a character offset
    empty = http.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {org_a[1]}"})
    assert empty.status_code == 400 and empty.json()["error"]["message"] == "The request has no body: send a JSON object"


@pytest.mark.parametrize("body", [b"{oops", b"\xff", b'{"model": "\xff"}', b"\xff\xfe"])
def test_a_body_that_is_not_json_is_400_invalid_json_whichever_layer_noticed(http, org_a, body):
    # malformed JSON and bytes that are not even UTF-8 (FastAPI's "There was an error parsing the body",
    # code null) get one answer: a stable code a client can branch on, no param (nothing was read)
    res = http.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {org_a[1]}", "content-type": "application/json"},
                    content=body)
    assert res.status_code == 400, res.text
    assert res.json()["error"] == {"message": "We could not parse the JSON body of your request: send a JSON object, encoded as UTF-8.",
                                   "type": "invalid_request_error", "param": None, "code": "invalid_json"}


@pytest.mark.parametrize(("body", "content_type"), [(b"", "application/json"), (b"null", "application/json"), (b"[]", "application/json"),
                                                    (b'{"model": "m"}', "text/plain")])
def test_a_missing_or_non_object_body_is_named_never_a_none_parameter(http, org_a, body, content_type):
    res = http.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {org_a[1]}", "content-type": content_type}, content=body)
    error = res.json()["error"]
    assert res.status_code == 400 and error["param"] is None and error["code"] in ("missing_required_parameter", "invalid_value")
    assert "None" not in error["message"] and error["message"].startswith("The request")


@pytest.mark.parametrize("number", [b"NaN", b"Infinity"])
def test_nan_and_infinity_are_400_naming_the_field(http, org_a, number):
    # not JSON (the SDK refuses to send them), but Python's parser reads them, and a NaN passed every range
    # check: the learning rate computed from it failed the job spec's own validation (a 500)
    body = b'{"model": "tuneforge-tiny", "training_file": "file-x", "hyperparameters": {"learning_rate_multiplier": %s}}' % number
    res = http.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {org_a[1]}", "content-type": "application/json"}, content=body)
    assert res.status_code == 400, res.text
    assert res.json()["error"]["param"] == "hyperparameters.learning_rate_multiplier"
    assert "finite number" in res.json()["error"]["message"]
    missing = http.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {org_a[1]}"}, json={"model": "tuneforge-tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "training_file"


def test_unhandled_exception_is_a_logged_500_in_openai_shape(app, caplog):
    @app.get("/boom")
    def boom():
        raise RuntimeError("kaboom")

    with TestClient(app) as client, caplog.at_level(logging.ERROR, logger="api.request"):
        res = client.get("/boom", headers={"x-request-id": "boom-1"})
    assert res.status_code == 500
    assert res.json()["error"]["type"] == "server_error" and "kaboom" not in res.text  # no internals leak
    assert res.headers["x-request-id"] == "boom-1"
    assert any(r.exc_info and "kaboom" in str(r.exc_info[1]) for r in caplog.records)


def test_logs_are_json_lines_carrying_the_request_id(http, org_a, capsys):
    http.get("/v1/files", headers={"Authorization": f"Bearer {org_a[1]}", "x-request-id": "log-42"})
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("request_id") == "log-42"]
    assert access and access[-1]["status"] == 200 and access[-1]["route"] == "/v1/files"


def test_metrics_count_requests_by_route_and_read_jobs_from_the_database(http, client_a, upload, db_session):
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload())
    client_a.fine_tuning.jobs.retrieve(job.id)
    mark_queued(db_session, db_session.get(Job, job.id))
    db_session.get(Job, job.id).trained_tokens = 1234
    db_session.flush()
    text = http.get("/metrics").text
    assert 'tuneforge_api_http_requests_total{method="GET",route="/v1/fine_tuning/jobs/{job_id}",status="200"} 1.0' in text
    assert "tuneforge_api_http_request_duration_seconds_bucket" in text
    queued = db_session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued"))
    assert f'tuneforge_jobs{{status="queued"}} {float(queued)}' in text
    assert f'tuneforge_queue_depth{{queue="default"}} {float(queued)}' in text
    assert "tuneforge_trained_tokens_total" in text


def test_embedded_mode_creates_schema_and_bootstrap_key_once(tmp_path, sdk):
    key = "tf-embedded-bootstrap-key-0123456789"
    settings = ApiSettings(data_dir=tmp_path / "embedded", bootstrap_api_key=key, serving_url="http://127.0.0.1:9")
    assert settings.database_url.startswith("sqlite")
    for _ in range(2):  # a restart must not duplicate the key
        app = create_app(settings)
        with TestClient(app) as client:
            res = client.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"})
            assert res.status_code == 200 and res.json() == {"object": "list", "data": [], "has_more": False}
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(ApiKey)) == 1


def test_malformed_ids_and_names_are_4xx_never_500(http, org_a):
    # PostgreSQL refuses NUL bytes in text: such values must be turned away before any query.
    auth = {"Authorization": f"Bearer {org_a[1]}"}
    for path in ["/v1/files/a%00b", "/v1/files/a%00b/content", "/v1/fine_tuning/jobs/a%00b", "/v1/fine_tuning/jobs/a%00b/events"]:
        assert http.get(path, headers=auth).status_code == 404, path
    for path in ["/v1/fine_tuning/jobs?after=a%00b", "/v1/files?purpose=a%00b", "/v1/files?after=a%00b"]:
        res = http.get(path, headers=auth)
        assert res.status_code == 400 and res.json()["error"]["param"] in ("after", "purpose"), path
    bad_file = http.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tuneforge-tiny", "training_file": "file-a\x00b"})
    assert bad_file.status_code == 400 and bad_file.json()["error"]["param"] == "training_file"
    long_name = http.post("/v1/files", headers=auth, files={"purpose": (None, "fine-tune"), "file": ("x" * 300 + ".jsonl", b"{}")})
    assert long_name.status_code == 400 and long_name.json()["error"]["param"] == "file"


def test_control_characters_are_stripped_from_stored_file_names(http, org_a, db_session):
    from scheduler.models import File
    from tests.api.conftest import jsonl

    body = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="tr\x00ain\x07.jsonl"\r\n\r\n' + jsonl() + b"\r\n--b--\r\n"
    )
    headers = {"Authorization": f"Bearer {org_a[1]}", "content-type": "multipart/form-data; boundary=b"}
    res = http.post("/v1/files", headers=headers, content=body)
    assert res.status_code == 200 and res.json()["filename"] == "train.jsonl"
    assert db_session.get(File, res.json()["id"]).filename == "train.jsonl"


def test_naive_datetimes_from_sqlite_are_read_as_utc(monkeypatch):
    import time
    from datetime import datetime, timezone

    from api.schemas import unix_seconds

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        aware = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        assert unix_seconds(aware.replace(tzinfo=None)) == unix_seconds(aware) == 1767323045
    finally:
        monkeypatch.undo()
        time.tzset()
