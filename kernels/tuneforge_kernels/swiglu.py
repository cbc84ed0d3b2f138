"""SwiGLU ``h = silu(g) * u`` forward/backward, elementwise in float32 with one rounding per output.

``swiglu_backward_inplace`` is a buffer-reusing backward: it reads ``dh, g, u`` and overwrites them with
``h, dg, du`` (each element is read before it is written by the same program). The fused LoRA MLP used
it up to v12; since v13 it runs lora_glu.py's 2D-tiled kernels, which take the adapters' rank-r terms
too. These 1D kernels stay as the standalone op and as v12's side of ``bench/micro.py --only glu``,
until that measurement says which layout moves the bytes faster (bench/NOTES.md).
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import launcher, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# 1024 elements (4 warps x 32 threads x 8 bf16 = 16-byte accesses): the usual elementwise tile;
# bandwidth-bound, not re-tuned yet (bench/NOTES.md)
_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, H, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(H + offs, (g * tl.sigmoid(g) * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DH, G, U, H_OUT, DG, DU, n, WRITE_H: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        if WRITE_H:
            tl.store(H_OUT + offs, (silu * u).to(H_OUT.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


def _check(*ts):
    # every tensor: the same shape (..., I), contiguous (flattened 1-D launch)
    for t in ts[1:]:
        assert t.shape == ts[0].shape, [tuple(x.shape) for x in ts]
    for t in ts:
        assert t.is_contiguous()


def _grid(n):
    return (triton.cdiv(n, _BLOCK),)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # g, u: (..., I) contiguous -> h: (..., I)
    _check(g, u)
    h = torch.empty_like(g)
    launcher(_swiglu_fwd_kernel, g)[_grid(g.numel())](g, u, h, g.numel(), BLOCK=_BLOCK, num_warps=4)
    return h


def swiglu_backward_inplace(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> None:
    # dh, g, u: (..., I) contiguous; afterwards dh holds h, g holds dg, u holds du
    _check(dh, g, u)
    launcher(_swiglu_bwd_kernel, g)[_grid(g.numel())](dh, g, u, dh, g, u, g.numel(), WRITE_H=True, BLOCK=_BLOCK,
                                         num_warps=4)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        launcher(_swiglu_bwd_kernel, g)[_grid(g.numel())](dh, g, u, dh, dg, du, g.numel(), WRITE_H=False,
                                             BLOCK=_BLOCK, num_warps=4)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """``silu(g) * u`` (Llama/Mistral/Qwen MLP activation)."""
    if not use_triton(g, u, impl=impl):
        return swiglu_reference(g, u)
    return _SwiGLUFunction.apply(g, u)


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The spec, computed in float32 and rounded once (HF rounds silu(g) first; within bf16 tolerance)."""
    return (torch.nn.functional.silu(g.float()) * u.float()).to(g.dtype) if g.dtype in (
        torch.bfloat16, torch.float16) else torch.nn.functional.silu(g) * u
