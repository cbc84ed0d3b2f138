"""OpenAI's Uploads: a file too large for one request, sent in parts and joined into a File.

``create`` declares the file (name, purpose, total bytes); ``add_part`` stores each part (at most
``max_upload_part_bytes``; parts may arrive in parallel, in any order) as an object under the upload;
``complete`` names the parts in their order, and the parts are joined in that order, streamed through
the same line-by-line validation as a ``/v1/files`` upload (and an optional MD5), and stored as one
File. All or nothing: a join that fails any check stores nothing and the upload stays pending, so the
client can complete it again with the right parts. ``cancel`` drops the parts.

Concurrency: ``add_part``, ``complete`` and ``cancel`` lock the upload's row (``SELECT ... FOR UPDATE``)
and re-read its status under the lock, so on PostgreSQL one request at a time changes an upload: the
parts' sum is checked in the transaction that inserts the part, and a second ``complete`` waits for the
first to commit, then answers that the upload is no longer pending. SQLite ignores FOR UPDATE: there a
part takes the database's write lock before its check, and a ``complete`` that finds a part already
deleted (another completion won) answers the same 400; the File is written only by the completion that
wins.

``expires_after`` is the File's expiry (api.services.files), as in OpenAI's API. An upload expires an hour
after its creation: a pending one then refuses parts and completion, and the scheduler's tick marks it
expired and deletes its parts (``scheduler.loop.expire_uploads``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.errors import InvalidRequest, NotFound
from api.multipart import LineValidator, Upload as Received, clean_filename
from api.schemas import UploadComplete, UploadCreate, UploadObject, UploadPartObject, unix_seconds
from api.services import files
from api.services.scoping import owned
from api.settings import ApiSettings
from gpu_worker.storage import ObjectNotFound, ObjectStore, delete_orphans
from scheduler.models import File, Upload, UploadPart, new_id, utcnow
from scheduler.tenancy import Principal

log = logging.getLogger("api.uploads")

LIFETIME = timedelta(hours=1)  # OpenAI's
_CHUNK = 1 << 20


def part_key(org_id: str, upload_id: str, part_id: str) -> str:
    return f"orgs/{org_id}/uploads/{upload_id}/{part_id}"


def to_public(row: Upload, file: File | None = None) -> UploadObject:
    return UploadObject(
        id=row.id,
        bytes=row.bytes,
        created_at=unix_seconds(row.created_at),
        expires_at=unix_seconds(row.expires_at),
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
        file=files.to_public(file) if file is not None else None,
    )


def create_upload(session: Session, settings: ApiSettings, principal: Principal, body: UploadCreate) -> UploadObject:
    if body.purpose not in files.PURPOSES:
        raise InvalidRequest(f"Invalid purpose {body.purpose!r}: only {', '.join(sorted(files.PURPOSES))} is supported.",
                             param="purpose", code="invalid_value")
    if body.bytes > settings.max_chunked_upload_bytes:
        raise InvalidRequest(f"An upload holds at most {settings.max_chunked_upload_bytes} bytes; this one declares {body.bytes}.",
                             param="bytes", code="file_too_large")
    now = utcnow()
    file_lifetime = files.expires_after(body.expires_after.anchor, body.expires_after.seconds) if body.expires_after else None
    row = Upload(id=new_id("upload_"), org_id=principal.org_id, filename=clean_filename(body.filename.encode(), "filename"),
                 purpose=body.purpose, mime_type=body.mime_type, bytes=body.bytes, status="pending", created_at=now,
                 expires_at=now + LIFETIME, file_expires_after=int(file_lifetime.total_seconds()) if file_lifetime else None)
    session.add(row)
    session.commit()
    return to_public(row)


def pending_upload(session: Session, principal: Principal, upload_id: str, lock: bool = False) -> Upload:
    """The caller's upload, if it still takes parts and completion: otherwise a 404 or a 400 saying why.
    ``lock``: its row locked until the transaction ends (PostgreSQL; SQLite ignores it), its status read
    after any other holder committed."""
    row = owned(session, Upload, upload_id, principal)
    if row is not None and lock:
        session.refresh(row, with_for_update=True)  # waits for a concurrent add_part/complete/cancel, then re-reads
    if row is None:
        raise NotFound(f"No such Upload object: {upload_id}", param="upload_id", code="upload_not_found")
    if row.status == "pending" and row.expires_at <= utcnow():
        raise InvalidRequest(f"Upload {upload_id} expired at {row.expires_at.isoformat()}.", param="upload_id", code="upload_expired")
    if row.status != "pending":
        raise InvalidRequest(f"Upload {upload_id} is {row.status}: it takes no more parts.", param="upload_id",
                             code="invalid_upload_status")
    return row


def add_part(session: Session, store: ObjectStore, principal: Principal, upload_id: str, received: Received) -> UploadPartObject:
    row = pending_upload(session, principal, upload_id)
    if not received.received:
        raise InvalidRequest("Missing required parameter: 'data'.", param="data", code="missing_required_parameter")
    if received.bytes == 0:
        raise InvalidRequest("The part is empty.", param="data", code="invalid_value")
    _check_room(session, row, received.bytes)  # early refusal, before storing; decided again under the lock
    session.commit()  # no transaction stays open while the part is stored
    part = UploadPart(id=new_id("part_"), upload_id=row.id, bytes=received.bytes, created_at=utcnow())
    part.storage_key = part_key(principal.org_id, row.id, part.id)
    store.put_file(part.storage_key, received.path)
    try:
        row = _lock_for_write(session, principal, upload_id)
        _check_room(session, row, received.bytes)  # the sum read in the transaction that inserts the part
        session.add(part)
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(part.storage_key)
        raise
    return UploadPartObject(id=part.id, created_at=unix_seconds(part.created_at), upload_id=row.id)


def _check_room(session: Session, row: Upload, size: int) -> None:
    held = session.scalar(select(func.coalesce(func.sum(UploadPart.bytes), 0)).where(UploadPart.upload_id == row.id))
    if held + size > row.bytes:
        raise InvalidRequest(f"With this part the upload would hold {held + size} bytes; it declared {row.bytes}.",
                             param="data", code="invalid_value")


def _lock_for_write(session: Session, principal: Principal, upload_id: str) -> Upload:
    """The pending upload, locked for a short check-then-write: its row on PostgreSQL; on SQLite, which
    ignores FOR UPDATE, the database's write lock, taken by a no-op write before anything is read."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Upload).where(Upload.id == upload_id, Upload.org_id == principal.org_id)
                        .values(status=Upload.status).execution_options(synchronize_session=False))
    return pending_upload(session, principal, upload_id, lock=True)


