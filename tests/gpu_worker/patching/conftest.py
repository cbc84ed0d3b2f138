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
# multimodal model_type -> the attribute of its text decoder: the adapters go there only (SigLIP's q/k/v would
# get no gradient from text)
TEXT_DECODERS = {"gemma3": "language_model"}
# a SigLIP tower as small as it gets: 16x16 images of 4x4 patches, pooled to 4 image tokens
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                   patch_size=4)


def lora_targets(model_type: str) -> list[str]:
    return FUSED_TARGETS.get(model_type, TARGETS)


def ties_by_default(model_type: str) -> bool:
    """Whether the family's checkpoints tie lm_head to the input embedding (HF's config default: Gemma's do)."""
    from transformers import AutoConfig

    return bool(AutoConfig.for_model(model_type).tie_word_embeddings)


def tiny_config(model_type: str = "llama", **overrides):
    """A two-layer decoder of ``model_type``; ``"gemma3"`` is the multimodal wrapper (Gemma 3's text config with
    ``overrides``, a tiny SigLIP tower)."""
    from transformers import AutoConfig

    if model_type == "gemma3":
        text = tiny_config("gemma3_text", **overrides)
        return AutoConfig.for_model("gemma3", text_config=text.to_dict(), vision_config=TINY_VISION,
                                    mm_tokens_per_image=4, tie_word_embeddings=text.tie_word_embeddings)
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    if model_type in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        kw["head_dim"] = 16
    if model_type in ("gemma2", "gemma3_text"):
        kw["sliding_window"] = 8  # shorter than the test sequences: the sliding layers really slide
    # caps that bite at this size: HF's defaults (final 30, attention 50) leave its logits (~0.5) and attention
    # scores alone, so a dropped cap went unseen; at 1.0, dropping either one moves the LoRA gradients by 4e-2
    # to 7e-2 and the logits by 2e-3 to 3e-2 (relative, against the 1e-4 the comparisons allow). Gemma 3's
    # attention ignores its cap (transformers 5.25): only the final one
    if model_type == "gemma2":
        kw.update(final_logit_softcapping=1.0, attn_logit_softcapping=1.0)
    if model_type == "gemma3_text":
        kw["final_logit_softcapping"] = 1.0
    if model_type == "phi3":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # defaults point past the tiny vocab
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    if model_type == "gemma2":
        config._attn_implementation = "eager"  # attention softcapping: HF's eager path implements it
    return config


def tiny_model(config, seed=0, random_norms=True):
    """The base model ``build_lora_model`` wraps, the same for the same ``seed``: HF's random weights, with
    random biases and Gemma 3's image projection (HF initialises them to zero, which a patched model that
    dropped a bias would match too, and where every image token would enter the decoder as zeros), and
    RMSNorm weights moved off HF's constants (ones, or zeros for Gemma's 1 + w), so that a patched norm
    that ignored its weight, or read it in the other family's convention, would not match either
    (``random_norms``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".bias", "mm_input_projection_weight")):
                p.normal_(std=0.5)
        for module in model.modules() if random_norms else ():
            if type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.weight.add_(torch.randn_like(module.weight), alpha=0.2)
    return model


def build_lora_model(config, device="cpu", dtype=torch.float32, seed=0, lora_dropout=0.0, random_norms=True):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(config, seed, random_norms).to(device=device, dtype=dtype)
    targets = lora_targets(config.model_type)
    if config.model_type in TEXT_DECODERS:
        targets = rf".*\.{TEXT_DECODERS[config.model_type]}\..*\.({'|'.join(targets)})"
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=targets,
                      init_lora_weights=False)  # random B: non-zero adapter grads everywhere
    model = get_peft_model(model, lcfg)
    model.train()
    return model


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
