"""Patching a loaded Hugging Face causal LM *instance* (optionally PEFT-wrapped) to train through
``kernels``, and choosing its memory mode. The one entry point is ``patch_model``; what it did is in the
returned ``PatchReport`` (the job's events carry its ``reason`` when the stock path is used).

Supported now: Llama, Mistral, Qwen2 (frozen q/k/v biases, added by the fused Q/K/V node),
Qwen3 (q/k norms), Gemma, Gemma 2 (attention and final logit softcapping, sandwich norms), Gemma 3
text (q/k norms), the text decoder of multimodal Gemma 3 (``Gemma3ForConditionalGeneration``: its
vision tower stays stock) and Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``, partial rotary); the Gemma
and Phi-3 families are checked on CPU only so far (bench/NOTES.md). Anything else trains on the stock HF
path and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from gpu_worker.patching import hopper_attention
from gpu_worker.patching.lora import attach_fp8, fp8_disabled, keep_fp8_sources_on_host
from gpu_worker.patching.memory import MEMORY_MODES, apply_memory_mode

# model_type -> the families whose module layout decoder.py's forwards reproduce exactly
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# multimodal model_type -> the family of the text decoder its wrapper holds at ``model.language_model``
# (Gemma3ForConditionalGeneration: ``model.model.language_model``, the head at ``model.lm_head``)
MULTIMODAL = {"gemma3": "gemma3_text"}
# families whose RMSNorm computes x_hat * (1 + w)
_UNIT_OFFSET_NORMS = ("gemma", "gemma2", "gemma3_text")
# families whose stock attention applies ``attn_logit_softcapping``: Gemma 3's keeps the attribute from its
# config and never passes it to the attention function (transformers 5.25), so neither do we
_ATTENTION_SOFTCAP = ("gemma2",)
# what a multimodal model's report says stays stock
_VISION_STOCK = "the vision tower and its projector run the stock path (a text-only step does not call them)"
# models up to this hidden size get their q/k/v and gate/up base weights joined into one buffer each
# (lora.join_frozen_weights): one GEMM per group is faster at 1B's shapes on the H200 and slower at 8B's
# (bench/NOTES.md, session 7's micro ``proj`` and v14)
JOIN_MAX_HIDDEN = 2048
# memory mode "off": models up to this hidden size get their MLP's frozen weights padded for the adapters
# (lora.pad_frozen_mlp: the GEMMs carry the rank-r terms): a 1.8% shorter median step at 1B on the H200
# (sessions 11 and 12). At 8B it gained nothing until the copies into the padded operands were gone (sessions
# 12 and 35); then 0.7% more tokens/s with the MLP padded, 1.1% with Q/K/V too, over three interleaved rounds
# on an H200 (bench/NOTES.md, session 39). 4096 is the widest size measured.
PAD_MAX_HIDDEN = 4096
# the same for Q/K/V (lora.pad_frozen_qkv), up to this hidden size: 0.9 ms less of kernels a 1B step on the
# H200, and the other 0.4% of session 39's 8B gain; its holes in the loaded weights' memory are given back by
# the worker's allocator settings (gpu_worker/allocator.py; bench/NOTES.md, session 12). O alone
# (lora.pad_frozen_o) follows the same rule: its backward without the rank-r pass over its input gradient
PAD_QKV_MAX_HIDDEN = 4096
# models up to this hidden size replay their decoder layers as CUDA graphs (graphs.py) by default: their
# steps are host-bound (1B on the H200: the host needs about as long to issue a step as the GPU to run it)
GRAPH_MAX_HIDDEN = 2048
# memory mode "off": the fused loss's chunk holds this many logits (1024 rows of a 128K vocabulary, 256 MB in
# bf16; the default rule takes 256 rows): 0.6% faster steps at 1B and 8B on the H200 (bench/NOTES.md,
# session 10), for ~0.2 GB more peak
FAST_CE_CHUNK_LOGITS = 1 << 27
# why memory mode offload declines FP8: on the H200 at 8B the offload step ran no faster with it (13,706
# against 13,637 tok/s: the step waits on its host copies) and its copies took 7.1 GB more, against the
# 19% that checkpointing and off gain (bench/NOTES.md, session 15)
FP8_WITH_OFFLOAD = "memory mode offload gains no speed from it (measured on the H200) and its copies would take memory"


@dataclass(frozen=True)
class PatchReport:
    architecture: str
    patched: tuple[str, ...] = ()
    memory_mode: str = "off"
    reason: str | None = None  # why the stock path is used, when it is
    counts: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what of the patched model still runs a stock path while training, and why

    @property
    def uses_kernels(self) -> bool:
        return bool(self.patched)


def _base_causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def patch_model(model: nn.Module, *, enabled: bool = True, memory_mode: str = "off",
                impl: str | None = None, cuda_graphs: bool | None = None, fp8: bool = False,
                attention: str = "auto") -> PatchReport:
    """Route ``model``'s norms, RoPE, MLP and loss through ``kernels`` (in place) and apply the memory mode.

    ``impl`` is passed to every op (None: Triton on CUDA, reference elsewhere; tests force "triton" to
    run the kernels through the interpreter on CPU). ``cuda_graphs``: replay the decoder layers of
    fixed-shape training steps as CUDA graphs (graphs.py); None: for models up to ``GRAPH_MAX_HIDDEN``, with
    or without adapter dropout (replays draw new masks each step; a 1B step with dropout ran 7-10% faster
    replayed than eager on one H100 host and as fast on another, where dropout 0's ran ~30% faster:
    bench/NOTES.md, sessions 21 and 25).
    Never with a memory mode other than ``off`` or in a multi-process (DeepSpeed) run; they replay only on
    CUDA. ``fp8``: the decoder layers' frozen projections compute their forward and input-gradient GEMMs
    in e4m3 (``tuneforge_kernels.fp8``; not exact bf16: ``fp8_disabled`` gives the bf16 loss to report
    beside it); on one GPU of compute capability 8.9 or later (or CPU, emulated), else the report's notes
    say why not. ``attention``: ``"fa4"``, causal attention through FlashAttention-4's Hopper kernels
    (hopper_attention.py) where it is installed and the GPU is a Hopper, else the report's notes say why
    not; ``"auto"``, those kernels for packed rows, where they are available (on an H100 1.64x torch's
    variable-length kernel: bench/NOTES.md, session 21), and for batched rows at the head sizes where they
    beat cuDNN (``hopper_attention.BATCHED_HEAD_DIMS``: 64, the 1B step 2% faster; session 34);
    neither yet for head sizes other than ``hopper_attention.VERIFIED_HEAD_DIMS``;
    ``"sdpa"``, neither.
    """
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
    if attention not in hopper_attention.BACKENDS:
        raise ValueError(f"attention must be one of {hopper_attention.BACKENDS}, got {attention!r}")
    base = _base_causal_lm(model)
    config = getattr(base, "config", None)
    arch = getattr(config, "model_type", type(base).__name__)
    family = MULTIMODAL.get(arch, arch)
    # a multimodal config keeps the decoder's sizes in its text config; a text config is its own
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    decoder = _text_decoder(base, arch)
    reason = None
    if not enabled:
        reason = "kernels switched off for this job"
    elif family not in SUPPORTED:
        reason = f"architecture {arch!r} is not supported by the kernel patches yet; stock HF path"
    elif decoder is None or not hasattr(base, "lm_head"):
        reason = f"{type(base).__name__} does not have the causal-LM layout the patches expect; stock HF path"
    else:
        from gpu_worker.patching.decoder import ACTIVATIONS
        act_name = getattr(text_config, "hidden_activation", None) or getattr(text_config, "hidden_act", None)
        act = ACTIVATIONS.get(act_name)
        if act is None:
            reason = f"activation {act_name!r} has no fused kernel; stock HF path"
    if reason is not None:
        apply_memory_mode(model, memory_mode)
        return PatchReport(architecture=arch, memory_mode=memory_mode, reason=reason)

    from gpu_worker.patching.decoder import (mlp_output_only_feeds_the_residual, patch_attention, patch_causal_lm,
                                             patch_mlp, patch_residual_norm, patch_rms_norm)
    from gpu_worker.patching.lora import mlp_interleaved, pad_frozen_mlp, pad_frozen_o, pad_frozen_qkv

    counts = {"rms_norm": 0, "lora_qkv_o": 0, "rope": 0, "lora_mlp": 0, "fused_linear_cross_entropy": 0,
              "gated_gemm_mlp": 0, "joined_weights": 0, "padded_mlp": 0, "padded_qkv": 0, "padded_o": 0,
              "residual_rms_norm": 0, "fp8_weights": 0}
    offset = 1.0 if family in _UNIT_OFFSET_NORMS else 0.0
    join = getattr(text_config, "hidden_size", JOIN_MAX_HIDDEN + 1) <= JOIN_MAX_HIDDEN
    distributed = dist.is_available() and dist.is_initialized()
    # speed mode only, and not in a DeepSpeed run: it broadcasts every parameter at start, and NCCL takes only
    # contiguous tensors
    hidden = getattr(text_config, "hidden_size", None)
    # live adapter dropout: the fused nodes draw its masks; the padded layouts carry no masks (a vision tower's
    # adapters run PEFT's own modules)
    dropout = _live_adapter_dropout(decoder)
    fp8_off = _fp8_unavailable(base, distributed, memory_mode) if fp8 else None
    fp8 = fp8 and fp8_off is None
    fp8_device = next(base.parameters()).device if fp8 else None
    fa4_off = hopper_attention.unavailable(next(base.parameters()).device) if attention != "sdpa" else None
    # the padded and joined layouts hold bf16 GEMMs of their own: not with FP8's
    join = join and not fp8
    speed = memory_mode == "off" and not distributed and not dropout and not fp8 and hidden is not None
    pad, pad_qkv = speed and hidden <= PAD_MAX_HIDDEN, speed and hidden <= PAD_QKV_MAX_HIDDEN
    for layer in decoder.layers:
        # the MLP's and Q/K/V's adapters carried by their GEMMs (before joining gate/up and q/k/v)
        if pad:
            counts["padded_mlp"] += pad_frozen_mlp(layer.mlp, act)
            counts["gated_gemm_mlp"] += mlp_interleaved(layer.mlp)
        if pad_qkv:
            counts["padded_qkv"] += pad_frozen_qkv(layer.self_attn)
            counts["padded_o"] += pad_frozen_o(layer.self_attn)
        if join:
            counts["joined_weights"] += _join_layer(layer)
        if fp8:
            counts["fp8_weights"] += attach_fp8(layer)
            if fp8_device.type == "cuda":  # the bf16 weights wait in host memory (lora.keep_fp8_sources_on_host)
                counts["fp8_host_bytes"] = counts.get("fp8_host_bytes", 0) + keep_fp8_sources_on_host(layer)
        # every RMSNorm of the layer: input/post-attention, Gemma 2/3's pre/post-feedforward, q/k norms
        for module in layer.modules():
            if type(module).__name__.endswith("RMSNorm"):
                patch_rms_norm(module, impl, offset)
                counts["rms_norm"] += 1
        attn = layer.self_attn
        patch_attention(attn, impl, softcap=getattr(attn, "attn_logit_softcapping", None)
                        if family in _ATTENTION_SOFTCAP else None)
        if attention != "sdpa" and fa4_off is None:
            fa4_off = hopper_attention.unverified(attn)
            if fa4_off is None:  # "fa4": batched and packed rows; "auto": packed rows, batched at some head sizes
                attn._tf_attention = attention
                counts["fa4_attention"] = counts.get("fa4_attention", 0) + 1
                if hopper_attention.batched_rows(attn, attention):
                    counts["fa4_batched_attention"] = counts.get("fa4_batched_attention", 0) + 1
        counts["rope"] += 1
        counts["lora_qkv_o"] += 1
        patch_mlp(layer.mlp, act, impl, output_discarded_in_recompute=mlp_output_only_feeds_the_residual(layer))
        counts["lora_mlp"] += 1
        counts["residual_rms_norm"] += patch_residual_norm(layer, impl, offset)  # reads the stock forward: last
    for below, layer in zip(decoder.layers, decoder.layers[1:]):  # lora.pad_frozen_mlp's output gradient
        if below.mlp.__dict__.get("_tf_output_grad_spare"):
            layer._tf_input_grad_spare = below.mlp._tf_output_grad_spare
    patch_rms_norm(decoder.norm, impl, offset)
    counts["rms_norm"] += 1
    # memory mode off is for speed: the fused loss takes larger chunks (256 MB of bf16 logits); a multimodal
    # wrapper's forward (Gemma3ForConditionalGeneration, transformers 5.25) applies no final softcap, whatever
    # its text config says
    softcap = getattr(text_config, "final_logit_softcapping", None) if family == arch else None
    patch_causal_lm(base, impl, ce_chunk_logits=FAST_CE_CHUNK_LOGITS if memory_mode == "off" else None,
                    decoder=decoder, softcap=softcap)
    counts["fused_linear_cross_entropy"] += 1
    apply_memory_mode(model, memory_mode)
    if counts.get("fp8_host_bytes"):
        torch.cuda.empty_cache()  # the bf16 weights' device memory back to the driver, not only to torch's pool
    if cuda_graphs is None:
        cuda_graphs = getattr(text_config, "hidden_size", GRAPH_MAX_HIDDEN + 1) <= GRAPH_MAX_HIDDEN
    notes = (_VISION_STOCK,) if family != arch else ()
    if fp8_off is not None:
        notes += (f"fp8 asked for, but {fp8_off}: the projections compute in bf16",)
    if fa4_off is not None and attention == "fa4":  # "auto" falls back without a word
        notes += (f"FlashAttention-4 asked for, but {fa4_off}: attention through SDPA",)
    gated_off = {layer.mlp.__dict__.get("_tf_gated_off") for layer in decoder.layers} - {None}  # lora.pad_frozen_mlp
    notes += tuple(f"{reason}: the MLP's activation runs in its own passes" for reason in sorted(gated_off))
    if dropout:
        notes += (f"adapter dropout {', '.join(f'{p:g}' for p in dropout)}: the fused kernels draw its masks, "
                  f"without the padded weight layouts; adapter dropout 0 trains fastest",)
    # not in a DeepSpeed run: its gradient hooks and collectives run on their own streams
    if cuda_graphs and memory_mode == "off" and not distributed:
        from gpu_worker.patching.graphs import attach

        counts["cuda_graph_layers"] = len(attach(list(decoder.layers)).layers)
        base._tf_pad_documents = True  # packed batches in shapes the graphs can replay (decoder._packing)
    # counts only: layouts and fusions of the kernels the patched names already list
    extras = ("joined_weights", "padded_mlp", "padded_qkv", "padded_o", "residual_rms_norm", "cuda_graph_layers",
              "fp8_weights", "fp8_host_bytes")
    return PatchReport(architecture=arch, patched=tuple(k for k, v in counts.items() if v and k not in extras),
                       memory_mode=memory_mode, counts=counts, notes=notes)


def _text_decoder(base: nn.Module, arch: str) -> nn.Module | None:
    """The module that holds the decoder layers and the final norm: ``base.model``, or inside a multimodal
    wrapper its language model; None where it has no ``layers``."""
    inner = getattr(base, "model", None)
    if arch in MULTIMODAL:
        inner = getattr(inner, "language_model", None)
    return inner if hasattr(inner, "layers") else None


def _fp8_unavailable(base: nn.Module, distributed: bool, memory_mode: str) -> str | None:
    """Why the FP8 mode cannot (or should not) run on ``base`` here, or None."""
    from tuneforge_kernels.fp8 import fp8_supported

    if memory_mode == "offload":
        return FP8_WITH_OFFLOAD
    if distributed:
        return "a multi-GPU (DeepSpeed) run shards the weights FP8 copies are taken from"
    try:
        device = next(base.parameters()).device
    except StopIteration:
        return "the model has no parameters"
    if not fp8_supported(device):
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            return f"this GPU (compute capability {major}.{minor}) has no FP8 GEMMs (8.9 or later has)"
        return f"device {device.type!r} has no FP8 GEMMs"
    return None


def _live_adapter_dropout(decoder: nn.Module) -> list[float]:
    """The dropout rates above 0 of the active adapters in ``decoder`` (lora.dropout_rate): the padded layouts
    carry no masks."""
    from gpu_worker.patching.lora import dropout_rate

    rates = set()
    for module in decoder.modules():
        if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict):
            rates.update(dropout_rate(module, name) for name in getattr(module, "active_adapters", ())
                         if name in module.lora_dropout)
    return sorted(rates - {0.0})


def _join_layer(layer: nn.Module) -> int:
    """Join the layer's q/k/v and gate/up base weights where they are separate modules; the count of
    groups joined."""
    from gpu_worker.patching.lora import join_frozen_weights

    groups = [[getattr(layer.self_attn, n, None) for n in ("q_proj", "k_proj", "v_proj")],
              [getattr(layer.mlp, n, None) for n in ("gate_proj", "up_proj")]]
    return sum(join_frozen_weights(g) for g in groups if all(m is not None for m in g))
