"""/v1/files through the stock openai SDK: uploads are validated while streaming, bad uploads store
nothing (no row, no object), and stored files read back byte for byte."""

from __future__ import annotations

import json

import openai
import pytest
from sqlalchemy import func, select

from api.services import files as file_service
from api.multipart import Upload
from scheduler.models import File
from scheduler.tenancy import Principal
from tests.api.conftest import MAX_UPLOAD_BYTES, chat_line, jsonl


def _nothing_stored(db_session, store, org) -> bool:
    rows = db_session.scalar(select(func.count()).select_from(File).where(File.org_id == org.id))
    return rows == 0 and store.list(f"orgs/{org.id}/") == []


def test_upload_retrieve_download_delete_roundtrip(client_a, org_a, store, db_session):
    content = jsonl(12)
    created = client_a.files.create(file=("train.jsonl", content), purpose="fine-tune")
    assert (created.object, created.purpose, created.bytes, created.filename, created.status) == (
        "file", "fine-tune", len(content), "train.jsonl", "processed"
    )
    row = db_session.get(File, created.id)
    assert row.examples == 12 and row.storage_key == f"orgs/{org_a[0].id}/files/{created.id}"
    assert store.get_bytes(row.storage_key) == content

    assert client_a.files.retrieve(created.id) == created
    assert client_a.files.content(created.id).content == content

    deleted = client_a.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert _nothing_stored(db_session, store, org_a[0])
    with pytest.raises(openai.NotFoundError):
        client_a.files.retrieve(created.id)


def test_bad_lines_are_named_and_nothing_is_stored(client_a, org_a, store, db_session):
    lines = [json.dumps(chat_line()) for _ in range(10)]
    lines[2] = json.dumps({"messages": [{"role": "bot", "content": "x"}]})
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(openai.BadRequestError) as err:
        client_a.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    body = err.value.body
    assert body["param"] == "file" and body["code"] == "invalid_file"
    assert "line 3: unknown role 'bot'" in body["message"]
    assert "line 7: no assistant message" in body["message"]
    assert _nothing_stored(db_session, store, org_a[0])


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\xff\xfe garbage\n" + jsonl(10), "line 1: invalid UTF-8"),
        # a lone surrogate escape was a 500 (the duplicate check could not encode the line)
        (jsonl(10) + b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}\n',
         "line 11: invalid JSON string"),
        (jsonl(9), "at least 10 are required"),
        (b"", "empty"),
    ],
)
def test_invalid_content_is_refused(client_a, org_a, store, db_session, content, needle):
    with pytest.raises(openai.BadRequestError) as err:
        client_a.files.create(file=("f.jsonl", content), purpose="fine-tune")
    assert needle in err.value.body["message"]
    assert _nothing_stored(db_session, store, org_a[0])


