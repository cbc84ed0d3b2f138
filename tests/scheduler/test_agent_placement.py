"""The worker agent hands a multi-GPU plan to the trainer: the spec it writes on the trainer's stdin
carries the plan's placement, and single-GPU jobs are left exactly as they were."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpu_worker import contract
from scheduler import agent as agent_module
from scheduler.agent import _Supervision, place
from scheduler.routing import Plan


def _spec(method=contract.Method.supervised, **runtime) -> contract.JobSpec:
    return contract.JobSpec(job_id="ftjob-1", org_id="org", base_model="tuneforge-tiny", seed=1, method=method,
                            hyperparameters=contract.Hyperparameters(n_epochs=1, batch_size=16, gradient_accumulation_steps=2, learning_rate=1e-4),
                            training_file_key="k", output_prefix="p", runtime=contract.Runtime(**runtime))


MULTI = Plan(queue="tuneforge.multi-gpu.h100", worker_kind="multi-gpu", reasons=("full fine-tuning",), gpu_class="h100", gpu_count=4,
             zero_stage=3, offload=True, memory_mode="checkpointing", micro_batch_size=2, gradient_accumulation_steps=4, uses_kernels=False)


def test_a_multi_gpu_plan_becomes_the_placement():
    spec, line = place(_spec(), MULTI)
    d = spec.runtime.distributed
    assert (d.gpus_per_node, d.nodes, d.zero_stage, d.offload_optimizer, d.micro_batch_size) == (4, 1, 3, True, 2)
    assert spec.runtime.memory_mode == contract.MemoryMode.checkpointing and spec.runtime.use_kernels is False
    # what to learn is untouched: the same global batch, shared by the 4 ranks
    assert spec.hyperparameters == _spec().hyperparameters
    assert line == "Training on 4 GPUs (h100) with DeepSpeed ZeRO-3 with optimizer offload"
    assert contract.JobSpec.model_validate_json(spec.model_dump_json()) == spec  # crosses the pipe intact


def test_single_gpu_plans_and_unknown_plans_leave_the_spec_alone():
    single = Plan(queue="q", worker_kind="single-gpu", reasons=(), gpu_class="l4", memory_mode="offload")
    assert place(_spec(), single) == (_spec(), None)
    assert place(_spec(), None) == (_spec(), None)


def test_preference_methods_are_placed_too():
    spec, line = place(_spec(contract.Method.dpo), MULTI)
    assert spec.runtime.distributed.gpus_per_node == 4 and line.startswith("Training on 4 GPUs")


@pytest.mark.integration
def test_the_trainer_receives_the_placement(scratch_database, tmp_path, monkeypatch):
    from scheduler import jobs
    from scheduler.db import session_scope
    from scheduler.migrate import upgrade
    from scheduler.models import File, Job, JobEvent, JobStatus
    from scheduler.settings import Settings
    from scheduler.tenancy import get_or_create_org

    url = scratch_database("placement")
    upgrade(url)
    with session_scope(url) as session:
        org = get_or_create_org(session, "acme")
        f = File(org_id=org.id, filename="t.jsonl", purpose="fine-tune", bytes=1, storage_key="k", examples=20)
        session.add(f)
        session.flush()
        spec = _spec().model_copy(update={"org_id": org.id})
        job = Job(id=spec.job_id, org_id=org.id, model="tuneforge-tiny", training_file_id=f.id, seed=1, suffix="s", method={},
                  spec=spec.model_dump(mode="json"), status=JobStatus.queued)
        session.add(job)
        session.flush()
        token = jobs.claim(session, job, "test", 30)
    monkeypatch.setattr(agent_module, "_plan", lambda s: MULTI)
    received = tmp_path / "spec.json"
    # A stand-in trainer: keeps the spec line it was given and fails the job with a known code.
    failed = contract.FailedEvent(code="internal_error", message="stand-in").model_dump_json()
    script = f"import sys; open({str(received)!r}, 'w').write(sys.stdin.readline()); print({failed!r}, flush=True)"
    real_popen = subprocess.Popen
    monkeypatch.setattr(agent_module.subprocess, "Popen", lambda cmd, **kw: real_popen([sys.executable, "-c", script], **kw))
    _Supervision(Settings(database_url=url, data_dir=tmp_path), spec.job_id, token).run()
    placed = contract.JobSpec.model_validate_json(received.read_text())
    assert placed.runtime.distributed == contract.Distributed(gpus_per_node=4, zero_stage=3, offload_optimizer=True, micro_batch_size=2)
    with session_scope(url) as session:
        messages = [e.message for e in session.query(JobEvent).filter(JobEvent.job_id == spec.job_id)]
    assert "Training on 4 GPUs (h100) with DeepSpeed ZeRO-3 with optimizer offload" in messages
