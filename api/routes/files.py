"""/v1/files: upload, list, retrieve, download and delete fine-tuning files."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentPrincipal, SessionDep, SettingsDep, StoreDep, WriterPrincipal
from api.schemas import ID_PATTERN, FileDeleted, FileObject, FilesPublic
from api.services import files
from api.multipart import receive_upload

router = APIRouter(prefix="/v1/files", tags=["files"])


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": sorted(files.PURPOSES)}},
                }
            }
        },
    }
}


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
async def create_file(request: Request, session: SessionDep, store: StoreDep, settings: SettingsDep, principal: WriterPrincipal) -> FileObject:
    # The body is parsed here, not by FastAPI, so that it streams (see api.multipart).
    async with receive_upload(request, settings.max_upload_bytes) as upload:
        return await run_in_threadpool(files.create_file, session, store, principal, upload)


@router.get("", response_model=FilesPublic)
def list_files(
    session: SessionDep,
    principal: CurrentPrincipal,
    purpose: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.-]{1,40}$")] = None,
    after: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> FilesPublic:
    return files.list_files(session, principal, purpose=purpose, after=after, limit=limit, order=order)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: SessionDep, principal: CurrentPrincipal) -> FileObject:
    return files.get_file(session, principal, file_id)


@router.get("/{file_id}/content")
def file_content(file_id: str, session: SessionDep, store: StoreDep, principal: CurrentPrincipal) -> StreamingResponse:
    row, chunks = files.open_content(session, store, principal, file_id)
    # RFC 5987 form: the stored name is the client's and may hold quotes or non-ASCII characters.
    headers = {"content-length": str(row.bytes), "content-disposition": f"attachment; filename*=UTF-8''{quote(row.filename)}"}
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, store: StoreDep, principal: WriterPrincipal) -> FileDeleted:
    return files.delete_file(session, store, principal, file_id)
