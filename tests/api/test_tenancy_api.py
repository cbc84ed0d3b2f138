"""Tenancy at the edge: no key or a bad key is 401; a viewer cannot write; and on every route, another
org's id answers exactly like an id that never existed."""

from __future__ import annotations

import openai
import pytest
from sqlalchemy import func, select

from api.main import bootstrap
from scheduler.models import ApiKey, Checkpoint, Job, Role, utcnow
from scheduler.tenancy import DEFAULT_ORG, authenticate_key
from tests.api.conftest import jsonl

MISSING_FILE = "file-000000000000000000000000"
MISSING_JOB = "ftjob-000000000000000000000000"


@pytest.fixture
def resources_of_a(client_a, upload, org_a, db_session):
    """A file, a job with an event and a checkpoint, all owned by org A."""
    file_id = upload()
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id)
    db_session.add(Checkpoint(job_id=job.id, org_id=org_a[0].id, step=5, storage_key="k", metrics={}))
    db_session.flush()
    return file_id, job.id


def _routes(file_id: str, job_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/pause"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/resume"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
    ]


def _without_ids(body: dict, *ids: str) -> dict:
    message = body["error"]["message"]
    for i in ids:
        message = message.replace(i, "<id>")
    return {**body["error"], "message": message}


def test_other_orgs_ids_are_404_exactly_like_missing_ones(http, make_org, resources_of_a, store, db_session):
    file_id, job_id = resources_of_a
    _, key_b = make_org("org-b")
    auth_b = {"Authorization": f"Bearer {key_b}"}
    for (method, foreign), (_, missing) in zip(_routes(file_id, job_id), _routes(MISSING_FILE, MISSING_JOB), strict=True):
        got = http.request(method, foreign, headers=auth_b)
        expected = http.request(method, missing, headers=auth_b)
        assert got.status_code == expected.status_code == 404, (method, foreign)
        assert _without_ids(got.json(), file_id, job_id) == _without_ids(expected.json(), MISSING_FILE, MISSING_JOB)
    # Nothing of A's was touched by B's attempts.
    assert db_session.get(Job, job_id).status.value == "validating_files"
    assert store.get_bytes(f"orgs/{db_session.get(Job, job_id).org_id}/files/{file_id}") == jsonl()


def test_other_orgs_resources_are_invisible_in_lists_and_as_job_inputs(sdk, make_org, resources_of_a):
    file_id, job_id = resources_of_a
    client_b = sdk(make_org("org-b")[1])
    assert client_b.files.list().data == []
    assert client_b.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.BadRequestError) as foreign:
        client_b.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id)
    with pytest.raises(openai.BadRequestError) as missing:
        client_b.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=MISSING_FILE)
    assert _without_ids(foreign.value.response.json(), file_id) == _without_ids(missing.value.response.json(), MISSING_FILE)
    with pytest.raises(openai.BadRequestError):  # a cursor from another org is no cursor
        client_b.fine_tuning.jobs.list(after=job_id)


@pytest.mark.parametrize("header", [None, "Bearer tf-not-a-real-key-000000000000", "Bearer sk-other-vendor", "Basic abc", "Bearer "])
def test_missing_or_bad_key_is_401_on_every_route(http, resources_of_a, header):
    file_id, job_id = resources_of_a
    headers = {"Authorization": header} if header is not None else {}
    routes = _routes(file_id, job_id) + [("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs")]
    for method, path in routes:
        res = http.request(method, path, headers=headers)
        assert res.status_code == 401, (method, path)
        assert res.json()["error"]["code"] == "invalid_api_key" and res.headers["x-request-id"]


def test_revoked_key_is_401(sdk, org_a, db_session):
    row = db_session.scalar(select(ApiKey).where(ApiKey.org_id == org_a[0].id))
    row.revoked_at = utcnow()
    db_session.flush()
    with pytest.raises(openai.AuthenticationError):
        sdk(org_a[1]).files.list()


def test_viewer_reads_but_cannot_create_delete_or_cancel(sdk, make_org, org_a, resources_of_a, db_session):
    file_id, job_id = resources_of_a
    _, viewer_key = make_org(org_a[0].name, role=Role.viewer)  # same org, read-only key
    viewer = sdk(viewer_key)
    assert viewer.files.retrieve(file_id).id == file_id
    assert viewer.fine_tuning.jobs.retrieve(job_id).id == job_id
    assert [e.message for e in viewer.fine_tuning.jobs.list_events(job_id)]
    writes = [
        lambda: viewer.files.create(file=("t.jsonl", jsonl()), purpose="fine-tune"),
        lambda: viewer.files.delete(file_id),
        lambda: viewer.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id),
        lambda: viewer.fine_tuning.jobs.cancel(job_id),
        lambda: viewer.fine_tuning.jobs.pause(job_id),
        lambda: viewer.fine_tuning.jobs.resume(job_id),
        lambda: viewer.uploads.create(bytes=10, filename="t.jsonl", mime_type="text/jsonl", purpose="fine-tune"),
    ]
    for write in writes:
        with pytest.raises(openai.PermissionDeniedError) as err:
            write()
        assert err.value.body["type"] == "permission_error"
    assert db_session.scalar(select(func.count()).select_from(Job).where(Job.org_id == org_a[0].id)) == 1
    assert db_session.get(Job, job_id).status.value == "validating_files"


def test_bootstrap_key_is_idempotent(settings, db_session):
    key = "tf-bootstrap-key-for-tests-0123456789"
    settings = settings.model_copy(update={"bootstrap_api_key": key})
    bootstrap(db_session, settings)
    bootstrap(db_session, settings)
    principal = authenticate_key(db_session, key)
    assert principal is not None and principal.has(Role.admin)
    rows = db_session.scalars(select(ApiKey).where(ApiKey.org_id == principal.org_id)).all()
    assert len(rows) == 1 and rows[0].name == "bootstrap"
    assert db_session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.key_hash == rows[0].key_hash)) == 1
    from scheduler.models import Organization

    assert db_session.get(Organization, principal.org_id).name == DEFAULT_ORG


def test_bootstrap_tolerates_a_replica_that_created_the_key_first(settings, db_session, monkeypatch):
    from sqlalchemy.exc import IntegrityError

    import api.main

    key = "tf-bootstrap-race-key-0123456789"
    settings = settings.model_copy(update={"bootstrap_api_key": key})

    def lost_race(session, _key):
        raise IntegrityError("INSERT INTO api_keys", {}, Exception("duplicate key"))

    monkeypatch.setattr(api.main, "ensure_bootstrap_key", lost_race)
    with pytest.raises(IntegrityError):  # the key is still missing: a real error, not a race
        bootstrap(db_session, settings)
    monkeypatch.undo()
    bootstrap(db_session, settings)  # the "other replica"
    monkeypatch.setattr(api.main, "ensure_bootstrap_key", lost_race)
    bootstrap(db_session, settings)  # loses the race, finds the key: fine
    assert authenticate_key(db_session, key) is not None
