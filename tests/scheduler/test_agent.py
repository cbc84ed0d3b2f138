"""The worker agent's bookkeeping: each trainer event becomes the right rows, fenced by the lease."""

import pytest
from sqlalchemy import select

from gpu_worker import contract
from scheduler import jobs
from scheduler.agent import LeaseLost, _Supervision
from scheduler.db import session_scope
from scheduler.migrate import upgrade
from scheduler.models import Adapter, Checkpoint, File, Job, JobEvent, JobStatus, UsageRecord, new_id
from scheduler.settings import Settings
from scheduler.tenancy import get_or_create_org

pytestmark = pytest.mark.integration


@pytest.fixture
def claimed(scratch_database, tmp_path):
    url = scratch_database("agent")
    upgrade(url)
    settings = Settings(database_url=url, data_dir=tmp_path)
    with session_scope(url) as session:
        org = get_or_create_org(session, "acme")
        f = File(org_id=org.id, filename="t.jsonl", purpose="fine-tune", bytes=1, storage_key="k", examples=20)
        session.add(f)
        session.flush()
        job_id = new_id("ftjob-")
        spec = contract.JobSpec(
            job_id=job_id, org_id=org.id, base_model="tuneforge-tiny", seed=1,
            hyperparameters=contract.Hyperparameters(n_epochs=1, batch_size=1, learning_rate=1e-3),
            training_file_key="k", output_prefix=f"orgs/{org.id}/jobs/{job_id}",
        )
        job = Job(id=job_id, org_id=org.id, model="tuneforge-tiny", training_file_id=f.id, seed=1, suffix="s", method={}, spec=spec.model_dump(mode="json"), status=JobStatus.queued)
        session.add(job)
        session.flush()
        token = jobs.claim(session, job, "test", 30)
    return settings, job_id, token, spec


def _manifest(spec):
    return contract.AdapterManifest(job_id=spec.job_id, base_model=spec.base_model, adapter=spec.adapter, key=f"{spec.output_prefix}/adapter", files=("adapter_model.safetensors",), trained_tokens=42)


def test_completed_registers_adapter_results_usage_and_report(claimed):
    settings, job_id, token, spec = claimed
    sup = _Supervision(settings, job_id, token)
    sup._record(contract.MetricsEvent(step=1, total_steps=2, epoch=0.5, train_loss=1.5, learning_rate=1e-3, tokens=21))
    sup._record(contract.CheckpointEvent(step=1, key=f"{spec.output_prefix}/checkpoints/step-000001"))
    sup._record(contract.CheckpointEvent(step=1, key=f"{spec.output_prefix}/checkpoints/step-000001"))  # a repeat is harmless
    artifacts = (
        contract.Artifact(kind="gguf", key=f"{spec.output_prefix}/artifacts/model-q8_0.gguf", filename="model-q8_0.gguf", bytes=123, detail={"agreement": 1.0}),
        contract.Artifact(kind="modelfile", key=f"{spec.output_prefix}/artifacts/Modelfile", filename="Modelfile", bytes=10),
    )
    report = contract.EvalReport(base_valid_loss=3.0, tuned_valid_loss=1.0, examples=5, passed=True)
    assert sup._record(contract.CompletedEvent(manifest=_manifest(spec), trained_tokens=42, steps=2, artifacts=artifacts, eval_report=report)) is True
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.succeeded and job.trained_tokens == 42 and job.lease_token is None
        assert job.fine_tuned_model == f"ft:tuneforge-tiny:acme:s:{job_id}"
        assert session.get(Adapter, job.fine_tuned_model).storage_key == f"{spec.output_prefix}/adapter"
        assert len(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()) == 1
        results = [session.get(File, fid) for fid in job.result_files]
        assert [(r.filename, r.purpose, r.bytes) for r in results] == [("model-q8_0.gguf", "fine-tune-results", 123), ("Modelfile", "fine-tune-results", 10)]
        usage = session.scalars(select(UsageRecord).where(UsageRecord.kind == "training")).all()
        assert [(u.request_id, u.trained_tokens) for u in usage] == [(f"training:{job_id}", 42)]
        messages = [e.message for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
        assert any(m.startswith("Evaluation gate passed") for m in messages)
        metrics = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")).one()
        assert metrics.data["train_loss"] == 1.5 and metrics.data["tokens"] == 21


def test_a_diverged_steps_metrics_are_recorded_with_the_loss_said_not_finite(claimed):
    """A NaN loss crosses the pipe as null (JSON has no NaN): the step's event is stored, not dropped."""
    settings, job_id, token, _ = claimed
    diverged = contract.MetricsEvent(step=3, total_steps=9, epoch=0.3, train_loss=float("nan"), learning_rate=1e-3,
                                     tokens=63, grad_norm=float("inf"))
    _Supervision(settings, job_id, token)._record(contract.parse_event(contract.dump_event(diverged)))
    with session_scope(settings.database_url) as session:
        event = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")).one()
        assert event.message == "Step 3/9: training loss=not finite (diverged)"
        assert (event.data["train_loss"], event.data["grad_norm"], event.data["tokens"]) == (None, None, 63)
        assert session.get(Job, job_id).trained_tokens == 63


def test_failed_event_fails_the_job_with_its_code(claimed):
    settings, job_id, token, _ = claimed
    _Supervision(settings, job_id, token)._record(contract.FailedEvent(code="eval_regression", message="tuned 2.0 > base 1.0"))
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.failed and job.error["code"] == "eval_regression"


@pytest.mark.parametrize("asked", ["pause", "cancel", None])
def test_a_stopped_trainer_ends_its_attempt_as_asked(claimed, asked):
    """The trainer checkpointed and stopped (SIGTERM): paused or cancelled as the tenant asked, and
    otherwise (preempted from outside) back to the queue; a pause frees the lease without a failure."""
    settings, job_id, token, _ = claimed
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        {"pause": jobs.request_pause, "cancel": jobs.request_cancel, None: lambda *_: None}[asked](session, job)
    assert _Supervision(settings, job_id, token)._record(contract.StoppedEvent(step=4, checkpoint_key="k/step-4")) is True
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job.status == {"pause": JobStatus.paused, "cancel": JobStatus.cancelled, None: JobStatus.queued}[asked]
        assert job.lease_token is None and job.pauses == (asked == "pause") and not job.pause_requested
        last = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc())).first()
        assert "step 4" in last.message


