"""Adapter dropout for the fused LoRA nodes (lora_linear.py, lora_mlp.py): PEFT's ``lora_dropout``.

PEFT computes ``y = x W^T + s (drop(x) A^T) B^T`` with one fresh mask per adapted projection and call, drawn
on the projection's input (``x``, or ``h`` for the MLP's down projection); the base GEMM reads ``x``
undropped; PEFT's autograd keeps each dropped input for backward (2 bytes an element in bf16, 4 in
float32). The fused nodes draw masks here and keep none of them; in backward

    dA = s (dy B)^T drop(x)          (drop(x) recomputed from x and the mask)
    dx = dy W + s ((dy B) A) * mask / keep
    dB = s dy^T (drop(x) A^T)        (the rank-r product, kept from forward as without dropout)

Two kinds of mask (``Mask``), one rule: ``philox`` on CUDA, ``stream`` on the CPU.

- ``philox`` (counter-based): a mask is a seed, an (1,) int64 tensor on the device, and ``salt``. The input
  is seen as rows of ``width`` elements; element ``(r, c)`` is kept where output ``c mod 4`` of
  Philox4x32-7 with key ``seed + salt`` and counter ``(c div 4, r, 0, 0)`` is, as a uniform float, >= p
  (Triton's ``tl.philox`` and ``tl.uint_to_uniform_float``: one Philox call gives four columns' bits;
  ``philox_keep`` is the same arithmetic in torch). The kernels compute the bits where they read them: no
  mask tensor is written or read, backward computes the same bits from the same 8 bytes, and a CUDA graph
  can replay it (gpu_worker/patching/graphs.py): an eager draw takes a new seed from the device's default generator
  (``torch.randint`` on the device, so a recompute that restores the random state draws the forward's
  masks); inside ``seeded_by(seed)`` (a graph's capture) the draws take that static tensor and salts
  0, 1, 2..., and the graph refreshes the tensor before each replay, outside the capture.
- ``stream``: the bool mask ``bernoulli_(keep)`` from the default generator, as ``torch.nn.functional.dropout``
  draws it on the CPU (the same stream whatever the tensor's dtype, so with one seed a patched model on
  the CPU draws PEFT's masks). A node keeps the generator's state before the draw (``released``) and
  draws it again in backward (``again``). ``philox_everywhere()`` makes the CPU draw ``philox`` masks too
  (tests of those through Triton's interpreter).

Activation checkpointing and ``offload`` restore the random state for their recompute
(gpu_worker/patching/memory.py), which then draws the forward's masks again.

``drop`` computes ``x * mask * (1 / keep)`` with the scale as a float32 multiplier and one rounding, as
torch's fused CUDA dropout does (on the CPU, torch's dropout of a bf16 tensor rounds the scale to bf16
first). With ``impl="triton"`` (the fused nodes) the dropped inputs are never written for the adapters
that read one input (Q/K/V's three, gate's and up's, O's): three kernels take up to three adapters a
launch and read that input once each,

    dropped_input_products    forward:  [drop_k(x) A_k^T]          (N, sum r), x read once (on CUDA for
                                                                    one or two adapters: three were slower)
    dropped_input_grads       backward: [d_b_k^T drop_k(x)]        the dA's, x read once
    add_masked_input_grads_   backward: dx += sum_k s_k (d_b_k A_k) * mask_k / keep_k, dx read and written once

each tile dropped as ``drop`` rounds it; ``drop`` itself (one pass) serves the rest (ranks over 64, the
MLP's h where lora_glu does not take the down term).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from tuneforge_kernels.backend import launcher, next_power_of_2, sm_count, use_triton

try:
    import triton
    import triton.language as tl

    from tuneforge_kernels.low_rank import low_rank_tile
except ImportError:
    triton = None

# elements a program (8 KB of bf16 in flight, 8 warps), of the order of copy_rows' 16 KB a program: not timed
# yet (bench/NOTES.md, sessions 16 and 17)
_BLOCK = 4096
SEED_HIGH = 2 ** 62  # seeds are drawn in [0, SEED_HIGH): seed + salt stays an int64
# Philox4x32's constants (Salmon et al. 2011, as triton.language.random) and uint_to_uniform_float's scale.
# 7 rounds, not Triton's default 10: seven is the fewest with which Philox4x32 passes all of TestU01's
# BigCrush (Salmon et al., table 2; ten is their margin), ample for Bernoulli masks, and the passes that draw
# three masks are integer-bound: 8B with dropout 0.05 trains 1.3% faster (bench/NOTES.md, session 32)
_ROUNDS = 7
_ROUND_A, _ROUND_B, _KEY_A, _KEY_B = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10

if triton is not None:
    _ROUNDS_TL = tl.constexpr(_ROUNDS)  # a kernel reads only constexpr globals (a NameError when compiled)

    @triton.jit
    def philox_uniform(key, rows, col0, BM: tl.constexpr, BN: tl.constexpr):
        """(BM, BN) uniform floats in [0, 1): the ``philox`` stream's for rows ``rows`` (BM,) and columns
        ``col0 .. col0 + BN`` (``col0`` a multiple of 4) under ``key``: one Philox call per 4 columns."""
        groups = (col0 // 4 + tl.arange(0, BN // 4)).to(tl.uint32)
        c0 = tl.broadcast_to(groups[None, :], (BM, BN // 4))
        c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BM, BN // 4))
        zero = tl.zeros((BM, BN // 4), dtype=tl.uint32)
        r0, r1, r2, r3 = tl.philox(key, c0, c1, zero, zero, _ROUNDS_TL)
        bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # column 4 g + j: r_j of group g
        return tl.uint_to_uniform_float(bits)

    @triton.jit
    def kept(M, ld, row0, p, salt, rows, col0, inside, SEEDED: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr):
        """(BM, BN) whether each element of the tile at local rows ``rows`` (BM,) and columns ``col0 ..``
        is kept: from the seed ``M`` (``row0``: the mask's row of local row 0), or read from the bool mask
        ``M`` with row stride ``ld``."""
        if SEEDED:
            return philox_uniform(tl.load(M) + salt, row0 + rows, col0, BM, BN) >= p
        else:
            cols = col0 + tl.arange(0, BN)
            return tl.load(M + rows[:, None].to(tl.int64) * ld + cols[None, :], mask=inside, other=0) != 0

    @triton.jit
    def _drop_kernel(X, ldx, Y, ldy, M, ld, row0, p, salt, n_rows, n_cols, scale, SEEDED: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        col0 = tl.program_id(1) * BN
        cols = col0 + tl.arange(0, BN)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        r64 = rows[:, None].to(tl.int64)  # int64: > 2^31 elements
        x = tl.load(X + r64 * ldx + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        keep = kept(M, ld, row0, p, salt, rows, col0, inside, SEEDED, BM, BN)
        tl.store(Y + r64 * ldy + cols[None, :], tl.where(keep, x * scale, 0.0).to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _dropped_tile(x, LIKE, M, ld, row0, p, salt, scale, rows, col0, inside, SEEDED: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr):
        # a (BM, BK) tile of x (float32) dropped, rounded to LIKE's dtype (x's) as drop rounds it
        keep = kept(M, ld, row0, p, salt, rows, col0, inside, SEEDED, BM, BK)
        return tl.where(keep, x * scale, 0.0).to(LIKE.dtype.element_ty)

    @triton.jit
    def _dropped_product(acc, x, A, ld_a, rank, M, ld, row0, p, salt, scale, rows, col0, n_cols, inside,
                         SEEDED: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                         BK: tl.constexpr):
        # acc (BM, RP) + drop(x) @ A[:rank, cols]^T over one (BM, BK) tile of x (float32)
        xd = _dropped_tile(x, A, M, ld, row0, p, salt, scale, rows, col0, inside, SEEDED, BM, BK)
        cols, r = col0 + tl.arange(0, BK), tl.arange(0, RP)
        at = tl.load(A + r[None, :].to(tl.int64) * ld_a + cols[:, None],
                     mask=(r[None, :] < rank) & (cols[:, None] < n_cols), other=0.0)       # (BK, RP)
        if PREC == "ieee":
            return acc + tl.dot(xd.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        return acc + tl.dot(xd, at)

    @triton.jit
    def _store_product(OUT, ldo, col, acc, rank, rows, n_rows, RP: tl.constexpr):
        r = tl.arange(0, RP)
        tl.store(OUT + rows[:, None].to(tl.int64) * ldo + col + r[None, :], acc.to(OUT.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (r[None, :] < rank))

    @triton.jit
    def _dropped_products_kernel(X, ldx, OUT, ldo, n_rows, n_cols,
                                 A0, ld_a0, rank0, M0, ld0, row00, p0, salt0, scale0, col0_out,
                                 A1, ld_a1, rank1, M1, ld1, row01, p1, salt1, scale1, col1_out,
                                 A2, ld_a2, rank2, M2, ld2, row02, p2, salt2, scale2, col2_out,
                                 N_TERMS: tl.constexpr, SEEDED: tl.constexpr, RP: tl.constexpr,
                                 PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        acc0 = tl.zeros((BM, RP), dtype=tl.float32)
        acc1 = tl.zeros((BM, RP), dtype=tl.float32)
        acc2 = tl.zeros((BM, RP), dtype=tl.float32)
        for col0 in range(0, n_cols, BK):  # x read once for every term
            cols = col0 + tl.arange(0, BK)
            inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
            x = tl.load(X + rows[:, None].to(tl.int64) * ldx + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            acc0 = _dropped_product(acc0, x, A0, ld_a0, rank0, M0, ld0, row00, p0, salt0, scale0, rows, col0, n_cols,
                                    inside, SEEDED, RP, PREC, BM, BK)
            if N_TERMS > 1:
                acc1 = _dropped_product(acc1, x, A1, ld_a1, rank1, M1, ld1, row01, p1, salt1, scale1, rows, col0,
                                        n_cols, inside, SEEDED, RP, PREC, BM, BK)
            if N_TERMS > 2:
                acc2 = _dropped_product(acc2, x, A2, ld_a2, rank2, M2, ld2, row02, p2, salt2, scale2, rows, col0,
                                        n_cols, inside, SEEDED, RP, PREC, BM, BK)
        _store_product(OUT, ldo, col0_out, acc0, rank0, rows, n_rows, RP)
        if N_TERMS > 1:
            _store_product(OUT, ldo, col1_out, acc1, rank1, rows, n_rows, RP)
        if N_TERMS > 2:
            _store_product(OUT, ldo, col2_out, acc2, rank2, rows, n_rows, RP)

    @triton.jit
    def _dropped_grad(acc, x, DB, ld_db, rank, M, ld, row0, p, salt, scale, rows, col0, n_rows, inside,
                      SEEDED: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                      BK: tl.constexpr):
        # acc (RP, BK) + DB[rows, :rank]^T @ drop(x) over one (BM, BK) tile of x (float32)
        xd = _dropped_tile(x, DB, M, ld, row0, p, salt, scale, rows, col0, inside, SEEDED, BM, BK)
        r = tl.arange(0, RP)
        dbt = tl.load(DB + rows[None, :].to(tl.int64) * ld_db + r[:, None],
                      mask=(r[:, None] < rank) & (rows[None, :] < n_rows), other=0.0)     # (RP, BM)
        if PREC == "ieee":
            return acc + tl.dot(dbt.to(tl.float32), xd.to(tl.float32), input_precision="ieee")
        return acc + tl.dot(dbt, xd)

    @triton.jit
    def _store_grad(PART, split, term, n_terms, n_cols, acc, cols, RP: tl.constexpr):
        # this split's partial sum of one term's dA into PART (splits, terms, RP, K), float32
        r = tl.arange(0, RP)
        base = (split * n_terms + term).to(tl.int64) * RP * n_cols
        tl.store(PART + base + r[:, None].to(tl.int64) * n_cols + cols[None, :], acc, mask=cols[None, :] < n_cols)

    @triton.jit
    def _dropped_grads_kernel(X, ldx, PART, n_rows, n_cols, rows_per_split,
                              DB0, ld_db0, rank0, M0, ld0, row00, p0, salt0, scale0,
                              DB1, ld_db1, rank1, M1, ld1, row01, p1, salt1, scale1,
                              DB2, ld_db2, rank2, M2, ld2, row02, p2, salt2, scale2,
                              N_TERMS: tl.constexpr, SEEDED: tl.constexpr, RP: tl.constexpr,
                              PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        col0, split = tl.program_id(0) * BK, tl.program_id(1)
        cols = col0 + tl.arange(0, BK)
        acc0 = tl.zeros((RP, BK), dtype=tl.float32)
        acc1 = tl.zeros((RP, BK), dtype=tl.float32)
        acc2 = tl.zeros((RP, BK), dtype=tl.float32)
        end = tl.minimum((split + 1) * rows_per_split, n_rows)
        for row_start in range(split * rows_per_split, end, BM):  # rows_per_split: a multiple of BM
            rows = row_start + tl.arange(0, BM)
            inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
            x = tl.load(X + rows[:, None].to(tl.int64) * ldx + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            acc0 = _dropped_grad(acc0, x, DB0, ld_db0, rank0, M0, ld0, row00, p0, salt0, scale0, rows, col0, n_rows,
                                 inside, SEEDED, RP, PREC, BM, BK)
            if N_TERMS > 1:
                acc1 = _dropped_grad(acc1, x, DB1, ld_db1, rank1, M1, ld1, row01, p1, salt1, scale1, rows, col0,
                                     n_rows, inside, SEEDED, RP, PREC, BM, BK)
            if N_TERMS > 2:
                acc2 = _dropped_grad(acc2, x, DB2, ld_db2, rank2, M2, ld2, row02, p2, salt2, scale2, rows, col0,
                                     n_rows, inside, SEEDED, RP, PREC, BM, BK)
        _store_grad(PART, split, 0, N_TERMS, n_cols, acc0, cols, RP)
        if N_TERMS > 1:
            _store_grad(PART, split, 1, N_TERMS, n_cols, acc1, cols, RP)
        if N_TERMS > 2:
            _store_grad(PART, split, 2, N_TERMS, n_cols, acc2, cols, RP)

    @triton.jit
    def _masked_term(acc, DB, ld_db, A, ld_a, rank, scale, M, ld, row0, p, salt, rows, col0, n_rows, n_cols,
                     inside, SEEDED: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr):
        # acc + scale (DB[rows] @ A[:, cols]) where kept: one adapter's term, its rank in chunks of RP
        cols = col0 + tl.arange(0, BN)
        term = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, rank, RP):
            term = low_rank_tile(term, DB + k, ld_db, A + k * ld_a, ld_a, rows, cols, n_rows, n_cols, rank - k,
                                 scale, True, RP, PREC)
        return acc + tl.where(kept(M, ld, row0, p, salt, rows, col0, inside, SEEDED, BM, BN), term, 0.0)

    @triton.jit
    def _add_masked_terms_kernel(OUT, ldo, n_rows, n_cols,
                                 DB0, ld_db0, A0, ld_a0, rank0, s0, M0, ld0, row00, p0, salt0,
                                 DB1, ld_db1, A1, ld_a1, rank1, s1, M1, ld1, row01, p1, salt1,
                                 DB2, ld_db2, A2, ld_a2, rank2, s2, M2, ld2, row02, p2, salt2,
                                 N_TERMS: tl.constexpr, SEEDED: tl.constexpr, RP: tl.constexpr,
                                 PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        col0 = tl.program_id(1) * BN
        cols = col0 + tl.arange(0, BN)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc = _masked_term(acc, DB0, ld_db0, A0, ld_a0, rank0, s0, M0, ld0, row00, p0, salt0, rows, col0, n_rows,
                           n_cols, inside, SEEDED, RP, PREC, BM, BN)
        if N_TERMS > 1:
            acc = _masked_term(acc, DB1, ld_db1, A1, ld_a1, rank1, s1, M1, ld1, row01, p1, salt1, rows, col0,
                               n_rows, n_cols, inside, SEEDED, RP, PREC, BM, BN)
        if N_TERMS > 2:
            acc = _masked_term(acc, DB2, ld_db2, A2, ld_a2, rank2, s2, M2, ld2, row02, p2, salt2, rows, col0,
                               n_rows, n_cols, inside, SEEDED, RP, PREC, BM, BN)
        offs = rows[:, None].to(tl.int64) * ldo + cols[None, :]
        out = tl.load(OUT + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (out + acc).to(OUT.dtype.element_ty), mask=inside)


def draw_mask(shape, p: float, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A keep mask (``torch.bool``, True with probability ``1 - p``) from ``generator`` (default: the
    device's default generator): the ``stream`` kind's bits."""
    _check_rate(p)
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)


