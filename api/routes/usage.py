"""GET /v1/usage: usage aggregates per day (and per key / model / adapter / kind) for the dashboard."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentPrincipal, SessionDep
from api.services import usage as service

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=service.UsagePublic)
def get_usage(
    session: SessionDep,
    principal: CurrentPrincipal,
    start_date: date | None = None,
    end_date: date | None = None,
    group_by: Annotated[list[service.GroupBy], Query()] = [],  # noqa: B006 - FastAPI copies defaults
    api_key_id: str | None = None,
) -> service.UsagePublic:
    return service.usage(session, principal, start_date=start_date, end_date=end_date, group_by=group_by, api_key_id=api_key_id)