def test_a_stale_attempt_cannot_write(claimed):
    settings, job_id, token, spec = claimed
    with pytest.raises(LeaseLost):
        _Supervision(settings, job_id, "not-the-token")._record(contract.CompletedEvent(manifest=_manifest(spec), trained_tokens=1, steps=1))
    with session_scope(settings.database_url) as session:
        assert session.get(Job, job_id).status == JobStatus.running
        assert session.scalars(select(Adapter)).first() is None


def test_an_org_at_its_running_limit_is_not_given_another_job(claimed):
    """The claim re-checks the org's limit: a stale nudge cannot push an org past it."""
    from scheduler.agent import Agent

    settings, job_id, _, spec = claimed  # one job of acme already running
    with session_scope(settings.database_url) as session:
        second = Job(id="ftjob-second", org_id=spec.org_id, model="tuneforge-tiny", training_file_id=session.scalars(select(File)).first().id, seed=1, method={}, spec=spec.model_dump(mode="json"), status=JobStatus.queued)
        session.add(second)
    limited = settings.model_copy(update={"org_concurrency_limits": {spec.org_id: 1}})
    assert Agent(limited).offer("ftjob-second") is False
    with session_scope(settings.database_url) as session:
        assert session.get(Job, "ftjob-second").status == JobStatus.queued


def test_fair_share_limits_come_from_settings(monkeypatch, tmp_path):
    from scheduler.fairness import Limits

    monkeypatch.setenv("TUNEFORGE_MAX_RUNNING_PER_ORG", "2")
    monkeypatch.setenv("TUNEFORGE_ORG_CONCURRENCY_LIMITS", '{"org-big": 5}')
    monkeypatch.setenv("TUNEFORGE_ORG_PRIORITIES", '{"org-vip": 3}')
    limits = Limits.from_settings(Settings(data_dir=tmp_path))
    assert (limits.limit("org-x"), limits.limit("org-big"), limits.org_priority) == (2, 5, {"org-vip": 3})


@pytest.mark.parametrize("passed,said,level", [
    (True, "Evaluation gate passed: base vs tuned on 5 validation examples", "info"),
    (False, "Evaluation gate failed: base vs tuned on 5 validation examples", "info"),
    # passed=None: no validation example was compared; the job succeeds and the line never says "failed"
    (None, "Evaluation gate not evaluated: no validation examples (the automatic split needs 100)", "warn"),
])
def test_the_gate_line_says_what_the_report_says_and_the_job_succeeds(claimed, passed, said, level):
    settings, job_id, token, spec = claimed
    examples = 0 if passed is None else 5
    report = contract.EvalReport(examples=examples, passed=passed, reason="no validation examples (the automatic split needs 100)" if passed is None else None)
    assert _Supervision(settings, job_id, token)._record(contract.CompletedEvent(manifest=_manifest(spec), trained_tokens=42, steps=2, eval_report=report)) is True
    with session_scope(settings.database_url) as session:
        assert session.get(Job, job_id).status == JobStatus.succeeded
        gate = [(e.message, e.level) for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)) if e.message.startswith("Evaluation gate")]
        assert gate == [(said, level)]
        assert session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.message.startswith("Evaluation gate"))).one().data["passed"] is passed