def _check_rate(p: float) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout must be in (0, 1), got {p}")


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the high and low 32 bits of a * b (a a uint32 constant, b int64 holding uint32 values) in int64 ops:
    # a * b itself can pass 2^63, so a is taken in 16-bit halves
    t = b * (a & 0xFFFF)                     # < 2^48
    u = b * (a >> 16) + (t >> 16)            # a * b = u 2^16 + (t mod 2^16)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox_keep(seed: torch.Tensor, salt: int, rows: torch.Tensor, width: int, p: float) -> torch.Tensor:
    """The ``philox`` kind's bits in torch ops (``philox_uniform``'s arithmetic, bit for bit): (len(rows),
    width) bools, whether each element of those rows (int64 indices) is kept under key ``seed + salt``
    (``seed`` an (1,) int64 tensor)."""
    mask32 = 0xFFFFFFFF
    key = seed.to(rows.device) + salt
    k0, k1 = key & mask32, key >> 32
    groups = torch.arange((width + 3) // 4, dtype=torch.int64, device=rows.device)
    c0, c1 = groups[None, :].expand(len(rows), -1), (rows & mask32)[:, None].expand(-1, len(groups))
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & mask32, (k1 + _KEY_B) & mask32
    bits = torch.stack([c0, c1, c2, c3], dim=-1).reshape(len(rows), -1)[:, :width]  # column 4 g + j: c_j
    signed = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)  # as an int32
    signed = torch.where(signed < 0, -signed - 1, signed)         # (~x for the negative ones)
    u = signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)
    return u >= torch.tensor(p, dtype=torch.float32)