@pytest.mark.parametrize("size", [MAX_UPLOAD_BYTES + 1, MAX_UPLOAD_BYTES + 2 * 1024 * 1024])
def test_oversized_upload_is_413_and_stores_nothing(client_a, org_a, store, db_session, size):
    # The first size is refused while streaming, the second from its Content-Length before reading.
    line = json.dumps(chat_line("x" * 200, "y" * 200)).encode() + b"\n"
    content = (line * (size // len(line) + 1))[:size]
    with pytest.raises(openai.APIStatusError) as err:
        client_a.files.create(file=("big.jsonl", content), purpose="fine-tune")
    assert err.value.status_code == 413
    assert err.value.body["code"] == "file_too_large" and err.value.body["param"] == "file"
    assert _nothing_stored(db_session, store, org_a[0])


def test_upload_at_exactly_the_limit_is_accepted(client_a):
    line = json.dumps(chat_line()).encode() + b"\n"
    n = MAX_UPLOAD_BYTES // len(line)
    content = line * n + b" " * (MAX_UPLOAD_BYTES - n * len(line))  # trailing blank line: ignored
    assert client_a.files.create(file=("f.jsonl", content), purpose="fine-tune").bytes == MAX_UPLOAD_BYTES


@pytest.mark.parametrize("purpose", ["assistants", "batch", "vision"])
def test_other_purposes_are_refused(client_a, org_a, store, db_session, purpose):
    with pytest.raises(openai.BadRequestError) as err:
        client_a.files.create(file=("f.jsonl", jsonl()), purpose=purpose)
    assert err.value.body["param"] == "purpose"
    assert _nothing_stored(db_session, store, org_a[0])


def test_malformed_requests_are_400_not_500(http, org_a):
    auth = {"Authorization": f"Bearer {org_a[1]}"}
    no_purpose = http.post("/v1/files", headers=auth, files={"file": ("f.jsonl", jsonl())})
    assert no_purpose.status_code == 400 and no_purpose.json()["error"]["param"] == "purpose"
    no_file = http.post("/v1/files", headers=auth, files={"purpose": (None, "fine-tune")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    not_multipart = http.post("/v1/files", headers=auth, json={"purpose": "fine-tune"})
    assert not_multipart.status_code == 400 and not_multipart.json()["error"]["code"] == "invalid_multipart"
    two_files = http.post(
        "/v1/files", headers=auth, data={"purpose": "fine-tune"}, files=[("file", ("a.jsonl", jsonl())), ("file", ("b.jsonl", jsonl()))]
    )
    assert two_files.status_code == 400


def test_client_path_in_filename_is_reduced_to_its_base_name(client_a):
    assert client_a.files.create(file=("../../etc/passwd.jsonl", jsonl()), purpose="fine-tune").filename == "passwd.jsonl"


def test_failed_row_insert_removes_the_object(db_session, org_a, store, tmp_path, monkeypatch):
    path = tmp_path / "upload.jsonl"
    path.write_bytes(jsonl())
    from gpu_worker.validation import validate_lines

    upload = Upload(path=path, fields={"purpose": "fine-tune"}, filename="t.jsonl", bytes=path.stat().st_size, report=validate_lines(path.open("rb")))
    principal = Principal(org_id=org_a[0].id, subject="test")

    def broken_commit():
        raise RuntimeError("database went away")

    monkeypatch.setattr(db_session, "commit", broken_commit)
    with pytest.raises(RuntimeError):
        file_service.create_file(db_session, store, principal, upload)
    monkeypatch.undo()
    assert _nothing_stored(db_session, store, org_a[0])


def test_list_filters_by_purpose_and_paginates_newest_first(client_a, upload, db_session, org_a):
    ids = [upload() for _ in range(5)]
    db_session.add(File(org_id=org_a[0].id, filename="x", purpose="assistants", bytes=1, storage_key="k", examples=0))
    db_session.flush()
    page = client_a.files.list(purpose="fine-tune", limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    assert [f.id for f in page] == ids[::-1]
    assert len(client_a.files.list().data) == 6
    assert [f.id for f in client_a.files.list(purpose="fine-tune", order="asc")] == ids


def test_file_used_by_an_unfinished_job_cannot_be_deleted(client_a, upload, store, db_session):
    from scheduler.jobs import mark_queued
    from scheduler.models import Job

    file_id = upload()
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id)
    with pytest.raises(openai.BadRequestError) as err:
        client_a.files.delete(file_id)
    assert err.value.body["code"] == "file_in_use"
    mark_queued(db_session, db_session.get(Job, job.id))
    client_a.fine_tuning.jobs.pause(job.id)  # a paused job reads its files again when resumed
    with pytest.raises(openai.BadRequestError):
        client_a.files.delete(file_id)
    assert client_a.files.content(file_id).content == jsonl()


def test_a_folder_result_downloads_as_a_tar_and_deleting_it_keeps_the_folder(client_a, org_a, store, db_session):
    """Result files such as a merged model are folders in the store: their content is a tar of the
    folder, streamed; deleting the file keeps the job's folder (serving may still use it)."""
    import io
    import tarfile

    prefix = f"orgs/{org_a[0].id}/jobs/ftjob-x/merged"
    files = {"config.json": b"{}", "model.safetensors": b"w" * 1500, "sub/tokenizer.json": b"t" * 7}
    for name, data in files.items():
        store.put_bytes(f"{prefix}/{name}", data)
    row = File(org_id=org_a[0].id, filename="merged.tar", purpose="fine-tune-results", bytes=1507, storage_key=prefix + "/", examples=0)
    db_session.add(row)
    db_session.flush()
    content = client_a.files.content(row.id).content
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == files
    client_a.files.delete(row.id)
    assert sorted(store.list(prefix + "/")) == sorted(f"{prefix}/{n}" for n in files)


def test_expires_after_sets_the_files_expiry_and_bad_values_store_nothing(client_a, org_a, store, db_session):
    created = client_a.files.create(file=("t.jsonl", jsonl()), purpose="fine-tune", expires_after={"anchor": "created_at", "seconds": 7200})
    assert created.expires_at == created.created_at + 7200
    assert client_a.files.retrieve(created.id).expires_at == created.expires_at
    plain = client_a.files.create(file=("t.jsonl", jsonl()), purpose="fine-tune")
    assert plain.expires_at is None
    for f in (created, plain):
        client_a.files.delete(f.id)
    for policy, param in (({"anchor": "last_active_at", "seconds": 7200}, "expires_after.anchor"),
                          ({"anchor": "created_at", "seconds": 60}, "expires_after.seconds"),
                          ({"anchor": "created_at", "seconds": 31 * 24 * 3600}, "expires_after.seconds")):
        with pytest.raises(openai.BadRequestError) as err:
            client_a.files.create(file=("t.jsonl", jsonl()), purpose="fine-tune", expires_after=policy)
        assert err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as err:
        client_a.files.create(file=("t.jsonl", jsonl()), purpose="fine-tune", extra_body={"colour": "blue"})
    assert err.value.body["param"] == "colour"  # an argument the API does not know is never ignored
    assert _nothing_stored(db_session, store, org_a[0])


@pytest.mark.parametrize("seconds", ["³⁶⁰⁰", "٣٦٠٠", "３６００", "+3600", " 3600", "3600.0", "9" * 1000])
def test_expires_after_seconds_is_ascii_digits_or_a_400_storing_nothing(http, org_a, store, db_session, seconds):
    # str.isdigit() passed superscripts (then int() raised: a 500) and int() read Arabic-Indic digits as
    # 3600; only what the SDK sends for a number, ASCII digits, is one
    res = http.post("/v1/files", headers={"Authorization": f"Bearer {org_a[1]}"},
                    data={"purpose": "fine-tune", "expires_after[anchor]": "created_at", "expires_after[seconds]": seconds},
                    files={"file": ("t.jsonl", jsonl())})
    assert res.status_code == 400, res.text
    assert res.json()["error"]["param"] == "expires_after.seconds" and res.json()["error"]["code"] == "invalid_value"
    assert _nothing_stored(db_session, store, org_a[0])
    ascii_digits = http.post("/v1/files", headers={"Authorization": f"Bearer {org_a[1]}"},
                             data={"purpose": "fine-tune", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
                             files={"file": ("t.jsonl", jsonl())})
    assert ascii_digits.json()["expires_at"] == ascii_digits.json()["created_at"] + 3600


def test_an_extra_training_file_of_an_unfinished_job_cannot_be_deleted(client_a, upload):
    train, extra = upload(), upload()
    client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=train,
                                     extra_body={"data": {"extra_training_files": [{"file": extra}]}})
    with pytest.raises(openai.BadRequestError) as err:
        client_a.files.delete(extra)
    assert err.value.body["code"] == "file_in_use"


def test_the_duplicate_report_is_on_the_file_object(client_a, upload, org_a, store):
    lines = [json.dumps(chat_line(f"q{i}", f"a{i}")) for i in range(10)]
    lines.append(lines[3])  # line 11 repeats line 4 exactly
    lines.append(json.dumps(chat_line("Q7!", "A7")))  # line 12: line 8 up to case and punctuation
    file_id = upload("\n".join(lines).encode())
    expected = {"exact": 1, "near": 1, "lines": [{"line": 11, "first_line": 4, "exact": True},
                                                 {"line": 12, "first_line": 8, "exact": False}]}
    assert client_a.files.retrieve(file_id).model_extra["duplicates"] == expected
    listed = next(f for f in client_a.files.list().data if f.id == file_id)
    assert listed.model_extra["duplicates"] == expected
    # a chunked upload keeps its report too
    done = client_a.uploads.upload_file_chunked(file="\n".join(lines).encode(), filename="t.jsonl", bytes=len("\n".join(lines)),
                                                mime_type="text/jsonl", purpose="fine-tune", part_size=1024)
    assert client_a.files.retrieve(done.file.id).model_extra["duplicates"] == expected


def test_the_duplicate_report_keeps_the_first_20_lines_and_counts_all(client_a, upload):
    line = json.dumps(chat_line())
    report = client_a.files.retrieve(upload("\n".join([line] * 30).encode())).model_extra["duplicates"]
    assert (report["exact"], report["near"], len(report["lines"])) == (29, 0, 20)
    assert [d["line"] for d in report["lines"]] == list(range(2, 22)) and {d["first_line"] for d in report["lines"]} == {1}


def test_a_file_without_a_kept_report_shows_null(client_a, upload, db_session):
    file_id = upload()
    db_session.get(File, file_id).duplicates = None  # stored before the report was kept
    db_session.flush()
    assert client_a.files.retrieve(file_id).model_extra["duplicates"] is None
