"""Tenant scoping of lookups by id: the one rule every route follows."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.schemas import is_well_formed_id
from scheduler.tenancy import Principal

T = TypeVar("T")


def owned(session: Session, model: type[T], row_id: str, principal: Principal) -> T | None:
    """The caller's organization's row with this id, or None. Another org's row reads exactly like
    a missing one, and a malformed id never reaches the database (PostgreSQL rejects NUL bytes)."""
    if not is_well_formed_id(row_id):
        return None
    return session.scalar(select(model).where(model.id == row_id, model.org_id == principal.org_id))
