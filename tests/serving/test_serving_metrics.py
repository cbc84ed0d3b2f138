"""The gateway's metrics count every observation under its own labels (the labelled children are
reused across requests, never shared between label values or between apps)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import GatewayMetrics


def _samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_repeated_observations_add_up_per_label_values():
    metrics, other = GatewayMetrics(), GatewayMetrics()
    metrics.observe_request("/v1/chat/completions", "POST", 200, 0.002)
    metrics.observe_request("/v1/chat/completions", "POST", 200, 0.02)
    metrics.observe_request("/v1/chat/completions", "POST", 429, 0.001)
    metrics.observe_tokens("m", 4, 8)
    metrics.observe_tokens("m", 1, 2)
    metrics.observe_tokens("n", 3, 0)
    other.observe_tokens("m", 100, 100)

    got = _samples(metrics)
    route = ("route", "/v1/chat/completions")
    assert got[("tuneforge_serving_requests_total", (("method", "POST"), route, ("status", "200")))] == 2
    assert got[("tuneforge_serving_requests_total", (("method", "POST"), route, ("status", "429")))] == 1
    assert got[("tuneforge_serving_request_duration_seconds_count", (route,))] == 3
    assert got[("tuneforge_serving_request_duration_seconds_bucket", (("le", "0.005"), route))] == 2
    assert got[("tuneforge_serving_tokens_total", (("kind", "prompt"), ("model", "m")))] == 5
    assert got[("tuneforge_serving_tokens_total", (("kind", "completion"), ("model", "m")))] == 10
    assert got[("tuneforge_serving_tokens_total", (("kind", "prompt"), ("model", "n")))] == 3
    assert _samples(other)[("tuneforge_serving_tokens_total", (("kind", "prompt"), ("model", "m")))] == 100
