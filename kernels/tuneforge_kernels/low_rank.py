"""A LoRA adapter's rank-r term on one tile of a wide tensor, ``s * XA[rows, :r] @ B^T[:, cols]``, for the
kernels that add it where they already pass over that tensor instead of a GEMM writing the term and a pass
reading it back: lora_glu.py (the gate's and up's terms of ``g`` and ``u``, the down adapter's of ``dh``)
and dropout.py (the masked terms of an input gradient).

A Triton helper only, no op of its own: its spec is the torch expression above, which each caller's
reference computes.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def low_rank_tile(acc, XA, ld_xa, B, ld_b, rows, cols, n_rows, n_cols, rank, s, B_IS_RT: tl.constexpr,
                      RP: tl.constexpr, PREC: tl.constexpr):
        """``acc + s * XA[rows, :rank] @ B^T[:, cols]`` in float32; B is (cols, rank) (``B_IS_RT`` False) or
        (rank, cols); ``rank <= RP`` (a power of two, at least 16: tl.dot's smallest inner dimension);
        ``PREC`` "ieee" for float32 operands (and bf16 ones on the interpreter, which has no bf16 dot)."""
        r = tl.arange(0, RP)
        xa = tl.load(XA + rows[:, None].to(tl.int64) * ld_xa + r[None, :],
                     mask=(rows[:, None] < n_rows) & (r[None, :] < rank), other=0.0)
        if B_IS_RT:
            bt = tl.load(B + r[:, None].to(tl.int64) * ld_b + cols[None, :],
                         mask=(r[:, None] < rank) & (cols[None, :] < n_cols), other=0.0)
        else:
            bt = tl.load(B + cols[None, :].to(tl.int64) * ld_b + r[:, None],
                         mask=(r[:, None] < rank) & (cols[None, :] < n_cols), other=0.0)
        if PREC == "ieee":
            return acc + s * tl.dot(xa.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        return acc + s * tl.dot(xa, bt)
