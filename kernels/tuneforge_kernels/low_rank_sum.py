"""A (rows x cols) tensor plus another and a rank-r product, in one pass: ``y = a + c + p @ b^T``.

What it is for: the padded down projection's output when its GEMM gives ``h W_d^T`` and the rank-r ``h A_d^T``
side by side (``lora_mlp.DOWN_CARRIES_PRODUCTS``: the GEMM's weight rows are ``[W_d; A_d]``, so h, tokens x
intermediate, is read once). The adapter's term ``(s h A_d^T) B_d^T`` and the decoder layer's residual are
then added here, in one pass over (tokens x hidden), where the K-augmented form reads h a second time for
``h A_d^T`` and cuBLAS copies the residual into the output before adding onto it (bench/NOTES.md, session 44).

    y = a + c + p @ b^T      a, c: (N, H), unit column stride (c optional); p: (N, r); b: (H, r); r <= 64

The sum is taken in float32 and rounded once to ``a``'s dtype.
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import launcher, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# 32 rows x 256 columns a program: tl.dot's M at least 16, and 16 KB of bf16 per streamed operand
_ROWS, _COLS = 32, 256
MAX_RANK = 64

if triton is not None:
    from tuneforge_kernels.low_rank import low_rank_tile

    @triton.jit
    def _low_rank_sum_kernel(A, C, P, B, Y, ld_a, ld_c, ld_p, ld_b, ld_y, n_rows, n_cols, rank,
                             HAS_C: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr, ROWS: tl.constexpr,
                             COLS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        r64 = rows[:, None].to(tl.int64)  # row * stride > 2^31 at long contexts
        acc = tl.load(A + r64 * ld_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_C:
            acc += tl.load(C + r64 * ld_c + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = low_rank_tile(acc, P, ld_p, B, ld_b, rows, cols, n_rows, n_cols, rank, 1.0, False, RP, PREC)
        tl.store(Y + r64 * ld_y + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def low_rank_sum(a: torch.Tensor, c: torch.Tensor | None, p: torch.Tensor, b: torch.Tensor,
                 impl: str | None = None) -> torch.Tensor:
    """``a + c + p @ b^T`` as a new (N, H) tensor in ``a``'s dtype (``c`` None: ``a + p @ b^T``). ``a``, ``c``:
    (N, H) with unit column stride; ``p`` (N, r) and ``b`` (H, r), any row strides, ``r <= MAX_RANK``."""
    (n, h), r = a.shape, p.shape[1]
    assert p.shape[0] == n and b.shape == (h, r), (tuple(a.shape), tuple(p.shape), tuple(b.shape))
    assert c is None or c.shape == a.shape, (tuple(a.shape), tuple(c.shape))
    if (not use_triton(a, c, p, b, impl=impl) or r > MAX_RANK or a.stride(1) != 1 or p.stride(1) != 1
            or b.stride(1) != 1 or (c is not None and c.stride(1) != 1)):
        return low_rank_sum_reference(a, c, p, b)
    y = torch.empty(n, h, dtype=a.dtype, device=a.device)
    if not y.numel():
        return y
    prec = "ieee" if a.dtype == torch.float32 or not a.is_cuda else "native"
    grid = (triton.cdiv(n, _ROWS), triton.cdiv(h, _COLS))
    launcher(_low_rank_sum_kernel, a)[grid](
        a, c if c is not None else a, p, b, y, a.stride(0), c.stride(0) if c is not None else 0, p.stride(0),
        b.stride(0), y.stride(0), n, h, r, HAS_C=c is not None, RP=max(16, next_power_of_2(r)), PREC=prec,
        ROWS=_ROWS, COLS=_COLS, num_warps=4)
    return y


def low_rank_sum_reference(a, c, p, b):
    """The spec, in float32, rounded once."""
    y = a.float() + p.float() @ b.float().t()
    if c is not None:
        y = y + c.float()
    return y.to(a.dtype)
