#!/usr/bin/env python3
"""Can one pass over an adapter's output gradient beat the two GEMMs that read it today?

bench/NOTES.md, open items: in backward each adapted projection reads its ``dy`` (tokens x out) twice for
its rank-r terms, ``dB = s dy^T (x A^T)`` (cuBLAS, split over the tokens) and ``s dy B`` (the A side's
input). All seven projections' ``dy`` are 705 MB a layer at 8B: one read fewer is ~6 ms of a step's reads,
~1% of the step if a fused pass ran at the copy rate. This probe is that pass (bench-only, not in the
step): a (row block x column group) grid, each program reading its ``dy`` tiles once for both products,
``dB`` as float32 partials per row block and ``dy B`` per column group, each summed after. It prints both
ways' times at the 8B widths, the bytes each must move, and the fused pass's error against float64.

    python3 bench/adapter_grads_probe.py --out $OUT/adapter_grads.jsonl
"""
import argparse

import torch

N_TOK, RANK = 8192, 16
# the output widths of the 8B step's adapted projections: gate/up, joined q/k/v, q/o/down, k/v
WIDTHS = [14336, 6144, 4096, 1024]
# (BM, BN, column groups): BM 256 keeps the dB partials at 1/8 of a 14336-wide dy's bytes (32 blocks)
TILES = [(256, 64, 8), (128, 64, 4), (256, 128, 8)]


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def both_products(DY, XA, B, DB_PART, DYB_PART, n_rows, n_cols, cols_per_group, R: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
        pid_m, group = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        ranks = tl.arange(0, R)
        in_rows = rows < n_rows
        xa = tl.load(XA + rows[:, None].to(tl.int64) * R + ranks[None, :], mask=in_rows[:, None], other=0.0)
        acc = tl.zeros((BM, R), dtype=tl.float32)
        start = group * cols_per_group
        for c0 in range(start, tl.minimum(start + cols_per_group, n_cols), BN):
            cols = c0 + tl.arange(0, BN)
            in_cols = cols < n_cols
            dy = tl.load(DY + rows[:, None].to(tl.int64) * n_cols + cols[None, :],
                         mask=in_rows[:, None] & in_cols[None, :], other=0.0)                  # (BM, BN)
            b = tl.load(B + cols[:, None] * R + ranks[None, :], mask=in_cols[:, None], other=0.0)  # (BN, R)
            acc = tl.dot(dy, b, acc)                                                         # dy B
            part = tl.dot(tl.trans(dy), xa)                                                  # (BN, R)
            tl.store(DB_PART + pid_m.to(tl.int64) * n_cols * R + cols[:, None] * R + ranks[None, :], part,
                     mask=in_cols[:, None])
        tl.store(DYB_PART + group.to(tl.int64) * n_rows * R + rows[:, None].to(tl.int64) * R + ranks[None, :],
                 acc, mask=in_rows[:, None])

    def fused(dy, xa, b, s, tile):
        """(s dy^T xa, s dy B) from one pass over dy (N, O); xa (N, R), b (O, R) contiguous."""
        bm, bn, groups = tile
        (n, o), r = dy.shape, b.shape[1]
        assert dy.is_contiguous() and xa.is_contiguous() and b.is_contiguous() and xa.shape == (n, r)
        cols_per_group = triton.cdiv(triton.cdiv(o, groups), bn) * bn
        groups = triton.cdiv(o, cols_per_group)
        blocks = triton.cdiv(n, bm)
        db_part = torch.empty(blocks, o, r, device=dy.device, dtype=torch.float32)
        dyb_part = torch.empty(groups, n, r, device=dy.device, dtype=torch.float32)
        both_products[(blocks, groups)](dy, xa, b, db_part, dyb_part, n, o, cols_per_group, R=r, BM=bm, BN=bn,
                                        num_warps=8 if bm * bn >= 256 * 64 else 4)
        return db_part.sum(0).mul_(s), dyb_part.sum(0).mul_(s)

    return fused


def two_gemms(dy, xa, b, s):
    """Today's two reads of dy (lora_linear.py): s dy^T xa and s dy B."""
    return torch.mm(dy.t(), xa).mul_(s), torch.mm(dy, b).mul_(s)


def main():
    from micro import timed, write_record  # bench/micro.py

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fused = _kernel()
    rows = []
    for o in WIDTHS:
        dy = torch.randn(N_TOK, o, device="cuda", dtype=torch.bfloat16)
        xa = torch.randn(N_TOK, RANK, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(o, RANK, device="cuda", dtype=torch.bfloat16) * 0.1
        exact = (dy.double().t() @ xa.double() * 0.5, dy.double() @ b.double() * 0.5)
        cases = [("two GEMMs", lambda: two_gemms(dy, xa, b, 0.5))]
        cases += [(f"one pass {bm}x{bn}/{g}", lambda t=(bm, bn, g): fused(dy, xa, b, 0.5, t)) for bm, bn, g in TILES]
        for name, fn in cases:
            rec = {"width": o, "case": name, "dy_mb": dy.numel() * 2 / 1e6, "gpu": torch.cuda.get_device_name(0)}
            try:
                got = fn()
                rec["rel_err"] = max(float((g.double() - e).norm() / e.norm()) for g, e in zip(got, exact))
                rec["ms"] = timed(fn)
                rec["dy_gbps"] = dy.numel() * 2 / rec["ms"] / 1e6  # dy's bytes over the time: read once = 1x
            except Exception as err:  # a tile that does not compile: said, and the probe goes on
                rec["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(rec)
            write_record("PROBE", rec, args.out)
    print(f"\n{'width':>6} {'case':<22} {'ms':>8} {'dy GB/s':>8} {'rel err':>8}")
    for r in rows:
        print(f"{r['width']:6d} {r['case']:<22} {r.get('ms', float('nan')):8.3f} {r.get('dy_gbps', float('nan')):8.0f} "
              f"{r.get('rel_err', float('nan')):8.1e}" + (f"  {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
    main()
