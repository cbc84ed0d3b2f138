"""Where a job runs. For now every supported job goes to the single-GPU worker pool's queue; the
planner that weighs model size, method and fleet (issue 5) replaces ``route``'s body, not its shape."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_worker.contract import JobSpec

SINGLE_GPU_QUEUE = "tuneforge.single-gpu"


@dataclass(frozen=True)
class Plan:
    queue: str
    worker_kind: str
    reasons: tuple[str, ...]


def route(spec: JobSpec) -> Plan:
    return Plan(
        queue=SINGLE_GPU_QUEUE,
        worker_kind="single-gpu",
        reasons=(f"LoRA r={spec.adapter.rank} on {spec.base_model}: one accelerator (or the CPU) is enough",),
    )
