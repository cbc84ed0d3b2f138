"""Prometheus metrics of the gateway, exposed at ``GET /metrics``.

Each app gets its own registry so that several gateways in one process (tests) never share counters.
Labels are bounded: routes are path templates, not raw paths, and token counters are labelled by base
model, because fine-tuned model names grow with every tenant's every job.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

# Covers a cached auth failure (~1 ms) up to a long non-streamed generation (minutes).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tuneforge_serving_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "tuneforge_serving_request_duration_seconds",
            "Time from request to the last byte of the response",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "tuneforge_serving_tokens", "Tokens served, by base model and kind (prompt/completion)", ["model", "kind"], registry=self.registry
        )
        self.adapter_loads = Counter(
            "tuneforge_serving_adapter_loads", "LoRA adapter loads requested from engines", ["model"], registry=self.registry
        )

        # Labelled children by label values: ``labels()`` validates and locks on every call, and these
        # run on every request (a few percent of the gateway's CPU at 500 rps). Bounded like the labels.
        self._request_children: dict[tuple[str, str, int], tuple] = {}
        self._token_children: dict[str, tuple] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        children = self._request_children.get((route, method, status))
        if children is None:
            children = (self.requests.labels(route=route, method=method, status=str(status)), self.latency.labels(route=route))
            self._request_children[(route, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_tokens(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        children = self._token_children.get(model)
        if children is None:
            children = self._token_children[model] = (self.tokens.labels(model=model, kind="prompt"), self.tokens.labels(model=model, kind="completion"))
        children[0].inc(prompt_tokens)
        children[1].inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
