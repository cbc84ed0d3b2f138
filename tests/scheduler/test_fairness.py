"""Fair share: the pure ordering as a table with fake clocks, then the loop's nudge on a real
PostgreSQL database (a scratch one: the loop commits its own transactions)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine

from gpu_worker.contract import AdapterConfig, Hyperparameters, JobSpec
from scheduler.db import session_scope
from scheduler.fairness import Candidate, Limits, OrgState, fair_order
from scheduler.fleet import EMBEDDED_FLEET, parse_fleet
from scheduler.loop import RENUDGE_SECONDS, nudge_queued
from scheduler.models import Base, Job, JobStatus, Organization, new_id
from scheduler.settings import Settings

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=timezone.utc)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def jobs_of(org: str, n: int, start: float = 0, **kw) -> list[Candidate]:
    return [Candidate(f"{org}-{i}", org, at(start + i), **kw) for i in range(n)]


def ids(order) -> list[str]:
    return [c.job_id for c in order]


def test_one_orgs_hundred_jobs_do_not_starve_anothers_one():
    big = jobs_of("a", 100)
    small = [Candidate("b-0", "b", at(500))]  # submitted long after all of a's
    order = fair_order(big + small, {}, Limits())
    assert ids(order)[:2] in (["a-0", "b-0"], ["b-0", "a-0"])
    assert len(order) == 101


def test_orgs_alternate_and_each_org_keeps_its_fifo():
    order = fair_order(jobs_of("a", 3) + jobs_of("b", 3, start=10), {}, Limits())
    assert ids(order) == ["a-0", "b-0", "a-1", "b-1", "a-2", "b-2"]


def test_the_org_with_fewer_running_goes_first_then_the_least_recently_served():
    cands = jobs_of("a", 2) + jobs_of("b", 2) + jobs_of("c", 2)
    states = {"a": OrgState(running=2), "b": OrgState(running=0, last_started=at(-1)), "c": OrgState(running=0, last_started=at(-30))}
    # c and b run nothing; c was served longer ago; a catches up only once the others have 2 picked
    assert ids(fair_order(cands, states, Limits())) == ["c-0", "b-0", "c-1", "b-1", "a-0", "a-1"]


def test_per_org_concurrency_limit_counts_running_jobs():
    cands = jobs_of("a", 5) + jobs_of("b", 5)
    order = fair_order(cands, {"a": OrgState(running=1)}, Limits(max_running_per_org=2, per_org={"b": 3}))
    assert sorted(ids(order)) == ["a-0", "b-0", "b-1", "b-2"]


@pytest.mark.parametrize("limits,first", [
    (Limits(org_priority={"b": 5}), ["b-0", "b-1", "a-0"]),  # an org's priority lifts all its jobs
    (Limits(), ["a-0", "b-0", "a-1"]),
])
def test_priorities_before_turns(limits, first):
    assert ids(fair_order(jobs_of("a", 2) + jobs_of("b", 2, start=5), {}, limits))[:3] == first


def test_a_job_priority_beats_older_jobs():
    urgent = Candidate("a-urgent", "a", at(99), priority=10)
    assert ids(fair_order(jobs_of("a", 3) + [urgent], {}, Limits()))[0] == "a-urgent"


def test_free_gpus_bound_what_is_offered_and_small_jobs_go_around_big_ones():
    cands = [
        Candidate("a-big", "a", at(0), "h100", 4),
        Candidate("b-small", "b", at(1), "h100", 1),
        Candidate("c-l4", "c", at(2), "l4", 1),
        Candidate("d-l4", "d", at(3), "l4", 1),
    ]
    order = fair_order(cands, {}, Limits(), free_gpus={"h100": 2, "l4": 1})
    assert ids(order) == ["b-small", "c-l4"]  # a-big needs 4 of the 2 free H100s: it waits
    assert fair_order(cands, {}, Limits(), free_gpus={"h100": 0, "l4": 0}) == []
    assert len(fair_order(cands, {}, Limits(), free_gpus=None)) == 4  # capacity unknown: all


# --- the loop ------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.nudges: list[tuple[str, str]] = []

    def nudge(self, job_id: str, queue: str) -> None:
        self.nudges.append((job_id, queue))


class LimitedSettings(Settings):
    max_running_per_org: int | None = None


@pytest.fixture(scope="module")
def loop_db(scratch_database):
    url = scratch_database("fair")
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def settings(loop_db, tmp_path):
    with session_scope(loop_db) as s:
        s.query(Job).delete()
        s.query(Organization).delete()
    return LimitedSettings(data_dir=tmp_path, database_url=loop_db)


def add_jobs(url, org_name: str, n: int, start: float, model="tuneforge-tiny", status=JobStatus.queued, adapter="lora") -> list[str]:
    made = []
    with session_scope(url) as s:
        org = s.query(Organization).filter_by(name=org_name).one_or_none() or Organization(id=new_id("org-"), name=org_name)
        s.add(org)
        s.flush()
        for i in range(n):
            job_id = new_id("ftjob-")
            spec = JobSpec(job_id=job_id, org_id=org.id, base_model=model, adapter=AdapterConfig(type=adapter),
                           hyperparameters=Hyperparameters(n_epochs=1, batch_size=2, learning_rate=1e-3, max_seq_length=512),
                           seed=1, training_file_key="k", output_prefix="p")
            s.add(Job(id=job_id, org_id=org.id, model=model, training_file_id="file-x", seed=1, method={"type": "supervised"},
                      spec=spec.model_dump(mode="json"), status=status, created_at=at(start + i),
                      started_at=at(start + i) if status == JobStatus.running else None))
            made.append(job_id)
    return made


def test_nudge_interleaves_orgs_and_respects_limits(settings):
    url = settings.database_url
    a = add_jobs(url, "a", 60, start=0)  # more than one batch
    b = add_jobs(url, "b", 1, start=100)
    add_jobs(url, "a", 1, start=-10, status=JobStatus.running)
    settings.max_running_per_org = 3
    rec = Recorder()
    assert nudge_queued(settings, rec, now=at(200), fleet=EMBEDDED_FLEET) == 3
    # b first (runs nothing), then a's two oldest up to a's limit of 3 (1 already running)
    assert [j for j, _ in rec.nudges] == [b[0], a[0], a[1]]
    assert {q for _, q in rec.nudges} == {"tuneforge.single-gpu"}
    # offered jobs are not re-nudged until the interval passes, and still hold their org's share
    rec2 = Recorder()
    assert nudge_queued(settings, rec2, now=at(200) + timedelta(seconds=1), fleet=EMBEDDED_FLEET) == 0
    rec3 = Recorder()
    nudge_queued(settings, rec3, now=at(200) + timedelta(seconds=RENUDGE_SECONDS + 1), fleet=EMBEDDED_FLEET)
    assert [j for j, _ in rec3.nudges] == [b[0], a[0], a[1]]


def test_nudge_offers_only_what_free_gpus_can_start(settings):
    url = settings.database_url
    fleet = parse_fleet({"classes": [{"name": "l4", "memory_gb": 24, "gpus_per_node": 1, "nodes": 2}]})
    add_jobs(url, "a", 1, start=0, status=JobStatus.running)
    a = add_jobs(url, "a", 3, start=1)
    b = add_jobs(url, "b", 3, start=2)
    rec = Recorder()
    assert nudge_queued(settings, rec, now=at(10), fleet=fleet) == 1  # 2 GPUs, 1 busy
    assert rec.nudges == [(b[0], "tuneforge.single-gpu.l4")]
    with session_scope(url) as s:
        assert s.get(Job, b[0]).queue == "tuneforge.single-gpu.l4"
    # while b-0's offer is outstanding, its GPU counts as taken
    rec2 = Recorder()
    assert nudge_queued(settings, rec2, now=at(10) + timedelta(seconds=1), fleet=fleet) == 0
    with session_scope(url) as s:
        assert all(s.get(Job, j).nudged_at is None for j in a)  # a runs one already: b got the free GPU


def test_a_job_the_fleet_cannot_place_fails_with_the_reason(settings):
    url = settings.database_url
    small = parse_fleet({"classes": [{"name": "l4", "memory_gb": 24}]})
    (job_id,) = add_jobs(url, "a", 1, start=0, model="meta-llama/Llama-3.1-8B", adapter="full")
    assert nudge_queued(settings, Recorder(), now=at(1), fleet=small) == 0
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.failed
        assert job.error["code"] == "unplaceable" and "fleet has 1×24 GB" in job.error["message"]
