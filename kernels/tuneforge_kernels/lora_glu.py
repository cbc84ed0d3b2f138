"""The gated activation of a LoRA MLP with the adapters' rank-r terms computed inside it: the gate's and
up's in forward and backward, and the down projection's input-gradient term in backward.

The LoRA MLP (lora_mlp.py) used to add each rank-r term onto a (tokens x intermediate) tensor with its
own ``addmm_``: a memory-bound pass that reads and writes the whole tensor, three per layer at 8B
(g and u in forward, dh in backward: 1.4 GB of traffic per layer at 8192 tokens). Here the kernel that
reads those tensors anyway computes the terms as a small ``tl.dot`` per tile:

    g  = Yg + s_g (x A_g^T) B_g^T          u = Yu + s_u (x A_u^T) B_u^T          (Yg = x W_g^T, base only)
    h  = act(g) * u
    dh = DH + s_d (dy B_d) A_d            (DH = dy W_d, base only)
    dg = dh * u * act'(g)                 du = dh * act(g)

``lora_glu_forward`` returns ``h``; ``lora_glu_backward_inplace`` overwrites ``DH, Yg, Yu`` with
``h, dg, du``. With adapter dropout on the down projection (dropout.py: its adapter reads ``h * m / keep``)
the backward takes the mask ``m`` (its bits read, or computed from its seed): the down term of ``dh``
becomes ``s_d ((dy B_d) A_d) * m / keep``, and ``h`` is written dropped (what the down adapter's gradients
read), rounded as the forward's dropout rounded it. ``g`` and ``u`` are never stored with their terms:
backward recomputes them from the same inputs. Each term is optional (``None``: that projection has no
adapter). Everything is computed in float32 and rounded once per output. Ranks up to ``MAX_RANK`` (padded
to 64 on the tensor cores, the largest a GPU test ran: rank 33); the MLP adds larger ranks' terms with the
addmm_ passes instead. The terms' tiles: low_rank.py.
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import launcher, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl

    from tuneforge_kernels.dropout import kept
    from tuneforge_kernels.geglu import _gelu_and_grad
    from tuneforge_kernels.low_rank import low_rank_tile
except ImportError:
    triton = None

ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
MAX_RANK = 64
# The tiles (rows, columns, warps) of the forward's and the backward's launches with rank-r terms. v13 had
# 32 x 128 x 4; session 8's micro-benchmark timed seven tiles on the H200 (bench/NOTES.md v14,
# results/2026-12-04-h200-v14-micro.txt) and 16 x 256 at 4 warps was the fastest or within 1% of it for both
# kernels at both shapes (8B backward 0.671 ms against 32 x 128's 0.743, forward 0.288 against 0.307; 1B
# 0.412 / 0.186 against 0.449 / 0.195). A per-launch pick was tried and dropped: its trial compiles (seven
# tiles per kind of launch) cost tens of seconds at the first step, and on 2048 trial rows it kept 32 x 128
# where the full-size timing preferred 16 x 256. The terms' ``tl.dot`` needs 16 rows or more.
FWD_TILE = BWD_TILE = (16, 256, 4)
# The tiles of the launches without rank-r terms (the padded MLP's, whose GEMMs carry the adapters): plain
# SwiGLU or GeGLU passes over the bytes. bench/micro.py's ``glu_plain`` at the 1B shape (session 37, H100,
# results/2026-12-06-h100-v40-micro-glu-plain.jsonl): the backward at 4 x 1024 x 4 0.342 ms against 16 x 256's
# 0.377 (2,353 against 2,138 GB/s, 0.78 of the copy's rate); no forward tile was 2% faster than 16 x 256.
PLAIN_FWD_TILE, PLAIN_BWD_TILE = FWD_TILE, (4, 1024, 4)

if triton is not None:

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        if ACT == 0:
            sig = tl.sigmoid(g)
            return g * sig, sig * (1.0 + g * (1.0 - sig))
        else:
            return _gelu_and_grad(g, ACT == 2)

    @triton.jit
    def _gate_up(YG, YU, ld_y, XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                 rows, cols, n_rows, n_cols, offs, mask,
                 HAS_G: tl.constexpr, HAS_U: tl.constexpr, RG: tl.constexpr, RU: tl.constexpr,
                 PREC: tl.constexpr):
        g = tl.load(YG + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(YU + offs, mask=mask, other=0.0).to(tl.float32)
        return with_terms(g, u, XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                          rows, cols, n_rows, n_cols, HAS_G, HAS_U, RG, RU, PREC)

    @triton.jit
    def with_terms(g, u, XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                   rows, cols, n_rows, n_cols,
                   HAS_G: tl.constexpr, HAS_U: tl.constexpr, RG: tl.constexpr, RU: tl.constexpr,
                   PREC: tl.constexpr):
        """The float32 tiles of the gate's and up's base products with their rank-r terms added."""
        if HAS_G:
            g = low_rank_tile(g, XAG, ld_xg, BG, ld_bg, rows, cols, n_rows, n_cols, rank_g, sg, False, RG, PREC)
        if HAS_U:
            u = low_rank_tile(u, XAU, ld_xu, BU, ld_bu, rows, cols, n_rows, n_cols, rank_u, su, False, RU, PREC)
        return g, u

    @triton.jit
    def _lora_glu_fwd_kernel(YG, YU, H, ld_y, ld_h, XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g,
                             rank_u, sg, su, n_rows, n_cols, ACT: tl.constexpr, HAS_G: tl.constexpr,
                             HAS_U: tl.constexpr, RG: tl.constexpr, RU: tl.constexpr, PREC: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offs = rows[:, None].to(tl.int64) * ld_y + cols[None, :]
        g, u = _gate_up(YG, YU, ld_y, XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                        rows, cols, n_rows, n_cols, offs, mask, HAS_G, HAS_U, RG, RU, PREC)
        act, _ = _act_and_grad(g, ACT)
        tl.store(H + rows[:, None].to(tl.int64) * ld_h + cols[None, :], (act * u).to(H.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _lora_glu_bwd_kernel(DH, YG, YU, ld_y, ld_h, XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g,
                             rank_u, sg, su, DYB, ld_dyb, AD, ld_ad, rank_d, sd, MD, ld_md, md_row0, md_p, md_salt,
                             inv_keep, n_rows, n_cols, ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr,
                             HAS_D: tl.constexpr, HAS_MD: tl.constexpr, SEEDED_MD: tl.constexpr,
                             RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, PREC: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offs = rows[:, None].to(tl.int64) * ld_y + cols[None, :]
        offs_h = rows[:, None].to(tl.int64) * ld_h + cols[None, :]
        dh = tl.load(DH + offs_h, mask=mask, other=0.0).to(tl.float32)
        if HAS_MD:  # the down adapter's dropout: its term masked (the scale 1 / keep is in sd)
            keep = kept(MD, ld_md, md_row0, md_p, md_salt, rows, tl.program_id(1) * BN, mask, SEEDED_MD, BM, BN)
            term = low_rank_tile(tl.zeros((BM, BN), dtype=tl.float32), DYB, ld_dyb, AD, ld_ad, rows, cols, n_rows,
                             n_cols, rank_d, sd, True, RD, PREC)
            dh += tl.where(keep, term, 0.0)
        elif HAS_D:
            dh = low_rank_tile(dh, DYB, ld_dyb, AD, ld_ad, rows, cols, n_rows, n_cols, rank_d, sd, True, RD, PREC)
        g, u = _gate_up(YG, YU, ld_y, XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                        rows, cols, n_rows, n_cols, offs, mask, HAS_G, HAS_U, RG, RU, PREC)
        act, dact = _act_and_grad(g, ACT)
        h = act * u
        if HAS_MD:  # h dropped: h rounded as the forward stored it, then scaled and rounded (dropout.drop)
            h = tl.where(keep, h.to(DH.dtype.element_ty).to(tl.float32) * inv_keep, 0.0)
        # every element is read above before any is written: the outputs reuse the input buffers
        tl.store(DH + offs_h, h.to(DH.dtype.element_ty), mask=mask)
        tl.store(YU + offs, (dh * act).to(YU.dtype.element_ty), mask=mask)
        tl.store(YG + offs, (dh * u * dact).to(YG.dtype.element_ty), mask=mask)


def _rank_pad(rank: int) -> int:
    return max(16, next_power_of_2(rank))  # tl.dot's smallest inner dimension


def fusable(*lora_bs: torch.Tensor | None) -> bool:
    """Whether the kernels can take these adapters' terms (every rank <= ``MAX_RANK``)."""
    return all(b is None or b.shape[-1] <= MAX_RANK for b in lora_bs)


