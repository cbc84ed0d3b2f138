"""Prometheus metrics of the API: HTTP traffic counted by the request middleware, and job gauges read
from the database when ``/metrics`` is scraped (so every API replica reports the same truth and
nothing drifts between scrapes).

Each app owns its registry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from scheduler.models import Job, JobStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tuneforge_api_http_requests", "HTTP requests handled", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "tuneforge_api_http_request_duration_seconds",
            "Time to the end of the response",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class _JobsSnapshot:
    """A one-shot collector over figures already read from the database."""

    def __init__(self, by_status: dict[str, int], queue_depth: dict[str, int], trained_tokens: int):
        self.by_status, self.queue_depth, self.trained_tokens = by_status, queue_depth, trained_tokens

    def collect(self):
        jobs = GaugeMetricFamily("tuneforge_jobs", "Fine-tuning jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], self.by_status.get(status.value, 0))
        yield jobs
        depth = GaugeMetricFamily("tuneforge_queue_depth", "Queued jobs waiting for a worker", labels=["queue"])
        for queue, n in sorted(self.queue_depth.items()):
            depth.add_metric([queue], n)
        yield depth
        yield CounterMetricFamily("tuneforge_trained_tokens", "Tokens trained by all jobs", value=self.trained_tokens)


def _read_jobs(session: Session) -> _JobsSnapshot:
    by_status = {
        (s.value if isinstance(s, JobStatus) else str(s)): n
        for s, n in session.execute(select(Job.status, func.count()).group_by(Job.status))
    }
    depth = dict(
        session.execute(select(Job.queue, func.count()).where(Job.status == JobStatus.queued).group_by(Job.queue)).all()
    )
    tokens = session.scalar(select(func.coalesce(func.sum(Job.trained_tokens), 0))) or 0
    return _JobsSnapshot(by_status, depth, int(tokens))


def render(metrics: ApiMetrics, session: Session) -> bytes:
    """The exposition text: the live HTTP series plus job figures read now."""
    scrape = CollectorRegistry()
    scrape.register(_read_jobs(session))
    return generate_latest(metrics.registry) + generate_latest(scrape)
