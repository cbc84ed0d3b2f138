"""Tiny randomly initialised decoders (built from configs, no downloads) wrapped with PEFT LoRA, for
comparing the patched model with the stock HF+PEFT one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# CPU: the Triton kernels through the interpreter ("triton") and the references (None -> reference)
DEVICES_IMPLS = [("cpu", "triton"), ("cpu", None),
                 pytest.param("cuda", None, marks=[pytest.mark.gpu, needs_cuda])]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Phi-3 fuses q/k/v and gate/up into one module each
FUSED_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def lora_targets(model_type: str) -> list[str]:
    return FUSED_TARGETS.get(model_type, TARGETS)


def tiny_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    if model_type in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        kw["head_dim"] = 16
    if model_type in ("gemma2", "gemma3_text"):
        kw["sliding_window"] = 8  # shorter than the test sequences: the sliding layers really slide
    if model_type == "phi3":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # defaults point past the tiny vocab
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    if model_type == "gemma2":
        config._attn_implementation = "eager"  # attention softcapping: HF's eager path implements it
    return config


def build_lora_model(config, device="cpu", dtype=torch.float32, seed=0, lora_dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=lora_targets(config.model_type),
                      init_lora_weights=False)  # random B: non-zero adapter grads everywhere
    model = get_peft_model(model, lcfg)
    model.train()
    return model


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
