"""Usage aggregates for the dashboard: the org's usage records summed per day and, as asked, per API
key, model and adapter. Members and viewers see their own key's usage; admins see the whole org or any
of its keys. Records of other orgs are never read (every query is scoped by the caller's org)."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Literal

from pydantic import BaseModel
from sqlalchemy import Date, cast, func, select
from sqlalchemy.orm import Session

from api.errors import InvalidRequest, PermissionDenied
from scheduler.models import Role, UsageRecord
from scheduler.tenancy import Principal

GroupBy = Literal["api_key", "model", "adapter", "kind"]
_COLUMNS = {"api_key": UsageRecord.api_key_id, "model": UsageRecord.model, "adapter": UsageRecord.adapter, "kind": UsageRecord.kind}
MAX_DAYS = 366  # a year of daily buckets is what a dashboard chart shows; more is an export job


class UsageBucket(BaseModel):
    object: Literal["usage.bucket"] = "usage.bucket"
    date: date
    api_key_id: str | None = None
    model: str | None = None
    adapter: str | None = None
    kind: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    trained_tokens: int
    total_tokens: int


class UsagePublic(BaseModel):
    object: Literal["list"] = "list"
    start_date: date
    end_date: date  # inclusive
    data: list[UsageBucket]


def usage(
    session: Session,
    principal: Principal,
    *,
    start_date: date | None,
    end_date: date | None,
    group_by: list[GroupBy],
    api_key_id: str | None,
) -> UsagePublic:
    today = datetime.now(timezone.utc).date()
    end_date = end_date or today
    # The query runs up to the day after end_date, and the default window starts 29 days before it:
    # neither may leave the calendar (years 1 to 9999).
    if end_date >= date.max:
        raise InvalidRequest(f"end_date must be before {date.max.isoformat()}.", param="end_date", code="invalid_value")
    if start_date is None:
        if end_date < date.min + timedelta(days=29):
            raise InvalidRequest(
                f"end_date must be on or after {(date.min + timedelta(days=29)).isoformat()} when start_date is not given.",
                param="end_date",
                code="invalid_value",
            )
        start_date = end_date - timedelta(days=29)
    if start_date > end_date:
        raise InvalidRequest("start_date must not be after end_date.", param="start_date")
    if (end_date - start_date).days >= MAX_DAYS:
        raise InvalidRequest(f"At most {MAX_DAYS} days per request.", param="start_date")
    if not principal.has(Role.admin):
        if api_key_id is not None and api_key_id != principal.api_key_id:
            raise PermissionDenied("Only admins can read the usage of other API keys.", code="insufficient_permissions")
        api_key_id = principal.api_key_id
        if api_key_id is None:
            raise PermissionDenied("Only admins can read the organization's usage.", code="insufficient_permissions")
    # Days are UTC days whatever the database session's time zone (PostgreSQL casts in the session's).
    if session.get_bind().dialect.name == "postgresql":
        day = cast(func.timezone("UTC", UsageRecord.created_at), Date)
    else:
        day = func.date(UsageRecord.created_at)
    keys = [day.label("date"), *(_COLUMNS[g].label(g if g != "api_key" else "api_key_id") for g in group_by)]
    query = (
        select(
            *keys,
            func.count().label("requests"),
            func.coalesce(func.sum(UsageRecord.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(UsageRecord.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(UsageRecord.trained_tokens), 0).label("trained_tokens"),
        )
        .where(
            UsageRecord.org_id == principal.org_id,
            UsageRecord.created_at >= datetime.combine(start_date, time(), timezone.utc),
            UsageRecord.created_at < datetime.combine(end_date + timedelta(days=1), time(), timezone.utc),
        )
        .group_by(*keys)
        .order_by(*keys)
    )
    if api_key_id is not None:
        query = query.where(UsageRecord.api_key_id == api_key_id)
    data = []
    for row in session.execute(query).mappings():
        fields = dict(row)
        fields["total_tokens"] = fields["prompt_tokens"] + fields["completion_tokens"] + fields["trained_tokens"]
        data.append(UsageBucket(**fields))
    return UsagePublic(start_date=start_date, end_date=end_date, data=data)
