"""The wire schemas the gateway reads and writes (OpenAI's API).

Requests are validated only as far as the gateway needs them (the model to route, the stream flags);
every other field is kept as sent and relayed to the engine, which owns the sampling parameters and
rejects what it does not support. Responses from engines are relayed byte for byte, so only the
gateway's own answers (the model list) have response schemas here.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from gpu_worker.validation import LONE_SURROGATE, lone_surrogate  # torch-free


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class _InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: Any) -> Any:
        defect = _first_defect(data)
        if defect is None:
            return data
        kind, where = defect  # the error names the field (errors._validation_response)
        if kind == "too_deep":
            # pydantic's serializer gives up at 255 levels: relayed, such a body was a 500.
            raise PydanticCustomError(
                "nesting_too_deep", "Input nests more than {max_depth} levels deep", {"param": where, "max_depth": MAX_DEPTH}
            )
        if kind == "surrogate":
            raise PydanticCustomError(
                "string_unicode", f"Input should be a valid string: {LONE_SURROGATE}", {"param": where}
            )
        # NaN and Infinity are not JSON, though Python's parser reads them. Relayed, they would reach the
        # engine as null (how pydantic writes a non-finite float): a silent default instead of an error
        raise PydanticCustomError("finite_number", "Input should be a finite number", {"param": where})

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("invalid_value", "stream_options is only allowed when stream is true", {"param": "stream_options"})
        return self

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def upstream_payload(self) -> dict[str, Any]:
        """The body for the engine: the client's fields as sent, and for a stream always a final usage
        chunk, because metering needs the token counts whether or not the client asked for them."""
        payload = self.model_dump(mode="json", exclude_unset=True)
        if self.stream:
            options = dict(payload.get("stream_options") or {})
            options["include_usage"] = True
            # Usage on every chunk (vLLM's extension, also in the built-in engine): a client that leaves
            # mid-stream is billed its prompt and the tokens generated so far, as the engine counted them.
            options["continuous_usage_stats"] = True
            payload["stream_options"] = options
        return payload

    @property
    def wants_continuous_usage(self) -> bool:
        return bool(self.wants_usage_chunk and (self.model_extra_options.get("continuous_usage_stats") is True))

    @property
    def choices_per_prompt(self) -> int:
        """``n``: choices generated per prompt (an invalid value is the engine's to refuse: 1 here)."""
        n = (self.model_extra or {}).get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1

    @property
    def model_extra_options(self) -> dict[str, Any]:
        return dict(self.stream_options.model_extra or {}) if self.stream_options else {}


# The deepest a request body may nest (the body itself is level 1). The deepest legitimate bodies are
# JSON schemas in ``tools`` and ``response_format``: OpenAI caps those at 10 object levels, about 30
# levels of JSON with their wrappers. pydantic cannot serialize past 255 levels (the body is relayed).
MAX_DEPTH = 64


def _first_defect(value: Any) -> tuple[str, str] | None:
    """What in a parsed JSON body is not JSON the gateway can relay, and where: ("too_deep", the field
    that nests deeper than ``MAX_DEPTH``), ("non_finite", the path of a NaN or infinite number, like
    ``logit_bias.50256``) or ("surrogate", the path of a string or key holding a lone surrogate). One pass
    with its own stack: recursion would fail on the very bodies it is there to refuse, and a body of many
    token ids is walked once."""
    if isinstance(value, float) and not math.isfinite(value):
        return "non_finite", "body"
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            return "too_deep", _field_of(path)
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, (*path, key)))
            elif isinstance(child, float) and not math.isfinite(child):
                return "non_finite", ".".join(str(part) for part in (*path, key))
            elif isinstance(child, str) and lone_surrogate(child) or isinstance(key, str) and lone_surrogate(key):
                return "surrogate", ".".join(str(part) for part in (*path, key))
    return None


def _field_of(path: tuple[Any, ...]) -> str:
    """The field a deep path is in: its named part (up to the last key that is a name, not a list
    index) among its first three parts, so ``messages.0.x.0.0...`` reads ``messages.0.x``."""
    head = path[:3]
    named = max((i for i, key in enumerate(head) if isinstance(key, str)), default=0)
    return ".".join(str(key) for key in head[: named + 1]) or "body"


class ChatCompletionRequest(_InferenceRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_InferenceRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_InferenceRequest):
    input: str | list[str] | list[int] | list[list[int]]

    @model_validator(mode="after")
    def _not_streamed(self):
        if self.stream:
            raise PydanticCustomError("invalid_value", "embeddings cannot be streamed", {"param": "stream"})
        return self


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # A fine-tuned model's compatibility check (serving.adapter_registry): "unchecked" until its first
    # request or POST /v1/adapters/{id}/check runs it. None for base models.
    compatibility: Literal["unchecked", "passed", "failed"] | None = None


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class AdapterVersionPublic(BaseModel):
    id: str  # the version's own model name (pinned)
    object: Literal["adapter.version"] = "adapter.version"
    version: int | None  # None until its compatibility check passed
    status: Literal["unchecked", "incompatible", "ready", "active"]
    created: int
    compatibility: dict[str, Any] | None


class AdapterPublic(BaseModel):
    id: str  # the versionless name; requests for it run on the active version
    object: Literal["adapter"] = "adapter"
    base_model: str
    active_version: str | None
    versions: list[AdapterVersionPublic]


class AdaptersPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterPublic]


class AdapterPromote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)  # the version id to make active


class AdapterChange(BaseModel):
    name: str
    previous: str | None
    active: str | None
