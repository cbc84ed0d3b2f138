"""/v1/uploads through the stock openai SDK: a file sent in parts becomes one validated File, joined in
the order ``complete`` names; a join that fails any check stores nothing and leaves the upload pending;
cancelled and expired uploads take nothing more; another org's upload does not exist."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import openai
import pytest
from sqlalchemy import func, select

from scheduler.models import File, Upload
from tests.api.conftest import MAX_CHUNKED_UPLOAD_BYTES, MAX_UPLOAD_PART_BYTES, jsonl


def _create(client, content: bytes, **kwargs):
    return client.uploads.create(bytes=len(content), filename="big.jsonl", mime_type="text/jsonl", purpose="fine-tune", **kwargs)


def _parts(client, upload_id: str, content: bytes, size: int) -> list[str]:
    return [client.uploads.parts.create(upload_id, data=content[i:i + size]).id for i in range(0, len(content), size)]


def _files(db_session, org) -> int:
    return db_session.scalar(select(func.count()).select_from(File).where(File.org_id == org.id))


def test_parts_in_any_order_join_into_one_file_that_trains(client_a, org_a, store, db_session):
    content = jsonl(200)  # ~11 KB: several parts of at most MAX_UPLOAD_PART_BYTES
    upload = _create(client_a, content)
    assert (upload.object, upload.status, upload.bytes, upload.file) == ("upload", "pending", len(content), None)
    assert upload.expires_at - upload.created_at == 3600
    size = MAX_UPLOAD_PART_BYTES
    chunks = [content[i:i + size] for i in range(0, len(content), size)]
    ids = [client_a.uploads.parts.create(upload.id, data=c).id for c in reversed(chunks)][::-1]  # sent last part first
    done = client_a.uploads.complete(upload.id, part_ids=ids, md5=hashlib.md5(content).hexdigest())
    assert done.status == "completed" and done.file.bytes == len(content) and done.file.filename == "big.jsonl"
    assert client_a.files.content(done.file.id).content == content
    assert db_session.get(File, done.file.id).examples == 200
    assert store.list(f"orgs/{org_a[0].id}/uploads/") == []  # the parts are gone once joined
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=done.file.id)
    assert job.training_file == done.file.id
    with pytest.raises(openai.BadRequestError) as err:
        client_a.uploads.complete(upload.id, part_ids=ids)  # once only
    assert err.value.body["code"] == "invalid_upload_status"


def test_expires_after_is_the_files_expiry(client_a):
    content = jsonl(20)
    upload = _create(client_a, content, expires_after={"anchor": "created_at", "seconds": 86400})
    assert upload.expires_at - upload.created_at == 3600  # the upload itself: an hour, always
    done = client_a.uploads.complete(upload.id, part_ids=_parts(client_a, upload.id, content, MAX_UPLOAD_PART_BYTES))
    assert done.file.expires_at == done.file.created_at + 86400
    with pytest.raises(openai.BadRequestError) as err:
        _create(client_a, content, expires_after={"anchor": "created_at", "seconds": 10})
    assert err.value.body["param"] == "expires_after.seconds"


def test_the_sdks_chunked_helper(client_a):
    content = jsonl(30)
    done = client_a.uploads.upload_file_chunked(file=content, filename="t.jsonl", bytes=len(content), mime_type="text/jsonl",
                                                purpose="fine-tune", part_size=1000)
    assert done.status == "completed" and client_a.files.content(done.file.id).content == content


def test_a_join_that_fails_a_check_stores_nothing_and_stays_pending(client_a, org_a, db_session):
    content = jsonl(20)
    upload = _create(client_a, content)
    half = len(content) // 2
    first, second = (client_a.uploads.parts.create(upload.id, data=c).id for c in (content[:half], content[half:]))
    bad = {
        "part_ids": ([first], "part_ids"),  # too few bytes
        "duplicate": ([first, first], "part_ids"),
        "unknown": ([first, "part_nope"], "part_ids"),
        "md5": ([first, second], "md5"),
        "order": ([second, first], "file"),  # joined out of order: no longer JSON lines
    }
    for name, (ids, param) in bad.items():
        extra = {"md5": "0" * 32} if name == "md5" else {}
        with pytest.raises(openai.BadRequestError) as err:
            client_a.uploads.complete(upload.id, part_ids=ids, **extra)
        assert err.value.body["param"] == param, (name, err.value.body)
    assert _files(db_session, org_a[0]) == 0
    assert client_a.uploads.complete(upload.id, part_ids=[first, second]).status == "completed"  # still pending: fixable


def test_invalid_content_is_refused_at_completion_naming_the_line(client_a, org_a, db_session):
    content = jsonl(12) + b"{not json\n"
    upload = _create(client_a, content)
    ids = _parts(client_a, upload.id, content, MAX_UPLOAD_PART_BYTES)
    with pytest.raises(openai.BadRequestError) as err:
        client_a.uploads.complete(upload.id, part_ids=ids)
    assert "line 13" in err.value.body["message"] and err.value.body["code"] == "invalid_file"
    assert _files(db_session, org_a[0]) == 0


def test_limits_are_checked_before_storing(client_a, http, org_a):
    with pytest.raises(openai.BadRequestError) as err:
        client_a.uploads.create(bytes=0, filename="x.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    assert err.value.body["param"] == "bytes"  # a field named like one of pydantic's union tags
    with pytest.raises(openai.BadRequestError) as err:
        client_a.uploads.create(bytes=MAX_CHUNKED_UPLOAD_BYTES + 1, filename="x.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    assert err.value.body["param"] == "bytes"
    with pytest.raises(openai.BadRequestError) as err:
        client_a.uploads.create(bytes=10, filename="x.jsonl", mime_type="text/jsonl", purpose="assistants")
    assert err.value.body["param"] == "purpose"
    content = jsonl(200)
    upload = _create(client_a, content)
    with pytest.raises(openai.APIStatusError) as err:
        client_a.uploads.parts.create(upload.id, data=content[:MAX_UPLOAD_PART_BYTES + 1])
    assert err.value.status_code == 413 and err.value.body["param"] == "data"
    small = _create(client_a, b"0123456789")
    with pytest.raises(openai.BadRequestError):
        client_a.uploads.parts.create(small.id, data=b"0123456789A")  # more than the upload declared
    no_data = http.post(f"/v1/uploads/{small.id}/parts", files={"other": ("x", b"12")}, headers={"Authorization": f"Bearer {org_a[1]}"})
    assert no_data.status_code == 400


@pytest.mark.parametrize("mime_type", ["text/jsonl\x00", "jsonl", "text/ jsonl", "text/jsonl; charset=\x00"])
def test_a_mime_type_that_is_not_one_is_400_and_stores_nothing(client_a, org_a, db_session, mime_type):
    # PostgreSQL refuses NUL characters in text: such a value was a failed insert (500) before
    with pytest.raises(openai.BadRequestError) as err:
        client_a.uploads.create(bytes=10, filename="x.jsonl", mime_type=mime_type, purpose="fine-tune")
    assert err.value.body["param"] == "mime_type"
    assert db_session.scalar(select(func.count()).select_from(Upload).where(Upload.org_id == org_a[0].id)) == 0
    assert client_a.uploads.create(bytes=10, filename="x.jsonl", mime_type="application/jsonl; charset=utf-8",
                                   purpose="fine-tune").status == "pending"


def test_cancelled_and_expired_uploads_take_nothing(client_a, org_a, store, db_session):
    content = jsonl(20)
    cancelled = _create(client_a, content)
    _parts(client_a, cancelled.id, content, MAX_UPLOAD_PART_BYTES)
    assert client_a.uploads.cancel(cancelled.id).status == "cancelled"
    assert store.list(f"orgs/{org_a[0].id}/uploads/{cancelled.id}/") == []
    with pytest.raises(openai.BadRequestError) as err:
        client_a.uploads.parts.create(cancelled.id, data=b"x")
    assert err.value.body["code"] == "invalid_upload_status"

    expiring = _create(client_a, content)
    ids = _parts(client_a, expiring.id, content, MAX_UPLOAD_PART_BYTES)
    row = db_session.get(Upload, expiring.id)
    row.expires_at -= timedelta(hours=2)
    db_session.commit()
    with pytest.raises(openai.BadRequestError) as err:
        client_a.uploads.complete(expiring.id, part_ids=ids)
    assert err.value.body["code"] == "upload_expired"
    assert _files(db_session, org_a[0]) == 0  # the scheduler's tick drops its parts: tests/scheduler/test_uploads_expiry.py


def test_another_orgs_upload_does_not_exist(client_a, sdk, make_org):
    upload = _create(client_a, b"0123456789")
    _, other_key = make_org("org-b")
    other = sdk(other_key)
    for call in (lambda: other.uploads.parts.create(upload.id, data=b"01"), lambda: other.uploads.cancel(upload.id),
                 lambda: other.uploads.complete(upload.id, part_ids=["part_x"])):
        with pytest.raises(openai.NotFoundError):
            call()


# Concurrency: real commits across connections (not the rolled-back db_session), on PostgreSQL and on SQLite.

@pytest.fixture(params=["postgresql", "sqlite"])
def committing_api(request, scratch_database, tmp_path):
    """(TestClient on an app whose sessions really commit, its settings, an api key of a fresh org)."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from api.settings import ApiSettings
    from scheduler.db import get_engine, session_scope
    from scheduler.migrate import upgrade
    from scheduler.models import Role
    from scheduler.tenancy import create_api_key, get_or_create_org

    url = scratch_database("uploads") if request.param == "postgresql" else f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    with session_scope(url) as session:
        _, key = create_api_key(session, get_or_create_org(session, "racers"), "test", Role.admin)
    settings = ApiSettings(data_dir=tmp_path / "data", database_url=url, storage_url=str(tmp_path / "objects"),
                           serving_url="http://127.0.0.1:9", max_upload_part_bytes=MAX_UPLOAD_PART_BYTES,
                           max_chunked_upload_bytes=MAX_CHUNKED_UPLOAD_BYTES, base_models=["tuneforge-tiny"])
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {key}"}) as client:
        yield client, app
    get_engine(url).dispose()


