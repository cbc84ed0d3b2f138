"""/v1/uploads: a file too large for one request, in parts (OpenAI's Uploads; logic in services.uploads)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StoreDep, WriterPrincipal
from api.multipart import receive_upload
from api.schemas import UploadComplete, UploadCreate, UploadObject, UploadPartObject
from api.services import uploads

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

_PART_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "format": "binary"}}}}},
    }
}


@router.post("", response_model=UploadObject)
def create_upload(body: UploadCreate, session: SessionDep, settings: SettingsDep, principal: WriterPrincipal) -> UploadObject:
    return uploads.create_upload(session, settings, principal, body)


@router.post("/{upload_id}/parts", response_model=UploadPartObject, openapi_extra=_PART_BODY)
async def add_part(upload_id: str, request: Request, session: SessionDep, store: StoreDep, settings: SettingsDep,
                   principal: WriterPrincipal) -> UploadPartObject:
    # refused before its bytes are read when the upload takes no parts; the body streams (api.multipart)
    await run_in_threadpool(uploads.pending_upload, session, principal, upload_id)
    async with receive_upload(request, settings.max_upload_part_bytes, file_field="data", validate=False) as part:
        return await run_in_threadpool(uploads.add_part, session, store, principal, upload_id, part)


@router.post("/{upload_id}/complete", response_model=UploadObject)
def complete_upload(upload_id: str, body: UploadComplete, session: SessionDep, store: StoreDep, principal: WriterPrincipal) -> UploadObject:
    return uploads.complete_upload(session, store, principal, upload_id, body)


@router.post("/{upload_id}/cancel", response_model=UploadObject)
def cancel_upload(upload_id: str, session: SessionDep, store: StoreDep, principal: WriterPrincipal) -> UploadObject:
    return uploads.cancel_upload(session, store, principal, upload_id)
