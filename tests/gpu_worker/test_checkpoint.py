"""Checkpoints: a round trip restores everything; an incomplete one is never used; nothing pickled."""

from __future__ import annotations

import random

import pytest
import torch

from gpu_worker import checkpoint as ckpt
from gpu_worker.contract import AdapterConfig
from gpu_worker.recipes.model_setup import wrap_with_lora


def _trained_model(model_dir, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(model_dir), AdapterConfig(rank=4, alpha=8))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 100, (2, 12))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_restores_adapter_optimizer_and_rng(micro_model_dir, store):
    model, opt = _trained_model(micro_model_dir, seed=1)
    random.seed(5)
    torch.manual_seed(5)
    rng = ckpt.capture_rng()
    expected_draws = (random.random(), torch.rand(3))
    key = ckpt.checkpoint_key("jobs/j", 2)
    state = {"step": 2, "data_position": {"epoch": 0, "batch_index": 2}}
    written = ckpt.save_checkpoint(store, key, model=model, optimizer=opt, rng=rng, state=state, base_model="tuneforge-tiny")
    assert written[-1] == f"{key}/{ckpt.MARKER}"
    names = {k.rsplit("/", 1)[1] for k in written}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json", "COMPLETE"}

    fresh, fresh_opt = _trained_model(micro_model_dir, seed=2)  # different weights and moments
    loaded_state, loaded_rng = ckpt.load_checkpoint(store, key, model=fresh, optimizer=fresh_opt)
    assert loaded_state == state
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    saved, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for pid, slots in saved.items():
        assert slots.keys() == restored[pid].keys()
        assert all(torch.equal(slots[k], restored[pid][k]) for k in slots), pid
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    ckpt.restore_rng(loaded_rng)
    draws = (random.random(), torch.rand(3))
    assert draws[0] == expected_draws[0] and torch.equal(draws[1], expected_draws[1])


def test_incomplete_checkpoints_are_ignored_and_refused(micro_model_dir, store):
    model, opt = _trained_model(micro_model_dir, seed=1)
    for step in (5, 10):
        ckpt.save_checkpoint(store, ckpt.checkpoint_key("jobs/j", step), model=model, optimizer=opt, rng=ckpt.capture_rng(), state={"step": step}, base_model="b")
    assert ckpt.latest_checkpoint(store, "jobs/j") == "jobs/j/checkpoints/step-000010"
    # A crash while writing step 15: files but no marker.
    store.put_bytes("jobs/j/checkpoints/step-000015/trainer_state.json", b"{}")
    store.delete("jobs/j/checkpoints/step-000010/COMPLETE")
    assert ckpt.latest_checkpoint(store, "jobs/j") == "jobs/j/checkpoints/step-000005"
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(store, "jobs/j/checkpoints/step-000015", model=model, optimizer=opt)
    assert ckpt.latest_checkpoint(store, "jobs/other") is None


def test_rewriting_a_checkpoint_drops_stale_files(micro_model_dir, store):
    model, opt = _trained_model(micro_model_dir, seed=1)
    key = ckpt.checkpoint_key("jobs/j", 3)
    store.put_bytes(f"{key}/stale.bin", b"left by a dead attempt")
    ckpt.save_checkpoint(store, key, model=model, optimizer=opt, rng=ckpt.capture_rng(), state={"step": 3}, base_model="b")
    assert not store.exists(f"{key}/stale.bin") and ckpt.is_complete(store, key)


def test_adapter_folder_is_standard_peft_naming_the_platform_base_model(micro_model_dir, tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = _trained_model(micro_model_dir, seed=1)
    ckpt.save_adapter(model, tmp_path, base_model="tuneforge-tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tuneforge-tiny"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_model_dir), tmp_path)
    ids = torch.arange(10).unsqueeze(0)
    model.eval()
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
