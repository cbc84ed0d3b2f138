"""GeGLU ``h = gelu(g) * u`` (exact erf, or tanh as Gemma's ``gelu_pytorch_tanh``) forward/backward,
elementwise in float32 with one rounding per output.

``geglu_backward_inplace`` is a buffer-reusing backward: it reads ``dh, g, u`` and overwrites them with
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
    def _gelu_and_grad(x, APPROX_TANH: tl.constexpr):
        # x float32 -> (gelu(x), gelu'(x)); tanh written via sigmoid (tl has no portable tanh)
        if APPROX_TANH:
            k0 = 0.7978845608028654  # sqrt(2/pi)
            z = k0 * (x + 0.044715 * x * x * x)
            t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
            act = 0.5 * x * (1.0 + t)
            dact = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k0 * (1.0 + 3.0 * 0.044715 * x * x)
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            act = x * cdf
            dact = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)  # pdf = exp(-x^2/2)/sqrt(2pi)
        return act, dact

    @triton.jit
    def _geglu_fwd_kernel(G, U, H, n, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        act, _ = _gelu_and_grad(g, APPROX_TANH)
        tl.store(H + offs, (act * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_bwd_kernel(DH, G, U, H_OUT, DG, DU, n, APPROX_TANH: tl.constexpr, WRITE_H: tl.constexpr,
                          BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        act, dact = _gelu_and_grad(g, APPROX_TANH)
        if WRITE_H:
            tl.store(H_OUT + offs, (act * u).to(H_OUT.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dh * act).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dh * u * dact).to(DG.dtype.element_ty), mask=mask)


def _check(*ts):
    # every tensor: the same shape (..., I), contiguous (flattened 1-D launch)
    for t in ts[1:]:
        assert t.shape == ts[0].shape, [tuple(x.shape) for x in ts]
    for t in ts:
        assert t.is_contiguous()


def _grid(n):
    return (triton.cdiv(n, _BLOCK),)


def geglu_forward(g: torch.Tensor, u: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    # g, u: (..., I) contiguous -> h: (..., I)
    _check(g, u)
    h = torch.empty_like(g)
    launcher(_geglu_fwd_kernel, g)[_grid(g.numel())](g, u, h, g.numel(), APPROX_TANH=approximate == "tanh",
                                        BLOCK=_BLOCK, num_warps=4)
    return h


def geglu_backward_inplace(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                           approximate: str = "none") -> None:
    # dh, g, u: (..., I) contiguous; afterwards dh holds h, g holds dg, u holds du
    _check(dh, g, u)
    launcher(_geglu_bwd_kernel, g)[_grid(g.numel())](dh, g, u, dh, g, u, g.numel(), APPROX_TANH=approximate == "tanh",
                                        WRITE_H=True, BLOCK=_BLOCK, num_warps=4)


class _GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, approximate):
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        ctx.approximate = approximate
        return geglu_forward(g, u, approximate)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        launcher(_geglu_bwd_kernel, g)[_grid(g.numel())](dh, g, u, dh, dg, du, g.numel(),
                                            APPROX_TANH=ctx.approximate == "tanh", WRITE_H=False,
                                            BLOCK=_BLOCK, num_warps=4)
        return dg, du, None


def geglu(g: torch.Tensor, u: torch.Tensor, approximate: str = "none", *,
          impl: str | None = None) -> torch.Tensor:
    """``gelu(g) * u``; ``approximate`` is torch's: ``"none"`` (erf) or ``"tanh"`` (Gemma)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if not use_triton(g, u, impl=impl):
        return geglu_reference(g, u, approximate)
    return _GeGLUFunction.apply(g, u, approximate)


def geglu_reference(g: torch.Tensor, u: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The spec: torch's gelu times ``u``, in float32 for half types and rounded once."""
    low = g.dtype in (torch.bfloat16, torch.float16)
    gg, uu = (g.float(), u.float()) if low else (g, u)
    return (torch.nn.functional.gelu(gg, approximate=approximate) * uu).to(g.dtype)
