"""The engine's HTTP surface, shaped like vLLM's OpenAI server so the serving gateway can talk to either.

Routes are thin: read the request, call ``CompletionService`` or ``ServedModels``, return the response.
Errors leave in OpenAI's shape: ``EngineError``s with their status, request validation failures as 400,
and anything unexpected as a logged 500.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpu_worker.engine.completions import CompletionService
from gpu_worker.engine.embeddings import EmbeddingService
from gpu_worker.engine.errors import EngineError, FeatureDisabled, error_body, param_from_loc
from gpu_worker.engine.models import ServedModels
from gpu_worker.engine.protocol import (
    ChatCompletionRequest,
    CheckAdapterRequest,
    CompletionRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    ModelList,
    UnloadLoRAAdapterRequest,
)

log = logging.getLogger(__name__)


def build_app(models: ServedModels) -> FastAPI:
    """The ASGI app for ``models``; their generation loops run while the app is up."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        models.start()
        try:
            yield
        finally:
            await run_in_threadpool(models.stop)

    app = FastAPI(title="Tuneforge inference engine", lifespan=lifespan)
    service = CompletionService(models)
    embeddings = EmbeddingService(models)
    _install_errors(app)

    @app.get("/health")
    async def health():
        if not models.healthy:
            return JSONResponse(error_body("a generation loop has stopped", "service_unavailable_error"), 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=models.cards())

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return _respond(await service.chat(req))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return _respond(await service.complete(req))

    @app.post("/v1/embeddings")
    async def embed(req: EmbeddingRequest):
        return await embeddings.embed(req)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest):
        _require_runtime_updates(models)
        # Blocking (download, file reads, waiting for the model lock): off the event loop.
        await run_in_threadpool(models.load_adapter, req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest):
        _require_runtime_updates(models)
        await run_in_threadpool(models.unload_adapter, req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/v1/tuneforge/check_adapter")
    async def check_adapter(req: CheckAdapterRequest):
        # Not gated on runtime updating: nothing stays loaded, and the registry needs it either way.
        return await run_in_threadpool(models.check_adapter, req.lora_path, req.atol)

    return app


def _respond(result):
    if hasattr(result, "model_dump"):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _require_runtime_updates(models: ServedModels) -> None:
    if not models.settings.allow_runtime_lora_updating:
        raise FeatureDisabled("Runtime LoRA updating (VLLM_ALLOW_RUNTIME_LORA_UPDATING)")


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError):
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.message)
        return JSONResponse(exc.body(), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = param_from_loc(tuple(first.get("loc", ())), drop_model_names=True)
        reason = str(first.get("msg", "invalid request"))
        if first.get("type") == "missing":
            message = f"Missing required parameter: '{param}'." if param else "The request has no body: send a JSON object."
            return JSONResponse(error_body(message, "invalid_request_error", param, "missing_required_parameter"), 400)
        message = f"Invalid value for '{param}': {reason}" if param else reason
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"), 500)
