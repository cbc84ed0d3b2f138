#!/usr/bin/env python3
"""Probe: the padded MLP's SwiGLU inside its GEMMs' epilogues with QuACK's warp-specialised CUTLASS kernels.

bench/NOTES.md, session 30: lora_glu's two passes (8B: forward 7.8 ms, backward 16.1 ms a step, session 41)
move the (tokens x 14336) tensors its GEMMs have just written or are about to read, and a Triton GEMM that
computes them in its epilogue cost what the passes cost, because Triton's sm_90 loop does not overlap the
epilogue with the next tile's main loop. QuACK (quack-kernels, the CuTe DSL kernels FlashAttention-4 already
brings to the device) has Hopper GEMMs whose epilogue does overlap (ping-pong warp groups, TMA stores), with
exactly these two epilogues:

- ``gemm_gated``: ``[g | u] = xa W^T`` stored (the backward's saved tensor) and ``h = silu(g) u`` written from
  the accumulator, against ours: two cuBLAS GEMMs and ``lora_glu_forward``;
- ``gemm_dgated``: ``dh = dya W_d`` left in registers, ``dg``, ``du`` and ``h`` (recomputed, for dA_d)
  written from it and the saved ``[g | u]``, against ours: cuBLAS ``dh`` and ``lora_glu_backward_inplace``.

QuACK's gated epilogues pair each gate column with its up column, so ``[g | u]`` is stored interleaved
(``g_0, u_0, g_1, ...``); the weight can stay in our concatenated layout (``concat_layout=("B",)``), and the
backward's input-gradient GEMM over the interleaved ``[dg | du]`` is timed too (QuACK's own GEMM with the
same relabelling, against cuBLAS over the concatenated one). Shapes: one padded 8B layer (8,192 tokens,
4096 -> 14336, spare columns 64). Each fused output is compared with ours (relative Frobenius distance:
the fused path rounds g, u and dh once fewer, ~1e-3 expected). JSON lines to ``--out``.

    python3 bench/quack_glu_probe.py --seconds 2 --out $OUT/quack_glu.jsonl
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tuneforge_kernels.lora_glu import lora_glu_backward_inplace, lora_glu_forward  # noqa: E402

N_TOK, HID, INTER, SPARE = 8192, 4096, 14336, 64


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def interleaved(t: torch.Tensor, i: int) -> torch.Tensor:
    """(N, 2I) concatenated [g | u] columns -> interleaved g_0, u_0, g_1, ... (a copy)."""
    return torch.stack((t[:, :i], t[:, i:2 * i]), dim=2).reshape(t.shape[0], 2 * i)


def main():
    from gemm_cap import at_cap, error_text  # bench/gemm_cap.py
    from micro import write_record  # bench/micro.py

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", choices=("8B", "1B"), default="8B", help="1B: hidden 2048, intermediate 8192")
    ap.add_argument("--configs", default="pp128x192c21,pp128x128c12,pp128x160c12,co256x128c12",
                    help="QuACK tiles for the fused GEMMs: pp (ping-pong) or co (cooperative), MxN, cluster MN")
    args = ap.parse_args()
    import quack

    from tuneforge_kernels.gated_gemm import key_dsl_internals
    key_dsl_internals()  # QuACK 0.6.5 under cutlass-dsl 4.8.1 (its docstring)
    from quack.gemm_config import GemmConfig
    from quack.gemm_interface import gemm, gemm_dgated, gemm_gated

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    n, hd, i, sp = N_TOK, HID, INTER, SPARE
    if args.shape == "1B":
        hd, i = 2048, 8192
    k = hd + sp
    gu_w = torch.randn(2 * i + sp, k, device=dev, dtype=bf) / hd ** 0.5  # [W_g; W_u; A's] x [H | B's]
    gu_w[:, hd + 32:] = 0
    d_w = torch.randn(hd + sp, i + sp, device=dev, dtype=bf) / i ** 0.5
    xa = torch.randn(n, k, device=dev, dtype=bf)
    dya = torch.randn(n, k, device=dev, dtype=bf) * 1e-2
    base = {"shape": f"{n}x{hd}->{i}", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "quack": getattr(quack, "__version__", "?")}

    def run(direction, name, fn, check=None):
        rec = {**base, "direction": direction, "candidate": name}
        try:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            rec["first_call_s"] = round(time.perf_counter() - t0, 2)
            if check is not None:
                rec["rel_err"] = check()
            rec.update(at_cap(fn, args.seconds))
        except Exception as err:  # a tile that does not compile or launch: said, and the sweep goes on
            rec["error"] = error_text(err)
        write_record("QUACKGLU", rec, args.out)
        return rec

    def config(spec):
        kind, rest = spec[:2], spec[2:]
        mn, cl = rest.split("c")
        tm, tn = (int(v) for v in mn.split("x"))
        return GemmConfig(tile_m=tm, tile_n=tn, pingpong=kind == "pp", cluster_m=int(cl[0]), cluster_n=int(cl[1]),
                          is_dynamic_persistent=False, device_capacity=9)

    # forward
    gu = torch.empty(n, 2 * i + sp, device=dev, dtype=bf)
    ha = torch.empty(n, i + sp, device=dev, dtype=bf)

    def ours_fwd():
        torch.mm(xa, gu_w[:i].t(), out=gu[:, :i])
        torch.mm(xa, gu_w[i:2 * i].t(), out=gu[:, i:2 * i])
        lora_glu_forward(gu[:, :i], gu[:, i:2 * i], "silu", out=ha[:, :i])

    run("fwd", "ours (cuBLAS x2 + lora_glu)", ours_fwd)
    g_ref, h_ref = gu[:, :2 * i].clone(), ha[:, :i].clone()
    gu_q = torch.empty(n, 2 * i + sp, device=dev, dtype=bf)
    ha_q = torch.empty(n, i + sp, device=dev, dtype=bf)
    for spec in args.configs.split(","):
        cfg = config(spec)
        run("fwd", f"quack gemm_gated {spec}",
            lambda: gemm_gated(xa, gu_w[:2 * i].t(), activation="swiglu", preact_out=gu_q[:, :2 * i],
                               postact_out=ha_q[:, :i], concat_layout=("B",), config=cfg, tuned=False),
            lambda: {"preact": _rel(gu_q[:, :2 * i], interleaved(g_ref, i)), "h": _rel(ha_q[:, :i], h_ref)})
    # backward: ours overwrites g, u with dg, du in place, so each call first restores them
    gu_saved = gu[:, :2 * i].clone()

    def ours_bwd():
        gu[:, :2 * i].copy_(gu_saved)
        dh = dya @ d_w[:, :i]
        lora_glu_backward_inplace(dh, gu[:, :i], gu[:, i:2 * i], "silu")
        return dh

    copies = run("bwd", "ours' restoring copy alone", lambda: gu[:, :2 * i].copy_(gu_saved))
    run("bwd", "ours (cuBLAS dh + lora_glu bwd)", ours_bwd)
    h_b = ours_bwd().clone()
    dgu_ref = interleaved(gu[:, :2 * i], i)
    pre_int = interleaved(gu_saved, i)
    dgu_q = torch.empty(n, 2 * i + sp, device=dev, dtype=bf)
    h_q = torch.empty(n, i, device=dev, dtype=bf)
    for spec in args.configs.split(","):
        cfg = config(spec)
        run("bwd", f"quack gemm_dgated {spec}",
            lambda: gemm_dgated(dya, d_w[:, :i], pre_int, activation="swiglu", dx_out=dgu_q[:, :2 * i],
                                postact_out=h_q, config=cfg, tuned=False),
            lambda: {"dgu": _rel(dgu_q[:, :2 * i], dgu_ref), "h": _rel(h_q, h_b)})
    # in place (dx_out over PreAct, as the padded MLP would keep one buffer): correct?
    pre_copy = pre_int.clone()

    def in_place():  # each call first restores the preact it overwrites
        pre_copy.copy_(pre_int)
        gemm_dgated(dya, d_w[:, :i], pre_copy, activation="swiglu", dx_out=pre_copy, postact_out=h_q, tuned=False)

    run("bwd", "quack gemm_dgated in place, default tile (with its restoring copy)", in_place,
        lambda: {"dgu": _rel(pre_copy, dgu_ref)})
    # the input gradient over [dg | du]: cuBLAS over the concatenated layout against QuACK over the interleaved
    gu[:, 2 * i:] = 0
    dx_ref = gu[:, :2 * i] @ gu_w[:2 * i, :hd]
    run("dx", "cuBLAS [dg | du] W (K = 2I + spare)", lambda: gu @ gu_w[:, :hd])
    dx_q = torch.empty(n, hd, device=dev, dtype=bf)
    run("dx", "quack gemm, interleaved [dg | du], concat B (K = 2I)",
        lambda: gemm(dgu_ref, gu_w[:2 * i, :hd], out=dx_q, concat_layout=("B",), tuned=False),
        lambda: {"dx": _rel(dx_q, dx_ref)})
    print(f"(ours' backward includes {copies.get('ms', float('nan')):.3f} ms of restoring copies)")


if __name__ == "__main__":
    main()
