"""Request dependencies as ``Annotated`` aliases: the database session, the settings, the object
store and the calling principal. Tests override ``get_session`` (a rolled-back session) and build the
app with their own settings; nothing here reads globals."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import PermissionDenied, Unauthorized
from api.settings import ApiSettings
from gpu_worker.storage import ObjectStore
from scheduler.fleet import Fleet, get_fleet
from scheduler.tenancy import Principal, authenticate_key


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. Services commit their own unit of work; anything uncommitted when
    the request ends (an error halfway) is rolled back on close."""
    with request.app.state.session_factory() as session:
        yield session


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


def get_fleet_dep(request: Request) -> Fleet:
    """The GPU fleet jobs are planned against: the app's own (tests, embedders) or the configured one."""
    return getattr(request.app.state, "fleet", None) or get_fleet()


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
FleetDep = Annotated[Fleet, Depends(get_fleet_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise Unauthorized(
            "You didn't provide an API key. Send it in the Authorization header: 'Authorization: Bearer YOUR_KEY'.",
            code="invalid_api_key",
        )
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer YOUR_KEY'.", code="invalid_api_key")
    return key.strip()


def get_principal(request: Request, session: SessionDep) -> Principal:
    key = _bearer(request)
    principal = authenticate_key(session, key)
    if principal is None:
        hint = f"{key[:3]}…{key[-4:]}" if len(key) > 8 else "…"
        raise Unauthorized(f"Incorrect API key provided: {hint}.", code="invalid_api_key")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def get_writer(principal: CurrentPrincipal) -> Principal:
    """A principal allowed to create, delete and cancel (member or admin; not viewer)."""
    if not principal.can_write:
        raise PermissionDenied(
            "Your API key has the viewer role, which cannot create, delete or cancel resources.",
            code="insufficient_permissions",
        )
    return principal


WriterPrincipal = Annotated[Principal, Depends(get_writer)]
