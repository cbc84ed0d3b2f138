#!/usr/bin/env python3
"""Probe: the gated activation in the epilogue of its GEMM, against cuBLAS plus lora_glu's own pass.

bench/NOTES.md (session 30): at 8B the no-recompute step spends ~30 ms in lora_glu (fwd 8.6, bwd 21.7 ms), two
memory-bound passes over (tokens x 14336) tensors that the GEMM beside each has just written (forward: the
gate and up products) or is about to be read from (backward: the down projection's input gradient ``DH``).
A GEMM whose epilogue computes them from the accumulator in registers skips one write and one read of
those tensors (940 MB a layer, 30 GB a step) and the passes' own launch and tail. Whether that pays depends
on what the epilogue costs the GEMM at the power cap, which is what this measures, per layer at 8B
(8,192 tokens, 4096 -> 14336, rank 16, silu), each variant run back to back for ``--seconds``:

- forward, ``ours``: two cuBLAS GEMMs (``x W_g^T``, ``x W_u^T``) and ``lora_glu_forward``;
  ``fused``: one persistent Triton GEMM whose tiles each hold the same columns of the gate's and the up's
  product (x's tile read once for both), whose epilogue adds the rank-r terms and writes the base products
  (what the backward keeps) and ``h``;
- backward, ``ours``: cuBLAS ``dy W_d`` and ``lora_glu_backward_inplace``; ``fused``: one persistent GEMM
  ``dy W_d`` whose epilogue adds the down adapter's term and writes ``h``, ``dg`` and ``du``.

Each fused output is compared with ours' (relative Frobenius distance; both round once from float32, so
only the GEMMs' summation order differs, ~1e-3). JSON lines to ``--out``.

    python3 bench/glu_gemm_probe.py --seconds 2 --out $OUT/glu_gemm.jsonl
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tuneforge_kernels.lora_glu import _act_and_grad, lora_glu_backward_inplace, lora_glu_forward  # noqa: E402
from tuneforge_kernels.lora_glu import _prec as prec  # noqa: E402
from tuneforge_kernels import glu_gemm  # noqa: E402
from tuneforge_kernels.low_rank import low_rank_tile  # noqa: E402

N_TOK, HID, INTER, RANK, SCALE = 8192, 4096, 14336, 16, 2.0
# (BM, BN, BK, stages, warps); in forward BN columns each of the gate's and the up's product
FWD_CONFIGS = [(128, 128, 64, 3, 8), (128, 64, 64, 4, 8), (128, 128, 64, 4, 8), (64, 128, 64, 4, 4)]
BWD_CONFIGS = [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (128, 128, 64, 3, 4)]


@triton.jit
def _tile_order(tile, num_m, num_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + tile % rows, (tile % in_group) // rows


@triton.jit
def _glu_fwd_gemm(a_desc, wg_desc, wu_desc, YG, YU, H, M, I, K, XAG, XAU, BG, BU, s_g, s_u,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                  GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr):
    # each tile: BN columns of the gate's product and the same BN of the up's, x's tile read once for both
    num_m, num_n, k_tiles = tl.cdiv(M, BM), tl.cdiv(I, BN), tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_order(tile, num_m, num_n, GROUP_M)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(k_tiles):
            a = a_desc.load([pid_m * BM, kk * BK])
            acc_g = tl.dot(a, wg_desc.load([pid_n * BN, kk * BK]).T, acc_g)
            acc_u = tl.dot(a, wu_desc.load([pid_n * BN, kk * BK]).T, acc_u)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        mask = (rows[:, None] < M) & (cols[None, :] < I)
        offs = rows[:, None].to(tl.int64) * I + cols[None, :]
        ygr = acc_g.to(YG.dtype.element_ty)
        yur = acc_u.to(YU.dtype.element_ty)
        tl.store(YG + offs, ygr, mask=mask)
        tl.store(YU + offs, yur, mask=mask)
        # the terms onto the rounded base products, as lora_glu_forward reads them back
        g = low_rank_tile(ygr.to(tl.float32), XAG, RP, BG, RP, rows, cols, M, I, RP, s_g, False, RP, PREC)
        u = low_rank_tile(yur.to(tl.float32), XAU, RP, BU, RP, rows, cols, M, I, RP, s_u, False, RP, PREC)
        act, _ = _act_and_grad(g, ACT)
        tl.store(H + offs, (act * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_gemm(a_desc, w_desc, YG, YU, H, M, I, K, XAG, XAU, BG, BU, s_g, s_u, DYB, AD, s_d,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                  GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr):
    # a_desc: dy (M, K); w_desc: W_d (K, I). Writes h into H, dg into YG, du into YU.
    num_m, num_n, k_tiles = tl.cdiv(M, BM), tl.cdiv(I, BN), tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_order(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(k_tiles):
            a = a_desc.load([pid_m * BM, kk * BK])
            b = w_desc.load([kk * BK, pid_n * BN])
            acc = tl.dot(a, b, acc)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        mask = (rows[:, None] < M) & (cols[None, :] < I)
        offs = rows[:, None].to(tl.int64) * I + cols[None, :]
        # DH rounded as cuBLAS would have stored it, then the term (lora_glu_backward_inplace's order)
        dh = low_rank_tile(acc.to(H.dtype.element_ty).to(tl.float32), DYB, RP, AD, I, rows, cols, M, I, RP, s_d,
                           True, RP, PREC)
        g = tl.load(YG + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(YU + offs, mask=mask, other=0.0).to(tl.float32)
        g = low_rank_tile(g, XAG, RP, BG, RP, rows, cols, M, I, RP, s_g, False, RP, PREC)
        u = low_rank_tile(u, XAU, RP, BU, RP, rows, cols, M, I, RP, s_u, False, RP, PREC)
        act, dact = _act_and_grad(g, ACT)
        tl.store(H + offs, (act * u).to(H.dtype.element_ty), mask=mask)
        tl.store(YU + offs, (dh * act).to(YU.dtype.element_ty), mask=mask)
        tl.store(YG + offs, (dh * u * dact).to(YG.dtype.element_ty), mask=mask)


def fused_forward(x, wg, wu, xa_g, b_g, xa_u, b_u, config, sms):
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, stages, warps = config
    m, k = x.shape
    i = wg.shape[0]
    yg, yu, h = (torch.empty(m, i, device=x.device, dtype=x.dtype) for _ in range(3))
    programs = min(sms, triton.cdiv(m, bm) * triton.cdiv(i, bn))
    descs = (TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(wg, [bn, bk]),
             TensorDescriptor.from_tensor(wu, [bn, bk]))

    def call():
        _glu_fwd_gemm[(programs,)](*descs, yg, yu, h, m, i, k, xa_g, xa_u, b_g, b_u, SCALE, SCALE, BM=bm, BN=bn,
                                   BK=bk, RP=RANK, GROUP_M=8, NUM_SMS=programs, ACT=0, PREC=prec(x),
                                   num_stages=stages, num_warps=warps)
        return yg, yu, h

    return call


def fused_backward(dy, wd, yg, yu, xa_g, b_g, xa_u, b_u, dy_b, a_d, config, sms):
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, stages, warps = config
    m, k = dy.shape
    i = wd.shape[1]
    h = torch.empty(m, i, device=dy.device, dtype=dy.dtype)
    programs = min(sms, triton.cdiv(m, bm) * triton.cdiv(i, bn))
    descs = (TensorDescriptor.from_tensor(dy, [bm, bk]), TensorDescriptor.from_tensor(wd, [bk, bn]))

    def call():
        _glu_bwd_gemm[(programs,)](*descs, yg, yu, h, m, i, k, xa_g, xa_u, b_g, b_u, SCALE, SCALE, dy_b, a_d,
                                   SCALE, BM=bm, BN=bn, BK=bk, RP=RANK, GROUP_M=8, NUM_SMS=programs,
                                   ACT=0, PREC=prec(dy), num_stages=stages, num_warps=warps)
        return h, yg, yu

    return call


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    from gemm_cap import _Sampler, sustained  # bench/gemm_cap.py
    from micro import write_record  # bench/micro.py

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=("8B", "1B"), default="8B", help="1B: hidden 2048, intermediate 8192")
    ap.add_argument("--tokens", type=int, default=N_TOK)
    ap.add_argument("--hidden", type=int, default=HID)
    ap.add_argument("--inter", type=int, default=INTER)
    ap.add_argument("--check-only", action="store_true",
                    help="compare the outputs, time nothing (the CPU: TRITON_INTERPRET=1, --device cpu, float32)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = args.device
    bf = torch.bfloat16 if dev == "cuda" else torch.float32
    n, hid, inter = args.tokens, args.hidden, args.inter
    if args.shape == "1B":
        hid, inter = 2048, 8192
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 4
    x = torch.randn(n, hid, device=dev, dtype=bf)
    wg, wu = (torch.randn(inter, hid, device=dev, dtype=bf) / hid ** 0.5 for _ in range(2))
    wd = torch.randn(hid, inter, device=dev, dtype=bf) / inter ** 0.5
    xa_g, xa_u, dy_b = (torch.randn(n, RANK, device=dev, dtype=bf) for _ in range(3))
    b_g, b_u = (torch.randn(inter, RANK, device=dev, dtype=bf) * 0.01 for _ in range(2))
    a_d = torch.randn(RANK, inter, device=dev, dtype=bf) * 0.01
    dy = torch.randn(n, hid, device=dev, dtype=bf)
    base = {"shape": f"{n}x{hid}->{inter}", "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
            "torch": torch.__version__,
            "triton": triton.__version__}

    def run(direction, name, fn, ref=None, got=None):
        rec = {**base, "direction": direction, "candidate": name}
        try:
            outs = fn()
            if ref is not None:
                rec["rel_err"] = {k: _rel(o, r) for k, o, r in zip(("a", "b", "c"), got(outs), ref)}
            if args.check_only:
                write_record("GLUGEMM", rec, args.out)
                return rec
            with _Sampler() as sampler:
                calls, secs = sustained(fn, args.seconds)
            rec.update(calls=calls, ms=secs / calls * 1e3)
            rec["sm_mhz"], rec["watts"] = sampler.steady()
        except Exception as err:  # a tile that does not compile or fit: said, and the sweep goes on
            rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        write_record("GLUGEMM", rec, args.out)
        return rec

    # forward
    def ours_fwd():
        yg, yu = x @ wg.t(), x @ wu.t()
        return yg, yu, lora_glu_forward(yg, yu, "silu", xa_g, b_g, SCALE, xa_u, b_u, SCALE)

    ref = [t.clone() for t in ours_fwd()]
    run("fwd", "ours (cuBLAS x2 + lora_glu)", ours_fwd)
    run("fwd", "glu_gemm.py {}x{}x{}/s{}/w{}".format(*glu_gemm.FWD_TILE),
        lambda: glu_gemm.glu_gemm_forward(x, wg, wu, "silu", xa_g, b_g, SCALE, xa_u, b_u, SCALE), ref, lambda o: o)
    for cfg in FWD_CONFIGS:
        run("fwd", "fused {}x{}x{}/s{}/w{}".format(*cfg), fused_forward(x, wg, wu, xa_g, b_g, xa_u, b_u, cfg, sms),
            ref, lambda o: o)
    # backward: the same saved base products each time (the in-place variants overwrite theirs)
    yg0, yu0 = ref[0], ref[1]
    yg, yu = yg0.clone(), yu0.clone()

    def ours_bwd():
        yg.copy_(yg0), yu.copy_(yu0)
        dh = dy @ wd
        lora_glu_backward_inplace(dh, yg, yu, "silu", xa_g, b_g, SCALE, xa_u, b_u, SCALE, dy_b, a_d, SCALE)
        return dh, yg, yu

    def copies_only():
        yg.copy_(yg0), yu.copy_(yu0)

    bref = [t.clone() for t in ours_bwd()]
    copies = run("bwd", "the variants' restoring copies alone", copies_only)
    run("bwd", "ours (cuBLAS + lora_glu bwd)", ours_bwd)

    def module_bwd():
        yg.copy_(yg0), yu.copy_(yu0)
        return glu_gemm.glu_gemm_backward(dy, wd, yg, yu, "silu", xa_g, b_g, SCALE, xa_u, b_u, SCALE, dy_b, a_d,
                                          SCALE), yg, yu

    run("bwd", "glu_gemm.py {}x{}x{}/s{}/w{}".format(*glu_gemm.BWD_TILE), module_bwd, bref, lambda o: o)
    for cfg in BWD_CONFIGS:
        inner = fused_backward(dy, wd, yg, yu, xa_g, b_g, xa_u, b_u, dy_b, a_d, cfg, sms)

        def call(inner=inner):
            yg.copy_(yg0), yu.copy_(yu0)
            return inner()

        run("bwd", "fused {}x{}x{}/s{}/w{}".format(*cfg), call, bref, lambda o: o)
    print(f"(backward times include {copies.get('ms', float('nan')):.3f} ms of restoring copies)")


if __name__ == "__main__":
    main()
