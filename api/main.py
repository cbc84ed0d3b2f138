"""The API application: ``create_app(settings)`` wires settings, database, object store, routes,
error handlers, metrics and the shared client for the serving gateway.

Startup prepares the database (``prepare_database``) and, if configured, the bootstrap admin key.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

from fastapi import FastAPI, Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import errors
from api.deps import SessionDep
from api.logs import configure_logging
from api.metrics import CONTENT_TYPE, ApiMetrics, render
from api.middleware import RequestMiddleware
from api.routes import entitlements, estimates, files, jobs, proxy, uploads, usage
from api.settings import ApiSettings, get_settings
from gpu_worker.storage import open_store
from scheduler.db import session_factory
from scheduler.migrate import upgrade
from scheduler.tenancy import authenticate_key, ensure_bootstrap_key

log = logging.getLogger("api")


def prepare_database(settings: ApiSettings) -> None:
    """Bring the schema up to date. Embedded mode (SQLite) runs the Alembic migrations to head at
    start-up (idempotent, and the same history ``tuneforge migrate`` writes); PostgreSQL deployments
    migrate as their own release step, so replicas starting together never race on DDL."""
    if settings.database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.database_url)


def bootstrap(session: Session, settings: ApiSettings) -> None:
    """Create the bootstrap admin key if configured; a no-op on every later start."""
    if not settings.bootstrap_api_key:
        return
    try:
        ensure_bootstrap_key(session, settings.bootstrap_api_key)
        session.commit()
    except IntegrityError:
        # Another replica starting at the same moment created it first: that is the outcome we want.
        session.rollback()
        if authenticate_key(session, settings.bootstrap_api_key) is None:
            raise


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.json_logs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepare_database(settings)
        with app.state.session_factory() as session:
            bootstrap(session, settings)
        app.state.serving_client = proxy.build_client(settings.serving_url, settings.proxy_connect_timeout_s, settings.proxy_read_timeout_s)
        log.info("api started", extra={"database": settings.database_url.split("@")[-1], "storage": settings.storage_url})
        try:
            yield
        finally:
            await app.state.serving_client.aclose()

    app = FastAPI(title="Tuneforge API", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.session_factory = session_factory(settings.database_url)
    app.state.store = open_store(settings.storage_url)
    app.state.metrics = ApiMetrics()
    errors.install(app)
    app.add_middleware(RequestMiddleware, metrics=app.state.metrics)
    app.include_router(files.router)
    app.include_router(estimates.router)
    app.include_router(jobs.router)
    app.include_router(proxy.router)
    app.include_router(usage.router)
    app.include_router(uploads.router)
    app.include_router(entitlements.router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics(session: SessionDep) -> Response:
        return Response(render(app.state.metrics, session), media_type=CONTENT_TYPE)

    return app
