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
    def _finite_numbers(cls, data: Any) -> Any:
        # NaN and Infinity are not JSON, though Python's parser reads them. Relayed, they would reach the
        # engine as null (how pydantic writes a non-finite float): a silent default instead of an error
        where = _non_finite(data)
        if where is not None:  # the error names the field (errors._validation_response)
            raise PydanticCustomError("finite_number", "Input should be a finite number", {"param": where})
        return data

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
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
    def model_extra_options(self) -> dict[str, Any]:
        return dict(self.stream_options.model_extra or {}) if self.stream_options else {}


def _non_finite(value: Any, path: str = "") -> str | None:
    """The path (``logit_bias.50256``) of the first NaN or infinite number in a parsed JSON value, if any."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path or "body"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = _non_finite(item, f"{path}.{key}" if path else str(key))
        if where is not None:
            return where
    return None


class ChatCompletionRequest(_InferenceRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_InferenceRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_InferenceRequest):
    input: str | list[str] | list[int] | list[list[int]]

    @model_validator(mode="after")
    def _not_streamed(self):
        if self.stream:
            raise ValueError("embeddings cannot be streamed")
        return self


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


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
