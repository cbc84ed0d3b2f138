"""The multi-GPU launch without training: the torchrun command for one node and for several, and what
the supervising trainer reports when its ranks end without a result."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gpu_worker import distributed
from gpu_worker.contract import Distributed, FailedEvent, Hyperparameters, JobSpec, LogEvent, Runtime, dump_event


def test_one_node_uses_a_standalone_rendezvous_with_a_rank_per_gpu(tmp_path):
    cmd = distributed.launch_command(Distributed(gpus_per_node=4), tmp_path, env={})
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in cmd and "--standalone" in cmd and "--nnodes=1" in cmd
    assert cmd[-4:] == ["-m", "gpu_worker.distributed", "--run-dir", str(tmp_path)]


def test_several_nodes_meet_at_node_zero(tmp_path):
    d = Distributed(gpus_per_node=8, nodes=2, zero_stage=3)
    cmd = distributed.launch_command(d, tmp_path, env={"TUNEFORGE_MASTER_ADDR": "tf-job-0.tf-job", "JOB_COMPLETION_INDEX": "1"})
    assert {"--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--master-addr=tf-job-0.tf-job", "--master-port=29500"} <= set(cmd)
    assert "--standalone" not in cmd
    explicit = distributed.launch_command(d, tmp_path, env={"TUNEFORGE_MASTER_ADDR": "10.0.0.1", "TUNEFORGE_MASTER_PORT": "7000", "TUNEFORGE_NODE_RANK": "0"})
    assert {"--node-rank=0", "--master-port=7000"} <= set(explicit)
    with pytest.raises(ValueError, match="TUNEFORGE_MASTER_ADDR"):
        distributed.launch_command(d, tmp_path, env={})


def _spec() -> JobSpec:
    return JobSpec(job_id="ftjob-x", org_id="o", base_model="m", seed=1, training_file_key="k", output_prefix="p",
                   hyperparameters=Hyperparameters(n_epochs=1, batch_size=1, learning_rate=1e-4),
                   runtime=Runtime(distributed=Distributed(gpus_per_node=2)))


def _fake_ranks(monkeypatch, script: str):
    """Replace torchrun with a Python one-liner standing in for the node's ranks."""
    monkeypatch.setattr(distributed, "launch_command", lambda d, run_dir, env=None: [sys.executable, "-c", script, str(run_dir)])


def test_ranks_that_die_without_a_result_become_one_failed_event(monkeypatch):
    log = dump_event(LogEvent(message="rank 0 started"))
    _fake_ranks(monkeypatch, f"print({log!r}); print('not an event'); import sys; sys.exit(3)")
    events = []
    code = distributed.supervise(_spec(), events.append, lambda: False)
    assert code == 1 and [type(e) for e in events] == [LogEvent, FailedEvent]
    assert events[-1].code == "internal_error" and "exit code 3" in events[-1].message


def test_a_failing_rank_other_than_zero_names_its_error(monkeypatch):
    failed = FailedEvent(code="out_of_memory", message="out of GPU memory on rank 1")
    script = ("import sys, pathlib; pathlib.Path(sys.argv[1], 'failed-rank-1.json').write_text("
              f"{failed.model_dump_json()!r}); sys.exit(1)")
    _fake_ranks(monkeypatch, script)
    events = []
    assert distributed.supervise(_spec(), events.append, lambda: False) == 1
    assert events == [failed]


def test_a_stop_request_reaches_the_ranks_as_a_file(monkeypatch):
    # The fake rank waits for the stop file, then reports a StoppedEvent like rank 0 would.
    script = ("import sys, time, pathlib; p = pathlib.Path(sys.argv[1], 'stop')\n"
              "while not p.exists(): time.sleep(0.05)\n"
              "print('{\"type\": \"stopped\", \"step\": 3, \"checkpoint_key\": \"p/checkpoints/step-000003\"}')")
    _fake_ranks(monkeypatch, script)
    events = []
    assert distributed.supervise(_spec(), events.append, lambda: True) == 0
    assert [e.type for e in events] == ["stopped"] and events[0].step == 3


def test_the_run_folder_is_private_and_removed(monkeypatch, tmp_path):
    seen = tmp_path / "seen"
    _fake_ranks(monkeypatch, f"import sys, os, pathlib; d = pathlib.Path(sys.argv[1]); pathlib.Path({str(seen)!r}).write_text(d.as_posix() + ' ' + oct(d.stat().st_mode & 0o777) + ' ' + (d / 'spec.json').read_text()[:20])")
    distributed.supervise(_spec(), [].append, lambda: False)
    folder, mode, spec_head = seen.read_text().split(" ", 2)
    assert mode == "0o700" and spec_head.startswith('{"schema_version":1') and not Path(folder).exists()
