"""Adapter dropout for the fused LoRA nodes (lora_linear.py, lora_mlp.py): PEFT's ``lora_dropout``.

PEFT computes ``y = x W^T + s (drop(x) A^T) B^T`` with one fresh mask per adapted projection and call, drawn
on the projection's input (``x``, or ``h`` for the MLP's down projection); the base GEMM reads ``x``
undropped; PEFT's autograd keeps each dropped input for backward (2 bytes an element in bf16, 4 in
float32). The fused nodes draw the same masks here and keep none of it; in backward

    dA = s (dy B)^T drop(x)          (drop(x) recomputed from x and the mask)
    dx = dy W + s ((dy B) A) * mask / keep
    dB = s dy^T (drop(x) A^T)        (the rank-r product, kept from forward as without dropout)

with each mask drawn again from the generator state saved before it (``Mask``) rather than kept.

The masks come from the device's default generator as ``torch.nn.functional.dropout`` draws them on the
CPU (``bernoulli_(keep)`` over the input's shape: the same stream whatever the tensor's dtype, so with one
seed a patched model on the CPU draws PEFT's masks). On CUDA, torch's fused dropout draws its own way,
so the masks are as random but not PEFT's. Activation checkpointing and ``offload`` restore the random
state for their recompute (gpu_worker/patching/memory.py), which then draws the forward's masks again.
CUDA graphs are not used for layers with live dropout (gpu_worker/patching/graphs.py).

``drop`` computes ``x * mask * (1 / keep)`` with the scale as a float32 multiplier and one rounding, as
torch's fused CUDA dropout does (on the CPU, torch's dropout of a bf16 tensor rounds the scale to bf16
first). With ``impl="triton"`` (the fused nodes) it is one pass: x and the mask read, the dropped input
written, where torch's two ops write and read it once more; likewise ``add_masked_input_grad_`` adds the
masked term into ``dx`` in one pass instead of masking the GEMM's output, then adding it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tuneforge_kernels.backend import launcher, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# elements a program (8 KB of bf16 and 4 KB of mask in flight, 8 warps), of the order of copy_rows' 16 KB a
# program: not timed yet (bench/NOTES.md, session 16)
_BLOCK = 4096

if triton is not None:

    @triton.jit
    def _drop_kernel(X, KEEP, Y, n, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: > 2^31 elements
        inside = offs < n
        x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
        kept = tl.load(KEEP + offs, mask=inside, other=0) != 0
        tl.store(Y + offs, tl.where(kept, x * scale, 0.0).to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _add_masked_kernel(OUT, T, KEEP, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        out = tl.load(OUT + offs, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(T + offs, mask=inside, other=0.0).to(tl.float32)
        kept = tl.load(KEEP + offs, mask=inside, other=0) != 0
        tl.store(OUT + offs, (out + tl.where(kept, t, 0.0)).to(OUT.dtype.element_ty), mask=inside)


def draw_mask(shape, p: float, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A keep mask (``torch.bool``, True with probability ``1 - p``) from ``generator`` (default: the
    device's default generator)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout must be in (0, 1), got {p}")
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)


def _default_generator(device: torch.device) -> torch.Generator | None:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None


@dataclass(frozen=True)
class Mask:
    """One adapter's dropout draw: ``keep`` (the bool mask) while it is needed, and the default generator's
    state before the draw. A node keeps only the state for backward (``released``: 16 bytes on CUDA) and
    draws the mask again there (``again``: the same generator state, op and shape, so the same bits),
    instead of keeping a byte per element of every adapted input: ~10 GB for an 8B model's 32 layers at
    8,192 tokens a step. A device without a default generator we can read keeps the mask itself."""

    p: float
    shape: tuple
    device: torch.device
    state: torch.Tensor | None
    keep: torch.Tensor | None

    @classmethod
    def draw(cls, shape, p: float, device: torch.device) -> Mask:
        gen = _default_generator(device)
        state = gen.get_state() if gen is not None else None
        return cls(p, tuple(shape), device, state, draw_mask(shape, p, device))

    def released(self) -> Mask:
        return self if self.state is None else replace(self, keep=None)

    def again(self) -> Mask:
        if self.keep is not None:
            return self
        gen = torch.Generator(device=self.device)
        gen.set_state(self.state)
        return replace(self, keep=draw_mask(self.shape, self.p, self.device, gen))

    def rows(self, rows: slice) -> Mask:
        return replace(self, keep=self.keep[rows], shape=None)


def _scaled_keep(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    # x * keep / (1 - p) in torch ops (the reference's, autograd included): the scale a float32 multiplier
    return x.mul(keep).mul_(1.0 / (1.0 - p))


def _flat(*tensors: torch.Tensor) -> bool:
    # one shape, contiguous, on one device: the kernels index them as flat arrays
    first = tensors[0]
    return all(t.shape == first.shape and t.is_contiguous() and t.device == first.device for t in tensors)


def drop(x: torch.Tensor, m: Mask, impl: str | None = None) -> torch.Tensor:
    """``x * keep / (1 - p)``, a new tensor: the dropped input (forward), again from its mask (backward)."""
    if not x.numel() or not _flat(x, m.keep) or not use_triton(x, impl=impl):
        return _scaled_keep(x, m.keep, m.p)
    y = torch.empty_like(x)
    launcher(_drop_kernel, x)[(triton.cdiv(x.numel(), _BLOCK),)](
        x,                        # (N, K), any float dtype, contiguous
        m.keep.view(torch.uint8),  # (N, K) the keep mask as bytes
        y,                        # (N, K) out, x's dtype
        x.numel(), 1.0 / (1.0 - m.p), BLOCK=_BLOCK, num_warps=8)
    return y


def add_masked_input_grad_(out: torch.Tensor, d_b: torch.Tensor, a: torch.Tensor, m: Mask, s: float = 1.0,
                           impl: str | None = None) -> None:
    """``out += s (d_b A) * keep / (1 - p)``: the adapter's term of ``dx`` (``d_b = s dy B``; or of the MLP's
    ``dh``), the scale taken by the GEMM, the mask and the add by one pass over ``out``."""
    term = torch.addmm(d_b.new_empty(()), d_b, a, beta=0.0, alpha=s / (1.0 - m.p))
    if not out.numel() or not _flat(out, term, m.keep) or not use_triton(out, impl=impl):
        out.add_(term.mul_(m.keep))
        return
    launcher(_add_masked_kernel, out)[(triton.cdiv(out.numel(), _BLOCK),)](
        out,                      # (N, K) dx, updated in place
        term,                     # (N, K) s (d_b A) / (1 - p), out's dtype
        m.keep.view(torch.uint8),  # (N, K) the keep mask as bytes
        out.numel(), BLOCK=_BLOCK, num_warps=8)


def dropout_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    """The spec through autograd: ``x`` dropped with a mask drawn as ``draw_mask`` draws it (identity for
    ``p == 0``)."""
    if not p:
        return x
    return _scaled_keep(x, draw_mask(x.shape, p, x.device), p)