def complete_upload(session: Session, store: ObjectStore, principal: Principal, upload_id: str, body: UploadComplete) -> UploadObject:
    # the row stays locked (PostgreSQL) until the File's transaction commits or this fails: a concurrent
    # complete or cancel waits, then finds the upload no longer pending, instead of losing the parts mid-join
    row = pending_upload(session, principal, upload_id, lock=True)
    try:
        return _complete_locked(session, store, principal, row, body)
    except BaseException:
        session.rollback()  # releases the lock
        raise


def _complete_locked(session: Session, store: ObjectStore, principal: Principal, row: Upload, body: UploadComplete) -> UploadObject:
    upload_id = row.id
    if len(set(body.part_ids)) != len(body.part_ids):
        raise InvalidRequest("A part is named twice in part_ids.", param="part_ids", code="invalid_value")
    found = {p.id: p for p in session.scalars(select(UploadPart).where(UploadPart.upload_id == row.id, UploadPart.id.in_(body.part_ids)))}
    unknown = [p for p in body.part_ids if p not in found]
    if unknown:
        raise InvalidRequest(f"No part {unknown[0]!r} in upload {upload_id}.", param="part_ids", code="invalid_value")
    parts = [found[p] for p in body.part_ids]
    total = sum(p.bytes for p in parts)
    if total != row.bytes:
        raise InvalidRequest(f"The parts hold {total} bytes; the upload declared {row.bytes}.", param="part_ids", code="invalid_value")
    fd, tmp = tempfile.mkstemp(prefix="tuneforge-upload-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as out:
            lines, md5 = LineValidator(), hashlib.md5(usedforsecurity=False)
            try:
                for part in parts:
                    with store.open(part.storage_key) as body_in:
                        while chunk := body_in.read(_CHUNK):
                            out.write(chunk)
                            lines.feed(chunk)
                            md5.update(chunk)
            except ObjectNotFound:
                # deleted by a completion, cancellation or expiry that committed meanwhile (SQLite, where
                # nothing waited for it): re-read and answer that the upload is not pending. A part
                # missing from a still-pending upload is lost data, left a server error.
                session.rollback()
                pending_upload(session, principal, upload_id)
                raise
        if body.md5 is not None and md5.hexdigest() != body.md5.lower():
            raise InvalidRequest(f"The parts' MD5 is {md5.hexdigest()}, not {body.md5}.", param="md5", code="invalid_value")
        joined = Received(path=Path(tmp), fields={"purpose": row.purpose}, filename=row.filename, bytes=total, received=True,
                          report=lines.finish())

        def completed(file: File) -> None:  # in the File's transaction: one completion wins
            won = session.execute(update(Upload).where(Upload.id == row.id, Upload.status == "pending")
                                  .values(status="completed", file_id=file.id).execution_options(synchronize_session=False)).rowcount
            if won != 1:
                raise InvalidRequest(f"Upload {upload_id} was completed or cancelled meanwhile.", param="upload_id",
                                     code="invalid_upload_status")

        lifetime = timedelta(seconds=row.file_expires_after) if row.file_expires_after else None
        file = files.store_file(session, store, principal, joined, then=completed, lifetime=lifetime)
    finally:
        Path(tmp).unlink(missing_ok=True)
    session.refresh(row)
    delete_orphans(store, [p.storage_key for p in parts], "an upload part")
    log.info("upload completed", extra={"upload_id": row.id, "file_id": file.id, "parts": len(parts), "bytes": total})
    return to_public(row, file)


def cancel_upload(session: Session, store: ObjectStore, principal: Principal, upload_id: str) -> UploadObject:
    row = pending_upload(session, principal, upload_id, lock=True)  # after an in-flight complete: 400
    row.status = "cancelled"
    session.commit()
    delete_orphans(store, session.scalars(select(UploadPart.storage_key).where(UploadPart.upload_id == row.id)).all(), "an upload part")
    return to_public(row)
