"""/v1/fine_tuning/jobs/estimate: what a job would need (plan, tokens, time, GPU-hours, price),
from the same body as job creation; nothing is created."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import CurrentPrincipal, SessionDep, SettingsDep
from api.schemas import JobCreate
from api.services import estimates
from scheduler.fleet import get_fleet

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("/estimate", response_model=estimates.EstimatePublic)
def estimate_job(body: JobCreate, request: Request, session: SessionDep, settings: SettingsDep, principal: CurrentPrincipal) -> estimates.EstimatePublic:
    fleet = getattr(request.app.state, "fleet", None) or get_fleet()  # tests and embedders may set their own
    return estimates.estimate(session, settings, principal, body, fleet)
