"""Memory modes through the Triton kernels (``impl="triton"``: the interpreter on CPU) for the families whose
layers are not Llama's: Qwen3 (q/k norms), Gemma 2 (sandwich norms, softcapping, sliding window, eager
attention) and Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``). With checkpointing or offload the patched
model gives the loss and every LoRA gradient of the stock HF+PEFT model with checkpointing on, and the
recompute in backward runs our kernels again (test_patch_llama.py covers Llama the same way, and these
families through the interpreter with memory mode off)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.patching import decoder, patch_model
from tests.gpu_worker.patching.conftest import build_lora_model, lora_grads, lora_targets, rel, tiny_config

# the ops each decoder layer calls once per forward pass (Q/K/V and O are two lora_linears calls)
_LAYER_OPS = ("lora_linears", "rope", "lora_mlp")


def _counted(op, name: str, calls: dict):
    def counted(*a, **kw):
        calls[name] += 1
        return op(*a, **kw)

    return counted


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "phi3"])
@pytest.mark.parametrize("memory_mode", ["checkpointing", "offload"])
def test_interpreted_kernels_match_stock_with_recompute(model_type, memory_mode, monkeypatch):
    config = tiny_config(model_type)
    stock, ours = build_lora_model(config), build_lora_model(config)
    stock.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = patch_model(ours, memory_mode=memory_mode, impl="triton")
    assert report.reason is None and report.memory_mode == memory_mode
    calls = dict.fromkeys(_LAYER_OPS, 0)
    for name in _LAYER_OPS:
        monkeypatch.setattr(decoder, name, _counted(getattr(decoder, name), name, calls))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, config.vocab_size, (2, 16), generator=g)
    labels = x.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    l_stock = stock(input_ids=x, labels=labels).loss
    l_stock.backward()
    l_ours = ours(input_ids=x, labels=labels).loss
    forward = dict(calls)
    l_ours.backward()
    layers = config.num_hidden_layers
    assert forward == {"lora_linears": 2 * layers, "rope": layers, "lora_mlp": layers}
    assert calls == {name: 2 * n for name, n in forward.items()}  # backward recomputed every layer
    # float32: reassociation only (measured up to 1e-7 on the loss, 2.1e-6 on a gradient), 1e-4 as in
    # test_patch_llama; a wrong recompute (stale activations, a missing adapter term) is O(1)
    assert abs(l_stock.item() - l_ours.item()) / abs(l_stock.item()) < 1e-4
    g_stock, g_ours = lora_grads(stock), lora_grads(ours)
    assert g_stock.keys() == g_ours.keys()
    assert len(g_stock) == 2 * len(lora_targets(model_type)) * layers
    worst = max(rel(g_ours[n], g_stock[n]) for n in g_stock)
    assert worst < 1e-4, worst
