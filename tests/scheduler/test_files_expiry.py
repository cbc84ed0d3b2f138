"""The scheduler's tick deletes files past their ``expires_at`` (OpenAI's ``expires_after``): the row and the
object, but not while an unfinished job reads the file."""

from datetime import timedelta

import pytest

from scheduler.db import session_scope
from scheduler.loop import expire_files
from scheduler.models import File, Job, JobStatus, utcnow
from scheduler.tenancy import get_or_create_org

pytestmark = pytest.mark.integration


def test_expired_files_go_unless_an_unfinished_job_reads_them(tick_world):
    url, settings, store = tick_world
    now = utcnow()
    with session_scope(url) as session:
        org = get_or_create_org(session, "acme")
        for name, expires in (("old", now - timedelta(seconds=1)), ("used", now - timedelta(seconds=1)),
                              ("extra", now - timedelta(seconds=1)), ("live", now + timedelta(hours=1)), ("kept", None)):
            store.put_bytes(f"files/{name}", b"{}")
            session.add(File(id=f"file-{name}", org_id=org.id, filename=name, purpose="fine-tune", bytes=2, storage_key=f"files/{name}",
                             expires_at=expires))
        session.flush()
        spec = {"data": {"extra_training_files": [{"key": "files/extra", "weight": 1.0}]}}
        session.add(Job(org_id=org.id, model="m", training_file_id="file-used", seed=0, method={}, spec=spec, status=JobStatus.paused))
    assert expire_files(settings) == 1
    with session_scope(url) as session:
        assert sorted(f.id for f in session.query(File)) == ["file-extra", "file-kept", "file-live", "file-used"]
        session.query(Job).one().status = JobStatus.succeeded
    assert store.list("files/") == ["files/extra", "files/kept", "files/live", "files/used"]
    assert expire_files(settings) == 2  # the job finished: its expired files go too
    assert store.list("files/") == ["files/kept", "files/live"]
