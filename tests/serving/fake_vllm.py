"""A small stand-in for vLLM's OpenAI server, used as the gateway's real upstream in tests.

It speaks the same HTTP as vLLM: ``/v1/chat/completions`` and ``/v1/completions`` (JSON or SSE),
``/v1/embeddings`` (a 404 when ``embeddings`` is off, as from a vLLM serving a generative model),
``/v1/models`` (the base and the loaded adapters, as vLLM lists them), ``/v1/load_lora_adapter`` (400
when the name is already loaded) and ``/v1/unload_lora_adapter``, and a
404 ``NotFoundError`` for a model it does not have. Output is deterministic: the model name followed
by the prompt's words, one word per token; tokens are counted by whitespace. It records what it was
asked (loads per adapter, request ids, aborted streams) so tests can check the gateway's behaviour
from the engine's side. By default adapters are loaded through ``/v1/load_lora_adapter`` with ``store:``
paths (the built-in engine's protocol); with ``resolver_store`` it behaves as vLLM with Tuneforge's resolver
plugin: adapters load by name on first request, ``prompt_logprobs`` score prompts.

``n`` choices per prompt and several prompts (text completions) are served as vLLM serves them: choice
``p * n + j`` answers prompt ``p`` (choice ``j`` one word shorter than choice ``j - 1``), streamed
chunks of the choices interleave, one choice per chunk, and with ``continuous_usage_stats`` each chunk
carries its own choice's count (its prompt's tokens, the choice's tokens so far); the final usage is
the total, each prompt counted once.

What the engine bills is counted per request it served (``attempts``, a retry under the same request
id is another attempt) as vLLM reports it: the usage of the last chunk (or body) that actually left
the engine. A chunk made after the gateway went away is never sent, so it is not counted
(``_DeliveryCounter`` looks at the connection as each body is written).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gpu_worker.storage import open_store
from serving.vllm_plugin import check as vllm_check
from serving.vllm_plugin import index


@dataclass
class EngineState:
    base_model: str
    load_delay_s: float = 0.0
    token_delay_s: float = 0.0
    fail_status: int | None = None  # answer every completion with this error status
    embeddings: bool = True  # serves /v1/embeddings
    loaded: dict[str, str] = field(default_factory=dict)  # lora_name -> lora_path
    load_calls: Counter = field(default_factory=Counter)  # lora_name -> successful loads
    load_requests: Counter = field(default_factory=Counter)  # lora_name -> loads asked for, refused or not
    served: list[str] = field(default_factory=list)  # model of every completion served
    request_ids: list[str] = field(default_factory=list)
    not_found: int = 0  # completions refused because the model is not loaded
    streams_aborted: int = 0
    tokens_streamed: int = 0
    # every completion or embedding served, in order, with the usage it reported on the wire
    attempts: list["Attempt"] = field(default_factory=list)
    # As a vLLM with Tuneforge's resolver plugin: an unknown ``ft:`` model is looked up in the adapter index
    # of this object store and loaded by name (counted in load_calls); /v1/load_lora_adapter takes local
    # paths only, as vLLM does, so a gateway that sends it a ``store:`` path gets vLLM's 404.
    resolver_store: str | None = None
    # prompt_logprobs of an adapter are its training-side reference (the adapter's
    # reference_logits.safetensors) moved by this much: 0 reproduces the training side exactly.
    logprob_shift: float = 0.0


@dataclass
class Attempt:
    """One request the engine served: what it billed (the usage on the last chunk or body it sent)."""

    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pending: tuple[int, int] | None = None  # the usage of the body being written

    @property
    def counts(self) -> tuple[int, int]:
        return self.prompt_tokens, self.completion_tokens


class _DeliveryCounter:
    """ASGI middleware: a body written while the connection is open is sent, and its attempt's billed
    usage becomes the one that body carried. uvicorn drops a body written after the client left without
    a word (its ``send`` returns), so the connection is looked at on uvicorn's side of ``send``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        cycle = getattr(send, "__self__", None)  # uvicorn's RequestResponseCycle

        async def counted(message):
            attempt = state.get("attempt")
            if message["type"] == "http.response.body" and message.get("body") and attempt is not None and attempt.pending:
                sent = cycle is None or not (cycle.disconnected or cycle.transport.is_closing())
                if sent:
                    attempt.prompt_tokens, attempt.completion_tokens = attempt.pending
                attempt.pending = None
            await send(message)

        await self.app(scope, receive, counted)