def _race(n: int, call) -> list:
    """call() from n threads released together: their responses."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    barrier = Barrier(n)

    def go(_):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def _slowed(monkeypatch, store, name: str) -> None:
    """The store's ``name`` method made slow, each call slower than the one before, so that racing
    requests overlap and the first to arrive is done while the others are still at work."""
    import itertools
    import time

    real, calls = getattr(store, name), itertools.count(1)

    def slow(*args, **kwargs):
        time.sleep(0.02 * min(next(calls), 10))
        return real(*args, **kwargs)

    monkeypatch.setattr(store, name, slow)


def _create_raw(client, content_bytes: int) -> str:
    r = client.post("/v1/uploads", json={"bytes": content_bytes, "filename": "big.jsonl", "mime_type": "text/jsonl",
                                         "purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_concurrent_completes_one_wins_the_rest_are_told_it_is_not_pending(committing_api, monkeypatch):
    from scheduler.db import session_scope

    client, app = committing_api
    _slowed(monkeypatch, app.state.store, "open")  # the winner still joins while the losers arrive
    for _ in range(3):
        content = jsonl(40)
        upload_id = _create_raw(client, len(content))
        half = len(content) // 2
        ids = [client.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("p", c)}).json()["id"]
               for c in (content[:half], content[half:])]
        answers = _race(4, lambda: client.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": ids}))
        assert sorted(r.status_code for r in answers) == [200, 400, 400, 400], [r.text for r in answers]
        assert all(r.json()["error"]["code"] == "invalid_upload_status" for r in answers if r.status_code == 400)
        with session_scope(app.state.settings.database_url) as session:
            row = session.get(Upload, upload_id)
            assert row.status == "completed" and session.get(File, row.file_id) is not None
        winner = next(r for r in answers if r.status_code == 200).json()
        assert client.get(f"/v1/files/{winner['file']['id']}/content").content == content
        keys = app.state.store.list("orgs/")
        assert [k for k in keys if "/uploads/" in k] == []  # the parts are gone; no File object without its row:
        files = [k for k in keys if "/files/" in k]
        with session_scope(app.state.settings.database_url) as session:
            assert len(files) == session.scalar(select(func.count()).select_from(File))


def test_concurrent_parts_never_exceed_the_declared_bytes(committing_api, monkeypatch):
    from scheduler.db import session_scope
    from scheduler.models import UploadPart

    client, app = committing_api
    _slowed(monkeypatch, app.state.store, "put_file")  # a wide window between a part's check and its insert
    for _ in range(3):
        upload_id = _create_raw(client, 100)
        answers = _race(4, lambda: client.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("p", b"x" * 60)}))
        assert sorted(r.status_code for r in answers) == [200, 400, 400, 400], [r.text for r in answers]
        with session_scope(app.state.settings.database_url) as session:
            held = session.scalar(select(func.coalesce(func.sum(UploadPart.bytes), 0)).where(UploadPart.upload_id == upload_id))
        assert held == 60
        stored = [k for k in app.state.store.list("orgs/") if f"/uploads/{upload_id}/" in k]
        assert len(stored) == 1  # a refused part's object is removed
