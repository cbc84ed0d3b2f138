"""The gateway's app factory: wires settings, the database, the engine pool, metrics, the error
handlers and the request middleware around the routes."""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastapi import FastAPI

from serving import adapter_routes
from serving.cache import TTLCache
from serving.database import Database
from serving.engines import EnginePool, Timeouts
from serving.errors import install_error_handlers
from serving.limits import Limiter, MemoryBuckets, RedisBuckets
from serving.metrics import GatewayMetrics
from serving.middleware import RequestContextMiddleware
from serving.routes import router
from serving.settings import ServingSettings, get_serving_settings
from serving.usage_writer import UsageWriter


def create_app(settings: ServingSettings | None = None, database: Database | None = None) -> FastAPI:
    """``database``: tests pass one on their rolled-back session; by default ``settings.database_url``."""
    settings = settings or get_serving_settings()
    database = database or Database.from_url(settings.database_url)
    metrics = GatewayMetrics()
    engines = EnginePool(
        settings.engines,
        timeouts=Timeouts(settings.engine_connect_timeout_s, settings.engine_read_timeout_s, settings.adapter_load_timeout_s),
        cooldown_s=settings.replica_cooldown_s,
        refresh_s=settings.replica_refresh_s,
        on_adapter_load=lambda base: metrics.adapter_loads.labels(model=base).inc(),
        resolves_adapters=settings.engine_kind == "vllm",
    )

    buckets = RedisBuckets(settings.rate_limit_url) if settings.rate_limit_url else MemoryBuckets()
    journal = Path(settings.usage_journal_dir) if settings.usage_journal_dir else settings.data_dir / "usage-journal"
    usage_writer = UsageWriter(database, journal, interval_s=settings.usage_flush_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await usage_writer.start()
        try:
            yield
        finally:
            await usage_writer.aclose()
            await engines.aclose()
            if isinstance(buckets, RedisBuckets):
                await buckets.aclose()

    app = FastAPI(title="Tuneforge inference gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.database = database
    app.state.engines = engines
    app.state.usage_writer = usage_writer
    app.state.key_cache = TTLCache(settings.auth_cache_ttl_s)
    app.state.model_cache = TTLCache(settings.model_cache_ttl_s)
    app.state.metrics = metrics
    app.state.limiter = Limiter(buckets)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(adapter_routes.router)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
