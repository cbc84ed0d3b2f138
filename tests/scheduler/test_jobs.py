"""The job state machine and lease protocol: every move is conditional, so races have one winner."""

from datetime import timedelta

import pytest

from scheduler import jobs
from scheduler.models import JobEvent, JobStatus, utcnow


def test_claim_has_one_winner(db_session, make_org, make_job):
    org, _ = make_org()
    job = make_job(org)
    first = jobs.claim(db_session, job, "worker-a", 30)
    second = jobs.claim(db_session, job, "worker-b", 30)
    assert first is not None and second is None
    assert job.status == JobStatus.running and job.lease_owner == "worker-a" and job.attempts == 1


def test_heartbeat_is_fenced_by_the_token(db_session, make_org, make_job):
    org, _ = make_org()
    job = make_job(org)
    token = jobs.claim(db_session, job, "a", 30)
    assert jobs.heartbeat(db_session, job.id, token, 30) == (True, None)
    assert jobs.heartbeat(db_session, job.id, "not-the-token", 30) == (False, None)


def test_cancel_queued_is_immediate_and_running_is_flagged(db_session, make_org, make_job):
    org, _ = make_org()
    queued = make_job(org)
    jobs.request_cancel(db_session, queued)
    assert queued.status == JobStatus.cancelled and queued.finished_at is not None

    running = make_job(org)
    token = jobs.claim(db_session, running, "a", 30)
    jobs.request_cancel(db_session, running)
    assert running.status == JobStatus.running
    assert jobs.heartbeat(db_session, running.id, token, 30) == (True, "cancel")


def test_cancel_finished_job_is_refused(db_session, make_org, make_job):
    org, _ = make_org()
    job = make_job(org)
    jobs.fail(db_session, job, "x", "boom")
    with pytest.raises(jobs.InvalidTransition):
        jobs.request_cancel(db_session, job)


def test_pause_queued_is_immediate_and_resume_queues_it_again(db_session, make_org, make_job):
    org, _ = make_org()
    job = make_job(org)
    jobs.request_pause(db_session, job)
    assert job.status == JobStatus.paused
    with pytest.raises(jobs.InvalidTransition):
        jobs.request_pause(db_session, job)  # already paused
    jobs.resume(db_session, job)
    assert job.status == JobStatus.queued and job.nudged_at is None  # the next tick offers it
    with pytest.raises(jobs.InvalidTransition):
        jobs.resume(db_session, job)  # only a paused job resumes
    jobs.request_pause(db_session, job)
    jobs.request_cancel(db_session, job)  # a paused job can be cancelled
    assert job.status == JobStatus.cancelled
    for move in (jobs.request_pause, jobs.resume):
        with pytest.raises(jobs.InvalidTransition):
            move(db_session, job)


def test_pause_running_is_flagged_and_its_worker_stops_it(db_session, make_org, make_job):
    org, _ = make_org()
    job = make_job(org)
    token = jobs.claim(db_session, job, "a", 30)
    jobs.request_pause(db_session, job)
    jobs.request_pause(db_session, job)  # asked twice: one flag, one event
    assert job.status == JobStatus.running and job.pause_requested
    assert [e.message for e in db_session.query(JobEvent).filter_by(job_id=job.id)].count(
        "Pause requested; stopping the running job at a checkpoint") == 1
    assert jobs.heartbeat(db_session, job.id, token, 30) == (True, "pause")
    assert jobs.stopped_by_pause(db_session, job, token, "at step 3")
    assert job.status == JobStatus.paused and not job.pause_requested and job.lease_token is None and job.pauses == 1
    assert jobs.heartbeat(db_session, job.id, token, 30)[0] is False  # the attempt is over
    with pytest.raises(jobs.InvalidTransition):
        jobs.request_pause(db_session, make_job(org, status=JobStatus.validating_files))  # not validated yet


