#!/usr/bin/env python3
"""The 8B step's frozen GEMMs at the GPU's power cap: which kernel does the most FLOPs per joule?

bench/NOTES.md (sessions 13, 14 and 25): the 8B no-recompute step runs at the 700 W cap throughout, its
frozen GEMMs (~350 ms of ~464) at the clock the cap allows (~1,530 MHz against 1,980), ~84% of the matmul
micro's burst rate. cuBLAS picks its kernels for speed at a free clock. A kernel that draws less power per
FLOP (more operand reuse per tile) would clock higher at the cap; 10% on those GEMMs is the 35 ms the goal
needs. This measures each projection shape of the step (forward ``x W^T`` and input gradient ``dy W``),
each candidate run back to back for ``--seconds`` so that the cap acts, with nvidia-smi sampling the SM
clock and the power meanwhile:

- ``cublas``: torch's default (cuBLAS), and the same product transposed (``y^T = B^T a^T``: other
  operand layouts, so other kernels; the step would need its output transposed, so an indicator only);
- ``cublaslt``: torch's matmul with ``preferred_blas_library("cublaslt")`` (cuBLASLt's own heuristic);
- ``triton BMxBNxBK/sS/wW``: a persistent Triton GEMM (TMA descriptors, grouped tile order) at a few tile
  shapes: larger tiles read each operand fewer times.

Each candidate's output is checked against cuBLAS's first (relative Frobenius error; bf16 outputs of
K-long float32 sums differ by rounding, ~1e-3). Prints a table and writes JSON lines (``--out``).

    python3 bench/gemm_cap.py --seconds 2 --out $OUT/gemm_cap.jsonl
"""
import argparse
import subprocess
import time

import torch

N_TOK = 8192
# (name, out features, in features) of the 8B shape's frozen projections (bench/train_step.py SHAPES)
PROJECTIONS = [("gate/up", 14336, 4096), ("down", 4096, 14336), ("q/o", 4096, 4096), ("k/v", 1024, 4096)]
# (BM, BN, BK, stages, warps): Hopper wgmma tiles that fit 228 KB of shared memory at these stage counts
TRITON_CONFIGS = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 128, 3, 8)]


