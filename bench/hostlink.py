#!/usr/bin/env python3
"""The host link's speed as the ``offload`` memory mode uses it, in one ~20 s device run:

- pinned copies device->host and host->device (256 MB), each alone, both at once on two streams, and a
  device->host copy next to a compute-bound GEMM on the compute stream (does either slow the other?);
- NF4 dequantisation of a 14336 x 4096 weight, bitsandbytes vs tuneforge_kernels.nf4 (bit-equal?);
- the embedding row gather of an 8192-token step (128256 x 4096 bf16 table, Llama-3 8B) from device
  memory and from the pinned host table (gpu_worker.patching.memory.host_resident), through torch's
  F.embedding and through tuneforge_kernels.embedding, each checked equal to the device gather.

Prints one JSON line per measurement (median of ``--reps`` event-timed repetitions) and writes them to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # kernels/ holds tuneforge_kernels

import torch  # noqa: E402


def _time(fn, reps, stream=None):
    stream = stream or torch.cuda.current_stream()
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(stream)
        fn()
        e.record(stream)
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]


def copies(reps, mb=256):
    n = mb * 2 ** 20 // 2
    dev = torch.randn(n, device="cuda").to(torch.bfloat16)
    dev2 = torch.empty_like(dev)
    host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    host2 = torch.randn(n).to(torch.bfloat16).pin_memory()
    side = torch.cuda.Stream()
    out = []
    ms = _time(lambda: host.copy_(dev, non_blocking=True), reps)
    out.append({"what": "d2h", "mb": mb, "ms": ms, "gb_s": mb * 2 ** 20 / ms / 1e6})
    ms = _time(lambda: dev2.copy_(host2, non_blocking=True), reps)
    out.append({"what": "h2d", "mb": mb, "ms": ms, "gb_s": mb * 2 ** 20 / ms / 1e6})

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dev2.copy_(host2, non_blocking=True)
        host.copy_(dev, non_blocking=True)
        torch.cuda.current_stream().wait_stream(side)
    ms = _time(both, reps)
    out.append({"what": "d2h+h2d concurrent", "mb_each": mb, "ms": ms, "gb_s_each": mb * 2 ** 20 / ms / 1e6})

    a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(8192, 14336, device="cuda", dtype=torch.bfloat16)
    gemm = lambda: [torch.mm(a, b, out=c) for _ in range(8)]  # noqa: E731
    g_ms = _time(gemm, reps)

    def gemm_and_copy():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            host.copy_(dev, non_blocking=True)
            dev2.copy_(host2, non_blocking=True)
        gemm()
        torch.cuda.current_stream().wait_stream(side)
    gc_ms = _time(gemm_and_copy, reps)
    out.append({"what": "8 GEMMs 8192x4096x14336 alone vs with d2h+h2d on a side stream", "gemm_ms": g_ms,
                "gemm_plus_copies_ms": gc_ms, "tflops_alone": 8 * 2 * 8192 * 4096 * 14336 / g_ms / 1e9})
    return out


def gathers(reps):
    from gpu_worker.patching.memory import host_resident
    from tuneforge_kernels.embedding import embedding_rows

    w = torch.randn(128256, 4096, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, 128256, (4, 2048), device="cuda")
    ref = torch.nn.functional.embedding(ids, w)
    uva = host_resident(w)
    out = []
    cases = {"F.embedding device": lambda: torch.nn.functional.embedding(ids, w),
             "embedding_rows device": lambda: embedding_rows(ids, w),
             "F.embedding host table": lambda: torch.nn.functional.embedding(ids, uva),
             "embedding_rows host table": lambda: embedding_rows(ids, uva)}
    for name, fn in cases.items():
        same = bool(torch.equal(fn(), ref))
        ms = _time(fn, reps)
        out.append({"what": name, "ms": ms, "gb_s": ref.numel() * 2 / ms / 1e6, "equal": same})
    return out


def nf4(reps):
    """tuneforge_kernels.nf4 against bitsandbytes' dequantisation of one 14336 x 4096 weight (nested
    statistics): each checked bit-equal to bitsandbytes, then timed as 20 launches back to back per repetition (the
    device's time per launch, not the host's launch cost), the flat v9 kernel and the tiled v10 one at a
    few sizes per program."""
    import bitsandbytes as bnb
    from gpu_worker.patching.lora import _nf4_state
    from tuneforge_kernels.nf4 import _launch, pick_variant

    w = torch.randn(14336, 4096, device="cuda").to(torch.bfloat16)
    packed, qs = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    state = _nf4_state(qs)
    ref = bnb.functional.dequantize_4bit(packed, qs)
    gb = w.numel() * 2.5 / 1e9  # 0.5 byte read, 2 written per value
    variants = {"nf4 bitsandbytes": lambda out: bnb.functional.dequantize_4bit(packed, qs, out=out),
                "nf4 tuneforge_kernels.nf4 flat (v9)": lambda out: _launch(packed, state, out, tiled=False)}
    for values in (2048, 4096, 8192):
        for warps in (4, 8):
            variants[f"nf4 tuneforge_kernels.nf4 tiled values={values} warps={warps}"] = (
                lambda out, v=values, nw=warps: _launch(packed, state, out, tiled=True, values=v, warps=nw))
    rows = []
    for name, fn in variants.items():
        out = torch.full_like(ref, float("nan"))
        fn(out)
        same = bool(torch.equal(out, ref))
        ms = _time(lambda: [fn(out) for _ in range(20)], reps) / 20
        rows.append({"what": name, "ms": ms, "gb_s": gb / ms * 1e3, "equal": same})
    choice, outcomes = pick_variant(packed, state, ref)  # what a QLoRA model would pick for this weight
    rows.append({"what": "nf4 pick_variant", "chose": choice, "ms": outcomes})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", default="copies,gathers,nf4")
    a = ap.parse_args()
    rows = []
    for part in [{"copies": copies, "gathers": gathers, "nf4": nf4}[p] for p in a.parts.split(",")]:
        try:
            rows += part(a.reps)
        except Exception as e:  # noqa: BLE001  (one failing part must not lose the other's numbers)
            rows.append({"what": part.__name__, "error": f"{type(e).__name__}: {e}"[:500]})
    for r in rows:
        print("HOSTLINK " + json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
