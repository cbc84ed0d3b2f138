"""Which queued jobs to offer to workers next: priorities, fair share across organizations, per-org
concurrency limits and GPU capacity. Pure: the loop gathers the facts from the database and calls
``fair_order``; tests call it with fake clocks.

The order:
1. higher priority first (a job's own priority plus its org's, from settings);
2. within a priority, organizations take turns: the next job goes to the org with the fewest jobs
   running or already picked this round, then to the one served least recently (oldest last start),
   so one org's 100 queued jobs cannot starve another org's 1;
3. within an org, oldest first;
4. an org at its concurrency limit gets nothing more; a job whose GPU class has no free GPUs left is
   skipped (it waits; smaller jobs on other classes go ahead).

Nudging only what can start now keeps the broker's FIFO queues short, so the order chosen here is the
order workers see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

@dataclass(frozen=True)
class Candidate:
    job_id: str
    org_id: str
    created_at: datetime
    gpu_class: str | None = None
    gpus: int = 1
    priority: int = 0


@dataclass(frozen=True)
class OrgState:
    running: int = 0  # jobs of the org running now
    last_started: datetime | None = None  # when the org's latest job started


@dataclass(frozen=True)
class Limits:
    max_running_per_org: int | None = None  # None: no limit
    per_org: dict[str, int] = field(default_factory=dict)  # overrides per org id (0 there pauses the org)
    org_priority: dict[str, int] = field(default_factory=dict)  # added to each of the org's jobs

    def limit(self, org_id: str) -> int | None:
        return self.per_org.get(org_id, self.max_running_per_org)

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(
            max_running_per_org=settings.max_running_per_org or None,  # 0: no limit
            per_org=dict(settings.org_concurrency_limits),
            org_priority=dict(settings.org_priorities),
        )


def fair_order(
    candidates: list[Candidate],
    orgs: dict[str, OrgState],
    limits: Limits,
    free_gpus: dict[str, int] | None = None,
) -> list[Candidate]:
    """The candidates to offer now, in order. ``free_gpus`` (per GPU class) None: capacity unknown."""
    free = dict(free_gpus) if free_gpus is not None else None
    picked: list[Candidate] = []
    taken: dict[str, int] = {}
    prio = lambda c: c.priority + limits.org_priority.get(c.org_id, 0)
    for level in sorted({prio(c) for c in candidates}, reverse=True):
        queues: dict[str, list[Candidate]] = {}
        for c in sorted((c for c in candidates if prio(c) == level), key=lambda c: (c.created_at, c.job_id)):
            queues.setdefault(c.org_id, []).append(c)
        while queues:
            def turn(org: str):
                state = orgs.get(org, OrgState())
                served = (0,) if state.last_started is None else (1, state.last_started)  # never served: first
                return (state.running + taken.get(org, 0), served, org)

            org = min(queues, key=turn)
            state = orgs.get(org, OrgState())
            limit = limits.limit(org)
            if limit is not None and state.running + taken.get(org, 0) >= limit:
                del queues[org]
                continue
            job = _first_that_fits(queues[org], free)
            if job is None:
                del queues[org]
                continue
            queues[org].remove(job)
            if not queues[org]:
                del queues[org]
            picked.append(job)
            taken[org] = taken.get(org, 0) + 1
            if free is not None and job.gpu_class is not None:
                free[job.gpu_class] = free.get(job.gpu_class, 0) - job.gpus
    return picked


def _first_that_fits(jobs: list[Candidate], free: dict[str, int] | None) -> Candidate | None:
    for job in jobs:
        if free is None or job.gpu_class is None or free.get(job.gpu_class, 0) >= job.gpus:
            return job
    return None
