"""How a step is shared out between ranks, and the DeepSpeed configuration a placement becomes."""

from __future__ import annotations

import pytest

from gpu_worker.contract import Distributed, Hyperparameters, JobSpec, Runtime
from gpu_worker.recipes.train_engine import split_step


@pytest.mark.parametrize("sizes,world,micro", [([3, 3], 2, 2), ([3, 3], 4, 1), ([1], 2, 2), ([2, 1], 3, None), ([4, 4, 4], 2, 5), ([5], 8, 1)])
def test_the_ranks_share_every_example_of_the_step_once_in_equal_numbers_of_passes(sizes, world, micro):
    step, n = [], 0
    for size in sizes:
        step.append(list(range(n, n + size)))
        n += size
    shares = [split_step(step, r, world, micro) for r in range(world)]
    counted = sorted(e for share in shares for examples, w in share if w for e in examples)
    assert counted == list(range(n))  # every example once, none twice
    assert len({len(share) for share in shares}) == 1  # same number of passes: ZeRO's collectives line up
    real = [sum(len(ex) for ex, w in share if w) for share in shares]
    assert max(real) - min(real) <= 1
    for share in shares:
        for examples, weight in share:
            assert examples and weight in (0.0, 1.0) and (micro is None or len(examples) <= micro)


def test_a_rank_without_examples_keeps_the_others_company_with_a_weightless_pass():
    assert split_step([["a"]], 1, 2, 4) == [(["a"], 0.0)]
    assert split_step([["a"]], 0, 2, 4) == [(["a"], 1.0)]


def _spec(**distributed) -> JobSpec:
    return JobSpec(job_id="j", org_id="o", base_model="m", seed=1, training_file_key="k", output_prefix="p",
                   hyperparameters=Hyperparameters(n_epochs=1, batch_size=8, gradient_accumulation_steps=4, learning_rate=1e-4, max_grad_norm=0.5),
                   runtime=Runtime(distributed=Distributed(**distributed)))


def test_deepspeed_config_follows_the_plan():
    pytest.importorskip("deepspeed")
    from gpu_worker.recipes.deepspeed_engine import deepspeed_config

    c = deepspeed_config(_spec(gpus_per_node=4, zero_stage=3, offload_optimizer=True, micro_batch_size=2), world_size=4, bf16=True)
    assert c["zero_optimization"]["stage"] == 3 and c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # 32 examples a step over 4 ranks in passes of 2: 4 passes; DeepSpeed's identity holds.
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (2, 4, 32)
    assert c["gradient_clipping"] == 0.5 and c["bf16"] == {"enabled": True}
    c = deepspeed_config(_spec(gpus_per_node=3, zero_stage=2), world_size=3, bf16=False)
    assert "offload_optimizer" not in c["zero_optimization"] and c["zero_optimization"]["stage"] == 2
    # micro-batch defaults to the job's batch_size: 32 over 3 ranks is 11 each, in 2 passes of ≤ 8.
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (8, 2, 48)


def test_specs_without_a_placement_still_parse_and_mean_one_gpu():
    old = {"job_id": "j", "org_id": "o", "base_model": "m", "seed": 1, "training_file_key": "k", "output_prefix": "p",
           "hyperparameters": {"n_epochs": 1, "batch_size": 1, "learning_rate": 1e-4}, "runtime": {"use_kernels": True}}
    assert JobSpec.model_validate(old).runtime.distributed is None
    assert Distributed(gpus_per_node=4, nodes=2).world_size == 8
