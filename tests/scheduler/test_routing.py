"""Routing rules as a table: (job, model, fleet) → worker kind, GPU class and count, ZeRO stage,
memory mode; refusals say what would fit; the plan's micro-batch keeps the effective batch."""

from __future__ import annotations

import pytest

from gpu_worker.contract import AdapterConfig, Hyperparameters, JobSpec, Runtime
from scheduler.estimator import read_model_facts
from scheduler.fleet import EMBEDDED_FLEET, FleetError, load_fleet, parse_fleet
from scheduler.routing import SINGLE_GPU_QUEUE, Unplaceable, apply_plan, estimate_job, plan_or_refuse, route

FLEET = parse_fleet({"classes": [
    {"name": "l4", "memory_gb": 24, "gpus_per_node": 1, "nodes": 4, "bf16_tflops": 121, "price_per_gpu_hour": 0.8},
    {"name": "h100", "memory_gb": 80, "gpus_per_node": 8, "bf16_tflops": 767, "price_per_gpu_hour": 2.5},
]})
SMALL = parse_fleet({"classes": [{"name": "l4", "memory_gb": 24}]})
H100x2 = parse_fleet({"classes": [{"name": "h100", "memory_gb": 80, "gpus_per_node": 2}]})

L8, L70, PHI3 = "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "microsoft/Phi-3-mini-4k-instruct"
GRANITE = "ibm-granite/granite-3.0-8b-base"  # an architecture the kernels do not patch


def spec(model=L8, adapter="lora", quant="none", mode="off", batch=8, accum=1, seq=2048, kernels=True, method="supervised"):
    return JobSpec(
        job_id="j", org_id="o", base_model=model, method=method, quantization=quant,
        adapter=AdapterConfig(type=adapter, rank=16, alpha=16),
        hyperparameters=Hyperparameters(n_epochs=1, batch_size=batch, gradient_accumulation_steps=accum,
                                        learning_rate=1e-4, max_seq_length=seq),
        seed=1, training_file_key="k", output_prefix="p", runtime=Runtime(memory_mode=mode, use_kernels=kernels),
    )


# job, fleet → (worker kind, GPU class, GPU count, ZeRO stage, offload, memory mode)
TABLE = [
    ("tiny LoRA, embedded", spec("tuneforge-tiny"), EMBEDDED_FLEET, ("single-gpu", "local", 1, None, False, "off")),
    ("8B LoRA: smallest GPU that fits, with our offload mode", spec(), FLEET, ("single-gpu", "l4", 1, None, False, "offload")),
    ("8B QLoRA fits 24 GB without checkpointing", spec(quant="nf4"), FLEET, ("single-gpu", "l4", 1, None, False, "off")),
    ("8B LoRA, kernels off: stock path still single GPU", spec(kernels=False), FLEET, ("single-gpu", "l4", 1, None, False, "checkpointing")),
    # one H100 with the optimizer states in host memory beats two without: fewest GPUs first
    ("8B full FT: DeepSpeed ZeRO-3, fewest H100s", spec(adapter="full"), FLEET, ("multi-gpu", "h100", 1, 3, True, "off")),
    ("70B LoRA: weights do not fit one GPU → ZeRO-3", spec(L70), FLEET, ("multi-gpu", "h100", 4, 3, False, "checkpointing")),
    ("70B QLoRA fits one H100", spec(L70, quant="nf4"), FLEET, ("single-gpu", "h100", 1, None, False, "offload")),
    ("a job that asks for checkpointing gets it", spec(mode="checkpointing"), FLEET, ("single-gpu", "l4", 1, None, False, "checkpointing")),
    ("70B full FT needs 8 GPUs and optimizer offload", spec(L70, adapter="full"), FLEET, ("multi-gpu", "h100", 8, 3, True, "checkpointing")),
    ("unsupported arch trains on the stock path", spec(GRANITE), FLEET, ("single-gpu", "l4", 1, None, False, "checkpointing")),
    ("Phi-3 (fused qkv/gate_up) takes the kernel path", spec(PHI3), FLEET, ("single-gpu", "l4", 1, None, False, "off")),
    ("a requested memory mode is kept", spec("tuneforge-tiny", mode="offload"), FLEET, ("single-gpu", "l4", 1, None, False, "offload")),
]


