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
  ``glu_gemm``: bench/glu_gemm.py's forward at a few tiles (persistent Triton GEMM, the
  gate's and up's columns in one program, the epilogue adding the rank-r terms and writing ``Yg``, ``Yu``,
  ``h``);
- backward, ``ours``: cuBLAS ``dy W_d`` and ``lora_glu_backward_inplace``; ``glu_gemm``: its backward (the
  epilogue adds the down adapter's term and writes ``h``, ``dg`` and ``du``).

The first version (session 30's first call, results/2026-12-06-h100-v33-glu-gemm-first.jsonl: the probe's
own kernels, pointer stores, a flattened tile loop) spilled ~6 KB a thread and serialised its wgmma; this one
keeps the candidates that ptxas compiles without spills. Each fused output is compared with ours' (relative
Frobenius distance; both round once from float32, so only the GEMMs' summation order differs, ~1e-3). JSON
lines to ``--out``.

    python3 bench/glu_gemm_probe.py --seconds 2 --out $OUT/glu_gemm.jsonl
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402

import glu_gemm  # noqa: E402  (bench/glu_gemm.py)
from tuneforge_kernels.lora_glu import lora_glu_backward_inplace, lora_glu_forward  # noqa: E402

N_TOK, HID, INTER, RANK, SCALE = 8192, 4096, 14336, 16, 2.0
# glu_gemm's (BM, BN, BK, stages, warps, epilogue split, programs per SM) candidates; in forward BN columns each
# of the gate's and the up's product. Chosen from ptxas's report for sm_90a (wgmma not serialised; spills of
# 0-152 bytes, the 128x256 backward's 620).
FWD_CONFIGS = [(128, 128, 64, 3, 8, 1, 1), (64, 64, 64, 4, 4, 1, 2), (64, 128, 64, 2, 4, 1, 2)]
BWD_CONFIGS = [(128, 256, 64, 3, 8, 4, 1), (64, 128, 64, 3, 4, 4, 2), (64, 128, 64, 4, 4, 2, 2)]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    from gemm_cap import at_cap, error_text  # bench/gemm_cap.py
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
    x = torch.randn(n, hid, device=dev, dtype=bf)
    wg, wu = (torch.randn(inter, hid, device=dev, dtype=bf) / hid ** 0.5 for _ in range(2))
    wd = torch.randn(hid, inter, device=dev, dtype=bf) / inter ** 0.5
    xa_g, xa_u, dy_b = (torch.randn(n, RANK, device=dev, dtype=bf) for _ in range(3))
    b_g, b_u = (torch.randn(inter, RANK, device=dev, dtype=bf) * 0.01 for _ in range(2))
    a_d = torch.randn(RANK, inter, device=dev, dtype=bf) * 0.01
    dy = torch.randn(n, hid, device=dev, dtype=bf)
    base = {"shape": f"{n}x{hid}->{inter}", "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__}

    def run(direction, name, fn, ref=None, got=None):
        rec = {**base, "direction": direction, "candidate": name}
        try:
            outs = fn()
            if ref is not None:
                rec["rel_err"] = {k: _rel(o, r) for k, o, r in zip(("a", "b", "c"), got(outs), ref)}
            if args.check_only:
                write_record("GLUGEMM", rec, args.out)
                return rec
            rec.update(at_cap(fn, args.seconds))
        except Exception as err:  # a tile that does not compile or fit: said, and the sweep goes on
            rec["error"] = error_text(err)
        write_record("GLUGEMM", rec, args.out)
        return rec

    # forward
    def ours_fwd():
        yg, yu = x @ wg.t(), x @ wu.t()
        return yg, yu, lora_glu_forward(yg, yu, "silu", xa_g, b_g, SCALE, xa_u, b_u, SCALE)

    ref = [t.clone() for t in ours_fwd()]
    run("fwd", "ours (cuBLAS x2 + lora_glu)", ours_fwd)
    for cfg in FWD_CONFIGS:
        glu_gemm.FWD_TILE = cfg
        run("fwd", "glu_gemm {}x{}x{}/s{}/w{}/split{}/{}perSM".format(*cfg),
            lambda: glu_gemm.glu_gemm_forward(x, wg, wu, "silu", xa_g, b_g, SCALE, xa_u, b_u, SCALE), ref, lambda o: o)
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

    for cfg in BWD_CONFIGS:
        glu_gemm.BWD_TILE = cfg
        run("bwd", "glu_gemm {}x{}x{}/s{}/w{}/split{}/{}perSM".format(*cfg), module_bwd, bref, lambda o: o)
    print(f"(backward times include {copies.get('ms', float('nan')):.3f} ms of restoring copies)")


if __name__ == "__main__":
    main()