class _Seeds(threading.local):
    """What ``philox`` draws take inside ``seeded_by`` (per thread: a capture is per thread), and whether
    the CPU draws ``philox`` masks too (``philox_everywhere``)."""

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self.salts = 0
        self.cpu = False


_seeds = _Seeds()


@contextmanager
def seeded_by(seed: torch.Tensor):
    """Within the block, ``philox`` draws take ``seed`` (an (1,) int64 tensor on the device, read when the
    kernels run) with salts 0, 1, 2... in their order, and touch no generator: what a CUDA graph's capture
    records. Yields a function that says how many draws took it so far."""
    saved, drawn = (_seeds.tensor, _seeds.salts), []
    _seeds.tensor, _seeds.salts = seed, 0
    try:
        yield lambda: drawn[0] if drawn else _seeds.salts
    finally:
        drawn.append(_seeds.salts)
        _seeds.tensor, _seeds.salts = saved


@contextmanager
def philox_everywhere():
    """Within the block the CPU draws ``philox`` masks as CUDA does (Triton's interpreter runs the
    kernels that compute them)."""
    saved, _seeds.cpu = _seeds.cpu, True
    try:
        yield
    finally:
        _seeds.cpu = saved


def new_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh ``philox`` seed: an (1,) int64 tensor drawn on ``device`` (no host sync)."""
    return torch.randint(SEED_HIGH, (1,), dtype=torch.int64, device=device, generator=generator)




@dataclass(frozen=True)
class Mask:
    """One adapter's dropout draw over an input of ``shape`` (module docstring): ``seed`` and ``salt``
    (``philox``), or ``keep``, the bool mask, and the default generator's ``state`` before the draw
    (``stream``). A node keeps it for backward ``released`` (``stream``: the state alone, and ``again``
    draws the same bits; a device whose generator we do not read keeps the mask) instead of a byte per
    element of every adapted input (~10 GB for an 8B model's 32 layers at 8,192 tokens a step). The input is seen as rows of ``width`` (its last
    dimension); ``row0``: the input's row of this mask's first row (a block of rows, ``rows``)."""

    p: float
    shape: tuple | None
    device: torch.device
    width: int
    state: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    seed: torch.Tensor | None = None
    salt: int = 0
    row0: int = 0

    @classmethod
    def draw(cls, shape, p: float, device: torch.device) -> Mask:
        _check_rate(p)
        shape, width = tuple(shape), (shape[-1] if len(shape) else 1)
        if device.type == "cuda" or _seeds.cpu:
            if _seeds.tensor is not None:
                _seeds.salts += 1
                return cls(p, shape, device, width, seed=_seeds.tensor, salt=_seeds.salts - 1)
            return cls(p, shape, device, width, seed=new_seed(device))
        state = torch.default_generator.get_state() if device.type == "cpu" else None
        return cls(p, shape, device, width, state=state, keep=draw_mask(shape, p, device))

    @property
    def seeded(self) -> bool:
        return self.seed is not None

    def released(self) -> Mask:
        return self if self.seeded or self.state is None else replace(self, keep=None)

    def again(self) -> Mask:
        if self.seeded or self.keep is not None:
            return self
        gen = torch.Generator(device=self.device)
        gen.set_state(self.state)
        return replace(self, keep=draw_mask(self.shape, self.p, self.device, gen))

    def rows(self, rows: slice) -> Mask:
        """The mask of a block of the input's rows (``rows.start`` to ``rows.stop``, step 1)."""
        if self.seeded:
            return replace(self, shape=None, row0=self.row0 + rows.start)
        return replace(self, keep=self.keep[rows], shape=None)

    def bits(self, shape) -> torch.Tensor:
        """The bool mask over an input of ``shape`` (row-major) in torch ops: the references' and the
        fallbacks' (the kernels compute it where they read it)."""
        if not self.seeded:
            return self.keep
        assert shape[-1] == self.width, (shape, self.width)
        n = 1
        for d in shape[:-1]:
            n *= d
        rows = torch.arange(self.row0, self.row0 + n, dtype=torch.int64, device=self.seed.device)
        return philox_keep(self.seed, self.salt, rows, self.width, self.p).view(shape)

    def kernel_args(self, like: torch.Tensor) -> tuple:
        """``(M, ld, row0, p, salt, SEEDED)`` for ``kept`` over a 2D ``like`` (its shape): the seed, or the
        mask's bytes and row stride."""
        if self.seeded:
            assert like.shape[-1] == self.width, (like.shape, self.width)
            return self.seed, 0, self.row0, float(self.p), self.salt, True
        assert self.keep.shape == like.shape and self.keep.dtype == torch.bool and self.keep.stride(-1) == 1, (
            self.keep.shape, self.keep.dtype, like.shape)
        return self.keep.view(torch.uint8), self.keep.stride(0), 0, 0.0, 0, False


