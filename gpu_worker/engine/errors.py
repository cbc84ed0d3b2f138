"""Errors the engine answers with, in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Services raise these; ``server`` turns them into responses. Anything else that escapes is a bug: it is
logged and answered as a 500, never dressed up as a 4xx.
"""

from __future__ import annotations

from typing import Any


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_UNION_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "bytes"}


def param_from_loc(loc: tuple[Any, ...], *, drop_model_names: bool = False) -> str | None:
    """A pydantic error's location as OpenAI's ``param``: ("body", "messages", 0, "content", "str") →
    "messages.0.content". Drops the request part ("body", "query", ...) and pydantic's union-branch tags,
    which follow a field (the first name is always a field: an upload's ``bytes``); with
    ``drop_model_names`` also the model names a union of models tags its branches with (``TextPart``).
    One spelling for the management API, the gateway and the engine."""
    def tag(p) -> bool:
        return p in _UNION_TAGS or "[" in p or "-" in p or (drop_model_names and p[:1].isupper())

    parts = [str(p) for p in loc[1:2]] + [str(p) for p in loc[2:] if isinstance(p, int) or not tag(p)]
    return ".".join(parts) or None


class EngineError(Exception):
    status_code = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(EngineError):
    """The request (or the adapter it names) is malformed or unsupported: 400."""


class ModelNotFound(EngineError):
    status_code = 404

    def __init__(self, name: str, *, param: str | None = "model"):
        super().__init__(f"The model `{name}` does not exist.", param=param, code="model_not_found")


class AdapterNotFound(EngineError):
    status_code = 404

    def __init__(self, name: str):
        super().__init__(f"The lora adapter '{name}' cannot be found.", param="lora_name", code="lora_not_found")


class FeatureDisabled(EngineError):
    status_code = 404

    def __init__(self, what: str):
        super().__init__(f"{what} is disabled on this engine", code="not_found")


class GenerationFailed(EngineError):
    """The generation loop failed while running this request (logged there): 500, typed as OpenAI
    types its 5xx, also when it ends a stream after the 200."""

    status_code = 500
    type = "server_error"
