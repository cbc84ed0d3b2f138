#!/usr/bin/env python3
"""Probe: a LoRA projection's two rank-r backward products in one pass over its output gradient.

bench/NOTES.md, session 43: the 8B profile's rank-r GEMMs read the MLP's [dg | du] (8192 x 28672, 470 MB)
twice more after the input-gradient GEMM, once for ``s dgu B`` (the padded layout's spare columns, 5.3 ms a
step) and once for ``dgu^T (s x A^T)`` (dB_g, dB_u: 5.0 ms), each at ~3 TB/s. ``grad_pair`` below (a
Triton kernel) reads each tile once for both and sums float32 partials afterwards. Prediction: ~0.1 ms a
layer at 8B for the MLP, ~3.5 ms a step; little for Q/K/V (their partials cost about what one read of
[dq | dk | dv] does). Measured on an H100: slower at every site (NOTES.md, session 43), so not in kernels/.

Each site of one 8B (or 1B) layer, timed at the power cap (``gemm_cap.at_cap``), both ways:
- ``gemms``: today's two cuBLAS GEMMs (``addmm`` with alpha into the spare columns, then ``d^T xa``);
- ``pair`` and the ``--plans`` variants (BC, groups, warps, stages): grad_pair.
Each output is compared with the float32 reference (relative Frobenius error). JSON lines to ``--out``.

    python3 bench/grad_pair_probe.py --seconds 2 --out $OUT/grad_pair.jsonl
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tuneforge_kernels.backend import next_power_of_2  # noqa: E402

# (site, columns of d, k = P's real columns, spare width, r = xa's columns); 8192 tokens
SITES = {"8B": [("mlp dgu", 28672, 32, 64, 32), ("down dy", 4096, 16, 64, 16), ("qkv dy", 6144, 48, 64, 48)],
         "1B": [("mlp dgu", 16384, 32, 64, 32), ("down dy", 2048, 16, 64, 16), ("qkv dy", 3072, 48, 64, 48)]}


# A program owns a block of columns and a group of rows. It keeps its block's dB rows in registers over its
# rows (one partial per row group) and writes P's partial for its columns (one per column block). A second
# kernel sums P's partials, scales, rounds once and writes P, with zeros after its k columns, as the padded
# layouts' GEMMs expect.


@triton.jit
def _grad_pair_kernel(D, ld_d, B, ld_b, XA, ld_xa, PP, QP, n_rows, n_cols, k, r, rows_per_group,
                      K: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    cb, rg = tl.program_id(0), tl.program_id(1)
    cols = cb * BC + tl.arange(0, BC)
    kk, rr = tl.arange(0, K), tl.arange(0, R)
    col_in = cols < n_cols
    b = tl.load(B + cols[:, None].to(tl.int64) * ld_b + kk[None, :],
                mask=col_in[:, None] & (kk[None, :] < k), other=0.0)                     # (BC, K)
    q = tl.zeros((BC, R), dtype=tl.float32)
    end = tl.minimum((rg + 1) * rows_per_group, n_rows)
    for m in range(rg * rows_per_group, end, BM):  # rows_per_group: a multiple of BM
        rows = m + tl.arange(0, BM)
        row_in = rows < n_rows
        d = tl.load(D + rows[:, None].to(tl.int64) * ld_d + cols[None, :],
                    mask=row_in[:, None] & col_in[None, :], other=0.0)                    # (BM, BC)
        xa = tl.load(XA + rows[:, None].to(tl.int64) * ld_xa + rr[None, :],
                     mask=row_in[:, None] & (rr[None, :] < r), other=0.0)                 # (BM, R)
        q = tl.dot(tl.trans(d), xa, q)                                                   # (BC, R)
        p = tl.dot(d, b)                                                                 # (BM, K)
        tl.store(PP + (cb * n_rows + rows[:, None]).to(tl.int64) * k + kk[None, :], p,
                 mask=row_in[:, None] & (kk[None, :] < k))
    tl.store(QP + (rg * n_cols + cols[:, None]).to(tl.int64) * r + rr[None, :], q,
             mask=col_in[:, None] & (rr[None, :] < r))


@triton.jit
def _sum_partials_kernel(PP, OUT, ld_out, n_rows, n_parts, k, width, scale, W: tl.constexpr, BM: tl.constexpr):
    # OUT[rows, :width] = scale * sum_j PP[j, rows, :k], zeros in k..width
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.arange(0, W)
    row_in = rows < n_rows
    acc = tl.zeros((BM, W), dtype=tl.float32)
    for j in range(n_parts):
        acc += tl.load(PP + (j * n_rows + rows[:, None]).to(tl.int64) * k + c[None, :],
                       mask=row_in[:, None] & (c[None, :] < k), other=0.0)
    tl.store(OUT + rows[:, None].to(tl.int64) * ld_out + c[None, :], (acc * scale).to(OUT.dtype.element_ty),
             mask=row_in[:, None] & (c[None, :] < width))


def own_plan(n: int, c: int, k: int, r: int) -> dict:
    """The kernel's launch for ``d`` (n, c): a column block's B and dB rows stay in registers (16K of each per
    program, 8 warps); as many row groups as fill the SMs once."""
    kp, rp = max(16, next_power_of_2(k)), max(16, next_power_of_2(r))
    bc = min(max(16, next_power_of_2(c)), 16384 // max(kp, rp))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    groups = max(1, min(triton.cdiv(n, 128), round(sms / triton.cdiv(c, bc))))
    return {"BC": bc, "BM": 32, "groups": groups, "warps": 8, "stages": 3}


def grad_pair(d, b, xa, scale: float, out, k: int, plan: dict) -> torch.Tensor:
    """Writes ``out[:, :k] = scale * d @ b[:, :k]`` (``out``'s other columns: zeros) and returns ``d^T @ xa``
    in float32. ``d`` (N, C), ``b`` (C, >= k), ``xa`` (N, r), ``out`` (N, >= k), bf16, unit column strides."""
    n, c = d.shape
    r = xa.shape[1]
    kp, rp = max(16, next_power_of_2(k)), max(16, next_power_of_2(r))
    bm, n_blocks = plan["BM"], triton.cdiv(c, plan["BC"])
    rows_per_group = triton.cdiv(triton.cdiv(n, plan["groups"]), bm) * bm
    groups = triton.cdiv(n, rows_per_group)
    pp = torch.empty((n_blocks, n, k), dtype=torch.float32, device=d.device)
    qp = torch.empty((groups, c, r), dtype=torch.float32, device=d.device)
    _grad_pair_kernel[(n_blocks, groups)](
        d, d.stride(0), b, b.stride(0), xa, xa.stride(0), pp, qp, n, c, k, r, rows_per_group,
        K=kp, R=rp, BM=bm, BC=plan["BC"], num_warps=plan["warps"], num_stages=plan["stages"])
    width = out.shape[1]
    _sum_partials_kernel[(triton.cdiv(n, 64),)](
        pp, out, out.stride(0), n, n_blocks, k, width, float(scale), W=max(16, next_power_of_2(width)), BM=64,
        num_warps=4)
    return qp[0] if groups == 1 else qp.sum(0)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _plans(text):
    # "BCxGROUPS/wW/sS[/mBM],..." -> plan dicts (BM: rows a loop trip, default 32)
    out = []
    for item in filter(None, text.split(",")):
        tile, warps, stages, *rows = item.split("/")
        bc, groups = tile.split("x")
        out.append((item, {"BC": int(bc), "BM": int(rows[0][1:]) if rows else 32, "groups": int(groups),
                           "warps": int(warps[1:]), "stages": int(stages[1:])}))
    return out


def main():
    from gemm_cap import at_cap, error_text  # bench/gemm_cap.py
    from micro import write_record  # bench/micro.py

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--shape", choices=sorted(SITES), default="8B")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--plans", default="512x2/w8/s3,512x3/w8/s2,256x1/w8/s3,256x2/w4/s3",
                    help="grad_pair launches beside its own plan: BCxGROUPS/wWARPS/sSTAGES[/mROWS]")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, n = "cuda", args.tokens
    for site, c, k, spare, r in SITES[args.shape]:
        torch.manual_seed(0)
        d = torch.randn(n, c + spare, device=dev, dtype=torch.bfloat16)[:, :c]  # a view, as in the layer
        b = torch.zeros(c, spare, device=dev, dtype=torch.bfloat16)
        b[:, :k] = torch.randn(c, k, device=dev) * 0.05
        xa = torch.randn(n, r, device=dev, dtype=torch.bfloat16)
        out = torch.empty(n, c + spare, device=dev, dtype=torch.bfloat16)[:, c:]
        ref_out = (d.float() @ b.float() * 2.0)
        ref_q = d.float().t() @ xa.float()

        def gemms():
            torch.addmm(out, d, b, beta=0.0, alpha=2.0, out=out)
            return d.t() @ xa

        ways = [("gemms", None)] + [("pair", own_plan(n, c, k, r))] + _plans(args.plans)
        for name, plan in ways:
            rec = {"kind": "grad_pair_probe", "shape": args.shape, "site": site, "tokens": n, "cols": c, "k": k,
                   "r": r, "way": name, "plan": plan, "gpu": torch.cuda.get_device_name()}
            fn = gemms if plan is None else (lambda _p=plan: grad_pair(d, b, xa, 2.0, out, k, _p))
            try:
                out.fill_(float("nan"))
                q = fn()
                torch.cuda.synchronize()
                rec["err_p"], rec["err_q"] = _rel(out, ref_out), _rel(q, ref_q)
                rec.update(at_cap(fn, args.seconds))
                rec["gb_per_s_of_d"] = d.numel() * 2 / rec["ms"] / 1e6
            except Exception as err:  # a plan that does not compile or fit: the sweep goes on
                rec["error"] = error_text(err)
            print(f"{site:8} {name:14} " + (f"{rec['ms']:.4f} ms  {rec['gb_per_s_of_d']:.0f} GB/s of d  "
                                            f"err P {rec['err_p']:.1e} dB {rec['err_q']:.1e}  "
                                            f"{rec['sm_mhz']} MHz" if "ms" in rec else rec["error"]), flush=True)
            write_record("GRADPAIR", rec, args.out)


if __name__ == "__main__":
    main()
