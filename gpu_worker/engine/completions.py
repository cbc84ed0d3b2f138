"""OpenAI completions on top of the generation loop: requests become token prompts and sampling
parameters, deltas become responses or server-sent events.

Everything that can be refused is refused before the request is queued, so a bad request is always a
4xx JSON error and never a broken stream. Token counts are exact: ``prompt_tokens`` is the length of
the prompt as fed to the model (the chat template applied), ``completion_tokens`` every generated token
(a final end-of-sequence token included, as vLLM counts it).
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from jinja2 import TemplateError

from gpu_worker.engine.errors import GenerationFailed, InvalidRequest
from gpu_worker.engine.models import DeltaStream, ServedModels, Target
from gpu_worker.engine.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
    new_id,
    now,
)
from gpu_worker.engine.sampling import SamplingParams

DONE = "data: [DONE]\n\n"
# What a chat chunk after the first leaves out (pydantic's exclude: every choice's delta.role).
_LATER_DELTAS = {"choices": {"__all__": {"delta": {"role"}}}}
# OpenAI's limit on stop sequences; a fifth is a 400, not silently ignored or honoured.
MAX_STOP_SEQUENCES = 4


class CompletionService:
    def __init__(self, models: ServedModels):
        self.models = models

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion | AsyncIterator[str]:
        _refuse_unsupported(
            req,
            n=req.n not in (None, 1),
            logprobs=bool(req.logprobs) or req.top_logprobs is not None,
            tools=bool(req.tools),
            response_format=bool(req.response_format) and req.response_format.get("type") != "text",
            logit_bias=bool(req.logit_bias),
        )
        target = self.models.resolve(req.model)
        prompt_ids = _chat_prompt(target, req.messages)
        params = _sampling(req, req.max_completion_tokens or req.max_tokens, len(prompt_ids), target)
        stream = self.models.submit(target, prompt_ids, params)
        if req.stream:
            return self._chat_events(stream, req, len(prompt_ids))
        text, count, reason = await _collect(stream)
        return ChatCompletion(
            id=new_id("chatcmpl"),
            created=now(),
            model=req.model,
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)],
            usage=Usage.of(len(prompt_ids), count),
        )

    async def complete(self, req: CompletionRequest) -> Completion | AsyncIterator[str]:
        _refuse_unsupported(
            req,
            n=req.n not in (None, 1),
            best_of=req.best_of not in (None, 1),
            echo=bool(req.echo),
            logprobs=req.logprobs is not None,
            suffix=bool(req.suffix),
            logit_bias=bool(req.logit_bias),
        )
        target = self.models.resolve(req.model)
        prompt_ids = _text_prompt(target, req.prompt)
        params = _sampling(req, req.max_tokens, len(prompt_ids), target)
        stream = self.models.submit(target, prompt_ids, params)
        if req.stream:
            return self._completion_events(stream, req, len(prompt_ids))
        text, count, reason = await _collect(stream)
        return Completion(
            id=new_id("cmpl"),
            created=now(),
            model=req.model,
            choices=[CompletionChoice(text=text, finish_reason=reason)],
            usage=Usage.of(len(prompt_ids), count),
        )

    async def _chat_events(self, stream: DeltaStream, req: ChatCompletionRequest, prompt_tokens: int) -> AsyncIterator[str]:
        meta = dict(id=new_id("chatcmpl"), created=now(), model=req.model)

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None, *, first: bool = False) -> str:
            # OpenAI sends the role in the first delta only; later deltas have no "role" key (not null)
            exclude = None if first else _LATER_DELTAS
            return _event(ChatCompletionChunk(**meta, choices=choices, usage=usage).model_dump_json(exclude=exclude))

        running = _continuous(req)
        yield chunk(
            [ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))], Usage.of(prompt_tokens, 0) if running else None, first=True
        )
        async for event in _stream_body(stream, req, prompt_tokens):
            if isinstance(event, str):
                yield event
            elif isinstance(event, Usage):
                yield chunk([], event)
            else:
                text, reason, count = event
                usage = Usage.of(prompt_tokens, count) if running else None
                yield chunk([ChatChunkChoice(delta=ChatDelta(content=text if text else None), finish_reason=reason)], usage)

    async def _completion_events(self, stream: DeltaStream, req: CompletionRequest, prompt_tokens: int) -> AsyncIterator[str]:
        meta = dict(id=new_id("cmpl"), created=now(), model=req.model)
        async for event in _stream_body(stream, req, prompt_tokens):
            if isinstance(event, str):
                yield event
            elif isinstance(event, Usage):
                yield _event(Completion(**meta, choices=[], usage=event).model_dump_json())
            else:
                text, reason, count = event
                usage = Usage.of(prompt_tokens, count) if _continuous(req) else None
                yield _event(Completion(**meta, choices=[CompletionChoice(text=text, finish_reason=reason)], usage=usage).model_dump_json())


async def _stream_body(stream: DeltaStream, req, prompt_tokens: int):
    """The parts every stream shares: ``(text, finish_reason)`` per delta worth sending, then the usage
    (when asked for) and ``[DONE]`` as ready-made events; an error event if generation failed."""
    try:
        count = 0
        async for delta in stream:
            count = delta.completion_tokens
            if delta.error:
                yield _event(json.dumps(GenerationFailed(delta.error).body()))
                break
            if delta.text or delta.finish_reason:
                yield delta.text, delta.finish_reason, count
        else:
            if req.stream_options and req.stream_options.include_usage:
                yield Usage.of(prompt_tokens, count)
        yield DONE
    finally:
        stream.close()  # aborts the request if the client went away mid-stream


def _continuous(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage and req.stream_options.continuous_usage_stats)


def _event(data: str) -> str:
    return f"data: {data}\n\n"


async def _collect(stream: DeltaStream) -> tuple[str, int, str]:
    parts: list[str] = []
    try:
        async for delta in stream:
            if delta.error:
                raise GenerationFailed(delta.error)
            parts.append(delta.text)
            if delta.final:
                return "".join(parts), delta.completion_tokens, delta.finish_reason
    finally:
        stream.close()
    raise GenerationFailed("generation ended without a result")


def _refuse_unsupported(req, **flags: bool) -> None:
    for param, used in flags.items():
        if used:
            what = "n must be 1: one choice per request" if param in ("n", "best_of") else f"'{param}' is not supported"
            raise InvalidRequest(f"{what} by this engine", param=param, code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(req.stop)}", param="stop", code="invalid_value"
        )


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if isinstance(part, dict):  # any part other than text
            raise InvalidRequest(
                f"only text content is supported, got a {part.get('type')!r} part", param=f"messages.{index}.content"
            )
        texts.append(part.text)
    return "\n".join(texts)


def _chat_prompt(target: Target, messages: list[ChatMessage]) -> list[int]:
    tokenizer = target.base.runner.tokenizer
    conversation = [
        # Templates written before OpenAI's "developer" role know it as "system".
        {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)}
        for i, m in enumerate(messages)
    ]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except TemplateError as err:  # templates raise on conversations they cannot render (e.g. role order)
        raise InvalidRequest(f"the model's chat template rejected these messages: {err}", param="messages") from None
    # The template writes the special tokens (BOS included) itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text_prompt(target: Target, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequest("one prompt per request: send a string or a single token list", param="prompt")
        prompt = prompt[0]
    ids = token_ids(target.base.runner, prompt, param="prompt")
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return ids


def token_ids(runner, value: str | list[int], *, param: str) -> list[int]:
    """A prompt given as text (tokenized as the model's tokenizer does) or as token ids (checked
    against the vocabulary); shared by completions and embeddings."""
    if isinstance(value, str):
        return runner.tokenizer(value)["input_ids"] if value else []
    ids = list(value)
    if any(not 0 <= t < runner.vocab_size for t in ids):
        raise InvalidRequest(f"{param} token ids must be in [0, {runner.vocab_size})", param=param)
    return ids


def _sampling(req, max_tokens: int | None, prompt_tokens: int, target: Target) -> SamplingParams:
    limit = target.base.max_model_len
    if prompt_tokens >= limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_tokens} "
            "tokens, leaving no room for a completion. Please reduce the length of the prompt.",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = limit - prompt_tokens
    elif prompt_tokens + max_tokens > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
            "Please reduce the length of the prompt or the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=stop,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
    )