def _term(xa, b, s, dummy):
    # kernel arguments of one optional term: (xa, b, ld_xa, ld_b, rank, scale, has, padded rank)
    if xa is None:
        return dummy, dummy, 0, 0, 0, 0.0, False, 16
    assert xa.stride(-1) == 1 and b.stride(-1) == 1, "row-major operands"
    assert xa.dtype == b.dtype, (xa.dtype, b.dtype)
    return xa, b, xa.stride(0), b.stride(0), xa.shape[1], float(s), True, _rank_pad(xa.shape[1])


def _check(yg, yu, *others):
    # yg and yu share their strides (two tensors, or the column halves of one gate+up product); the others
    # (h, dh) have their own row stride
    assert yg.dim() == 2 and yg.shape == yu.shape and yg.stride() == yu.stride() and yg.stride(1) == 1, (
        yg.shape, yu.shape, yg.stride(), yu.stride())
    for t in others:
        assert t.shape == yg.shape and t.stride(1) == 1, (t.shape, t.stride(), yg.shape)


def _prec(t):
    # float32 operands: exact products, not tf32; on the CPU interpreter bf16 operands are upcast (exact:
    # a product of two bf16 values fits a float32), where a GPU multiplies them on the tensor cores
    return "ieee" if t.dtype == torch.float32 or not t.is_cuda else "native"


