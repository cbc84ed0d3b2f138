"""Metering of inference: each run of a request on an engine becomes exactly one usage record.

The record is keyed by (org, the attempt's id): the request's ``x-request-id`` for its first run,
``<id>#<n>`` for a later run under the same id (serving.idempotency: a retry of a request that
succeeded is answered from its stored response and not billed; a retry of one that failed or was cut
off runs again and is billed as its own attempt). A request that reached an engine is recorded
whatever its outcome, with its status and the engine's counts (zero when the engine counted nothing).
Token counts come from the engine's ``usage``; a stream the client abandoned is recorded with the
engine's running count so far and status ``client_disconnected``.

Records are journaled on the response path and reach the database in batches
(``serving.usage_writer``). A run is journaled as open when it is sent to the engine, with its running
count at most every ``progress_interval_s``: a gateway killed mid-request leaves that state, which the
next gateway bills with status ``gateway_restarted``.
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
from serving.usage_writer import GATEWAY_RESTARTED, UsageWriter

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Outcome:
    prompt_tokens: int
    completion_tokens: int
    # "ok" | "client_disconnected" | "engine_error" | "engine_timeout" | "engine_rejected" | "usage_missing"
    # (the engine sent no counts); "gateway_restarted" is the journal's (serving.usage_writer)
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


class StreamTally:
    """The engine's running count of a stream with several choices (``n`` > 1, or several prompts).

    With continuous usage stats vLLM puts on each chunk the count of that chunk's choice: its prompt's
    tokens and the choice's completion tokens so far. The stream's count is the latest per choice,
    summed, with each prompt counted once (choice ``i`` of a completion with ``n`` choices per prompt
    answers prompt ``i // n``; every chat choice answers the one conversation). The final usage chunk,
    when it comes, is the engine's total and replaces the tally."""

    def __init__(self, choices_per_prompt: int | None):
        self._per_prompt = choices_per_prompt  # None: all choices share one prompt (chat)
        self._prompt: dict[int, int] = {}
        self._completion: dict[int, int] = {}
        self._final: tuple[int, int] | None = None

    def add(self, choices: Any, counts: tuple[int, int]) -> None:
        indexes = [c.get("index", 0) for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
        indexes = [i for i in indexes if isinstance(i, int) and i >= 0]
        if not indexes:  # the final usage chunk (no choices): the engine's own total
            self._final = counts
            return
        prompt, completion = counts
        for index in indexes:  # vLLM sends one choice per chunk; several would share its count
            self._prompt[index // self._per_prompt if self._per_prompt else 0] = prompt
            self._completion[index] = completion

    @property
    def counts(self) -> tuple[int, int] | None:
        if self._final is not None:
            return self._final
        if not self._completion:
            return None
        return sum(self._prompt.values()), sum(self._completion.values())


class Meter:
    """Records the outcome of one run of a request; bound to who asked, for what, under which id, and
    when it started."""

    def __init__(
        self,
        writer: UsageWriter,
        metrics: GatewayMetrics,
        principal: Principal,
        request_id: str,
        target: ResolvedModel,
        *,
        progress_interval_s: float = 1.0,
    ):
        self._writer = writer
        self._metrics = metrics
        self._principal = principal
        self._request_id = request_id
        self._target = target
        self._progress_interval_s = progress_interval_s
        self._started = time.perf_counter()
        self._journaled_at: float | None = None  # when the open state was last journaled
        self._counts = (0, 0)
        self._closed = False

    def _usage(self, prompt: int, completion: int, status: str) -> Usage:
        return Usage(
            org_id=self._principal.org_id,
            request_id=self._request_id,
            kind="inference",
            model=self._target.base,
            adapter=self._target.adapter.id if self._target.adapter else None,
            api_key_id=self._principal.api_key_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            latency_ms=(time.perf_counter() - self._started) * 1000,
            status=status,
        )

    def open(self) -> None:
        """Journal the run as open (sent to an engine): billed as ``gateway_restarted`` if the gateway
        dies before ``record``."""
        self._journaled_at = time.perf_counter()
        self._writer.open(self._usage(0, 0, GATEWAY_RESTARTED))

    def progress(self, prompt: int, completion: int) -> None:
        """The engine's running count; journaled at most every ``progress_interval_s``."""
        if (prompt, completion) == self._counts or self._journaled_at is None or self._closed:
            return
        self._counts = (prompt, completion)
        now = time.perf_counter()
        if now - self._journaled_at >= self._progress_interval_s:
            self._journaled_at = now
            self._writer.open(self._usage(prompt, completion, GATEWAY_RESTARTED))

    def discard(self) -> None:
        """The run never reached an engine (none was reachable): no record."""
        if not self._closed:
            self._closed = True
            self._writer.discard(self._principal.org_id, self._request_id)

    def record(self, outcome: Outcome) -> None:
        """Journal the usage record (once: a second call is ignored)."""
        if self._closed:
            return
        self._closed = True
        usage = self._usage(outcome.prompt_tokens, outcome.completion_tokens, outcome.status)
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