def test_cancel_wins_over_pause_and_paused_attempts_are_not_worker_failures(db_session, make_org, make_job):
    org, _ = make_org()
    job = make_job(org)
    token = jobs.claim(db_session, job, "a", 30)
    jobs.request_pause(db_session, job)
    jobs.request_cancel(db_session, job)
    assert jobs.heartbeat(db_session, job.id, token, 30) == (True, "cancel")
    with pytest.raises(jobs.InvalidTransition):
        jobs.request_pause(db_session, job)  # being cancelled

    job = make_job(org)
    for attempt in range(3):  # three attempts, each paused: none counts against max_attempts
        token = jobs.claim(db_session, job, f"w{attempt}", 30)
        jobs.request_pause(db_session, job)
        jobs.stopped_by_pause(db_session, job, token, f"at step {attempt}")
        jobs.resume(db_session, job)
    token = jobs.claim(db_session, job, "w3", 30)
    assert jobs.reap(db_session, job, max_attempts=3) == "requeued"  # the first lost worker
    token = jobs.claim(db_session, job, "w4", 30)
    jobs.request_pause(db_session, job)
    assert jobs.reap(db_session, job, max_attempts=3) == "paused"  # lost while pausing: paused, counted
    assert job.status == JobStatus.paused and job.pauses == 3


def test_reaper_requeues_then_fails_after_max_attempts(db_session, make_org, make_job):
    org, _ = make_org()
    job = make_job(org)
    for attempt in range(1, 4):
        token = jobs.claim(db_session, job, f"w{attempt}", 30)
        assert token
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
        db_session.flush()
        assert [j.id for j in jobs.expired_leases(db_session)] == [job.id]
        outcome = jobs.reap(db_session, job, max_attempts=3)
        assert outcome == ("requeued" if attempt < 3 else "failed")
        # the stale holder can no longer heartbeat
        assert jobs.heartbeat(db_session, job.id, token, 30)[0] is False
    assert job.status == JobStatus.failed and job.error["code"] == "worker_lost"


def test_reap_loses_to_a_late_heartbeat(db_session, make_org, make_job):
    org, _ = make_org()
    job = make_job(org)
    token = jobs.claim(db_session, job, "a", 30)
    stale = job.lease_token
    jobs.reap(db_session, job, 3)  # requeued
    jobs.claim(db_session, job, "b", 30)
    assert job.lease_token != stale
    assert jobs.heartbeat(db_session, job.id, token, 30)[0] is False
    assert job.lease_owner == "b"


def test_events_are_ordered_per_job(db_session, make_org, make_job):
    org, _ = make_org()
    job = make_job(org)
    for i in range(3):
        jobs.add_event(db_session, job, f"m{i}")
    seqs = [e.seq for e in db_session.query(JobEvent).filter_by(job_id=job.id).order_by(JobEvent.seq)]
    assert seqs == [1, 2, 3]


def test_fine_tuned_model_name():
    assert jobs.fine_tuned_model_name("tuneforge-tiny", "acme", "demo", "ftjob-1") == "ft:tuneforge-tiny:acme:demo:ftjob-1"
    assert jobs.fine_tuned_model_name("m", "acme", None, "ftjob-1") == "ft:m:acme::ftjob-1"



@pytest.mark.integration
def test_event_seq_collision_takes_the_next_number(scratch_database):
    """Writer B holds seq 1 uncommitted while writer A picks seq 1 too: A waits on B's row, gets the
    unique violation when B commits, and takes seq 2 instead of failing."""
    import threading

    from sqlalchemy.orm import Session

    from scheduler.db import get_engine
    from scheduler.migrate import upgrade
    from scheduler.models import Job, Organization

    url = scratch_database("events")
    upgrade(url)
    engine = get_engine(url)
    with Session(engine) as s:
        org = Organization(name="o")
        s.add(org)
        s.flush()
        org_id = org.id
        s.add(Job(id="ftjob-race", org_id=org_id, model="m", training_file_id="f", seed=1, method={}, spec={}, status=JobStatus.running))
        s.commit()
    b = Session(engine)
    b.add(JobEvent(job_id="ftjob-race", org_id=org_id, seq=1, message="from B"))
    b.flush()  # seq 1 taken, not yet visible to A
    threading.Timer(0.5, b.commit).start()
    with Session(engine) as a:
        seq = jobs.add_event(a, a.get(Job, "ftjob-race"), "from A").seq
        a.commit()
    b.close()
    assert seq == 2
