"""OpenAI embeddings on the served models (``POST /v1/embeddings``): each input's last hidden state,
L2-normalised, computed with the named adapter's LoRA when the model is a fine-tuned one.

Exact usage: ``prompt_tokens`` counts every input token as fed to the model (special tokens included).
Inputs are embedded together in one forward pass between decode steps; ``dimensions`` (Matryoshka
truncation) is refused, as vLLM refuses it for models not trained for it.
"""

from __future__ import annotations

import base64

import torch
from fastapi.concurrency import run_in_threadpool

from gpu_worker.engine.completions import token_ids
from gpu_worker.engine.errors import InvalidRequest, ModelNotFound
from gpu_worker.engine.generation import AdapterGone
from gpu_worker.engine.models import ServedModels
from gpu_worker.engine.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, new_id, now

# Inputs per request (OpenAI's own limit is 2048); bounds the padded batch one request can hold.
MAX_INPUTS = 2048


class EmbeddingService:
    def __init__(self, models: ServedModels):
        self.models = models

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResponse:
        if req.dimensions is not None:
            raise InvalidRequest("dimensions is not supported by this model", param="dimensions")
        target = self.models.resolve(req.model)
        prompts = _inputs(req.input, target.base.runner, target.base.max_model_len)
        try:
            vectors = await run_in_threadpool(target.base.runner.embed, prompts, target.adapter)
        except AdapterGone:  # unloaded between resolve() and now
            raise ModelNotFound(req.model) from None
        tokens = sum(len(p) for p in prompts)
        return EmbeddingResponse(
            id=new_id("embd"),
            created=now(),
            model=req.model,
            data=[EmbeddingData(index=i, embedding=_encode(v, req.encoding_format)) for i, v in enumerate(vectors)],
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )


def _inputs(value, runner, limit: int) -> list[list[int]]:
    if isinstance(value, str):
        items = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [value]  # one prompt as token ids
    else:
        items = list(value)
    if not items or len(items) > MAX_INPUTS:
        raise InvalidRequest(f"input must hold 1 to {MAX_INPUTS} items", param="input")
    prompts = []
    for item in items:
        ids = token_ids(runner, item, param="input")
        if not ids:
            raise InvalidRequest("an input is empty", param="input")
        if len(ids) > limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens. However, an input has {len(ids)} tokens.",
                param="input",
                code="context_length_exceeded",
            )
        prompts.append(ids)
    return prompts


def _encode(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()
