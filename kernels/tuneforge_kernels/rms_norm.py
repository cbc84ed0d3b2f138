"""RMSNorm forward/backward: Llama's ``w * x_hat`` and Gemma's ``(1 + w) * x_hat``, optionally fused with
the residual add that precedes it, and with no weight-gradient work when the weight is frozen (LoRA).

What is saved for backward: the normalised input (bf16, the caller's tensor itself when there is no
residual) and one float32 ``rstd`` per row, instead of stock HF's float32 copies of the activations.

Rounding matches HF: Llama-style (``offset == 0``) casts ``x_hat`` to the input dtype before multiplying
by the weight (``LlamaRMSNorm``), Gemma-style (``offset != 0``) multiplies in float32 and casts once.
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import launcher, next_power_of_2, sm_count, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference path serves
    triton = None

if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, R, S, Y, W, RSTD,
        stride_x, stride_r, stride_s, stride_y,
        n_cols, eps, offset,
        HAS_RESIDUAL: tl.constexpr, LLAMA_CAST: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            # exact sum rounded once to the promoted dtype, as HF's `residual + h` does (a float32 stream
            # stays float32 when h comes out of a bf16 autocast matmul)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + row * stride_s + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        x_hat = xf * rstd
        if LLAMA_CAST:
            x_hat = x_hat.to(x.dtype).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (x_hat * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, DS, X, W, RSTD, DX, DW_PARTIAL,
        stride_dy, stride_ds, stride_x, stride_dx,
        n_rows, n_cols, offset,
        HAS_DS: tl.constexpr, COMPUTE_DW: tl.constexpr, LLAMA_CAST: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(pid, n_rows, n_prog):  # grid-stride: dW partials stay in registers
            row64 = tl.cast(row, tl.int64)
            x_raw = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0)
            x = x_raw.to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row64)
            x_hat = x * rstd
            dxh = dy * w
            dx = rstd * (dxh - x_hat * (tl.sum(dxh * x_hat, axis=0) / n_cols))
            if HAS_DS:
                dx += tl.load(DS + row64 * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                if LLAMA_CAST:
                    x_hat = x_hat.to(x_raw.dtype).to(tl.float32)
                dw += dy * x_hat
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _block(n_cols: int) -> tuple[int, int]:
    block = next_power_of_2(n_cols)
    # one row per program; 8 warps once a row is >= 4096 wide keeps 16-byte loads per thread (Liger's
    # choice for the same layout; not yet re-measured here, see bench/NOTES.md)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def _leading_columns(n_rows: int, n_cols: int, spare: int, dtype, device) -> torch.Tensor:
    # an (M, N) tensor, the first N columns of a new (M, N + spare) buffer: its consumer may fill the rest
    return torch.empty((n_rows, n_cols + spare), dtype=dtype, device=device)[:, :n_cols]


def _fwd_launch(x, residual, weight, eps, offset, out_dtype=None, spare=0):
    # x, residual: (..., N) any leading shape; weight: (N,); y in out_dtype (default x's), the first N
    # columns of an (M, N + spare) buffer
    n_cols = x.shape[-1]
    assert weight.shape == (n_cols,), f"weight {tuple(weight.shape)} vs hidden {n_cols}"
    assert residual is None or residual.shape == x.shape
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    n_rows = x2.shape[0]
    y = _leading_columns(n_rows, n_cols, spare, out_dtype or x.dtype, x.device)  # (M, N)
    s = (torch.empty((n_rows, n_cols), dtype=_sum_dtype(x, residual), device=x.device)  # (M, N) new residual
         if residual is not None else y)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)        # (M,)
    block, warps = _block(n_cols)
    assert block <= 65536, "rows wider than 64K need a looped kernel"
    launcher(_rms_norm_fwd_kernel, x2)[(n_rows,)](
        x2, r2, s, y, weight, rstd,
        x2.stride(0), r2.stride(0), s.stride(0), y.stride(0),
        n_cols, eps, offset,
        HAS_RESIDUAL=residual is not None, LLAMA_CAST=offset == 0.0, BLOCK=block, num_warps=warps,
    )
    return y, (s if residual is not None else x2), rstd


def _bwd_launch(dy, ds, x2, weight, rstd, offset, compute_dw, spare=0):
    # dy, ds: (M, N) grads of y and of the new residual; x2: (M, N) saved normalised input; dx the first N
    # columns of an (M, N + spare) buffer
    n_rows, n_cols = x2.shape
    dy2 = _rows(dy)
    ds2 = _rows(ds) if ds is not None else dy2
    dx = _leading_columns(n_rows, n_cols, spare, x2.dtype, x2.device)  # (M, N)
    n_prog = max(1, min(n_rows, 4 * sm_count()))  # 4 per SM: enough rows in flight to hide latency
    dw_partial = torch.empty((n_prog, n_cols) if compute_dw else (1,), dtype=torch.float32,
                             device=x2.device)
    block, warps = _block(n_cols)
    launcher(_rms_norm_bwd_kernel, x2)[(n_prog,)](
        dy2, ds2, x2, weight, rstd, dx, dw_partial,
        dy2.stride(0), ds2.stride(0), x2.stride(0), dx.stride(0),
        n_rows, n_cols, offset,
        HAS_DS=ds is not None, COMPUTE_DW=compute_dw, LLAMA_CAST=offset == 0.0, BLOCK=block,
        num_warps=warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


class NormRecipe:
    """How to recompute a Triton ``rms_norm`` output from the tensors its own node keeps anyway.

    A consumer saves ``tensors()`` with ``save_for_backward`` (so activation checkpointing's hooks see
    them) and calls ``recompute(*saved)`` in its backward: the same kernel on the same input gives the
    bit-identical output. Saves (tokens x hidden) per norm per layer of activation memory.

    A consumer that reads the output in backward only as ``G^T y`` (an adapter's dA, ``G`` of a few columns)
    calls ``product(G, *saved)`` instead: with ``y = diag(rstd) x diag(w + offset)``, that is
    ``((rstd G)^T x) diag(w + offset)``, a GEMM over the norm's input and two passes over rank-wide tensors,
    where the recompute is a pass over (tokens x hidden) in and out. The same sums, rounded elsewhere:
    ``rstd G`` to ``G``'s dtype where the recompute rounds ``y`` to its own (bench/NOTES.md, session 43).
    """

    def __init__(self, x2, weight, rstd, eps, offset, shape, out_dtype):
        self._tensors = (x2, weight, rstd) if x2 is not None else None
        self.eps, self.offset, self.shape, self.out_dtype = eps, offset, shape, out_dtype

    def tensors(self):
        return self._tensors

    def without_tensors(self) -> "NormRecipe":
        return NormRecipe(None, None, None, self.eps, self.offset, self.shape, self.out_dtype)

    def recompute(self, x2, weight, rstd):
        with torch.no_grad():
            return _fwd_launch(x2, None, weight, self.eps, self.offset, self.out_dtype)[0].view(self.shape)

    def product(self, g, x2, weight, rstd, scaled: bool = True):
        """``g^T @ y`` in float32 (``g``: (tokens, k) in ``y``'s dtype), from the norm's input, not ``y``;
        ``x2``'s dtype must be ``g``'s (else ``recompute``). ``scaled=False``: ``(p, w)`` with ``p`` in ``g``'s
        dtype and ``g^T @ y == p * w`` (float32, ``w`` along the columns), for a caller whose next pass over
        ``p`` (the gradients' cast, ``cast_blocks``' ``scales``) multiplies as it goes: one launch less."""
        with torch.no_grad():
            # each product in float32 (rstd's, w's) and rounded once, as (g.float() * rstd).to(g.dtype) and
            # (gs^T x2).float() * w round, without their casts' own launches (six small ones a layer)
            gs = torch.mul(g, rstd[:, None], out=torch.empty_like(g))
            p, w = gs.t() @ x2, _float_weight(weight, self.offset)
            return torch.mul(p, w) if scaled else (p, w)


def _float_weight(weight: torch.Tensor, offset: float) -> torch.Tensor:
    """``weight.float() + offset``, kept on a frozen ``weight`` (LoRA's norms) between steps: one small cast a
    norm and step less (64 launches a step at 8B, session 45's profile). Made again when the weight's data or
    version changes (an in-place update, a load); a trainable weight is cast every time."""
    key = None if weight.requires_grad else (weight.data_ptr(), weight._version, offset)
    kept = getattr(weight, "_tf_float_weight", None)
    if key is not None and kept is not None and kept[0] == key:
        return kept[1]
    w = weight.float() + offset if offset else weight.float()
    if key is not None:
        weight._tf_float_weight = (key, w)
    return w


def norm_recipe(t: torch.Tensor) -> NormRecipe | None:
    """The recipe attached to ``t`` if it is, unchanged, the output of a Triton ``rms_norm``."""
    return getattr(t, "_tf_norm_recipe", None)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset, with_input, spare, grad_spare):
        out_dtype = _out_dtype(_sum_dtype(x, residual), weight, offset)
        y, saved_x, rstd = _fwd_launch(x, residual, weight, eps, offset, out_dtype, spare)
        ctx.save_for_backward(saved_x, weight, rstd)
        # the second output (x + residual, or x itself): its gradient is added in the backward kernel
        ctx.offset, ctx.has_residual, ctx.shape = offset, residual is not None or with_input, x.shape
        ctx.grad_spare = grad_spare  # with a residual, its producer leaves the spare columns to x's (docstring)
        y = y.view(x.shape)
        # consumers that would save y for their backward (the LoRA projections) save this recipe
        # instead: the norm already keeps its input, so y can be recomputed rather than stored
        y._tf_norm_recipe = NormRecipe(saved_x, weight, rstd, float(eps), float(offset), tuple(x.shape), out_dtype)
        if spare:  # the consumer may write the columns after each row (lora_mlp.spare_columns)
            y._tf_spare_columns = spare
        if not ctx.has_residual:
            return y
        return y, saved_x.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        x2, weight, rstd = ctx.saved_tensors
        compute_dw = ctx.needs_input_grad[1]
        dx, dw = _bwd_launch(dy, ds if ctx.has_residual else None, x2, weight, rstd, ctx.offset,
                             compute_dw, ctx.grad_spare)
        dx = dx.view(ctx.shape)
        if ctx.grad_spare:  # x's producer may write the columns after each row (lora_mlp.spare_columns)
            dx._tf_spare_columns = ctx.grad_spare
        return dx, dw, (dx if ctx.needs_input_grad[2] else None), None, None, None, None, None


def _sum_dtype(x, residual):
    # the dtype of HF's `residual + h`: a bf16 h on a float32 stream (float32 weights under autocast) is float32
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _out_dtype(dtype, weight, offset):
    # HF's dtypes: LlamaRMSNorm returns `weight * x_hat.to(x.dtype)`, i.e. the promoted dtype (float32
    # for a bf16 input and float32 weights under autocast: Qwen3's q/k norms); GemmaRMSNorm `type_as(x)`
    return torch.promote_types(dtype, weight.dtype) if offset == 0.0 else dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             residual: torch.Tensor | None = None, with_input: bool = False, spare: int = 0,
             grad_spare: int = 0, impl: str | None = None):
    """``y = x_hat * (weight + offset)`` with ``x_hat = x / rms(x)`` over the last dim.

    With ``residual``, normalises ``x + residual`` and returns ``(y, x + residual)``. ``with_input`` (no
    residual): returns ``(y, x)``, where the gradient reaching that ``x`` from its other uses is added to
    the norm's input gradient by the backward kernel (a decoder layer's residual stream: no separate add of
    the two gradients). ``y``'s dtype is HF's: the promotion of ``x``'s and ``weight``'s for ``offset=0``,
    ``x``'s for Gemma's form. ``offset=1.0`` is Gemma's ``(1 + w)`` form. Input gradient only when
    ``weight`` is frozen.

    ``spare``: the Triton path returns ``y`` as the first columns of a ``(rows, N + spare)`` buffer, whose
    spare columns its consumer may fill in place (the padded MLP's ``[x | s x A^T]``: no copy of ``y``
    into a wider buffer). A layout hint: the values are the same, and the reference path ignores it.
    ``grad_spare``: the same for ``x``'s gradient, for ``x``'s producer's backward (the padded MLP below a
    decoder layer: its ``[dy | s dy B_d]``, not a copy of ``dy``; the padded O above a post-attention norm).
    With ``residual``, ``residual`` gets the same gradient tensor: the caller passes ``grad_spare`` only where
    ``residual``'s producer does not write those columns (the fused layer's input norm's second output).
    """
    if not use_triton(x, weight, residual, impl=impl):
        y = rms_norm_reference(x, weight, eps, offset=offset, residual=residual)
        return (y, x) if with_input and residual is None else y
    return _RMSNormFunction.apply(x, weight, residual, float(eps), float(offset), bool(with_input), int(spare),
                                  int(grad_spare))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
                       residual: torch.Tensor | None = None):
    """The spec: HF's LlamaRMSNorm (offset 0) / GemmaRMSNorm (offset 1) rounding, in plain torch."""
    s = x + residual if residual is not None else x
    xf = s.float()
    x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        y = weight * x_hat.to(s.dtype)  # promoted dtype, as HF
    else:
        y = (x_hat * (offset + weight.float())).to(s.dtype)
    return (y, s) if residual is not None else y