def _scaled_keep(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    # x * keep / (1 - p) in torch ops (the reference's, autograd included): the scale a float32 multiplier
    return x.mul(keep).mul_(1.0 / (1.0 - p))


def _tiles(x: torch.Tensor, m: Mask) -> bool:
    # 2D, unit column stride, and a mask over it: the kernels' layout (rows of any stride)
    if x.dim() != 2 or x.stride(1) != 1 and x.shape[1] > 1:
        return False
    return m.seeded or (m.keep.shape == x.shape and m.keep.stride(-1) == 1)


def _launch(kernel, m: Mask, a: torch.Tensor, b: torch.Tensor, *scalars) -> None:
    # one of the 2D-tiled kernels over a and b (one shape), the mask's arguments after them: tiles of ~4096
    # elements, at least 16 columns (philox_uniform's groups of 4 in a power of two)
    bn = min(1024, next_power_of_2(max(16, a.shape[1])))
    bm = max(1, _BLOCK // bn)
    launcher(kernel, a)[(triton.cdiv(a.shape[0], bm), triton.cdiv(a.shape[1], bn))](
        a, a.stride(0), b, b.stride(0), *m.kernel_args(a)[:-1], a.shape[0], a.shape[1], *scalars,
        SEEDED=m.seeded, BM=bm, BN=bn, num_warps=8)


def drop(x: torch.Tensor, m: Mask, impl: str | None = None) -> torch.Tensor:
    """``x * keep / (1 - p)``, a new tensor: the dropped input (forward), again from its mask (backward)."""
    if not x.numel() or not _tiles(x, m) or not use_triton(x, impl=impl):
        return _scaled_keep(x, m.bits(x.shape), m.p)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(_drop_kernel, m,
            x,                        # (N, K), any float dtype, rows of any stride
            y,                        # (N, K) out, x's dtype
            1.0 / (1.0 - m.p))
    return y


# the adapters one launch of the two kernels below serves: Q/K/V's three on one input
_TERMS_PER_LAUNCH = 3
# from this many adapters on, CUDA computes the rank-r inputs as drop, then a GEMM, per adapter: three in one
# pass took 0.286 / 0.814 ms against 0.251 / 0.671 that way at 8192 x 4096 / 14336 on an H200 (bench/NOTES.md,
# session 18; the 16-row tiles compute rather than stream). One and two adapters are not timed yet (micro.py)
_PRODUCTS_SPLIT_ON_CUDA = 3
# dropped_input_products' tile: 16 rows (tl.dot's smallest M; 512 programs at 8,192 tokens) by 256 columns a
# step of the loop over x's row; timed at three adapters only, where it lost (above); no other tile timed
_PRODUCTS_TILE = (16, 256, 4)
_PRODUCTS_MAX_RANK = 64  # three (16 x 64) float32 accumulators; larger ranks: drop, then a GEMM


def dropped_input_products(x: torch.Tensor, terms, impl: str | None = None) -> torch.Tensor:
    """``[drop_k(x) A_k^T]`` side by side, an (N, sum r_k) tensor in x's dtype, for ``terms`` = ``[(a (r, K),
    mask)]``: the rank-r inputs of the adapters with dropout that read one input ``x (N, K)``. With Triton
    one pass over ``x`` for up to three adapters, each tile dropped by each mask (rounded as ``drop``
    rounds it) and multiplied on the spot; ``drop`` then a GEMM per adapter would write each dropped
    input and read it back (6 bytes an element per adapter in bf16, against 2 for the pass over ``x``).
    But on CUDA three adapters or more take ``drop`` then a GEMM each, which measured faster
    (``_PRODUCTS_SPLIT_ON_CUDA``)."""
    ranks = [a.shape[0] for a, _ in terms]
    fused = (use_triton(x, impl=impl) and x.dim() == 2 and x.numel() and max(ranks) <= _PRODUCTS_MAX_RANK
             and not (x.is_cuda and len(terms) >= _PRODUCTS_SPLIT_ON_CUDA)
             and all(_tiles(x, m) and a.dtype == x.dtype and a.stride(1) == 1 for a, m in terms))
    if not fused:
        return torch.cat([drop(x, m, impl=impl) @ a.t() for a, m in terms], dim=1)
    out = x.new_empty(x.shape[0], sum(ranks))
    seeded = terms[0][1].seeded
    assert all(m.seeded == seeded for _, m in terms), "one node's masks are of one kind"
    rp = next_power_of_2(max(16, *ranks))
    bm, bk, warps = _PRODUCTS_TILE
    col = 0
    for start in range(0, len(terms), _TERMS_PER_LAUNCH):
        chunk, args = terms[start:start + _TERMS_PER_LAUNCH], []
        for a, m in chunk:
            assert a.shape[1] == x.shape[1], (a.shape, x.shape)
            mask, ld, row0, p, salt, _ = m.kernel_args(x)
            args += [a,              # (r, K) the adapter's A, row-major, x's dtype
                     a.stride(0), a.shape[0], mask, ld, row0, p, salt, 1.0 / (1.0 - m.p), col]
            col += a.shape[0]
        args += args[-10:] * (_TERMS_PER_LAUNCH - len(chunk))  # unused slots (N_TERMS leaves them out)
        launcher(_dropped_products_kernel, x)[(triton.cdiv(x.shape[0], bm),)](
            x,                        # (N, K) the adapters' input, rows of any stride
            x.stride(0), out,         # (N, sum r) out, x's dtype
            out.stride(0), x.shape[0], x.shape[1], *args, N_TERMS=len(chunk), SEEDED=seeded, RP=rp,
            PREC="ieee" if x.dtype == torch.float32 or not x.is_cuda else "native", BM=bm, BK=bk, num_warps=warps)
    return out


# dropped_input_grads' tile: 64 rows a step of the loop (tl.dot's K), 128 columns a program, and enough splits
# of the rows for ~4 programs an SM (8B: 32 column tiles x 16 splits); not timed yet (bench/micro.py)
_GRADS_TILE = (64, 128, 4)


def dropped_input_grads(x: torch.Tensor, terms, impl: str | None = None) -> list[torch.Tensor]:
    """``[d_b_k^T drop_k(x)]``, each (r_k, K) in x's dtype, for ``terms`` = ``[(d_b (N, r), mask)]``: the
    A gradients ``dA = s (dy B)^T drop(x)`` of the adapters with dropout that read one input ``x (N, K)``.
    With Triton one pass over ``x`` for up to three adapters (the rows split over programs, their partial
    sums added in float32), where ``drop`` then a GEMM per adapter would write each dropped input and read
    it back."""
    ranks = [d_b.shape[1] for d_b, _ in terms]
    fused = (use_triton(x, impl=impl) and x.dim() == 2 and x.numel() and max(ranks) <= _PRODUCTS_MAX_RANK
             and all(_tiles(x, m) and d_b.dtype == x.dtype and d_b.stride(1) == 1 for d_b, m in terms))
    if not fused:
        return [d_b.t() @ drop(x, m, impl=impl) for d_b, m in terms]
    seeded = terms[0][1].seeded
    assert all(m.seeded == seeded for _, m in terms), "one node's masks are of one kind"
    n, k = x.shape
    rp = next_power_of_2(max(16, *ranks))
    bm, bk, warps = _GRADS_TILE
    col_tiles = triton.cdiv(k, bk)
    splits = max(1, min(triton.cdiv(n, bm), triton.cdiv(4 * sm_count(x.device.index or 0), col_tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), bm) * bm
    splits = triton.cdiv(n, rows_per_split)
    out = []
    for start in range(0, len(terms), _TERMS_PER_LAUNCH):
        chunk, args = terms[start:start + _TERMS_PER_LAUNCH], []
        for d_b, m in chunk:
            assert d_b.shape[0] == n, (d_b.shape, x.shape)
            mask, ld, row0, p, salt, _ = m.kernel_args(x)
            args += [d_b,            # (N, r) s dy B, row-major, x's dtype
                     d_b.stride(0), d_b.shape[1], mask, ld, row0, p, salt, 1.0 / (1.0 - m.p)]
        args += args[-9:] * (_TERMS_PER_LAUNCH - len(chunk))  # unused slots (N_TERMS leaves them out)
        part = torch.empty(splits, len(chunk), rp, k, device=x.device, dtype=torch.float32)
        launcher(_dropped_grads_kernel, x)[(col_tiles, splits)](
            x,                        # (N, K) the adapters' input, rows of any stride
            x.stride(0), part,        # (splits, terms, RP, K) float32 partial sums
            n, k, rows_per_split, *args, N_TERMS=len(chunk), SEEDED=seeded, RP=rp,
            PREC="ieee" if x.dtype == torch.float32 or not x.is_cuda else "native", BM=bm, BK=bk, num_warps=warps)
        total = part.sum(0) if splits > 1 else part[0]
        out += [total[t, :d_b.shape[1]].to(x.dtype) for t, (d_b, _) in enumerate(chunk)]
    return out


# _add_masked_terms_kernel's tile: lora_glu.FWD_TILE's 16 x 256 (the same work: a 2D pass over a wide tensor with
# rank-r dots inside; not timed for this kernel yet, bench/micro.py's dropout group)
_TERMS_TILE = (16, 256, 4)


def add_masked_input_grads_(out: torch.Tensor, terms, impl: str | None = None) -> None:
    """``out += sum_k s_k (d_b_k A_k) * keep_k / (1 - p_k)`` over ``terms`` = ``[(d_b (N, r), a (r, K), mask,
    s)]``: the terms of ``dx`` of the adapters with dropout that read one input (``d_b = s dy B``; or the
    MLP's ``dh``). With Triton one pass over ``out`` for up to three terms, each rank-r product computed
    on the tile that adds it (low_rank.py) and rounded once with the sum; a GEMM per term would write it
    and a pass read it back (8 bytes an element per term in bf16, against 4 for the pass over ``out``)."""
    terms = [t for t in terms if t is not None]
    if not terms or not out.numel():
        return
    if not use_triton(out, impl=impl) or not all(_tiles(out, m) for _, _, m, _ in terms):
        for d_b, a, m, s in terms:  # the reference: each term in out's dtype, masked, added
            out.add_(torch.addmm(d_b.new_empty(()), d_b, a, beta=0.0, alpha=s / (1.0 - m.p)).mul_(m.bits(out.shape)))
        return
    seeded = terms[0][2].seeded
    assert all(m.seeded == seeded for _, _, m, _ in terms), "one node's masks are of one kind"
    rp = min(64, next_power_of_2(max(16, *(a.shape[0] for _, a, _, _ in terms))))
    bm, bn, warps = _TERMS_TILE
    prec = "ieee" if out.dtype == torch.float32 or not out.is_cuda else "native"
    for start in range(0, len(terms), _TERMS_PER_LAUNCH):
        chunk = terms[start:start + _TERMS_PER_LAUNCH]
        args = []
        for d_b, a, m, s in chunk:
            assert d_b.shape == (out.shape[0], a.shape[0]) and a.shape[1] == out.shape[1], (d_b.shape, a.shape)
            assert d_b.stride(1) == 1 and a.stride(1) == 1 and d_b.dtype == a.dtype, (d_b.stride(), a.stride())
            mask, ld, row0, p, salt, _ = m.kernel_args(out)
            args += [d_b,           # (N, r) s dy B, row-major
                     d_b.stride(0),
                     a,             # (r, K) the adapter's A, row-major, d_b's dtype
                     a.stride(0), a.shape[0], float(s) / (1.0 - m.p), mask, ld, row0, p, salt]
        args += args[-11:] * (_TERMS_PER_LAUNCH - len(chunk))  # unused slots (N_TERMS leaves them out)
        launcher(_add_masked_terms_kernel, out)[(triton.cdiv(out.shape[0], bm), triton.cdiv(out.shape[1], bn))](
            out,                      # (N, K) dx, rows of any stride, updated in place
            out.stride(0), out.shape[0], out.shape[1], *args, N_TERMS=len(chunk), SEEDED=seeded, RP=rp, PREC=prec,
            BM=bm, BN=bn, num_warps=warps)


def dropout_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    """The spec through autograd: ``x`` dropped with a mask drawn as the nodes draw it (``Mask.draw``; identity
    for ``p == 0``)."""
    if not p:
        return x
    return _scaled_keep(x, Mask.draw(x.shape, p, x.device).bits(x.shape), p)
