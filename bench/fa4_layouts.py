#!/usr/bin/env python3
"""FlashAttention-4's variable-length kernels, forward and backward, on the operand layouts our patched
attention hands them, against a float32 reference (causal attention within each document, grouped-query):
which layouts give right gradients, and whether the order of calls in one process matters.

Why (bench/NOTES.md, sessions 21 and 22): over packed rows the GPU test's tiny Qwen3 got wrong value
gradients through FA4. Session 21 suspected its layouts (q and k new tensors out of its q/k norms, v a column
slice of the joined Q/K/V projection) or strides cached across FA4's compiles (its key holds none). Session 22's
run cleared both at head sizes 64 and 128; that Qwen3's head size, 16, is the case added since.

Layouts: ``slices`` (q/k/v column views of one (T, (Hq + 2 Hkv) D) tensor: the joined projection's output),
``mixed`` (q and k contiguous, v a slice), ``contiguous`` (all three: what the patched attention hands FA4, for
both models).
Each is run in the order given, in this one process, with new compiles only where FA4's key differs.

    python3 bench/fa4_layouts.py --order slices,mixed,contiguous --out $OUT/fa4-layouts.jsonl
"""
import argparse
import json
import os
import sys

import torch

sys.path[:0] = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")]
from tuneforge_kernels.varlen_attention import Packing, varlen_attention_reference  # noqa: E402

SHAPES = {"tiny": (4, 2, 64), "tiny-d16": (4, 2, 16), "8B": (32, 8, 128)}  # (query heads, key/value heads, head size)
# (head size 16: the GPU test's tiny Qwen3, whose packed case failed in sessions 21 and 22)
DOCS = (24, 40, 24, 40)  # two rows of 64 tokens, two documents each: the GPU test's packed batch


def operands(layout, hq, hkv, d, n, g):
    joined = torch.randn(n, (hq + 2 * hkv) * d, generator=g).cuda().bfloat16()
    q, k, v = (t.view(n, -1, d) for t in joined.split([hq * d, hkv * d, hkv * d], dim=1))
    if layout == "mixed":
        q, k = q.contiguous(), k.contiguous()
    elif layout == "contiguous":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    elif layout != "slices":
        raise SystemExit(f"--order: no layout {layout!r} (slices, mixed, contiguous)")
    return joined, q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--order", default="slices,mixed,contiguous")
    ap.add_argument("--out")
    args = ap.parse_args()
    from flash_attn.cute import flash_attn_varlen_func

    starts = [0]
    for doc in DOCS:
        starts.append(starts[-1] + doc)
    n = starts[-1]
    cu = torch.tensor(starts, dtype=torch.int32, device="cuda")
    packing = Packing(cu, tuple(starts), max(DOCS))
    for shape, (hq, hkv, d) in SHAPES.items():
        for layout in args.order.split(","):
            g = torch.Generator().manual_seed(0)
            joined, q, k, v = operands(layout, hq, hkv, d, n, g)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)] if layout != "slices" else None
            if leaves is None:  # the slices' gradients meet in the joined tensor, as in the model
                joined.requires_grad_()
                q, k, v = (t.view(n, -1, d) for t in joined.split([hq * d, hkv * d, hkv * d], dim=1))
            else:
                q, k, v = leaves
            grad_out = torch.randn(n, hq, d, generator=g).cuda().bfloat16()
            out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(DOCS),
                                         max_seqlen_k=max(DOCS), softmax_scale=d ** -0.5, causal=True)
            out = out[0] if isinstance(out, tuple) else out
            if leaves is None:
                (dj,) = torch.autograd.grad(out, (joined,), grad_out)
                got = (out, *dj.split([hq * d, hkv * d, hkv * d], dim=1))
            else:
                got = (out, *torch.autograd.grad(out, leaves, grad_out))
            r = [t.detach().float().requires_grad_() for t in (q, k, v)]
            want_out = varlen_attention_reference(*r, packing, d ** -0.5)  # float32, within each document
            want = (want_out, *torch.autograd.grad(want_out, r, grad_out.float()))
            errs = {name: ((a.float().reshape(b.shape) - b).abs().max() / b.abs().max()).item()
                    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
            rec = {"shape": shape, "layout": layout, "order": args.order,
                   "strides": [list(t.stride()) for t in (q, k, v)], **errs,
                   "ok": max(errs.values()) < 2e-2}
            print(json.dumps(rec), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
