"""Metering of inference: each request that reached an engine becomes exactly one usage record.

The record is keyed by (org, request id). A client retrying with the same ``x-request-id`` gets its
answer again, but the second insert is ignored (insert-or-ignore on the unique pair), so it is billed
once. Token counts come from the engine's ``usage``; a stream the client abandoned is recorded with
the tokens relayed so far and status ``client_disconnected``. Records are journaled on the response
path and reach the database in batches (``serving.usage_writer``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog

from scheduler.metering import Usage
from scheduler.tenancy import Principal
from serving.metrics import GatewayMetrics
from serving.registry import ResolvedModel
from serving.usage_writer import UsageWriter

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Outcome:
    prompt_tokens: int
    completion_tokens: int
    # "ok" | "client_disconnected" | "engine_error" | "usage_missing" (the engine sent no counts)
    status: str


def token_counts(usage: Any, *, completion_optional: bool = False) -> tuple[int, int] | None:
    """(prompt, completion) from an OpenAI ``usage`` object, or None when it is absent or malformed.
    ``completion_optional``: an embedding's usage has no completion count (0)."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0 if completion_optional else None)
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        return None
    return prompt, completion


class Meter:
    """Records the outcome of one request; bound to who asked, for what, and when it started."""

    def __init__(self, writer: UsageWriter, metrics: GatewayMetrics, principal: Principal, request_id: str, target: ResolvedModel):
        self._writer = writer
        self._metrics = metrics
        self._principal = principal
        self._request_id = request_id
        self._target = target
        self._started = time.perf_counter()

    def record(self, outcome: Outcome) -> None:
        """Journal the usage record (the database ignores it if this request id was already billed)."""
        usage = Usage(
            org_id=self._principal.org_id,
            request_id=self._request_id,
            kind="inference",
            model=self._target.base,
            adapter=self._target.adapter.id if self._target.adapter else None,
            api_key_id=self._principal.api_key_id,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            latency_ms=(time.perf_counter() - self._started) * 1000,
            status=outcome.status,
        )
        # Served tokens count every time they were served; billing (the record) counts them once.
        self._metrics.observe_tokens(self._target.base, outcome.prompt_tokens, outcome.completion_tokens)
        self._writer.submit(usage)
        log.info(
            "usage recorded",
            model=usage.model,
            adapter=usage.adapter,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            status=usage.status,
        )
