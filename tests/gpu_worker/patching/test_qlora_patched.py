"""QLoRA through the patched model on a GPU (bitsandbytes NF4, double quantisation, bf16 compute): the same
loss and LoRA gradients as stock HF+PEFT on the same quantised model, each measured against the float32
model whose weights are the quantised ones expanded; and no full bf16 copy of the frozen weights kept alive
through a step."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.patching import patch_model
from tests.gpu_worker.patching.conftest import lora_grads, lora_targets, needs_cuda, rel, tiny_config

pytestmark = [pytest.mark.gpu, needs_cuda]
bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes on the GPU worker")


def _loader(tmp_path, model_type, **overrides):
    """A function loading the same random checkpoint as an NF4 QLoRA model (bf16 compute) with the same
    random adapters, and the checkpoint's path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path / model_type
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)

    def load():
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0})
        torch.manual_seed(1)
        lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(model_type), init_lora_weights=False)
        return get_peft_model(model, lcfg).train()

    return load, path


def _expanded_float32(quantized, path):
    """The float32 model computing what ``quantized`` approximates: its 4-bit weights expanded (bitsandbytes'
    own values), its adapters copied."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    model = get_peft_model(model, quantized.peft_config["default"]).train()
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            model.get_submodule(name).weight.data.copy_(w.float())
    ours = dict(model.named_parameters())
    for name, p in quantized.named_parameters():
        if p.requires_grad:
            ours[name].data.copy_(p.data.float())
    return model


def _batch(vocab, rows=2, seq=48):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(3, vocab, (rows, seq), generator=g).cuda()
    labels = x.clone()
    labels[:, :6] = -100
    return x, labels


def _step(model, x, labels, autocast):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=x, labels=labels).loss
    loss.backward()
    return loss.detach().float()


# Phi-3 at hidden 256: its fused q/k/v and gate/up parts begin nested quantisation blocks, so each part
# expands alone (tuneforge_kernels.nf4.row_block)
@pytest.mark.parametrize("model_type,overrides", [("llama", {}), ("qwen2", {}),
                                                  ("phi3", {"hidden_size": 256, "intermediate_size": 512})])
def test_patched_qlora_matches_stock_hf_peft(tmp_path, model_type, overrides):
    load, path = _loader(tmp_path, model_type, **overrides)
    stock, ours = load(), load()
    report = patch_model(ours)
    assert report.reason is None and "lora_mlp" in report.patched
    exact = _expanded_float32(stock, path)
    x, labels = _batch(stock.config.vocab_size)
    l_stock, l_ours, l_exact = _step(stock, x, labels, True), _step(ours, x, labels, True), _step(exact, x, labels, False)
    assert abs(l_ours - l_stock) / l_stock < 2e-2, (l_ours, l_stock)
    g_stock, g_ours, g_exact = lora_grads(stock), lora_grads(ours), lora_grads(exact)
    assert g_stock.keys() == g_ours.keys() == g_exact.keys()

    def distance(g):
        return rel(torch.cat([g[n].float().flatten() for n in g_exact]),
                   torch.cat([g_exact[n].flatten() for n in g_exact]))

    # bf16 compute in both; a wrong term (the weight expanded wrong, a missing adapter) is O(1)
    stock_d, ours_d = distance(g_stock), distance(g_ours)
    assert ours_d <= max(2 * stock_d, 2e-2), (ours_d, stock_d, abs(l_exact - l_stock) / l_exact)


def test_patched_qlora_keeps_no_full_bf16_copy_of_the_frozen_weights(tmp_path):
    """A step's peak above what the model holds stays well below the frozen projections in bf16 (8 layers of
    16.8 M parameters: 268 MB): each is expanded for its matmul and dropped, forward and backward."""
    load, _ = _loader(tmp_path, "llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=128)
    model = load()
    patch_model(model, cuda_graphs=False)  # eager: a replayed step's transients live in the graph's pool
    x, labels = _batch(model.config.vocab_size, rows=1, seq=64)
    _step(model, x, labels, True)                              # first step: the NF4 kernel checks, allocations
    model.zero_grad(set_to_none=False)
    frozen_bf16 = 2 * sum(m.weight.quant_state.shape.numel() for m in model.modules()
                          if isinstance(m, bnb.nn.Linear4bit))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    _step(model, x, labels, True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - held
    assert extra < 0.4 * frozen_bf16, (extra / 2**20, frozen_bf16 / 2**20)