def _triton_gemm():
    """A persistent GEMM C = A B (B given as (N, K) rows when ``B_NK``, else (K, N)): one program per SM
    walking output tiles in groups of GROUP_M row tiles (the B tiles stay in L2 across a group)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemm(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, B_NK: tl.constexpr, OUT: tl.constexpr):
        num_m, num_n, k_tiles = tl.cdiv(M, BM), tl.cdiv(N, BN), tl.cdiv(K, BK)
        in_group = GROUP_M * num_n
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            first_m = (tile // in_group) * GROUP_M
            rows = tl.minimum(num_m - first_m, GROUP_M)
            pid_m = first_m + tile % rows
            pid_n = (tile % in_group) // rows
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(k_tiles):
                a = a_desc.load([pid_m * BM, kk * BK])
                if B_NK:
                    b = b_desc.load([pid_n * BN, kk * BK]).T
                else:
                    b = b_desc.load([kk * BK, pid_n * BN])
                acc = tl.dot(a, b, acc)
            c_desc.store([pid_m * BM, pid_n * BN], acc.to(OUT))

    out_types = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    def prepare(a, b, b_nk, config):
        """A call computing a (M, K) @ (b.T if b_nk else b) -> (M, N) in their dtype, bf16 (or fp16: Triton's
        interpreter multiplies bf16 wrongly, so the CPU check runs fp16), its descriptors and output made once
        (a k/v GEMM takes ~0.1 ms: building them at each call would time the host); ``config`` (BM, BN, BK,
        stages, warps)."""
        from triton.tools.tensor_descriptor import TensorDescriptor

        bm, bn, bk, stages, warps = config
        m, k = a.shape
        n = b.shape[0] if b_nk else b.shape[1]
        assert b.shape[1 if b_nk else 0] == k and a.dtype == b.dtype and a.dtype in out_types
        assert a.is_contiguous() and b.is_contiguous()
        out = torch.empty(m, n, device=a.device, dtype=a.dtype)
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
        programs = min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn))
        descs = (TensorDescriptor.from_tensor(a, [bm, bk]),
                 TensorDescriptor.from_tensor(b, [bn, bk] if b_nk else [bk, bn]),
                 TensorDescriptor.from_tensor(out, [bm, bn]))

        def call():
            gemm[(programs,)](*descs, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=8, NUM_SMS=programs, B_NK=b_nk,
                              OUT=out_types[a.dtype], num_stages=stages, num_warps=warps)
            return out

        return call

    return prepare


class _Sampler:
    """nvidia-smi's SM clock and power every 50 ms while the block runs (None where it is not installed)."""

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            self.proc = None
        return self

    def __exit__(self, *exc):
        self.samples = []
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            self.samples = parse_samples(out)

    def steady(self):
        """The median SM MHz and watts over the later half of the samples (the cap has acted by then)."""
        late = self.samples[len(self.samples) // 2:]
        if not late:
            return None, None
        return (sorted(s[0] for s in late)[len(late) // 2], sorted(s[1] for s in late)[len(late) // 2])


def parse_samples(text):
    """(SM MHz, watts) per line of ``clocks.sm,power.draw`` in csv,noheader,nounits; others skipped."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            out.append((int(parts[0]), float(parts[1])))
        except (ValueError, IndexError):
            continue  # a line cut when the sampler was stopped
    return out


def sustained(fn, seconds):
    """Calls of ``fn`` back to back for ``seconds`` (after a 0.5 s warm-up): (calls, elapsed seconds)."""
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, end = 0, time.perf_counter() + seconds
    start.record()
    while time.perf_counter() < end:
        for _ in range(8):  # the host stays ahead of the GPU; the clock is read every 8 calls
            fn()
        calls += 8
    stop.record()
    stop.synchronize()
    return calls, start.elapsed_time(stop) / 1e3


def at_cap(fn, seconds) -> dict:
    """``sustained`` under the sampler: calls, seconds, ms a call, and the steady SM MHz and watts."""
    with _Sampler() as sampler:
        calls, secs = sustained(fn, seconds)
    mhz, watts = sampler.steady()
    return {"calls": calls, "seconds": secs, "ms": secs / calls * 1e3, "sm_mhz": mhz, "watts": watts}


def error_text(err: Exception) -> str:
    """An exception as one short line for a record (a tile that does not compile or fit: the sweep goes on)."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def candidates(x, w, dy, way):
    """(name, fn) of every candidate for one projection and direction: ``fwd`` x W^T, ``dgrad`` dy W."""
    a, b, b_nk = (x, w, True) if way == "fwd" else (dy, w, False)
    right = w.t() if b_nk else w
    out = [("cublas", lambda: torch.mm(a, right)),
           # the transposed product (y^T = B^T a^T, read back as a view): other operand layouts, other kernels
           ("cublas transposed", lambda: torch.mm(right.t(), a.t()).t())]

    def lt():
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return torch.mm(a, right)
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")

    out.append(("cublaslt", lt))
    prepare = _triton_gemm()
    for bm, bn, bk, stages, warps in TRITON_CONFIGS:
        out.append((f"triton {bm}x{bn}x{bk}/s{stages}/w{warps}", prepare(a, b, b_nk, (bm, bn, bk, stages, warps))))
    return out


def main():
    from micro import write_record  # bench/micro.py

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--only", default=",".join(name for name, _, _ in PROJECTIONS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name, n_out, k_in in PROJECTIONS:
        if name not in args.only.split(","):
            continue
        x = torch.randn(N_TOK, k_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16) / k_in ** 0.5
        dy = torch.randn(N_TOK, n_out, device="cuda", dtype=torch.bfloat16)
        flop = 2 * N_TOK * n_out * k_in
        for way in ("fwd", "dgrad"):
            ref = None
            for cand, fn in candidates(x, w, dy, way):
                rec = {"shape": f"8B {name} {way} ({n_out}x{k_in})", "candidate": cand,
                       "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
                try:
                    y = fn().float()
                    ref = y if ref is None else ref
                    rec["rel_err_vs_cublas"] = float((y - ref).norm() / ref.norm())
                    rec.update(at_cap(fn, args.seconds))
                    rec["tflops"] = flop * rec["calls"] / rec["seconds"] / 1e12
                    if rec["watts"]:
                        rec["tflop_per_kj"] = rec["tflops"] / rec["watts"] * 1e3
                except Exception as err:  # a tile that does not compile or fit: said, and the sweep goes on
                    rec["error"] = error_text(err)
                rows.append(rec)
                write_record("GEMMCAP", rec, args.out)
        del x, w, dy
        torch.cuda.empty_cache()
    print(f"\n{'shape':<34} {'candidate':<28} {'TFLOP/s':>8} {'MHz':>6} {'W':>6} {'rel err':>8}")
    for r in rows:
        print(f"{r['shape']:<34} {r['candidate']:<28} {r.get('tflops', float('nan')):8.1f} "
              f"{r.get('sm_mhz') or 0:6d} {r.get('watts') or 0:6.0f} {r.get('rel_err_vs_cublas', float('nan')):8.1e}"
              + (f"  {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
    main()
