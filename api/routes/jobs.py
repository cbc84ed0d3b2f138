"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause and resume jobs; their events and checkpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.deps import CurrentPrincipal, FleetDep, SessionDep, SettingsDep, StoreDep, WriterPrincipal
from api.errors import InvalidRequest
from api.schemas import ID_PATTERN, CheckpointsPublic, JobCreate, JobEventsPublic, JobPublic, JobsPublic
from api.services import jobs

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(pattern=ID_PATTERN)]


@router.post("", response_model=JobPublic)
def create_job(body: JobCreate, session: SessionDep, store: StoreDep, settings: SettingsDep, principal: WriterPrincipal, fleet: FleetDep) -> JobPublic:
    return jobs.create_job(session, store, settings, principal, body, fleet)


@router.get("", response_model=JobsPublic)
def list_jobs(request: Request, session: SessionDep, principal: CurrentPrincipal, after: Cursor = None, limit: Limit = 20) -> JobsPublic:
    return jobs.list_jobs(session, principal, after=after, limit=limit, metadata=_metadata_filter(request))


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """OpenAI's list filter, ``?metadata[key]=value`` (each pair must match), or ``?metadata=null`` (jobs
    without metadata); None when there is none."""
    pairs = {}
    for name, value in request.query_params.multi_items():
        if name == "metadata" and value == "null":
            return {}
        if name.startswith("metadata[") and name.endswith("]") and len(name) > len("metadata[]"):
            if "\x00" in name + value:  # no stored metadata holds one (the API refuses them), and PostgreSQL refuses them in a query
                raise InvalidRequest("Invalid metadata filter: a key or value holds a NUL character.", param="metadata", code="invalid_value")
            pairs[name[len("metadata[") : -1]] = value
        elif name.startswith("metadata"):
            raise InvalidRequest(f"Invalid metadata filter {name!r}: use metadata[key]=value or metadata=null.", param="metadata",
                                 code="invalid_value")
    return pairs or None


@router.get("/{job_id}", response_model=JobPublic)
def retrieve_job(job_id: str, session: SessionDep, principal: CurrentPrincipal) -> JobPublic:
    return jobs.get_job(session, principal, job_id)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, principal: WriterPrincipal) -> JobPublic:
    return jobs.cancel_job(session, principal, job_id)


@router.post("/{job_id}/pause", response_model=JobPublic)
def pause_job(job_id: str, session: SessionDep, principal: WriterPrincipal) -> JobPublic:
    return jobs.pause_job(session, principal, job_id)


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(job_id: str, session: SessionDep, principal: WriterPrincipal) -> JobPublic:
    return jobs.resume_job(session, principal, job_id)


@router.get("/{job_id}/events", response_model=JobEventsPublic)
def list_events(job_id: str, session: SessionDep, principal: CurrentPrincipal, after: Cursor = None, limit: Limit = 20) -> JobEventsPublic:
    return jobs.list_events(session, principal, job_id, after=after, limit=limit)


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(
    job_id: str, session: SessionDep, principal: CurrentPrincipal, after: Cursor = None, limit: Limit = 10
) -> CheckpointsPublic:
    return jobs.list_checkpoints(session, principal, job_id, after=after, limit=limit)