def _error(status: int, message: str, type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": status}}, status_code=status)


def reply_words(model: str, prompt_text: str, max_tokens: int) -> list[str]:
    return ([model] + prompt_text.split())[:max_tokens]


def _prompt_texts(body: dict[str, Any], chat: bool) -> list[str]:
    """The request's prompts: one conversation, or a text completion's prompts (a string, a list of
    strings, token ids, or lists of token ids)."""
    if chat:
        return [" ".join(str(m.get("content") or "") for m in body["messages"])]
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(isinstance(p, list) for p in prompt):
        return [" ".join(map(str, p)) for p in prompt]
    return [" ".join(map(str, prompt))]


def create_engine_app(state: EngineState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        # As vLLM lists them: the base model, then each loaded adapter with its parent.
        cards = [{"id": state.base_model, "object": "model", "created": 0, "owned_by": "vllm", "root": state.base_model, "parent": None}]
        cards += [{"id": name, "object": "model", "created": 0, "owned_by": "vllm", "root": path, "parent": state.base_model} for name, path in state.loaded.items()]
        return {"object": "list", "data": cards}

    def resolve(model: Any) -> bool:
        """vLLM's resolve_lora with the tuneforge resolver: True when ``model`` is (now) loaded."""
        if model in state.loaded:
            return True
        if state.resolver_store is None or not isinstance(model, str):
            return False
        entry = index.lookup(open_store(state.resolver_store), model)
        if entry is None or entry.base_model != state.base_model:
            return False
        state.loaded[model] = entry.key
        state.load_calls[model] += 1
        return True

    @app.post("/v1/load_lora_adapter")
    async def load(body: dict[str, Any]):
        name, path = body.get("lora_name"), body.get("lora_path")
        state.load_requests[name] += 1
        if state.resolver_store is not None and isinstance(path, str) and path.startswith("store:"):
            return _error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        if not name or not isinstance(path, str) or not path.startswith("store:"):
            return _error(400, "lora_name and a store: lora_path are required", "BadRequestError")
        if name in state.loaded:
            return _error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        await asyncio.sleep(state.load_delay_s)
        state.loaded[name] = path
        state.load_calls[name] += 1
        return JSONResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: dict[str, Any]):
        if state.loaded.pop(body.get("lora_name"), None) is None:
            return _error(404, f"The lora adapter '{body.get('lora_name')}' cannot be found.", "NotFoundError")
        return JSONResponse("Success")

    async def complete(request: Request, chat: bool):
        body = await request.json()
        request_id = request.headers.get("x-request-id", "")
        state.request_ids.append(request_id)
        if state.fail_status is not None:
            return _error(state.fail_status, "engine failure injected by the test", "InternalServerError")
        model = body.get("model")
        if model != state.base_model and not resolve(model):
            state.not_found += 1
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        if not chat and body.get("prompt_logprobs"):
            return score(model, body)
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "max_tokens must be at least 1", "BadRequestError", "max_tokens")
        n = body.get("n", 1)
        if not isinstance(n, int) or n < 1:
            return _error(400, "n must be at least 1", "BadRequestError", "n")
        state.served.append(model)
        attempt = Attempt(request_id)
        state.attempts.append(attempt)
        request.scope["state"]["attempt"] = attempt
        prompts = [text.split() for text in _prompt_texts(body, chat)]
        # choice p * n + j answers prompt p, one word shorter than choice j - 1 (vLLM's numbering)
        choices = [reply_words(model, " ".join(words), max(1, max_tokens - j)) for words in prompts for j in range(n)]
        prompt_tokens = sum(len(words) for words in prompts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(map(len, choices))}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = bool(options.get("include_usage"))
            continuous = include_usage and bool(options.get("continuous_usage_stats"))
            generation = _Generation(model, chat, [len(words) for words in prompts], n, choices, usage)
            return StreamingResponse(_stream(state, attempt, generation, include_usage, continuous), media_type="text/event-stream")
        await asyncio.sleep(state.token_delay_s * max(map(len, choices)))  # a non-streamed answer comes when all is generated
        out = []
        for index, words in enumerate(choices):
            text = " ".join(words)
            if chat:
                out.append({"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
            else:
                out.append({"index": index, "text": text, "logprobs": None, "finish_reason": "length"})
        attempt.pending = (usage["prompt_tokens"], usage["completion_tokens"])
        obj = "chat.completion" if chat else "text_completion"
        return {"id": "cmpl-fake", "object": obj, "created": int(time.time()), "model": model, "choices": out, "usage": usage}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        if not state.embeddings:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        body = await request.json()
        model = body.get("model")
        if model != state.base_model and not resolve(model):
            state.not_found += 1
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        state.served.append(model)
        request_id = request.headers.get("x-request-id", "")
        state.request_ids.append(request_id)
        attempt = Attempt(request_id)
        state.attempts.append(attempt)
        request.scope["state"]["attempt"] = attempt
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data, tokens = [], 0
        for i, text in enumerate(inputs):
            words = str(text).split()
            tokens += len(words)
            vector = [float(len(words)), float(len(model)), float(i)]
            if body.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        attempt.pending = (tokens, 0)
        return {"id": "embd-fake", "object": "list", "created": int(time.time()), "model": model, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def score(model: str, body: dict[str, Any]) -> dict[str, Any]:
        """prompt_logprobs as vLLM returns them (None, then per position the top-k token ids as string
        keys), taken from the adapter's own training-side reference for the prompt that matches."""
        k, prompt = int(body["prompt_logprobs"]), body["prompt"]
        reference = vllm_check.read_reference(open_store(state.resolver_store), state.loaded[model]) or []
        rows: list[Any] = [None] * len(prompt)
        for ref in reference:
            if prompt[: len(ref.ids)] == ref.ids and len(prompt) == len(ref.ids) + 1:
                for t in range(len(ref.ids)):
                    rows[t + 1] = {str(tok): {"logprob": lp + state.logprob_shift, "rank": r + 1, "decoded_token": "x"}
                                   for r, (tok, lp) in enumerate(zip(ref.top_ids[t, :k].tolist(), ref.top_logprobs[t, :k].tolist()))}
        choice = {"index": 0, "text": "x", "logprobs": None, "finish_reason": "length", "prompt_logprobs": rows}
        usage = {"prompt_tokens": len(prompt), "completion_tokens": 1, "total_tokens": len(prompt) + 1}
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model, "choices": [choice], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return _DeliveryCounter(app)


@dataclass
class _Generation:
    model: str
    chat: bool
    prompt_lengths: list[int]  # per prompt
    n: int  # choices per prompt
    choices: list[list[str]]  # the words of each choice
    usage: dict


async def _stream(state: EngineState, attempt: Attempt, gen: _Generation, include_usage: bool, continuous: bool):
    obj = "chat.completion.chunk" if gen.chat else "text_completion"
    done = [0] * len(gen.choices)  # tokens sent per choice
    prompt_of = [i // gen.n for i in range(len(gen.choices))]
    reported: dict[int, int] = {}  # prompt -> its tokens, once a chunk of one of its choices was sent

    def chunk(index: int, choice: dict) -> str:
        reported[prompt_of[index]] = prompt = gen.prompt_lengths[prompt_of[index]]
        attempt.pending = (sum(reported.values()), sum(done))
        extra = {"usage": None} if include_usage else {}
        if continuous:  # vLLM's continuous_usage_stats: this chunk's choice's running count
            extra = {"usage": {"prompt_tokens": prompt, "completion_tokens": done[index], "total_tokens": prompt + done[index]}}
        return "data: " + json.dumps({"id": "cmpl-fake", "object": obj, "created": 0, "model": gen.model,
                                      "choices": [{"index": index, **choice}], **extra}) + "\n\n"

    try:
        if gen.chat:
            for index in range(len(gen.choices)):
                yield chunk(index, {"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        for step in range(max(map(len, gen.choices))):
            await asyncio.sleep(state.token_delay_s)
            for index, words in enumerate(gen.choices):  # one decoding step: a token of every choice
                if step >= len(words):
                    continue
                piece = words[step] if step == 0 else " " + words[step]
                last = "length" if step == len(words) - 1 else None
                state.tokens_streamed += 1
                done[index] += 1
                yield chunk(index, {"delta": {"content": piece}, "finish_reason": last} if gen.chat else {"text": piece, "finish_reason": last})
        if include_usage:
            attempt.pending = (gen.usage["prompt_tokens"], gen.usage["completion_tokens"])
            yield "data: " + json.dumps({"id": "cmpl-fake", "object": obj, "created": 0, "model": gen.model, "choices": [], "usage": gen.usage}) + "\n\n"
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        state.streams_aborted += 1
        raise
