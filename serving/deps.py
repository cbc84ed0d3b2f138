"""Request dependencies, as ``Annotated`` aliases routes declare: the settings, the database, the
engine pool, the request id and the authenticated principal.

``get_database`` is the seam tests override to run the gateway on their rolled-back session. The
trivial providers are ``async`` so FastAPI does not hop to a worker thread to call them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from scheduler.tenancy import Principal, authenticate_key, hash_key
from serving.database import Database
from serving.engines import EnginePool
from serving.errors import AuthenticationFailed
from serving.inference import InferenceContext
from serving.metrics import GatewayMetrics
from serving.settings import ServingSettings


async def get_settings(request: Request) -> ServingSettings:
    return request.app.state.settings


async def get_database(request: Request) -> Database:
    return request.app.state.database


async def get_engines(request: Request) -> EnginePool:
    return request.app.state.engines


async def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[ServingSettings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
EnginesDep = Annotated[EnginePool, Depends(get_engines)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]


async def authenticate(request: Request, db: Database) -> Principal:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationFailed("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    # Cached by the key's hash (serving.cache): a key is not kept in memory in clear longer than its request.
    cache = request.app.state.key_cache
    hashed = hash_key(key)
    principal = await cache.get_or_load(hashed, lambda: db.run(lambda session: authenticate_key(session, key)))
    if principal is None:
        raise AuthenticationFailed("Incorrect API key provided.")
    return principal


async def get_principal(request: Request, db: DatabaseDep) -> Principal:
    return await authenticate(request, db)


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


async def get_inference_context(request: Request) -> InferenceContext:
    # One dependency without sub-dependencies, the gateway's parts straight from app.state: this runs on
    # every inference request, and FastAPI solves each dependency anew per request. Measured in-process
    # (bench/results/serving-results.md): with the principal and the database as sub-dependencies the
    # gateway spent ~0.16 ms more CPU per request, over a tenth of all it spends. The database is the one
    # create_app was given (tests pass theirs there).
    state = request.app.state
    db = state.database
    principal = await authenticate(request, db)
    # Admission before anything else: a limited caller costs no model lookup and no engine time.
    await state.limiter.check(db, principal)
    return InferenceContext(
        principal=principal,
        request_id=request.state.request_id,
        settings=state.settings,
        db=db,
        engines=state.engines,
        metrics=state.metrics,
        usage=state.usage_writer,
        models=state.model_cache,
        client_request_id=request.state.request_id_from_client,
    )


InferenceContextDep = Annotated[InferenceContext, Depends(get_inference_context)]