@pytest.mark.parametrize("job,fleet,expected", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_routing_table(job, fleet, expected):
    plan = route(job, read_model_facts(job.base_model), fleet)
    got = (plan.worker_kind, plan.gpu_class, plan.gpu_count, plan.zero_stage, plan.offload, plan.memory_mode)
    assert got == expected, plan.reasons
    assert plan.queue == fleet.get(plan.gpu_class).queue(plan.worker_kind)
    assert plan.memory_gb is not None and plan.memory_gb <= fleet.get(plan.gpu_class).memory_gb
    assert plan.reasons and all(isinstance(r, str) and r for r in plan.reasons)


def test_reasons_say_why():
    assert any("not supported by the kernels" in r and "stock HF path" in r for r in route(spec(GRANITE), None, FLEET).reasons)
    assert any("supported by the Triton kernels" in r for r in route(spec(), None, FLEET).reasons)
    full = route(spec(adapter="full"), None, FLEET).reasons
    assert any("ZeRO-3" in r for r in full)
    assert any("raised to offload" in r for r in route(spec(), None, FLEET).reasons)
    assert any("raised to checkpointing" in r for r in route(spec(kernels=False), None, FLEET).reasons)


def test_adapter_states_too_big_for_one_gpu_go_to_zero2():
    # 70B QLoRA at rank 256 on every projection: 38 GB of NF4 weights fit one GPU, but 3.3B trainable
    # parameters × 16 bytes of AdamW state do not; ZeRO-2 shards those states (ZeRO-3 cannot shard
    # bitsandbytes 4-bit weights, so it is not offered for QLoRA).
    job = spec(L70, quant="nf4", mode="checkpointing", batch=8).model_copy(
        update={"adapter": AdapterConfig(type="lora", rank=256, alpha=16)})
    plan = route(job, None, FLEET)
    assert (plan.worker_kind, plan.zero_stage, plan.gpu_class) == ("multi-gpu", 2, "h100"), plan.reasons
    assert plan.gpu_count == 2
    assert any("ZeRO-2" in r and "adapter states sharded" in r for r in plan.reasons)


@pytest.mark.parametrize("model,adapter", [(L8, "lora"), (L70, "lora"), (L70, "full")])
@pytest.mark.parametrize("batch,accum", [(8, 1), (16, 2), (6, 1), (7, 3)])
def test_plan_keeps_the_effective_batch(model, adapter, batch, accum):
    job = spec(model, adapter=adapter, batch=batch, accum=accum)
    for fleet in (FLEET, SMALL):
        try:
            plan = route(job, None, fleet)
        except Unplaceable:
            continue
        ranks = plan.gpu_count if plan.zero_stage else 1
        planned, requested = plan.micro_batch_size * plan.gradient_accumulation_steps * ranks, batch * accum
        # equal, or the smallest multiple of the GPU count above it (DeepSpeed splits batches evenly)
        assert planned == -(-requested // ranks) * ranks, plan.reasons
        assert (planned == requested) or any(f"rounded up from {requested}" in r for r in plan.reasons)
        applied = apply_plan(job, plan)
        assert applied.hyperparameters.batch_size == plan.micro_batch_size
        assert applied.hyperparameters.gradient_accumulation_steps == plan.gradient_accumulation_steps
        assert applied.runtime.memory_mode.value == plan.memory_mode
        assert applied.hyperparameters.learning_rate == job.hyperparameters.learning_rate


def test_a_batch_smaller_than_the_gpu_count_is_rounded_up_and_said():
    plan = route(spec(L70, batch=1), None, FLEET)  # ZeRO-3 on 4 GPUs: one example each at least
    assert (plan.gpu_count, plan.micro_batch_size, plan.gradient_accumulation_steps) == (4, 1, 1)
    assert any("effective batch 4 (rounded up from 1 to split evenly across 4 GPUs)" in r for r in plan.reasons)


@pytest.mark.parametrize("job,fleet,needs", [
    (spec(adapter="full"), SMALL, ["needs 2×24 GB or 1×80 GB", "fleet has 1×24 GB (l4)", "try LoRA", "try QLoRA"]),
    (spec(L70), SMALL, ["needs 16×24 GB or 4×80 GB", "fleet has 1×24 GB (l4)"]),
    (spec(L70, quant="nf4"), SMALL, ["needs 1×80 GB", "fleet has 1×24 GB (l4)"]),
])
def test_unplaceable_says_what_would_fit(job, fleet, needs):
    with pytest.raises(Unplaceable) as e:
        plan_or_refuse(job, fleet)
    for part in needs:
        assert part in str(e.value)
    # hints only name what would fit this fleet: 70B LoRA/QLoRA does not fit one 24 GB GPU
    assert ("try QLoRA" in str(e.value)) == ("try QLoRA" in needs)
    assert ("try LoRA" in str(e.value)) == ("try LoRA" in needs)


def test_full_fine_tuning_that_fits_nowhere_suggests_lora_only_when_it_fits():
    with pytest.raises(Unplaceable) as e:
        route(spec(L70, adapter="full"), None, SMALL)
    assert "try LoRA" not in str(e.value) and "try QLoRA" not in str(e.value)


def test_unknown_model_goes_to_the_largest_gpu_and_says_so():
    plan = route(spec("acme/never-seen"), None, FLEET)
    assert (plan.worker_kind, plan.gpu_class) == ("single-gpu", "h100")
    assert "cannot estimate" in plan.reasons[0]


def test_embedded_fleet_keeps_the_historical_queue():
    assert load_fleet({}) == EMBEDDED_FLEET
    assert route(spec("tuneforge-tiny"), None, EMBEDDED_FLEET).queue == SINGLE_GPU_QUEUE
    assert route(spec("tuneforge-tiny", adapter="full"), None, EMBEDDED_FLEET).queue == SINGLE_GPU_QUEUE


@pytest.mark.parametrize("raw,message", [
    ("{", "not JSON"),
    ('{"classes": []}', "classes"),
    ('{"classes": [{"name": "H100", "memory_gb": 80}]}', "classes.0.name"),
    ('{"classes": [{"name": "a", "memory_gb": 0}]}', "classes.0.memory_gb"),
    ('{"classes": [{"name": "a", "memory_gb": 8}, {"name": "a", "memory_gb": 9}]}', "duplicate"),
    ('{"classes": [{"name": "a", "memory_gb": 8, "queues": {"tpu": "q"}}]}', "unknown worker kind"),
])
def test_bad_fleet_descriptions_name_the_field(raw, message):
    with pytest.raises(FleetError, match=message):
        load_fleet({"TUNEFORGE_FLEET": raw})


def test_fleet_from_a_file_and_its_queues(tmp_path):
    path = tmp_path / "fleet.json"
    path.write_text(FLEET.model_dump_json())
    fleet = load_fleet({"TUNEFORGE_FLEET_FILE": str(path)})
    assert fleet == FLEET
    assert fleet.queues() == ("tuneforge.single-gpu.l4", "tuneforge.multi-gpu.l4", "tuneforge.single-gpu.h100", "tuneforge.multi-gpu.h100")


def test_estimate_job_time_and_price():
    est = estimate_job(spec(mode="checkpointing"), tokens=36_000_000, fleet=FLEET)
    gpu = FLEET.get(est.plan.gpu_class)
    assert est.seconds == pytest.approx(est.tokens / est.tokens_per_second)
    assert est.gpu_hours == pytest.approx(est.seconds / 3600 * est.plan.gpu_count)
    assert est.price == pytest.approx(est.gpu_hours * gpu.price_per_gpu_hour)
    # l4 peak is 121/767 of the H100 the throughput was measured on
    h100 = estimate_job(spec(mode="checkpointing"), tokens=36_000_000, fleet=parse_fleet({"classes": [{"name": "h100", "memory_gb": 80}]}))
    assert est.tokens_per_second == pytest.approx(h100.tokens_per_second * 121 / 767, rel=0.01)
