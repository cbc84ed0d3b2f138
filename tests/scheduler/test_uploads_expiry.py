"""The scheduler's tick expires pending uploads (files in parts) past their expiry and deletes their parts."""

from datetime import timedelta

import pytest

from scheduler.db import session_scope
from scheduler.loop import expire_uploads
from scheduler.models import Upload, UploadPart, utcnow
from scheduler.tenancy import get_or_create_org

pytestmark = pytest.mark.integration


def test_expired_pending_uploads_lose_their_parts_and_the_rest_is_untouched(tick_world):
    url, settings, store = tick_world
    now = utcnow()
    with session_scope(url) as session:
        org = get_or_create_org(session, "acme")
        for name, status, expires in (("old", "pending", now - timedelta(seconds=1)), ("live", "pending", now + timedelta(hours=1)),
                                      ("done", "completed", now - timedelta(hours=1))):
            session.add(Upload(id=f"upload_{name}", org_id=org.id, filename="f", purpose="fine-tune", mime_type="text/jsonl", bytes=2,
                               status=status, created_at=now, expires_at=expires))
            session.flush()
            key = f"orgs/{org.id}/uploads/upload_{name}/part_{name}"
            store.put_bytes(key, b"xy")
            session.add(UploadPart(id=f"part_{name}", upload_id=f"upload_{name}", bytes=2, storage_key=key))
    assert expire_uploads(settings) == 1
    assert expire_uploads(settings) == 0  # once
    with session_scope(url) as session:
        assert {u.id: u.status for u in session.query(Upload)} == {"upload_old": "expired", "upload_live": "pending", "upload_done": "completed"}
        org_id = session.query(Upload).first().org_id
    assert store.list(f"orgs/{org_id}/uploads/upload_old/") == []
    assert store.list(f"orgs/{org_id}/uploads/upload_live/") and store.list(f"orgs/{org_id}/uploads/upload_done/")


def test_an_upload_held_by_a_completion_is_not_expired_under_it(tick_world):
    """A completion holds its upload's row while it joins the parts (api.services.uploads): the tick skips
    that row instead of marking it expired over the completion about to commit."""
    from sqlalchemy import select

    url, settings, store = tick_world
    now = utcnow()
    with session_scope(url) as session:
        org = get_or_create_org(session, "acme")
        session.add(Upload(id="upload_busy", org_id=org.id, filename="f", purpose="fine-tune", mime_type="text/jsonl",
                           bytes=2, status="pending", created_at=now, expires_at=now - timedelta(seconds=1)))
    with session_scope(url) as completing:
        row = completing.scalars(select(Upload).where(Upload.id == "upload_busy").with_for_update()).one()
        assert expire_uploads(settings) == 0  # another connection: skipped, not waited for
        row.status = "completed"
    with session_scope(url) as session:
        assert session.get(Upload, "upload_busy").status == "completed"
    assert expire_uploads(settings) == 0
