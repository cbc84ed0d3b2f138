"""Adapter dropout for the fused LoRA nodes (lora_linear.py, lora_mlp.py): PEFT's ``lora_dropout``.

PEFT computes ``y = x W^T + s (drop(x) A^T) B^T`` with one fresh mask per adapted projection and call, drawn
on the projection's input (``x``, or ``h`` for the MLP's down projection); the base GEMM reads ``x``
undropped. The fused nodes draw the same masks here, keep them as bytes (1 byte an element, where PEFT's
autograd keeps the dropped input: 2 bytes in bf16, 4 in float32), and in backward

    dA = s (dy B)^T drop(x)          (drop(x) recomputed from x and the mask)
    dx = dy W + s ((dy B) A) * mask / keep
    dB = s dy^T (drop(x) A^T)        (the rank-r product, kept from forward as without dropout)

The masks come from the device's default generator as ``torch.nn.functional.dropout`` draws them on the
CPU (``bernoulli_(keep)`` over the input's shape: the same stream whatever the tensor's dtype, so with one
seed a patched model on the CPU draws PEFT's masks). On CUDA, torch's fused dropout draws its own way,
so the masks are as random but not PEFT's. Activation checkpointing and ``offload`` restore the random
state for their recompute (gpu_worker/patching/memory.py), which then draws the forward's masks again.
CUDA graphs are not used for layers with live dropout (gpu_worker/patching/graphs.py).

``drop`` computes ``x * mask * (1 / keep)`` with the scale as a float32 multiplier and one rounding, as
torch's fused CUDA dropout does (on the CPU, torch's dropout of a bf16 tensor rounds the scale to bf16
first).
"""

from __future__ import annotations

import torch


def draw_mask(shape, p: float, device: torch.device) -> torch.Tensor:
    """A keep mask (``torch.bool``, True with probability ``1 - p``) from ``device``'s default generator."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout must be in (0, 1), got {p}")
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


def drop(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``x * mask / (1 - p)``, a new tensor: the dropped input (forward), again from its mask (backward)."""
    return x.mul(mask).mul_(1.0 / (1.0 - p))


def masked_input_grad(d_b: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """The adapter's term of ``dx``: ``(d_b A) * mask / (1 - p)`` (``d_b = s dy B``), the scale taken by the
    GEMM."""
    scale = 1.0 / (1.0 - p)
    term = d_b @ a if scale == 1.0 else torch.addmm(d_b.new_empty(()), d_b, a, beta=0.0, alpha=scale)
    return term.mul_(mask)


def dropout_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    """The spec through autograd: ``x`` dropped with a mask drawn as ``draw_mask`` draws it (identity for
    ``p == 0``)."""
    if not p:
        return x
    return drop(x, draw_mask(x.shape, p, x.device), p)
