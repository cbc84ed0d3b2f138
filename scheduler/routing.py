"""Where a job runs, and why: a pure function from (job spec, base model facts, fleet) to a ``Plan``.

Rules, in order:
- full fine-tuning goes to the DeepSpeed (``multi-gpu``) worker with ZeRO-3, optimizer offload only if
  nothing fits without it, on the smallest GPU count that fits;
- an adapter job that fits one GPU goes to the ``single-gpu`` worker (Triton kernels when the
  architecture is supported; otherwise the stock HF path, and the plan says so);
- an adapter job too big for one GPU goes to DeepSpeed: ZeRO-2 when the frozen weights fit one GPU
  (data parallel), else ZeRO-3 (weights sharded);
- within a layout, the memory mode escalates only as far as needed (the job's choice → checkpointing
  → offload; with our kernels "off" goes straight to offload, faster and smaller than stock
  checkpointing there), and the micro-batch is the largest divisor of the effective batch that fits;
- smallest GPUs first: a job never takes an 80 GB GPU when a 24 GB one is enough;
- nothing fits: ``Unplaceable`` says what would ("needs 2×80 GB; fleet has 1×24 GB (l4); try QLoRA").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gpu_worker.contract import AdapterType, Hyperparameters, JobSpec, Quantization, Runtime
from scheduler.estimator import (
    GB,
    USABLE_FRACTION,
    Layout,
    ModelFacts,
    UnknownModel,
    estimate_host_memory,
    estimate_memory,
    estimate_throughput,
    fits,
    load_measurements,
    read_model_facts,
    uses_kernels,
)
from scheduler.fleet import LEGACY_SINGLE_GPU_QUEUE, Fleet, GpuClass, get_fleet

SINGLE_GPU_QUEUE = LEGACY_SINGLE_GPU_QUEUE
MODES = ("off", "checkpointing", "offload")
GPU_COUNTS = (1, 2, 4, 8, 16)


class Unplaceable(ValueError):
    """No GPU class of the fleet can run the job; the message says what would."""


@dataclass(frozen=True)
class Plan:
    queue: str
    worker_kind: str  # "single-gpu" | "multi-gpu"
    reasons: tuple[str, ...]
    gpu_class: str | None = None
    gpu_count: int = 1
    zero_stage: int | None = None  # DeepSpeed ZeRO stage; None on the single-GPU worker
    offload: bool = False  # optimizer states in host memory
    quantization: str = "none"
    memory_mode: str = "off"
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    uses_kernels: bool = True
    memory_gb: float | None = None  # predicted peak allocated per GPU
    host_memory_gb: float = 0.0  # pinned host memory the memory mode holds per GPU (estimator.estimate_host_memory)
    memory_parts_gb: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        d["memory_parts_gb"] = dict(self.memory_parts_gb)
        return d


def apply_plan(spec: JobSpec, plan: Plan) -> JobSpec:
    """The spec the worker runs: the plan's memory mode, micro-batch and accumulation (per GPU; the
    effective batch is theirs × gpu_count on the DeepSpeed worker)."""
    hp = spec.hyperparameters.model_dump()
    hp.update(batch_size=plan.micro_batch_size, gradient_accumulation_steps=plan.gradient_accumulation_steps)
    runtime = spec.runtime.model_dump()
    runtime["memory_mode"] = plan.memory_mode
    return spec.model_copy(update={"hyperparameters": Hyperparameters(**hp), "runtime": Runtime(**runtime)})


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _modes_from(requested: str, kernels: bool = False) -> tuple[str, ...]:
    modes = MODES[MODES.index(requested):]
    if kernels and requested == "off":
        # With our kernels, offload (layer inputs copied to host memory on a side stream, a leaner
        # recompute) is both faster and smaller than stock checkpointing: measured on an H200 at 8B,
        # 12,311 vs 11,054 tok/s and 18.21 vs 19.93 GB in bf16 (bench/results/2026-12-03-h200-v5.md).
        # A job that asks for checkpointing itself still gets it.
        return ("off", "offload")
    return modes


def _effective_batch(spec: JobSpec) -> int:
    return spec.hyperparameters.batch_size * spec.hyperparameters.gradient_accumulation_steps


def _per_gpu_batch(spec: JobSpec, data_parallel: int) -> int:
    # DeepSpeed needs batch = micro × accumulation × ranks exactly: a batch that does not split evenly
    # among the GPUs is rounded up to the next one that does (and the plan says so).
    return -(-_effective_batch(spec) // data_parallel)


def _first_fit(spec, facts, gpu: GpuClass, count: int, zero: int | None, offload: bool):
    """(layout, estimate) with the lightest memory mode, then the largest micro-batch, that fits."""
    per_gpu = _per_gpu_batch(spec, count if zero is not None else 1)
    for mode in _modes_from(spec.runtime.memory_mode.value, uses_kernels(spec, facts, zero)):
        for micro in _divisors_desc(per_gpu):
            layout = Layout(gpu_count=count, zero_stage=zero, offload=offload, memory_mode=mode, micro_batch=micro)
            est = estimate_memory(spec, facts, layout)
            if fits(est, gpu.memory_gb):
                return layout, est
    return None


def _deepspeed_candidates(spec, facts, gpu: GpuClass):
    """(count, zero stage, offload) for the multi-GPU worker, cheapest first."""
    full = spec.adapter.type == AdapterType.full
    for count in (c for c in GPU_COUNTS if c <= gpu.gpus_per_node):
        if full:
            # the smallest GPU count wins; at a count, host offload only when nothing else fits
            yield count, 3, False
            yield count, 3, True
        else:
            yield count, 2, False
            if spec.quantization == Quantization.none:  # bitsandbytes 4-bit weights are not sharded by ZeRO-3
                yield count, 3, False


def _plan(spec, facts, gpu, kind, layout, est, reasons) -> Plan:
    ranks = layout.gpu_count if layout.zero_stage is not None else 1
    per_gpu = _per_gpu_batch(spec, ranks)
    accum = per_gpu // layout.micro_batch
    effective, requested = per_gpu * ranks, _effective_batch(spec)
    mode_note = "" if layout.memory_mode == spec.runtime.memory_mode.value else f" (memory mode raised to {layout.memory_mode} to fit)"
    reasons = reasons + [
        f"predicted peak {est.gb:.1f} GB per GPU of {gpu.memory_gb:g} GB ({USABLE_FRACTION:.0%} usable){mode_note}",
        f"micro-batch {layout.micro_batch} × {accum} accumulation" + (f" × {ranks} GPUs" if ranks > 1 else "")
        + f" = effective batch {effective}" + (f" (rounded up from {requested} to split evenly across {ranks} GPUs)" if effective != requested else ""),
    ]
    return Plan(
        queue=gpu.queue(kind), worker_kind=kind, reasons=tuple(reasons), gpu_class=gpu.name, gpu_count=layout.gpu_count,
        zero_stage=layout.zero_stage, offload=layout.offload, quantization=spec.quantization.value,
        memory_mode=layout.memory_mode, micro_batch_size=layout.micro_batch,
        gradient_accumulation_steps=accum, uses_kernels=uses_kernels(spec, facts, layout.zero_stage),
        memory_gb=round(est.gb, 2), memory_parts_gb=tuple((k, round(v / GB, 2)) for k, v in est.parts.items()),
        host_memory_gb=round(estimate_host_memory(spec, facts, layout) / GB, 2),
    )


def _path_reason(spec: JobSpec, facts: ModelFacts) -> str:
    if uses_kernels(spec, facts):
        return f"{facts.architecture} is supported by the Triton kernels"
    if not spec.runtime.use_kernels:
        return "kernels switched off for this job: stock HF path"
    return f"architecture {facts.architecture!r} is not supported by the kernels: trains on the stock HF path"


def route(spec: JobSpec, model_facts: ModelFacts | None = None, fleet: Fleet | None = None) -> Plan:
    """The plan for ``spec``; raises ``Unplaceable`` when nothing in the fleet fits it."""
    fleet = fleet or get_fleet()
    if model_facts is None:
        try:
            model_facts = read_model_facts(spec.base_model)
        except UnknownModel as e:
            biggest = max(fleet.classes, key=lambda c: c.memory_gb)
            return Plan(queue=biggest.queue("single-gpu"), worker_kind="single-gpu", gpu_class=biggest.name,
                        quantization=spec.quantization.value, memory_mode=spec.runtime.memory_mode.value,
                        micro_batch_size=spec.hyperparameters.batch_size,
                        gradient_accumulation_steps=spec.hyperparameters.gradient_accumulation_steps,
                        reasons=(f"{e}: cannot estimate, so the largest single GPU ({biggest.label})",))
    facts = model_facts
    size = f"{facts.params / 1e9:.2f}B-parameter {facts.architecture}"
    base = [f"{spec.adapter.type.value} fine-tuning of {spec.base_model} ({size})"
            + (", NF4-quantized base (QLoRA)" if spec.quantization == Quantization.nf4 else "")]
    if spec.adapter.type != AdapterType.full:
        for gpu in fleet.by_memory():
            hit = _first_fit(spec, facts, gpu, 1, None, False)
            if hit:
                return _plan(spec, facts, gpu, "single-gpu", *hit, base + [_path_reason(spec, facts), f"fits one {gpu.label} GPU"])
    why = "full fine-tuning trains every weight: DeepSpeed ZeRO-3" if spec.adapter.type == AdapterType.full \
        else "does not fit one GPU of any class: DeepSpeed"
    best = None
    for gpu in fleet.by_memory():
        for count, zero, offload in _deepspeed_candidates(spec, facts, gpu):
            hit = _first_fit(spec, facts, gpu, count, zero, offload)
            if hit:
                if best is None or (count * gpu.memory_gb, count) < (best[2] * best[0].memory_gb, best[2]):
                    best = (gpu, hit, count, zero, offload)
                break
    if best is not None:
        gpu, hit, count, zero, offload = best
        stage = f"ZeRO-{zero}" + (" with optimizer offload to host memory" if offload else "")
        detail = "frozen weights replicated, adapter states sharded" if zero == 2 else "weights, gradients and optimizer states sharded"
        path = "DeepSpeed worker: stock HF modules" + ("" if uses_kernels(spec, facts) else f" ({_path_reason(spec, facts)})")
        return _plan(spec, facts, gpu, "multi-gpu", *hit, base + [why, f"{stage} on {count}×{gpu.label}: {detail}", path])
    raise Unplaceable(_refusal(spec, facts, fleet))


def _placeable(spec: JobSpec, facts: ModelFacts, fleet: Fleet) -> bool:
    try:
        route(spec, facts, fleet)
        return True
    except Unplaceable:
        return False


def _would_fit(spec: JobSpec, facts: ModelFacts, memory_gb: float, max_count: int = 16) -> int | None:
    probe = GpuClass(name="probe", memory_gb=memory_gb, gpus_per_node=max_count)
    if spec.adapter.type != AdapterType.full and _first_fit(spec, facts, probe, 1, None, False):
        return 1
    for count, zero, offload in _deepspeed_candidates(spec, facts, probe):
        if _first_fit(spec, facts, probe, count, zero, offload):
            return count
    return None


def _refusal(spec: JobSpec, facts: ModelFacts, fleet: Fleet) -> str:
    biggest = max(c.memory_gb for c in fleet.classes)
    options = [f"{n}×{m:g} GB" for m in sorted({biggest, 80.0, 141.0}) if m >= biggest and (n := _would_fit(spec, facts, m))]
    needs = ("needs " + " or ".join(options[:2])) if options else None
    hints = []
    if spec.adapter.type == AdapterType.full and _placeable(spec.model_copy(update={"adapter": spec.adapter.model_copy(update={"type": AdapterType.lora})}), facts, fleet):
        hints.append("try LoRA")
    if spec.quantization == Quantization.none:
        qlora = spec.model_copy(update={"quantization": Quantization.nf4,
                                        "adapter": spec.adapter.model_copy(update={"type": AdapterType.lora})})
        if any(_first_fit(qlora, facts, c, 1, None, False) for c in fleet.classes):
            hints.append("try QLoRA")
    if spec.hyperparameters.max_seq_length > 1024:
        hints.append("or a shorter max_seq_length")
    parts = [needs or f"{facts.params / 1e9:.1f}B parameters do not fit even 16×141 GB",
             f"fleet has {fleet.describe()}"] + ([", ".join(hints)] if hints else [])
    return f"{spec.base_model} ({spec.adapter.type.value}"\
           + (", nf4" if spec.quantization == Quantization.nf4 else "") + "): " + "; ".join(parts)


def plan_or_refuse(spec: JobSpec, fleet: Fleet | None = None) -> Plan:
    """For job creation: the plan, or ``Unplaceable`` with a message for a 400 (param "model")."""
    return route(spec, None, fleet)


@dataclass(frozen=True)
class JobEstimate:
    plan: Plan
    tokens: int  # trained tokens, all epochs
    tokens_per_second: float
    seconds: float
    gpu_hours: float
    price: float
    throughput_source: str


def estimate_job(spec: JobSpec, tokens: int, fleet: Fleet | None = None, model_facts: ModelFacts | None = None,
                 measurements=None) -> JobEstimate:
    """Plan + time + cost for ``tokens`` trained tokens (all epochs). Raises ``Unplaceable``/``UnknownModel``."""
    fleet = fleet or get_fleet()
    facts = model_facts or read_model_facts(spec.base_model)
    plan = route(spec, facts, fleet)
    gpu = fleet.get(plan.gpu_class)
    tp = estimate_throughput(spec, facts, plan.memory_mode, gpu.bf16_tflops, plan.gpu_count, plan.zero_stage,
                             plan.offload, load_measurements() if measurements is None else measurements)
    seconds = tokens / tp.tokens_per_s
    gpu_hours = seconds / 3600 * plan.gpu_count
    return JobEstimate(plan=plan, tokens=tokens, tokens_per_second=tp.tokens_per_s, seconds=seconds,
                       gpu_hours=gpu_hours, price=gpu_hours * gpu.price_per_gpu_hour, throughput_source=tp.source)