def _grid(n_rows, n_cols, tile):
    return (triton.cdiv(n_rows, tile[0]), triton.cdiv(n_cols, tile[1]))


def lora_glu_forward(yg, yu, act: str, xa_g=None, b_g=None, s_g=1.0, xa_u=None, b_u=None, s_u=1.0, *, out=None):
    """``act(Yg + s_g xa_g B_g^T) * (Yu + s_u xa_u B_u^T)``, a new contiguous (N, I) tensor or written into
    ``out`` (N, I), rows of any stride; ``yg``/``yu`` (N, I) base outputs with the same strides (the column
    halves of one gate+up product are fine), ``xa_*`` (N, r), ``b_*`` (I, r); a term is left out where its
    ``xa`` is None."""
    _check(yg, yu, *(() if out is None else (out,)))
    h = torch.empty_like(yg, memory_format=torch.contiguous_format) if out is None else out
    xg, bg, ld_xg, ld_bg, rg, sg, has_g, pg = _term(xa_g, b_g, s_g, yg)
    xu, bu, ld_xu, ld_bu, ru, su, has_u, pu = _term(xa_u, b_u, s_u, yg)
    tile = FWD_TILE if has_g or has_u else PLAIN_FWD_TILE
    bm, bn, warps = tile
    launcher(_lora_glu_fwd_kernel, yg)[_grid(*yg.shape, tile)](
        yg, yu, h, yg.stride(0), h.stride(0), xg, xu, ld_xg, ld_xu, bg, bu, ld_bg, ld_bu, rg, ru, sg, su,
        yg.shape[0], yg.shape[1], ACT=ACTS[act], HAS_G=has_g, HAS_U=has_u, RG=pg, RU=pu, PREC=_prec(yg),
        BM=bm, BN=bn, num_warps=warps)
    return h


