"""An experiment, measured and not adopted (bench/NOTES.md, session 30): the LoRA MLP's two widest GEMMs with
the gated activation in their epilogues. On an H100 at 8B these kernels run 1.6% (forward) and 3% (backward)
slower than cuBLAS followed by lora_glu's passes, so kernels/ keeps those; this file stays for
bench/glu_gemm_probe.py, which times the two against each other.

lora_glu.py computes ``h = act(g) * u`` (forward) and ``h, dg, du`` (backward) in passes of their own over
(tokens x intermediate) tensors that a GEMM has just written (forward: the gate's and up's base products
``Yg = x W_g^T``, ``Yu = x W_u^T``) or writes for them alone (backward: ``DH = dy W_d``). Here the GEMM's
epilogue does that work on its accumulator tile while it is still in registers, so ``DH`` never exists and
``Yg``/``Yu`` are not read back in forward: 940 MB less traffic a layer at 8B with 8192 tokens.

    forward:   Yg, Yu = x W_g^T, x W_u^T   (one program holds the same columns of both; x's tile read once)
               h = act(Yg + s_g (x A_g^T) B_g^T) * (Yu + s_u (x A_u^T) B_u^T)
    backward:  dh = DH + s_d (dy B_d) A_d,  DH = dy W_d
               g, u as in forward (from the saved Yg, Yu), dg = dh * u * act'(g), du = dh * act(g)

Forward writes ``Yg``, ``Yu`` (what backward keeps, base products only, as lora_mlp saves them) and ``h``;
backward writes ``h`` into a new tensor and ``dg``, ``du`` over ``Yg``, ``Yu``. Every value is rounded as the
unfused pair rounds it: the base products to the compute dtype before the terms are added (what lora_glu
reads back from memory), the outputs once. So the results equal ``frozen GEMM + lora_glu`` up to the GEMMs'
summation order.

The GEMMs are persistent (programs walking output tiles, grouped so the weight tiles stay in L2), their
operands loaded and their outputs stored through TMA descriptors: rows must start on 16 bytes. Without warp
specialisation (Triton 3.6 does not specialise Hopper's loops; 3.9 compiles ``warp_specialize=True`` for sm_90
without it) the epilogue does not overlap the next tile's GEMM: it costs about what lora_glu's separate pass
costs. Adapter dropout on the down projection is not taken.
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import launcher, sm_count
from tuneforge_kernels.lora_glu import ACTS, _prec, _term

try:
    import triton
    import triton.language as tl

    from tuneforge_kernels.lora_glu import _act_and_grad, with_terms
    from tuneforge_kernels.low_rank import low_rank_tile
except ImportError:
    triton = None

# (BM, BN, BK, stages, warps, epilogue split, programs per SM); forward's BN columns of the gate's product and
# the same of the up's; the epilogue runs in SPLIT column blocks of the tile (1, 2 or 4 in backward, 1 or 2 in
# forward); two programs an SM (where registers and shared memory allow) would overlap one's epilogue with
# the other's GEMM (measured slower: 64-row tiles)
FWD_TILE = (128, 128, 64, 3, 8, 1, 1)
BWD_TILE = (128, 256, 64, 3, 8, 4, 1)
GROUP_M = 8

if triton is not None:

    @triton.jit
    def _tile_order(tile, num_m, num_n, GROUP_M: tl.constexpr):
        # groups of GROUP_M row tiles walk the columns together: a weight tile is reused from L2
        in_group = GROUP_M * num_n
        first_m = (tile // in_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + tile % rows, (tile % in_group) // rows

    @triton.jit
    def _dot(a, b, acc, PREC: tl.constexpr):
        # "ieee": float32 operands exact, not tf32 (and bf16 ones upcast: the interpreter has no bf16 dot)
        if PREC == "ieee":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _halves(acc, BM: tl.constexpr, BN: tl.constexpr):
        # the column halves [:BN/2], [BN/2:] of a (BM, BN) tile held in registers
        return tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))

    @triton.jit
    def _fwd_epilogue(acc_g, acc_u, yg_desc, yu_desc, h_desc, M, I, row0, col0,
                      XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                      ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, RG: tl.constexpr,
                      RU: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, W: tl.constexpr):
        rows = row0 + tl.arange(0, BM)
        cols = col0 + tl.arange(0, W)
        yg = acc_g.to(yg_desc.dtype)
        yu = acc_u.to(yu_desc.dtype)
        yg_desc.store([row0, col0], yg)
        yu_desc.store([row0, col0], yu)
        g, u = with_terms(yg.to(tl.float32), yu.to(tl.float32), XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu,
                          rank_g, rank_u, sg, su, rows, cols, M, I, HAS_G, HAS_U, RG, RU, PREC)
        act, _ = _act_and_grad(g, ACT)
        h_desc.store([row0, col0], (act * u).to(h_desc.dtype))

    @triton.jit
    def _glu_gemm_fwd_kernel(x_desc, wg_desc, wu_desc, yg_desc, yu_desc, h_desc, M, I, K,
                             XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                             ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, RG: tl.constexpr,
                             RU: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr, SPLIT: tl.constexpr, GROUP_M: tl.constexpr,
                             NUM_PROGRAMS: tl.constexpr):
        num_m, num_n, k_tiles = tl.cdiv(M, BM), tl.cdiv(I, BN), tl.cdiv(K, BK)
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
            pid_m, pid_n = _tile_order(tile, num_m, num_n, GROUP_M)
            acc_g = tl.zeros((BM, BN), dtype=tl.float32)
            acc_u = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(k_tiles):
                a = x_desc.load([pid_m * BM, kk * BK])
                acc_g = _dot(a, wg_desc.load([pid_n * BN, kk * BK]).T, acc_g, PREC)
                acc_u = _dot(a, wu_desc.load([pid_n * BN, kk * BK]).T, acc_u, PREC)
            row0, col0 = pid_m * BM, pid_n * BN
            if SPLIT == 1:
                _fwd_epilogue(acc_g, acc_u, yg_desc, yu_desc, h_desc, M, I, row0, col0, XAG, XAU, ld_xg, ld_xu,
                              BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su, ACT, HAS_G, HAS_U, RG, RU, PREC, BM, BN)
            else:  # in column halves: half the epilogue's float32 tiles alive at a time
                g0, g1 = _halves(acc_g, BM, BN)
                u0, u1 = _halves(acc_u, BM, BN)
                _fwd_epilogue(g0, u0, yg_desc, yu_desc, h_desc, M, I, row0, col0, XAG, XAU, ld_xg, ld_xu, BG, BU,
                              ld_bg, ld_bu, rank_g, rank_u, sg, su, ACT, HAS_G, HAS_U, RG, RU, PREC, BM, BN // 2)
                _fwd_epilogue(g1, u1, yg_desc, yu_desc, h_desc, M, I, row0, col0 + BN // 2, XAG, XAU, ld_xg, ld_xu,
                              BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su, ACT, HAS_G, HAS_U, RG, RU, PREC, BM,
                              BN // 2)

    @triton.jit
    def _bwd_epilogue(acc, yg_desc, yu_desc, h_desc, M, I, row0, col0,
                      XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                      DYB, ld_dyb, AD, ld_ad, rank_d, sd,
                      ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_D: tl.constexpr,
                      RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                      W: tl.constexpr):
        rows = row0 + tl.arange(0, BM)
        cols = col0 + tl.arange(0, W)
        dh = acc.to(h_desc.dtype).to(tl.float32)  # DH rounded, as the unfused GEMM stores it
        if HAS_D:
            dh = low_rank_tile(dh, DYB, ld_dyb, AD, ld_ad, rows, cols, M, I, rank_d, sd, True, RD, PREC)
        g, u = with_terms(yg_desc.load([row0, col0]).to(tl.float32), yu_desc.load([row0, col0]).to(tl.float32),
                          XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su, rows, cols, M, I,
                          HAS_G, HAS_U, RG, RU, PREC)
        act, dact = _act_and_grad(g, ACT)
        h_desc.store([row0, col0], (act * u).to(h_desc.dtype))
        yu_desc.store([row0, col0], (dh * act).to(yu_desc.dtype))
        yg_desc.store([row0, col0], (dh * u * dact).to(yg_desc.dtype))

    @triton.jit
    def _bwd_part(acc, yg_desc, yu_desc, h_desc, M, I, row0, col0,
                  XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                  DYB, ld_dyb, AD, ld_ad, rank_d, sd,
                  ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_D: tl.constexpr,
                  RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                  W: tl.constexpr, HALVED: tl.constexpr):
        # the epilogue of a (BM, W) block of the tile, or of its two column halves one after the other
        if HALVED:
            h0, h1 = _halves(acc, BM, W)
            _bwd_epilogue(h0, yg_desc, yu_desc, h_desc, M, I, row0, col0, XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg,
                          ld_bu, rank_g, rank_u, sg, su, DYB, ld_dyb, AD, ld_ad, rank_d, sd,
                          ACT, HAS_G, HAS_U, HAS_D, RG, RU, RD, PREC, BM, W // 2)
            _bwd_epilogue(h1, yg_desc, yu_desc, h_desc, M, I, row0, col0 + W // 2, XAG, XAU, ld_xg, ld_xu, BG, BU,
                          ld_bg, ld_bu, rank_g, rank_u, sg, su, DYB, ld_dyb, AD, ld_ad, rank_d, sd,
                          ACT, HAS_G, HAS_U, HAS_D, RG, RU, RD, PREC, BM, W // 2)
        else:
            _bwd_epilogue(acc, yg_desc, yu_desc, h_desc, M, I, row0, col0, XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg,
                          ld_bu, rank_g, rank_u, sg, su, DYB, ld_dyb, AD, ld_ad, rank_d, sd,
                          ACT, HAS_G, HAS_U, HAS_D, RG, RU, RD, PREC, BM, W)

    @triton.jit
    def _glu_gemm_bwd_kernel(dy_desc, wd_desc, yg_desc, yu_desc, h_desc, M, I, K,
                             XAG, XAU, ld_xg, ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su,
                             DYB, ld_dyb, AD, ld_ad, rank_d, sd,
                             ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_D: tl.constexpr,
                             RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, PREC: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                             GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
        num_m, num_n, k_tiles = tl.cdiv(M, BM), tl.cdiv(I, BN), tl.cdiv(K, BK)
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
            pid_m, pid_n = _tile_order(tile, num_m, num_n, GROUP_M)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(k_tiles):
                acc = _dot(dy_desc.load([pid_m * BM, kk * BK]), wd_desc.load([kk * BK, pid_n * BN]), acc, PREC)
            # the epilogue in SPLIT column blocks (1, 2 or 4): fewer float32 tiles alive at a time
            if SPLIT == 1:
                _bwd_part(acc, yg_desc, yu_desc, h_desc, M, I, pid_m * BM, pid_n * BN, XAG, XAU, ld_xg, ld_xu, BG,
                          BU, ld_bg, ld_bu, rank_g, rank_u, sg, su, DYB, ld_dyb, AD, ld_ad, rank_d, sd,
                          ACT, HAS_G, HAS_U, HAS_D, RG, RU, RD, PREC, BM, BN, False)
            else:
                a0, a1 = _halves(acc, BM, BN)
                _bwd_part(a0, yg_desc, yu_desc, h_desc, M, I, pid_m * BM, pid_n * BN, XAG, XAU, ld_xg, ld_xu, BG,
                          BU, ld_bg, ld_bu, rank_g, rank_u, sg, su, DYB, ld_dyb, AD, ld_ad, rank_d, sd,
                          ACT, HAS_G, HAS_U, HAS_D, RG, RU, RD, PREC, BM, BN // 2, SPLIT == 4)
                _bwd_part(a1, yg_desc, yu_desc, h_desc, M, I, pid_m * BM, pid_n * BN + BN // 2, XAG, XAU, ld_xg,
                          ld_xu, BG, BU, ld_bg, ld_bu, rank_g, rank_u, sg, su, DYB, ld_dyb, AD, ld_ad, rank_d, sd,
                          ACT, HAS_G, HAS_U, HAS_D, RG, RU, RD, PREC, BM, BN // 2, SPLIT == 4)


def _tma_ready(t) -> bool:
    # a TMA descriptor's operand: a 2D tensor with unit column stride, its start and row stride on 16 bytes
    return (isinstance(t, torch.Tensor) and t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


def _descriptor(t, block):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, list(block))


def _programs(tiles: int, like: torch.Tensor, per_sm: int) -> int:
    return max(1, min(per_sm * sm_count(like.device.index or 0) if like.is_cuda else 4, tiles))


def glu_gemm_forward(x, wg, wu, act: str, xa_g=None, b_g=None, s_g=1.0, xa_u=None, b_u=None, s_u=1.0):
    """``(Yg, Yu, h)``: the gate's and up's base products ``x W_g^T``, ``x W_u^T`` ((N, I) each, the column
    halves of one (N, 2I) tensor) and ``h = act(Yg + s_g xa_g B_g^T) * (Yu + s_u xa_u B_u^T)`` (N, I); ``x``
    (N, H), ``wg``/``wu`` (I, H), ``xa_*`` (N, r), ``b_*`` (I, r); a term is left out where its ``xa`` is None."""
    (n, k), i = x.shape, wg.shape[0]
    assert wu.shape == wg.shape and wg.shape[1] == k, (x.shape, wg.shape, wu.shape)
    # Yg and Yu as the column halves of one buffer, as one GEMM over joined weights gives them (what lora_mlp's
    # backward needs for its one dx GEMM over joined weights)
    yg, yu = torch.empty(n, 2 * i, device=x.device, dtype=x.dtype).split(i, dim=1)
    h = torch.empty(n, i, device=x.device, dtype=x.dtype)
    xg, bg, ld_xg, ld_bg, rg, sg, has_g, pg = _term(xa_g, b_g, s_g, yg)
    xu, bu, ld_xu, ld_bu, ru, su, has_u, pu = _term(xa_u, b_u, s_u, yg)
    bm, bn, bk, stages, warps, split, per_sm = FWD_TILE
    programs = _programs(triton.cdiv(n, bm) * triton.cdiv(i, bn), x, per_sm)
    launcher(_glu_gemm_fwd_kernel, x)[(programs,)](
        _descriptor(x, (bm, bk)), _descriptor(wg, (bn, bk)), _descriptor(wu, (bn, bk)),
        *(_descriptor(t, (bm, bn // split)) for t in (yg, yu, h)), n, i, k, xg, xu, ld_xg, ld_xu, bg, bu, ld_bg,
        ld_bu, rg, ru, sg, su,
        ACT=ACTS[act], HAS_G=has_g, HAS_U=has_u, RG=pg, RU=pu, PREC=_prec(x), BM=bm, BN=bn, BK=bk,
        SPLIT=split, GROUP_M=GROUP_M, NUM_PROGRAMS=programs, num_stages=stages, num_warps=warps)
    return yg, yu, h


def glu_gemm_backward(dy, wd, yg, yu, act: str, xa_g=None, b_g=None, s_g=1.0, xa_u=None, b_u=None, s_u=1.0,
                      dy_b=None, a_d=None, s_d=1.0) -> torch.Tensor:
    """Backward of ``glu_gemm_forward`` and the down projection's input gradient: returns ``h`` (N, I) and
    overwrites ``yg``/``yu`` (the forward's base products, (N, I) with one row stride) with ``dg``/``du``,
    where ``dh = dy W_d + s_d dy_b A_d``; ``dy`` (N, H), ``wd`` (H, I), ``dy_b`` (N, r_d), ``a_d`` (r_d, I)."""
    (n, k), i = dy.shape, wd.shape[1]
    assert wd.shape[0] == k and yg.shape == yu.shape == (n, i) and _tma_ready(yg) and _tma_ready(yu), (
        dy.shape, wd.shape, yg.shape, yu.shape, yg.stride(), yu.stride())
    h = torch.empty(n, i, device=dy.device, dtype=dy.dtype)
    xg, bg, ld_xg, ld_bg, rg, sg, has_g, pg = _term(xa_g, b_g, s_g, yg)
    xu, bu, ld_xu, ld_bu, ru, su, has_u, pu = _term(xa_u, b_u, s_u, yg)
    xd, ad, ld_xd, ld_ad, rd, sd, has_d, pd = _term(dy_b, a_d, s_d, yg)
    bm, bn, bk, stages, warps, split, per_sm = BWD_TILE
    programs = _programs(triton.cdiv(n, bm) * triton.cdiv(i, bn), dy, per_sm)
    launcher(_glu_gemm_bwd_kernel, dy)[(programs,)](
        _descriptor(dy, (bm, bk)), _descriptor(wd, (bk, bn)), *(_descriptor(t, (bm, bn // split)) for t in (yg, yu, h)),
        n, i, k,
        xg, xu, ld_xg, ld_xu, bg, bu, ld_bg, ld_bu, rg, ru, sg, su, xd, ld_xd, ad, ld_ad, rd, sd,
        ACT=ACTS[act], HAS_G=has_g, HAS_U=has_u, HAS_D=has_d, RG=pg, RU=pu, RD=pd, PREC=_prec(dy),
        BM=bm, BN=bn, BK=bk, SPLIT=split, GROUP_M=GROUP_M, NUM_PROGRAMS=programs, num_stages=stages,
        num_warps=warps)
    return h
