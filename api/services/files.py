"""Files: storing validated uploads, listing, reading and deleting them, always within the caller's org.

An upload is all or nothing: it is stored only after it validated completely; the object is written
before the row (a row always points at an object) and removed again if the row cannot be written. A file
created with OpenAI's ``expires_after`` gets an ``expires_at``; the scheduler deletes it then, once no
unfinished job uses it (``scheduler.loop.expire_files``).
"""

from __future__ import annotations

import logging
import tarfile
from datetime import timedelta
from typing import Iterator

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.errors import InvalidRequest, NotFound
from api.schemas import FileDeleted, FileObject, FilesPublic, unix_seconds
from api.services.scoping import owned
from api.multipart import Upload
from gpu_worker.storage import ObjectNotFound, ObjectStore, delete_orphans
from gpu_worker.validation import ValidationReport
from scheduler.jobs import job_using_file
from scheduler.models import File, new_id, utcnow
from scheduler.tenancy import Principal

log = logging.getLogger("api.files")

PURPOSES = frozenset({"fine-tune"})  # the only purpose the platform has a use for yet
_CHUNK = 1 << 16
EXPIRES_AFTER_SECONDS = (3600, 30 * 24 * 3600)  # OpenAI's range: an hour to 30 days
_ANCHOR, _SECONDS = "expires_after[anchor]", "expires_after[seconds]"  # the SDK's multipart fields
_FIELDS = frozenset({"purpose", _ANCHOR, _SECONDS})


def storage_key(org_id: str, file_id: str) -> str:
    return f"orgs/{org_id}/files/{file_id}"


def to_public(row: File) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=unix_seconds(row.created_at),
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
        expires_at=unix_seconds(row.expires_at),
        duplicates=row.duplicates,
    )


def duplicate_report(report: ValidationReport) -> dict:
    """The validation report's duplicates as stored with the file (and shown as ``FileDuplicates``)."""
    lines = [d.model_dump() for d in report.duplicate_lines]
    return {"exact": report.duplicates, "near": report.near_duplicates, "lines": lines}