def lora_glu_backward_inplace(dh, yg, yu, act: str, xa_g=None, b_g=None, s_g=1.0, xa_u=None, b_u=None,
                              s_u=1.0, dy_b=None, a_d=None, s_d=1.0, dropped_d=None) -> None:
    """Backward of ``lora_glu_forward`` with ``dh = DH + s_d dy_b A_d`` (``dy_b`` (N, r_d), ``a_d``
    (r_d, I)): afterwards ``dh`` holds ``h``, ``yg`` holds ``dg`` and ``yu`` holds ``du``.
    ``dropped_d``: the down adapter's dropout (dropout.Mask, drawn, over (N, I)), module docstring: the term
    masked and scaled by 1 / (1 - p), and ``dh`` then holds ``h`` dropped."""
    _check(yg, yu, dh)
    xg, bg, ld_xg, ld_bg, rg, sg, has_g, pg = _term(xa_g, b_g, s_g, yg)
    xu, bu, ld_xu, ld_bu, ru, su, has_u, pu = _term(xa_u, b_u, s_u, yg)
    xd, ad, ld_xd, ld_ad, rd, sd, has_d, pd = _term(dy_b, a_d, s_d, yg)
    md, ld_md, md_row0, md_p, md_salt, seeded_md, inv_keep = yg, 0, 0, 0.0, 0, False, 1.0
    if dropped_d is not None:
        assert has_d
        md, ld_md, md_row0, md_p, md_salt, seeded_md = dropped_d.kernel_args(yg)
        inv_keep = 1.0 / (1.0 - dropped_d.p)
        sd *= inv_keep
    tile = BWD_TILE if has_g or has_u or has_d else PLAIN_BWD_TILE
    bm, bn, warps = tile
    launcher(_lora_glu_bwd_kernel, yg)[_grid(*yg.shape, tile)](
        dh, yg, yu, yg.stride(0), dh.stride(0), xg, xu, ld_xg, ld_xu, bg, bu, ld_bg, ld_bu, rg, ru, sg, su,
        xd, ld_xd, ad, ld_ad, rd, sd, md, ld_md, md_row0, md_p, md_salt, inv_keep, yg.shape[0], yg.shape[1],
        ACT=ACTS[act], HAS_G=has_g, HAS_U=has_u, HAS_D=has_d, HAS_MD=dropped_d is not None, SEEDED_MD=seeded_md,
        RG=pg, RU=pu, RD=pd,
        PREC=_prec(yg), BM=bm, BN=bn, num_warps=warps)


def lora_glu_reference(yg, yu, act: str, xa_g=None, b_g=None, s_g=1.0, xa_u=None, b_u=None, s_u=1.0):
    """The spec of ``lora_glu_forward`` in float32 (or the inputs' dtype if wider), rounded once; through
    autograd its gradients are the backward's (with ``dh`` the incoming gradient)."""
    wide = torch.promote_types(yg.dtype, torch.float32)
    g, u = yg.to(wide), yu.to(wide)
    if xa_g is not None:
        g = g + s_g * (xa_g.to(wide) @ b_g.to(wide).t())
    if xa_u is not None:
        u = u + s_u * (xa_u.to(wide) @ b_u.to(wide).t())
    return (act_fn(g, act) * u).to(yg.dtype)


def act_fn(x: torch.Tensor, act: str) -> torch.Tensor:
    """The gate's activation in plain torch: ``silu``, ``gelu`` (erf) or ``gelu_tanh``."""
    if act == "silu":
        return torch.nn.functional.silu(x)
    return torch.nn.functional.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def lora_glu(yg, yu, act: str = "silu", xa_g=None, b_g=None, s_g=1.0, xa_u=None, b_u=None, s_u=1.0, *,
             impl: str | None = None):
    """Forward only (the fused LoRA MLP drives the backward itself): the Triton kernel or the reference."""
    if not use_triton(yg, yu, impl=impl):
        return lora_glu_reference(yg, yu, act, xa_g, b_g, s_g, xa_u, b_u, s_u)
    return lora_glu_forward(yg, yu, act, xa_g, b_g, s_g, xa_u, b_u, s_u)
