"""Memory modes for training: ``off`` (keep every activation), ``checkpointing`` (HF's non-reentrant
activation checkpointing per decoder layer) and ``offload`` (checkpointing whose only saved tensor, each
layer's input, is copied to pinned host memory during forward and back during backward).

``offload`` keeps GPU memory flat in depth: per layer, one (tokens x hidden) bf16 input lives on the
host instead of the device. The copies run on the compute stream (ordered with the kernels that make
and consume them, so no extra synchronisation is needed); overlapping them on a side stream is an open
item in bench/NOTES.md.
"""

from __future__ import annotations

import torch
from torch import nn

MEMORY_MODES = ("off", "checkpointing", "offload")


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden, *rest):
        ctx.run, ctx.rest = run, rest
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        with torch.no_grad():
            out = run(hidden, *rest)
        ctx.device = hidden.device
        if hidden.is_cuda:
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            host.copy_(hidden.detach(), non_blocking=True)
        else:
            host = hidden.detach().clone()
        ctx.host = host
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_()
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            out = ctx.run(hidden, *ctx.rest)
        torch.autograd.backward(out, grad_out)
        n_rest = len(ctx.rest)
        ctx.host = ctx.run = ctx.rest = None
        return (None, hidden.grad) + (None,) * n_rest


def offloaded_checkpoint(run, hidden, *rest):
    """Drop-in for ``torch.utils.checkpoint.checkpoint`` as transformers calls it per layer."""
    return _OffloadedCheckpoint.apply(run, hidden, *rest)


def apply_memory_mode(model: nn.Module, mode: str) -> None:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {mode!r}")
    if mode == "off":
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    if mode == "offload":
        # the layer input must require grad or the recompute's LoRA grads never run (layer 0's input is
        # a frozen embedding's output)
        base.enable_input_require_grads()
        for module in base.modules():
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = offloaded_checkpoint
