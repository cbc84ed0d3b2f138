"""The multi-GPU worker on CUDA: every GPU of the machine (up to 4) as a DeepSpeed rank over NCCL,
against the single-GPU worker on one of them. On a one-GPU machine it still runs DeepSpeed with one
rank (ZeRO-2 and ZeRO-3 on the GPU, the launcher, the event relay), which is all a single H200 can
show; on 2×/4×H200 it is the multi-GPU check of issue 5.

Both jobs train in float32 (TF32 off: PyTorch's default for matmuls), so the comparison has the CPU
test's meaning: the same arithmetic in another order; ``RTOL`` allows ~100× the ~1e-7 differences
seen there, for NCCL's reduction order and cuBLAS picking other kernels for other batch shapes.
``bench/deepspeed_scaling.py`` measures the bf16 case and the speed.
"""

from __future__ import annotations

import pytest

from gpu_worker.contract import CompletedEvent, LogEvent, MetricsEvent, StoppedEvent

pytestmark = pytest.mark.gpu
deepspeed = pytest.importorskip("deepspeed")

RTOL = 1e-5


def _ranks() -> int:
    import torch

    return min(torch.cuda.device_count(), 4)


@pytest.fixture(scope="module")
def gpu_store(tmp_path_factory):
    from tests.gpu_worker.test_distributed import make_store

    return make_store(tmp_path_factory.mktemp("gpu-objects"))


@pytest.mark.parametrize("stage,full", [(2, False), (3, True)], ids=["zero2-lora", "zero3-full"])
def test_all_gpus_train_the_single_gpu_job(gpu_store, micro_model_dir, tmp_path, stage, full):
    from gpu_worker.contract import DType
    from tests.gpu_worker.test_distributed import _losses, _spec, _Trainer

    from gpu_worker.recipes import RunContext
    from gpu_worker.recipes.sft import run

    n = _ranks()
    spec = _spec(micro_model_dir, f"jobs/gpu-{stage}", ranks=n, stage=stage, full=full)
    spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"dtype": DType.float32})})
    trainer = _Trainer(spec, gpu_store, tmp_path, tmp_path / "ranks.stderr")
    assert trainer.events_until_end() == 0 and isinstance(trainer.events[-1], CompletedEvent), trainer.log_tail()
    assert any(f"{n} rank(s), DeepSpeed ZeRO-{stage}" in e.message for e in trainer.of(LogEvent))
    one = spec.model_copy(update={"output_prefix": f"jobs/gpu-one-{stage}", "runtime": spec.runtime.model_copy(update={"distributed": None})})
    events = []
    result = run(one, RunContext(store=gpu_store, data_dir=tmp_path, emit=events.append, device="cuda"))
    assert isinstance(result, CompletedEvent)
    assert trainer.losses() == pytest.approx(_losses(events), rel=RTOL)
    assert all(m.gpu_memory_gb for m in trainer.of(MetricsEvent))


def test_cancel_and_resume_on_gpus(gpu_store, micro_model_dir, tmp_path):
    import signal

    from tests.gpu_worker.test_distributed import _spec, _Trainer

    spec = _spec(micro_model_dir, "jobs/gpu-stop", ranks=_ranks())
    whole = _Trainer(spec.model_copy(update={"output_prefix": "jobs/gpu-whole"}), gpu_store, tmp_path, tmp_path / "whole.stderr")
    assert whole.events_until_end() == 0, whole.log_tail()
    stopping = _Trainer(spec, gpu_store, tmp_path, tmp_path / "stop.stderr")
    stopping.events_until_end(lambda e: isinstance(e, MetricsEvent) and e.step == 1 and stopping.proc.send_signal(signal.SIGTERM))
    stopped = stopping.events[-1]
    assert isinstance(stopped, StoppedEvent), stopping.log_tail()
    resumed = _Trainer(spec.model_copy(update={"resume_from_key": stopped.checkpoint_key}), gpu_store, tmp_path, tmp_path / "resume.stderr")
    assert resumed.events_until_end() == 0, resumed.log_tail()
    assert resumed.losses() == pytest.approx(whole.losses()[stopped.step :], rel=RTOL)
