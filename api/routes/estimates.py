"""/v1/fine_tuning/jobs/estimate: what a job would need (plan, tokens, time, GPU-hours, price),
from the same body as job creation; nothing is created."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentPrincipal, FleetDep, SessionDep, SettingsDep, StoreDep
from api.schemas import JobCreate
from api.services import estimates

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("/estimate", response_model=estimates.EstimatePublic)
def estimate_job(body: JobCreate, session: SessionDep, store: StoreDep, settings: SettingsDep, principal: CurrentPrincipal,
                 fleet: FleetDep) -> estimates.EstimatePublic:
    return estimates.estimate(session, store, settings, principal, body, fleet)