def expires_after(anchor: str | None, seconds) -> timedelta | None:
    """OpenAI's ``expires_after`` (``anchor`` must be ``created_at``), or None when not given."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("Invalid value for 'expires_after.anchor': only 'created_at' is supported.", param="expires_after.anchor",
                             code="invalid_value")
    low, high = EXPIRES_AFTER_SECONDS
    # ASCII digits only: str.isdigit() also passes superscripts ("³⁶⁰⁰", which int() then refuses: a 500)
    # and int() reads other scripts' digits ("٣٦٠٠" as 3600), neither of which a client means as a number.
    # The length cap keeps int() below Python's 4300-digit limit, past which it raises too.
    well_formed = (isinstance(seconds, int) and not isinstance(seconds, bool)) or (
        isinstance(seconds, str) and seconds.isascii() and seconds.isdecimal() and len(seconds) <= 18
    )
    if not well_formed or not low <= int(seconds) <= high:
        raise InvalidRequest(f"Invalid value for 'expires_after.seconds': a whole number of seconds from {low} to {high}.",
                             param="expires_after.seconds", code="invalid_value")
    return timedelta(seconds=int(seconds))


def _check_upload(upload: Upload) -> None:
    unknown = sorted(set(upload.fields) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0], code="invalid_value")
    expires_after(upload.fields.get(_ANCHOR), upload.fields.get(_SECONDS))
    purpose = upload.fields.get("purpose")
    if not purpose:
        raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter")
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose {purpose!r}: only {', '.join(sorted(PURPOSES))} is supported.", param="purpose", code="invalid_value"
        )
    if upload.report is None:
        raise InvalidRequest("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
    if upload.bytes == 0:
        raise InvalidRequest("The file is empty.", param="file", code="invalid_file")
    if not upload.report.ok:
        raise InvalidRequest(f"Invalid fine-tuning file: {upload.report.message}", param="file", code="invalid_file")


def create_file(session: Session, store: ObjectStore, principal: Principal, upload: Upload) -> FileObject:
    return to_public(store_file(session, store, principal, upload))


def store_file(session: Session, store: ObjectStore, principal: Principal, upload: Upload, then=None,
               lifetime: timedelta | None = None) -> File:
    """A validated upload stored as a File: the object first, then the row, committed with whatever
    ``then(row)`` adds to the transaction (an Upload's completion); on any failure the object is removed.
    ``lifetime``: the file's ``expires_after`` when it does not come with the upload's fields."""
    _check_upload(upload)
    lifetime = lifetime or expires_after(upload.fields.get(_ANCHOR), upload.fields.get(_SECONDS))
    now = utcnow()
    file_id = new_id("file-")
    key = storage_key(principal.org_id, file_id)
    store.put_file(key, upload.path)
    try:
        row = File(
            id=file_id,
            org_id=principal.org_id,
            filename=upload.filename or "upload.jsonl",
            purpose=upload.fields["purpose"],
            bytes=upload.bytes,
            storage_key=key,
            examples=upload.report.examples,
            format=upload.report.format,
            duplicates=duplicate_report(upload.report),
            status="processed",
            created_at=now,
            expires_at=now + lifetime if lifetime else None,
        )
        session.add(row)
        session.flush()
        if then is not None:
            then(row)
        session.commit()
    except BaseException:
        session.rollback()
        store.delete(key)
        raise
    log.info("file stored", extra={"file_id": file_id, "org_id": principal.org_id, "bytes": upload.bytes})
    return row


def get_file_row(session: Session, principal: Principal, file_id: str) -> File:
    row = owned(session, File, file_id, principal)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return row


def get_file(session: Session, principal: Principal, file_id: str) -> FileObject:
    return to_public(get_file_row(session, principal, file_id))


def list_files(
    session: Session, principal: Principal, *, purpose: str | None, after: str | None, limit: int, order: str
) -> FilesPublic:
    query = select(File).where(File.org_id == principal.org_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    newest_first = order == "desc"
    if after:
        cursor = owned(session, File, after, principal)
        if cursor is None:
            raise InvalidRequest(f"Invalid cursor: no file {after!r}.", param="after", code="invalid_value")
        if newest_first:
            query = query.where(or_(File.created_at < cursor.created_at, and_(File.created_at == cursor.created_at, File.id < cursor.id)))
        else:
            query = query.where(or_(File.created_at > cursor.created_at, and_(File.created_at == cursor.created_at, File.id > cursor.id)))
    sort = (File.created_at.desc(), File.id.desc()) if newest_first else (File.created_at.asc(), File.id.asc())
    rows = list(session.scalars(query.order_by(*sort).limit(limit + 1)))
    data = [to_public(r) for r in rows[:limit]]
    return FilesPublic(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=len(rows) > limit)


def open_content(session: Session, store: ObjectStore, principal: Principal, file_id: str) -> tuple[File, Iterator[bytes]]:
    """The file's row and an iterator over its bytes (the object is opened now, so a missing object
    is an error before the response starts, not a truncated download)."""
    row = get_file_row(session, principal, file_id)
    if row.storage_key.endswith("/"):  # a folder result (adapter, merged model, report): one tar stream
        keys = store.list(row.storage_key)
        if not keys:
            raise NotFound(f"The content of file {file_id} is no longer available.", param="file_id", code="file_not_found")
        return row, _tar_stream(store, row.storage_key, keys)
    try:
        body = store.open(row.storage_key)
    except ObjectNotFound:
        log.error("file object missing", extra={"file_id": row.id, "key": row.storage_key})
        raise NotFound(f"The content of file {file_id} is no longer available.", param="file_id", code="file_not_found") from None

    def chunks() -> Iterator[bytes]:
        with body:
            while chunk := body.read(_CHUNK):
                yield chunk

    return row, chunks()


def _tar_stream(store: ObjectStore, prefix: str, keys: list[str]) -> Iterator[bytes]:
    """A POSIX tar of the objects under ``prefix``, produced member by member without holding any
    object in memory (a merged model is gigabytes)."""
    for key in keys:
        info = tarfile.TarInfo(name=key[len(prefix):])
        info.size = store.size(key)
        info.mode = 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with store.open(key) as body:
            while chunk := body.read(_CHUNK):
                yield chunk
        if pad := -info.size % tarfile.BLOCKSIZE:
            yield b"\0" * pad
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def delete_file(session: Session, store: ObjectStore, principal: Principal, file_id: str) -> FileDeleted:
    row = get_file_row(session, principal, file_id)
    active = job_using_file(session, row)  # a paused job too: it reads its files again when resumed
    if active is not None:
        raise InvalidRequest(
            f"File {file_id} is used by fine-tuning job {active}, which has not finished; cancel it or wait.",
            param="file_id",
            code="file_in_use",
        )
    key = row.storage_key
    session.delete(row)
    session.commit()
    if key.endswith("/"):
        # A folder result (the adapter, a merged model, a report) belongs to its job's output, which
        # serving may still use: deleting the file removes the listing, not the job's folder.
        return FileDeleted(id=file_id)
    # Row first, then object: a crash in between leaves an unreachable object, never a dangling row.
    delete_orphans(store, [key], "a deleted file's object")
    return FileDeleted(id=file_id)
