"""``model_setup.wrap_with_lora`` on a multimodal wrapper: the adapters go on the language model only (the
vision tower's q/k/v share the names but text never trains them), every language-model projection gets
one, the saved adapter holds nothing else and names its targets as serving reads them, and a training
step on text moves language-model adapters only. A text-only model is wrapped as before."""

from __future__ import annotations

import json

import pytest
import torch

from gpu_worker.contract import AdapterConfig
from gpu_worker.recipes.model_setup import trainable_parameter_groups, wrap_with_lora
from tests.gpu_worker.patching.conftest import TARGETS, tiny_config, tiny_model

pytest.importorskip("peft")

TEXT = "model.language_model."


def _lora_modules(model) -> set[str]:
    """Names (relative to the base model) of the modules that carry a LoRA adapter."""
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def test_multimodal_adapters_cover_the_language_model_and_nothing_else():
    base = tiny_model(tiny_config("gemma3"))
    wanted = {name for name, module in base.named_modules()
              if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS and name.startswith(TEXT)}
    vision_named_alike = {name for name, module in base.named_modules()
                          if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS and not name.startswith(TEXT)}
    assert vision_named_alike, "the tiny SigLIP tower has q/k/v projections: the test would prove nothing"
    model = wrap_with_lora(base, AdapterConfig(rank=4, alpha=8.0))
    assert _lora_modules(model) == wanted
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{TEXT}" in n for n in trainable)


def test_saved_multimodal_adapter_holds_language_model_weights_under_plain_target_names(tmp_path):
    from safetensors import safe_open

    from gpu_worker.checkpoint import save_adapter

    model = wrap_with_lora(tiny_model(tiny_config("gemma3")), AdapterConfig(rank=4, alpha=8.0))
    save_adapter(model, tmp_path, base_model="tiny-gemma3")
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(f".{TEXT}" in k for k in keys), [k for k in keys if f".{TEXT}" not in k][:3]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # serving's compatibility rule takes each target's last dotted part as a module name: a regex would fail it
    assert sorted(config["target_modules"]) == sorted(TARGETS)


def test_a_text_training_step_changes_only_language_model_adapters():
    model = wrap_with_lora(tiny_model(tiny_config("gemma3")), AdapterConfig(rank=4, alpha=8.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable_parameter_groups(model, 0.0), lr=1e-2)
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the step changed nothing"
    assert all(f".{TEXT}" in n and ".lora_" in n for n in changed), sorted(changed)[:3]


def test_text_only_model_is_wrapped_as_before():
    model = wrap_with_lora(tiny_model(tiny_config("llama")), AdapterConfig(rank=4, alpha=8.0))
    config = model.peft_config["default"]
    assert config.exclude_modules is None
    assert set(config.target_modules) == set(TARGETS)
    assert len(_lora_modules(model)) == len(TARGETS) * 2  # two layers
