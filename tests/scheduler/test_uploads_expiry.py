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
