#!/usr/bin/env python3
"""Micro-benchmarks behind the open questions of bench/NOTES.md, at the 8B (and for some groups 1B) training
shapes (8192 tokens), seconds of device time per group, one table at the end and JSON lines (``--out``):

- ``copy``: device-to-device copy bandwidth (bytes read + written), the ceiling for elementwise kernels;
- ``gemm``: why v4 (LoRA term first, base GEMM with beta=s) gave nothing: the gate projection
  (8192 x 4096 -> 14336, rank 16) as base only, base with beta != 0 onto a filled output, the rank-16
  read-modify-write pass (v3) and the rank-16 write (v4), and both orders end to end;
- ``ce``: fused linear cross-entropy forward+backward (hidden 4096 and 2048, vocab 128256) per chunk size
  in rows (the rule picks 256 at both): time and peak memory;
- ``ce_rows``: the cross-entropy rows kernel alone on one chunk's bf16 logits (1024 x 128256, the 1B step's
  chunk, and 256 rows), its tile width, warps and L2 eviction hints (``keep``: pass 1 asks L2 to keep each row
  for pass 2), in GB/s of the bytes it must move (the logits read once, the gradient written) against the copy
  ceiling, each variant's loss and gradient checked against the shipped launch's (session 36, H100: the
  shipped launch the fastest at 1024 rows, 0.65 of the copy's rate; results/2026-12-06-h100-v39-micro-ce-rows.txt);
- ``glu_plain``: lora_glu's kernels without rank-r terms, as the padded MLP calls them (gate and up the column
  halves of one ``[g | u | spare]`` product), at the 1B shape per tile (rows, columns, warps), in GB/s
  of the bytes they must move (session 37, H100: the backward 9% faster at 4 x 1024 x 4 than at the terms'
  16 x 256 x 4, 0.78 of the copy's rate; results/2026-12-06-h100-v40-micro-glu-plain.jsonl);
- ``padk``: the padded MLP's four big GEMMs and the padded q projection at the 8B shape, sustained at the
  power cap, as the layouts lay them out with ``lora_mlp.PAD_ALIGN`` 1 (K = H + 32, I + 16, 28704) and 64
  (K 4160, 14400, 28736; shipped since session 41), beside the unpadded GEMMs (K = H, I). Session 41 (H100):
  alone, align 64 wins back 1-2% a GEMM (results/2026-12-07-h100-v44-micro-padk.jsonl); in the 8B step -7 ms;
- ``elementwise``: our Triton rms_norm, SwiGLU (forward, in-place backward) and RoPE in GB/s against
  the copy ceiling;
- ``proj``: every frozen projection GEMM of a step at the 8B and 1B shapes (forward ``x W^T`` and input
  gradient ``dy W``) in TFLOP/s, and the concatenated q/k/v and gate/up weights against their parts;
- ``tuned``: the ``proj`` shapes again with torch's TunableOp on (cuBLAS against cuBLASLt's candidate
  algorithms, the fastest kept per shape), each shape tuned once before it is timed;
- ``glu``: v13's activation kernels with the rank-16 terms inside (lora_glu.py) against what they replaced
  (v12: the 1D SwiGLU kernels plus the addmm_ passes), forward and backward at the 8B and 1B MLP shapes,
  in GB/s of the bytes each must move, and both kernels per tile (session 37 added the 512- and 1024-wide
  ones, after ``glu_plain``'s backward preferred them);
- ``attn``: causal attention forward+backward at the 8B and 1B shapes (4 x 2048, GQA) through each SDPA
  backend (flash, cuDNN, memory-efficient) and torch's varlen kernel, in TFLOP/s; and FlashAttention-4's
  Hopper kernels (flash-attn-4, CuTe DSL; carried by bench/fa4_wheels.sh), batched and variable-length,
  with their largest difference from cuDNN's output and gradients (not yet run: session 20);
- ``varlen_pad``: a packed batch's variable-length attention with ``cu_seqlens`` padded by empty documents
  and ``max_len`` = the row width (shapes that do not depend on the documents, which a CUDA graph needs):
  the same values as the tight form?, its time, and whether it captures (run in session 10);
- ``dropout``: adapter dropout's passes (tuneforge_kernels/dropout.py) at the 8B shapes: the dropped input
  and the masked input-gradient terms with ``philox`` masks (computed in the kernel from a seed) against
  ``stream`` masks (a bool mask read; its ``bernoulli_`` draw timed apart) and torch's fused dropout, three
  terms in one pass against three GEMMs and torch's passes (the reference), three adapters' rank-r inputs and
  A gradients from one pass over x against drop + GEMM each,
  and lora_glu's backward with the down adapter's mask of each kind, in GB/s of the bf16 bytes moved;
  and a probe of the Philox work alone (1 or 3 masks a pass, 10 or 7 rounds, 32- or 16-bit uniforms)
  against the same pass without random bits (not yet run: session 17);
- ``residual``: the down projection with the decoder's residual as the GEMM's C (``torch.addmm``, what
  lora_mlp does) against the GEMM alone, the GEMM and a separate add, and the GEMM into an output that
  already holds the residual (``addmm_``): v21's 8B profile put the step's ``addmm`` at 1.61 ms a layer
  against 1.31 for the same shape's input-gradient ``mm``; each case timed in a burst and sustained for
  ``SUSTAIN_S`` seconds (the power cap acting), medians of the sustained run's second half (session 31:
  ``addmm`` is the fastest form with the residual, 2.5% over the bare GEMM);
- ``overlap``: one MLP backward at 8B with its off-chain rank-r products (the adapters' weight gradients)
  on one stream as today, or on a second stream beside the chain's next GEMM (session 32: in a burst the
  second stream hides most of them, sustained at the power cap none);
- ``aug``: the K-augmented LoRA GEMM (not built) against today's base GEMM + rank-r pass, per projection
  shape, forward and input gradient, and what it would save per step (not yet run: session 10).
- ``block``: the decoder layer's residual norm, gated activation's rstd and RoPE inside GEMM epilogues
  (QuACK's epilogue library, not built) against today's GEMM + kernel, with their values' differences (not yet
  run: session 48).

    python3 bench/micro.py --out $OUT/micro.jsonl
"""
import argparse
import contextlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # kernels/ holds tuneforge_kernels

import torch  # noqa: E402

N_TOK, HID, INTER, RANK, VOCAB = 8192, 4096, 14336, 16, 128256


def timed(fn, warmup=5, reps=20):
    """Median milliseconds of ``fn`` over ``reps`` runs, CUDA events around each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def write_record(tag, rec, path=None):
    """One result: printed as ``TAG {json}`` (what the device call's output keeps) and appended to ``path``."""
    print(f"{tag} {json.dumps(rec)}", flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def bench_copy(emit):
    a = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a))
    emit("copy", "d2d 2 GiB bf16", ms, gbps=2 * a.numel() * 2 / ms / 1e6)
    return 2 * a.numel() * 2 / ms / 1e6


def bench_gemm(emit):
    x = torch.randn(N_TOK, HID, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(INTER, HID, device="cuda", dtype=torch.bfloat16) / HID ** 0.5
    a = torch.randn(RANK, HID, device="cuda", dtype=torch.bfloat16) / HID ** 0.5
    b = torch.randn(INTER, RANK, device="cuda", dtype=torch.bfloat16) * 0.1
    xa = x @ a.t()
    y = torch.randn(N_TOK, INTER, device="cuda", dtype=torch.bfloat16)
    flop = 2 * N_TOK * HID * INTER
    cases = {
        "base x W^T (new output)": lambda: x @ w.t(),
        "base x W^T, beta=2 onto y": lambda: y.addmm_(x, w.t(), beta=2.0),
        "base x W^T, beta=1 onto y": lambda: y.addmm_(x, w.t()),
        "rank-16 y += xa B^T (v3 pass)": lambda: y.addmm_(xa, b.t(), alpha=2.0),
        "rank-16 xa B^T (v4 write)": lambda: xa @ b.t(),
        "v3 order end to end": lambda: (x @ w.t()).addmm_(x @ a.t(), b.t(), alpha=2.0),
        "v4 order end to end": lambda: ((x @ a.t()) @ b.t()).addmm_(x, w.t(), beta=2.0),
    }
    for name, fn in cases.items():
        ms = timed(fn)
        emit("gemm", name, ms, tflops=flop / ms / 1e9 if "rank-16" not in name else None)


def bench_ce(emit):
    import tuneforge_kernels.cross_entropy as ce

    rule = ce._chunk_rows
    try:
        for hid in (HID, 2048):  # the 8B and the 1B hidden size
            h = torch.randn(N_TOK, hid, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(VOCAB, hid, device="cuda", dtype=torch.bfloat16) / hid ** 0.5
            labels = torch.randint(0, VOCAB, (N_TOK,), device="cuda")
            default = rule(N_TOK, hid, VOCAB)

            def step():
                ce.fused_linear_cross_entropy(h, w, labels).backward()
                h.grad = None

            for rows in (256, 512, 1024, 2048):
                ce._chunk_rows = lambda *_, r=rows: r
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                ms = timed(step, warmup=2, reps=10)
                extra = (torch.cuda.max_memory_allocated() - before) / 1e9
                emit("ce", f"H={hid} chunk {rows} rows" + (" (rule)" if rows == default else ""), ms,
                     tflops=2 * 2 * N_TOK * hid * VOCAB / ms / 1e9, peak_extra_gb=extra)
            del h, w
            torch.cuda.empty_cache()
    finally:
        ce._chunk_rows = rule


def bench_ce_rows(emit, ceiling):
    import tuneforge_kernels.cross_entropy as ce

    variants = [dict(), dict(keep=True)] + [dict(block=b, num_warps=w, keep=k) for b, w in
                                            ((16384, 16), (8192, 8), (8192, 16), (4096, 8)) for k in (False, True)]
    for rows in (1024, 256):
        pristine = torch.randn(rows, VOCAB, device="cuda", dtype=torch.bfloat16) * 3
        labels = torch.randint(0, VOCAB, (rows,), device="cuda")
        labels[::7] = -100
        loss = torch.empty(rows, device="cuda", dtype=torch.float32)
        want = pristine.clone()
        ce._rows_kernel_launch(want, labels, loss, -100, 0.0, 0.0, True)
        want_loss = loss.clone()
        for kw in variants:
            got = pristine.clone()
            ce._rows_kernel_launch(got, labels, loss, -100, 0.0, 0.0, True, **kw)
            diff = max((got.float() - want.float()).abs().max().item(), (loss - want_loss).abs().max().item())
            work = pristine.clone()  # timed in place: the values drift (gradients of gradients), the work does not
            ms = timed(lambda: ce._rows_kernel_launch(work, labels, loss, -100, 0.0, 0.0, True, **kw))
            name = f"{rows} rows " + (",".join(f"{k}={v}" for k, v in kw.items()) or "shipped")
            emit("ce_rows", name, ms, gbps=2 * pristine.numel() * 2 / ms / 1e6, ceiling=ceiling, max_diff=diff)
        del pristine, want, got, work
        torch.cuda.empty_cache()


def bench_elementwise(emit, ceiling):
    from tuneforge_kernels.rms_norm import rms_norm
    from tuneforge_kernels.rope import rope
    from tuneforge_kernels.swiglu import swiglu_backward_inplace, swiglu_forward

    x = torch.randn(N_TOK, HID, device="cuda", dtype=torch.bfloat16)
    wn = torch.randn(HID, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: rms_norm(x, wn, 1e-5, impl="triton"))
    emit("elementwise", "rms_norm fwd 8192x4096", ms, gbps=2 * x.numel() * 2 / ms / 1e6, ceiling=ceiling)
    g, u, dh = (torch.randn(N_TOK, INTER, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ms = timed(lambda: swiglu_forward(g, u))
    emit("elementwise", "swiglu fwd 8192x14336", ms, gbps=3 * g.numel() * 2 / ms / 1e6, ceiling=ceiling)
    ms = timed(lambda: swiglu_backward_inplace(dh, g, u))  # values drift in place; timing is unaffected
    emit("elementwise", "swiglu bwd in place", ms, gbps=6 * g.numel() * 2 / ms / 1e6, ceiling=ceiling)
    q = torch.randn(4, 2048, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(4, 2048, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    pos = torch.arange(2048, device="cuda")[None].float()
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    ms = timed(lambda: rope(q, k, cos, sin, impl="triton"))  # q, k are views: out of place
    emit("elementwise", "rope fwd q 4x32x2048x128 + k", ms, gbps=2 * (q.numel() + k.numel()) * 2 / ms / 1e6,
         ceiling=ceiling)


# (hidden, q width, kv width, intermediate) of the two benchmark shapes; bench/train_step.py SHAPES
PROJ_SHAPES = {"8B": (4096, 4096, 1024, 14336), "1B": (2048, 2048, 512, 8192)}


def bench_proj(emit):
    for shape, (hid, nq, nkv, inter) in PROJ_SHAPES.items():
        weights = {"q/o": (nq, hid), "k/v": (nkv, hid), "gate/up": (inter, hid), "down": (hid, inter),
                   "qkv cat": (nq + 2 * nkv, hid), "gate+up cat": (2 * inter, hid)}
        for name, (n, k) in weights.items():
            x = torch.randn(N_TOK, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            dy = torch.randn(N_TOK, n, device="cuda", dtype=torch.bfloat16)
            flop = 2 * N_TOK * n * k
            for way, fn in (("fwd x W^T", lambda: x @ w.t()), ("dgrad dy W", lambda: dy @ w)):
                ms = timed(fn)
                emit("proj", f"{shape} {name} {way} ({n}x{k})", ms, tflops=flop / ms / 1e9)
            del x, w, dy


def bench_tuned(emit):
    import torch.cuda.tunable as tunable

    tunable.enable(True)
    tunable.tuning_enable(True)
    try:
        bench_proj(lambda group, name, ms, **kw: emit("tuned", name, ms, **kw))
    finally:
        tunable.enable(False)


SUSTAIN_S = 2.0


def sustained(fn, seconds=SUSTAIN_S):
    """Median milliseconds of ``fn`` over the second half of ``seconds`` of back-to-back calls (CUDA events
    around each): the rate once the power cap has acted."""
    events, start = [], time.monotonic()
    while time.monotonic() - start < seconds:
        for _ in range(50):  # the host waits every 50 calls, so that the queue stays short
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        events[-1][1].synchronize()
    ts = sorted(s.elapsed_time(e) for s, e in events[len(events) // 2:])
    return ts[len(ts) // 2]


def bench_residual(emit):
    for shape, (hid, _, _, inter) in PROJ_SHAPES.items():
        h = torch.randn(N_TOK, inter, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(hid, inter, device="cuda", dtype=torch.bfloat16) / inter ** 0.5
        res = torch.randn(N_TOK, hid, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(res)
        flop = 2 * N_TOK * hid * inter
        cases = {
            "mm (no residual)": lambda: h @ w.t(),
            "addmm(res, h, W^T) (today)": lambda: torch.addmm(res, h, w.t()),
            "mm then add_(res)": lambda: (h @ w.t()).add_(res),
            "out.copy_(res).addmm_": lambda: out.copy_(res).addmm_(h, w.t()),
            "addmm(res, out=)": lambda: torch.addmm(res, h, w.t(), out=out),
        }
        ref = cases["mm then add_(res)"]().float()
        for name, fn in cases.items():
            err = ((fn().float() - ref).norm() / ref.norm()).item() if "no residual" not in name else 0.0
            for how, timer in (("burst", timed), ("sustained", sustained)):
                ms = timer(fn)
                emit("residual", f"{shape} down {name} {how}", ms, tflops=flop / ms / 1e9,
                     note=f"rel diff {err:.1e}")
        del h, w, res, out


def bench_padk(emit):
    import tuneforge_kernels.lora_mlp as mlp
    from tuneforge_kernels.lora_linear import pad_linear_weights

    n, hid, inter, r = N_TOK, HID, INTER, RANK
    bf = dict(device="cuda", dtype=torch.bfloat16)
    gate, up = (torch.randn(inter, hid, **bf) / hid ** 0.5 for _ in range(2))
    down = torch.randn(hid, inter, **bf) / inter ** 0.5
    qkv = [torch.randn(o, hid, **bf) / hid ** 0.5 for o in (hid, 1024, 1024)]
    res = torch.randn(n, hid, **bf)
    cases = {"unpadded": {
        "gate fwd": (lambda x=torch.randn(n, hid, **bf), gu=torch.empty(n, 2 * inter, **bf):
                     torch.mm(x, gate.t(), out=gu[:, :inter]), hid * inter),
        "down fwd + residual": (lambda h=torch.randn(n, inter, **bf): torch.addmm(res, h, down.t()), hid * inter),
        "q fwd": (lambda x=torch.randn(n, hid, **bf): x @ qkv[0].t(), hid * hid),
        "dh = dy W_d": (lambda dy=torch.randn(n, hid, **bf): dy @ down, hid * inter),
        "dx over gate, up": (lambda g=torch.randn(n, 2 * inter, **bf), w=torch.cat([gate, up]): g @ w,
                             2 * inter * hid)}}
    saved = mlp.PAD_ALIGN
    try:
        for align in (1, 64):
            mlp.PAD_ALIGN = align
            gu_w, d_w = mlp.pad_weights(gate, up, down, (r, r, r))
            buf = pad_linear_weights(qkv, [r] * 3)
            sp, sp_d, sp_q = gu_w.shape[1] - hid, d_w.shape[1] - inter, buf.shape[1] - hid
            xa, ha = torch.randn(n, hid + sp, **bf), torch.randn(n, inter + sp_d, **bf)
            gu, dya = torch.randn(n, 2 * inter + sp, **bf), torch.randn(n, hid + sp_d, **bf)
            xq = torch.randn(n, hid + sp_q, **bf)
            cases[f"padded, align {align}"] = {
                "gate fwd": (lambda xa=xa, gu=gu, w=gu_w: torch.mm(xa, w[:inter].t(), out=gu[:, :inter]),
                             hid * inter),
                "down fwd + residual": (lambda ha=ha, w=d_w: torch.addmm(res, ha, w[:hid].t()), hid * inter),
                "q fwd": (lambda xq=xq, w=buf: xq @ w[:hid].t(), hid * hid),
                "dh = dy W_d": (lambda dya=dya, w=d_w: dya @ w[:, :inter], hid * inter),
                "dx over gate, up": (lambda gu=gu, w=gu_w: gu @ w[:, :hid], 2 * inter * hid)}
    finally:
        mlp.PAD_ALIGN = saved
    for layout, gemms in cases.items():
        for name, (fn, mac) in gemms.items():  # mac: the unpadded GEMM's multiply-adds per token
            ms = sustained(fn)
            emit("padk", f"8B {name}, {layout}", ms, tflops=2 * n * mac / ms / 1e9)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise difference over the reference's largest magnitude."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_block(emit):
    """The decoder layer's norms and RoPE inside its GEMMs' epilogues (QuACK 0.6.5's epilogue library, "Coda":
    not built; session 48), at the 8B shapes with the padded layouts' K (H + 64), each now against the
    epilogue form, sustained at the power cap, with the epilogue form's difference from today's values:

    - O's GEMM then the residual norm (``rms_norm._fwd_launch``: ``s = o + x``, ``y = norm(s) w``), against
      ``rms_partial_epi``: one GEMM whose epilogue adds the residual (C), writes ``s`` and ``s w`` (the norm's
      rstd deferred to the next GEMM, a row scale) and the per-row sums of squares, then rstd from them;
    - the gated gate/up GEMM (``gated_gemm.gated_forward``, on the normed input) against
      ``rstd_swiglu_preact_epi`` on the deferred input (``s w``): rstd applied as a column vector before the
      activation, the unscaled pre-activation saved for the backward (``dgated_rstd_preact_mod``);
    - the gated backward GEMM (``gated_gemm.gated_backward`` on the scaled pre-activation) against
      ``dswiglu_rstd_preact_mod`` on the unscaled one: rstd folded in, and the per-row sum the deferred norm's
      backward needs for rstd's gradient from the same epilogue;
    - the Q/K/V GEMM then RoPE on Q and K (``rope._launch``, HF's rotate-half pairs (j, j + 64)) against
      ``rope_posfreq_epi`` on the joined GEMM (cos and sin from per-row positions, so packed rows work; V's
      columns at zero frequency, an identity): the epilogue rotates adjacent pairs, so Q's and K's weight rows
      are permuted per head to (0, 64, 1, 65, ...), which leaves q . k unchanged.
    Together the replaced kernels were 4.16 (norm forward) + 1.87 (RoPE forward) ms of the 8B step (v51)."""
    from tuneforge_kernels import gated_gemm
    from tuneforge_kernels.rms_norm import _fwd_launch
    from tuneforge_kernels.rope import _launch as rope_launch

    found = gated_gemm._quack()
    if isinstance(found, Exception):
        print(f"block: no QuACK ({found})")
        return
    config = found[2]
    from quack.epilogue.library import dswiglu_rstd_preact_mod, rms_partial_epi, rstd_swiglu_preact_epi
    from quack.epilogue.rotary import make_interleaved_inv_freq, rope_posfreq_epi

    n, hid, inter, kp, eps = N_TOK, HID, INTER, HID + 64, 1e-5
    bf = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)

    def case(name, fn, flop=None, note=None):
        try:
            ms = sustained(fn)
        except Exception as e:  # noqa: BLE001 - the answer is the error
            print(f"block {name}: {type(e).__name__}: {str(e)[:400]}")
            return
        emit("block", f"8B {name}", ms, tflops=flop / ms / 1e9 if flop else None, note=note)

    # O's GEMM and the residual norm
    xo, wo = torch.randn(n, kp, **bf), torch.randn(hid, kp, **bf) / kp ** 0.5
    x, w = torch.randn(n, hid, **bf), 1 + 0.1 * torch.randn(hid, **bf)
    o = torch.empty(n, hid, **bf)

    def norm_now():
        torch.mm(xo, wo.t(), out=o)
        return _fwd_launch(o, x, w, eps, 0.0)

    d, r = torch.empty(n, hid, **bf), torch.empty(n, hid, **bf)

    def norm_epi():
        out = rms_partial_epi(xo, wo.t(), x, out={"D": d, "resid_out": r}, weight=w, tuned=False)
        return out, torch.rsqrt(out["sqsum"] / hid + eps)

    y, s_now, rstd_now = norm_now()
    note = None
    try:
        out, rstd = norm_epi()
        note = (f"normed rel diff {_rel_diff(out['D'].float() * rstd[:, None], y):.2e}, residual "
                f"{_rel_diff(out['resid_out'], s_now):.2e}, rstd {_rel_diff(rstd, rstd_now):.2e}")
    except Exception as e:  # noqa: BLE001
        print(f"block rms_partial_epi: {type(e).__name__}: {str(e)[:400]}")
    case("O GEMM + residual norm, now", norm_now, 2 * n * kp * hid)
    case("O GEMM + residual norm, rms_partial_epi", norm_epi, 2 * n * kp * hid, note)

    # gate/up: the gated GEMM on the normed input, against rstd applied in the epilogue to the deferred input
    gu_w = torch.randn(2 * inter, kp, **bf) / kp ** 0.5
    xa = torch.cat([y, torch.randn(n, kp - hid, **bf)], 1)
    gu, h = torch.empty(n, 2 * inter, **bf), torch.empty(n, inter, **bf)
    xd = (xa.float() / rstd_now[:, None]).to(torch.bfloat16)  # ~ [s w | the products before rstd]
    gu2, h2 = torch.empty(n, 2 * inter, **bf), torch.empty(n, inter, **bf)

    def gated():
        gated_gemm.gated_forward(xa, gu_w, gu, h)

    def deferred():
        rstd_swiglu_preact_epi(xd, gu_w.t(), out={"D": gu2, "postact": h2}, rstd=rstd_now, config=config,
                               tuned=False)

    note = None
    try:
        gated()
        deferred()
        acc = xd.float() @ gu_w.float().t()
        g, u = (acc[:, k::2] * rstd_now[:, None] for k in (0, 1))
        note = (f"postact rel diff {_rel_diff(h2, torch.nn.functional.silu(g) * u):.2e} (today's "
                f"{_rel_diff(h, torch.nn.functional.silu(g) * u):.2e}), preact {_rel_diff(gu2, acc):.2e}")
        del acc, g, u
    except Exception as e:  # noqa: BLE001
        print(f"block rstd_swiglu_preact_epi: {type(e).__name__}: {str(e)[:400]}")
    case("gate/up gated GEMM, now", gated, 2 * n * kp * 2 * inter)
    case("gate/up gated GEMM, rstd in the epilogue", deferred, 2 * n * kp * 2 * inter, note)

    # the gated backward: today's on the scaled pre-activation, against rstd folded in (and the rstd gradient's
    # per-row sum, which the deferred norm's backward needs, from the same epilogue)
    dya, w_d = torch.randn(n, kp, **bf), torch.randn(kp, inter, **bf) / kp ** 0.5
    pre_u = torch.randn(n, 2 * inter, **bf)
    pre_s = (pre_u.float() * rstd_now[:, None]).to(torch.bfloat16)
    dgu, dgu2 = torch.empty_like(pre_u), torch.empty_like(pre_u)

    def dgated():
        gated_gemm.gated_backward(dya, w_d, pre_s, dgu, h)

    def dgated_deferred():
        return dswiglu_rstd_preact_mod(dya, w_d, pre_u, out={"D": dgu2, "postact": h2}, rstd=rstd_now,
                                       config=config, tuned=False)

    note = None
    try:
        dgated()
        got = dgated_deferred()
        dh = dya.float() @ w_d.float()
        gs, us = (pre_u[:, k::2].float() * rstd_now[:, None] for k in (0, 1))
        sig = torch.sigmoid(gs)
        ref = torch.empty(n, 2 * inter, device="cuda")
        ref[:, 0::2], ref[:, 1::2] = dh * us * sig * (1 + gs * (1 - sig)), dh * gs * sig
        dsum = (ref[:, 0::2] * pre_u[:, 0::2].float() + ref[:, 1::2] * pre_u[:, 1::2].float()).sum(1)
        note = (f"D rel diff {_rel_diff(dgu2, ref * rstd_now[:, None]):.2e} (today's {_rel_diff(dgu, ref):.2e}), "
                f"dsum {_rel_diff(got['dsum'], dsum):.2e}")
        del dh, gs, us, sig, ref
    except Exception as e:  # noqa: BLE001
        print(f"block dswiglu_rstd_preact_mod: {type(e).__name__}: {str(e)[:400]}")
    case("dgated GEMM, now", dgated, 2 * n * kp * inter)
    case("dgated GEMM, rstd folded in", dgated_deferred, 2 * n * kp * inter, note)

    # Q/K/V and RoPE
    nq, nkv, hd, batch = 32, 8, 128, 4
    seq = n // batch
    qk, width = (nq + nkv) * hd, (nq + 2 * nkv) * hd
    wqkv, xq = torch.randn(width, kp, **bf) / kp ** 0.5, torch.randn(n, kp, **bf)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([ang, ang], -1)
    cos, sin = (f(emb).to(**bf)[None] for f in (torch.cos, torch.sin))  # HF's: cast to the model's dtype
    qkv = torch.empty(n, width, **bf)

    def rope_now():
        torch.mm(xq, wqkv.t(), out=qkv)
        q = qkv[:, :nq * hd].view(batch, seq, nq, hd).transpose(1, 2)
        k = qkv[:, nq * hd:qk].view(batch, seq, nkv, hd).transpose(1, 2)
        rope_launch(q, k, cos, sin, False, q, k)

    head = torch.stack([torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2], 1).reshape(-1)  # 0, 64, 1, 65..
    perm = torch.cat([(head + h0 * hd) for h0 in range(nq + nkv)] + [torch.arange(qk, width)]).cuda()
    wqkv_p = wqkv[perm].contiguous()
    pos = torch.arange(seq, dtype=torch.float32, device="cuda").repeat(batch)
    freq = make_interleaved_inv_freq(inv_freq, qk, width - qk).to(device="cuda", dtype=torch.float32)
    qkv2 = torch.empty(n, width, **bf)

    def rope_epi():
        rope_posfreq_epi(xq, wqkv_p.t(), out={"D": qkv2}, pos=pos, freq=freq, tuned=False)

    note = None
    try:
        rope_now()
        rope_epi()
        back = torch.empty_like(qkv2)
        back[:, perm] = qkv2
        note = f"rel diff {_rel_diff(back, qkv):.2e} (V {_rel_diff(back[:, qk:], qkv[:, qk:]):.2e})"
    except Exception as e:  # noqa: BLE001
        print(f"block rope_posfreq_epi: {type(e).__name__}: {str(e)[:400]}")
    case("Q/K/V GEMM + RoPE, now", rope_now, 2 * n * kp * width)
    case("Q/K/V GEMM + RoPE, rope_posfreq_epi", rope_epi, 2 * n * kp * width, note)


def bench_overlap(emit):
    """The MLP backward's off-chain products on a side stream (not built: session 32). In backward the next
    layer waits only on ``dx``; the adapters' weight gradients (``dB = s dg^T (x A^T)`` for gate and up,
    ``dA_d = s (dy B_d)^T h``, the gate's and up's dA) are needed only by the optimizer. At 8B they are
    memory-bound GEMMs of ~0.3 ms a layer, run today between the chain's GEMMs on one stream. Cases, each
    one MLP backward's worth, sustained at the power cap: the chain alone (``dh = dy W_d``, then ``dx = dg
    W_g + du W_u``), the side products alone, both on one stream (today's order: side between the chain's
    GEMMs), and the side products on a second stream launched beside the second GEMM (low or high priority)."""
    n, hid, inter, r = N_TOK, HID, INTER, RANK
    bf = dict(device="cuda", dtype=torch.bfloat16)
    dy, x = torch.randn(n, hid, **bf), torch.randn(n, hid, **bf)
    w_d = torch.randn(hid, inter, **bf) / inter ** 0.5
    w_g, w_u = (torch.randn(inter, hid, **bf) / hid ** 0.5 for _ in range(2))
    dg, du, h = (torch.randn(n, inter, **bf) for _ in range(3))
    xa_g, xa_u, dy_b = (torch.randn(n, r, **bf) for _ in range(3))
    dgu_b = torch.randn(n, 2 * r, **bf)
    dh, dx = torch.empty(n, inter, **bf), torch.empty(n, hid, **bf)
    flop = 2 * n * hid * inter * 3

    def first():
        torch.mm(dy, w_d, out=dh)

    def second():
        torch.mm(dg, w_g, out=dx).addmm_(du, w_u)

    def side():
        return dg.t() @ xa_g, du.t() @ xa_u, dy_b.t() @ h, dgu_b.t() @ x

    def overlapped(stream):
        def fn():
            cur = torch.cuda.current_stream()
            first()
            stream.wait_stream(cur)
            with torch.cuda.stream(stream):
                side()
            second()
            cur.wait_stream(stream)
        return fn

    low, high = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)
    cases = {
        "chain (3 GEMMs)": lambda: (first(), second()),
        "side products": side,
        "one stream (today)": lambda: (first(), side(), second()),
        "side stream, same priority": overlapped(low),
        "side stream, high priority": overlapped(high),
    }
    for name, fn in cases.items():
        for how, timer in (("burst", timed), ("sustained", sustained)):
            ms = timer(fn)
            tflops = flop / ms / 1e9 if name != "side products" else None
            emit("overlap", f"8B MLP bwd {name} {how}", ms, tflops=tflops)
    torch.cuda.synchronize()


def bench_aug(emit):
    """The K-augmented LoRA GEMM (NOTES "Open items", not built): each frozen weight stored in one (out + r) x
    (in + r) buffer holding W, s B in its r spare columns and A in its r spare rows, so that the forward
    ``[x | x A^T] [W | s B]^T`` and the input gradient ``[dy | dy B] [W ; A]`` are one GEMM each, against
    today's base GEMM plus a rank-r read-modify-write pass (``addmm_``) over the output. The inputs with r
    spare columns are what the norm / activation kernels would write; the rank-r products that fill them
    (x A^T, dy B) are the same in both and not timed. Per projection shape, and the sum over a layer's
    seven projections times the layer count: what the change would save per step."""
    layers = {"8B": 32, "1B": 16}
    for shape, (hid, nq, nkv, inter) in PROJ_SHAPES.items():
        saved = 0.0
        for name, (n, k), per_layer in (("q/o", (nq, hid), 2), ("k/v", (nkv, hid), 2),
                                        ("gate/up", (inter, hid), 2), ("down", (hid, inter), 1)):
            r = RANK
            buf = torch.randn(n + r, k + r, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            w, sb, a = buf[:n, :k].contiguous(), buf[:n, k:].contiguous(), buf[n:, :k].contiguous()
            x_aug = torch.randn(N_TOK, k + r, device="cuda", dtype=torch.bfloat16)
            dy_aug = torch.randn(N_TOK, n + r, device="cuda", dtype=torch.bfloat16)
            x, xa = x_aug[:, :k].contiguous(), x_aug[:, k:].contiguous()
            dy, dyb = dy_aug[:, :n].contiguous(), dy_aug[:, n:].contiguous()
            cases = {
                "fwd now": lambda: (x @ w.t()).addmm_(xa, sb.t()),
                "fwd augmented": lambda: x_aug @ buf[:n].t(),
                "dgrad now": lambda: (dy @ w).addmm_(dyb, a),
                "dgrad augmented": lambda: dy_aug @ buf[:, :k],
            }
            ms = {}
            for case, fn in cases.items():
                ms[case] = timed(fn)
                emit("aug", f"{shape} {name} {case} ({n}x{k}, r {r})", ms[case],
                     tflops=2 * N_TOK * n * k / ms[case] / 1e9)
            err = max(((cases[f"{way} augmented"]().float() - cases[f"{way} now"]().float()).norm()
                       / cases[f"{way} now"]().float().norm()).item() for way in ("fwd", "dgrad"))
            delta = ms["fwd now"] - ms["fwd augmented"] + ms["dgrad now"] - ms["dgrad augmented"]
            saved += per_layer * delta
            emit("aug", f"{shape} {name} saved per projection", delta, note=f"rel diff {err:.2e}")
            del buf, w, sb, a, x_aug, dy_aug, x, xa, dy, dyb
        emit("aug", f"{shape} saved per step ({layers[shape]} layers)", saved * layers[shape])


# (rows, columns, warps) of lora_glu's kernels with terms tried against its FWD_TILE / BWD_TILE. Session 11
# also timed row blocks per program (the B tiles loaded once for several) and dots accumulating onto the
# loaded tile: within 2% of this tile (results/2026-12-04-h200-v18-micro-glu-aug.txt), not kept
GLU_TILES = ((32, 128, 4), (32, 128, 8), (64, 64, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (128, 64, 8),
             (16, 512, 4), (16, 512, 8), (16, 1024, 8), (32, 512, 8))  # the terms' tl.dot: 16 rows or more


@contextlib.contextmanager
def _glu_tiles(tile, *names):
    """lora_glu's tiles ``names`` set to ``tile`` inside the block, the shipped ones back after it."""
    import tuneforge_kernels.lora_glu as glu

    chosen = {name: getattr(glu, name) for name in names}
    try:
        for name in names:
            setattr(glu, name, tile)
        yield
    finally:
        for name, value in chosen.items():
            setattr(glu, name, value)


def bench_glu(emit, ceiling):
    import tuneforge_kernels.lora_glu as glu
    from tuneforge_kernels.lora_glu import lora_glu_backward_inplace, lora_glu_forward
    from tuneforge_kernels.swiglu import swiglu_backward_inplace, swiglu_forward

    for shape, (_, _, _, inter) in PROJ_SHAPES.items():
        def rand(*size):
            return torch.randn(*size, device="cuda", dtype=torch.bfloat16)

        g, u, dh = rand(N_TOK, inter), rand(N_TOK, inter), rand(N_TOK, inter)
        xa_g, xa_u, dy_b = rand(N_TOK, RANK), rand(N_TOK, RANK), rand(N_TOK, RANK)
        b_g, b_u, a_d = rand(inter, RANK) * 0.1, rand(inter, RANK) * 0.1, rand(RANK, inter) * 0.1
        terms = {"xa_g": xa_g, "b_g": b_g, "s_g": 2.0, "xa_u": xa_u, "b_u": b_u, "s_u": 2.0}
        big = g.numel() * 2  # bytes of one (tokens x intermediate) bf16 tensor
        cases = {  # name: (fn, bytes the fused kernel must move)
            "fwd (terms inside)": (lambda: lora_glu_forward(g, u, "silu", **terms), 3 * big),
            "fwd without terms": (lambda: lora_glu_forward(g, u, "silu"), 3 * big),
            "v12 fwd (2 addmm_ + swiglu)": (lambda: (g.addmm_(xa_g, b_g.t()), u.addmm_(xa_u, b_u.t()),
                                                      swiglu_forward(g, u)), 3 * big),
            # backward values drift in place; the timing does not depend on them
            "bwd (terms inside)": (lambda: lora_glu_backward_inplace(dh, g, u, "silu", **terms, dy_b=dy_b,
                                                                    a_d=a_d, s_d=2.0), 6 * big),
            "bwd without terms": (lambda: lora_glu_backward_inplace(dh, g, u, "silu"), 6 * big),
            "v12 bwd (addmm_ + swiglu)": (lambda: (dh.addmm_(dy_b, a_d), swiglu_backward_inplace(dh, g, u)),
                                          6 * big),
        }
        for name, (fn, nbytes) in cases.items():
            ms = timed(fn)
            emit("glu", f"{shape} {name} {N_TOK}x{inter}", ms, gbps=nbytes / ms / 1e6, ceiling=ceiling)
        for tile in GLU_TILES:
            with _glu_tiles(tile, "FWD_TILE", "BWD_TILE"):
                for name, (fn, nbytes) in cases.items():
                    if name.endswith("(terms inside)"):
                        ms = timed(fn)
                        emit("glu", f"{shape} {name[:3]} tile {tile}", ms, gbps=nbytes / ms / 1e6, ceiling=ceiling)
        del g, u, dh
        torch.cuda.empty_cache()


PLAIN_TILES = ((16, 256, 4), (16, 128, 4), (8, 256, 4), (8, 512, 4), (16, 256, 8), (16, 512, 8), (32, 128, 4),
               (32, 256, 8), (64, 64, 4), (4, 1024, 4))


def bench_glu_plain(emit, ceiling):
    import tuneforge_kernels.lora_glu as glu

    for shape in ("1B",):  # the padded MLP's shapes (hidden <= 2048)
        inter = PROJ_SHAPES[shape][3]
        gu = torch.randn(N_TOK, 2 * inter + RANK, device="cuda", dtype=torch.bfloat16)
        g, u = gu[:, :inter], gu[:, inter:2 * inter]
        ha = torch.randn(N_TOK, inter + RANK, device="cuda", dtype=torch.bfloat16)
        h = ha[:, :inter]
        big = N_TOK * inter * 2
        for tile in PLAIN_TILES:
            with _glu_tiles(tile, "PLAIN_FWD_TILE", "PLAIN_BWD_TILE"):
                ms = timed(lambda: glu.lora_glu_forward(g, u, "silu", out=h))
                emit("glu_plain", f"{shape} fwd tile {tile}", ms, gbps=3 * big / ms / 1e6, ceiling=ceiling)
                # values drift in place; the timing does not depend on them
                ms = timed(lambda: glu.lora_glu_backward_inplace(h, g, u, "silu"))
                emit("glu_plain", f"{shape} bwd tile {tile}", ms, gbps=6 * big / ms / 1e6, ceiling=ceiling)
        del gu, g, u, ha, h
        torch.cuda.empty_cache()


def _philox_probe_kernel():
    """A bench-only Triton kernel for the open question of bench/NOTES.md session 17 (is adapter dropout's
    Philox work hidden under the bytes?): y = x * scale where each of MASKS masks keeps, MASKS masks a
    pass (the fused kernels compute up to three), Philox4x32 with ROUNDS rounds, PER_CALL columns a call
    (4: 32-bit uniforms, as dropout.py; 8: 16-bit ones, p rounded to 1/65536); MASKS 0: no random bits."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X, Y, n_cols, key, threshold16, p, MASKS: tl.constexpr, ROUNDS: tl.constexpr,
              PER_CALL: tl.constexpr, BN: tl.constexpr):
        row = tl.program_id(0)
        col0 = tl.program_id(1) * BN
        cols = col0 + tl.arange(0, BN)
        x = tl.load(X + row.to(tl.int64) * n_cols + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        keep = cols >= 0
        for m in tl.static_range(MASKS):
            groups = (col0 // PER_CALL + tl.arange(0, BN // PER_CALL)).to(tl.uint32)
            c1 = tl.zeros((BN // PER_CALL,), dtype=tl.uint32) + row.to(tl.uint32)
            zero = tl.zeros((BN // PER_CALL,), dtype=tl.uint32)
            r0, r1, r2, r3 = tl.philox(key + m, groups, c1, zero, zero, ROUNDS)
            if PER_CALL == 4:
                u = tl.uint_to_uniform_float(tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3)))
                keep = keep & (u >= p)
            else:
                lo = tl.interleave(tl.interleave(r0 & 0xFFFF, r2 & 0xFFFF), tl.interleave(r1 & 0xFFFF, r3 & 0xFFFF))
                hi = tl.interleave(tl.interleave(r0 >> 16, r2 >> 16), tl.interleave(r1 >> 16, r3 >> 16))
                keep = keep & (tl.interleave(lo, hi) >= threshold16)
        tl.store(Y + row.to(tl.int64) * n_cols + cols, tl.where(keep, x * 1.05, 0.0).to(Y.dtype.element_ty),
                 mask=cols < n_cols)

    return probe


def _one_pass_products(x, terms):
    """``dropped_input_products`` through its one-pass kernel whatever the number of adapters."""
    from tuneforge_kernels import dropout

    saved, dropout._PRODUCTS_SPLIT_ON_CUDA = dropout._PRODUCTS_SPLIT_ON_CUDA, len(terms) + 1
    try:
        return dropout.dropped_input_products(x, terms, impl="triton")
    finally:
        dropout._PRODUCTS_SPLIT_ON_CUDA = saved


def bench_dropout(emit, ceiling):
    from tuneforge_kernels.dropout import (Mask, add_masked_input_grads_, draw_mask, drop, dropped_input_grads,
                                           new_seed)
    from tuneforge_kernels.backend import launcher
    from tuneforge_kernels.lora_glu import lora_glu_backward_inplace

    dev, p = torch.device("cuda"), 0.05
    for width in (HID, INTER):
        x, out = (torch.randn(N_TOK, width, device=dev, dtype=torch.bfloat16) for _ in range(2))
        d_b, a = torch.randn(N_TOK, RANK, device=dev, dtype=torch.bfloat16), torch.randn(
            RANK, width, device=dev, dtype=torch.bfloat16)
        philox = Mask(p, x.shape, dev, width, seed=new_seed(dev))
        stream = Mask(p, x.shape, dev, width, keep=draw_mask(x.shape, p, dev))
        big = x.numel() * 2
        cases = {
            "drop philox": (lambda: drop(x, philox, impl="triton"), 2 * big),
            "drop stream (mask read)": (lambda: drop(x, stream, impl="triton"), 2 * big),
            "stream mask draw (bernoulli_)": (lambda: draw_mask(x.shape, p, dev), x.numel()),
            "torch native_dropout": (lambda: torch.native_dropout(x, p, True), 2 * big),
            "masked add philox": (lambda: add_masked_input_grads_(out, [(d_b, a, philox, 1.0)], impl="triton"),
                                  2 * big),
            "masked add stream": (lambda: add_masked_input_grads_(out, [(d_b, a, stream, 1.0)], impl="triton"),
                                  2 * big),
            "masked add philox x3 (q/k/v)": (lambda: add_masked_input_grads_(out, [(d_b, a, philox, 1.0)] * 3,
                                                                             impl="triton"), 2 * big),
            # session 16's way: a GEMM writes each term, torch masks it and adds it (stream masks: no
            # philox in torch ops timed)
            "masked add x3 as 3 addmm + torch": (lambda: add_masked_input_grads_(
                out, [(d_b, a, stream, 1.0)] * 3, impl="reference"), 2 * big),
            # the rank-r inputs and the A gradients of q/k/v's three adapters: one pass over x against three
            # (drop kernel, then a GEMM reading the dropped input); bytes: one read of x
            # (three adapters and more take drop + GEMM on CUDA since session 18's measurement: the one-pass
            # kernel is timed with that switch moved out of its way)
            "x A^T x3 in one pass": (lambda: _one_pass_products(x, [(a, philox)] * 3), big),
            "x A^T x3 as drop + GEMM": (lambda: [drop(x, philox, impl="triton") @ a.t() for _ in range(3)], big),
            "x A^T x2 in one pass (gate/up)": (lambda: _one_pass_products(x, [(a, philox)] * 2), big),
            "x A^T x2 as drop + GEMM": (lambda: [drop(x, philox, impl="triton") @ a.t() for _ in range(2)], big),
            "x A^T x1 in one pass (O)": (lambda: _one_pass_products(x, [(a, philox)]), big),
            "x A^T x1 as drop + GEMM": (lambda: drop(x, philox, impl="triton") @ a.t(), big),
            "dA x3 in one pass": (lambda: dropped_input_grads(x, [(d_b, philox)] * 3, impl="triton"), big),
            "dA x3 as drop + GEMM": (lambda: [d_b.t() @ drop(x, philox, impl="triton") for _ in range(3)], big),
        }
        for name, (fn, nbytes) in cases.items():
            ms = timed(fn)
            emit("dropout", f"{name} {N_TOK}x{width}", ms, gbps=nbytes / ms / 1e6, ceiling=ceiling)
        del x, out
        torch.cuda.empty_cache()
    probe = _philox_probe_kernel()
    x = torch.randn(N_TOK, HID, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for masks, rounds, per_call in ((0, 10, 4), (1, 10, 4), (1, 7, 4), (1, 10, 8), (3, 10, 4), (3, 7, 4),
                                    (3, 10, 8), (3, 7, 8)):
        ms = timed(lambda: launcher(probe, x)[(N_TOK, HID // 1024)](
            x, y, HID, 12345, round(p * 65536), p, MASKS=masks, ROUNDS=rounds, PER_CALL=per_call, BN=1024,
            num_warps=8))
        emit("dropout", f"philox probe {masks} mask(s) {rounds} rounds {per_call}/call", ms,
             gbps=2 * x.numel() * 2 / ms / 1e6, ceiling=ceiling)
    del x, y
    g, u, dh = (torch.randn(N_TOK, INTER, device=dev, dtype=torch.bfloat16) for _ in range(3))
    dy_b, a_d = torch.randn(N_TOK, RANK, device=dev, dtype=torch.bfloat16), torch.randn(
        RANK, INTER, device=dev, dtype=torch.bfloat16) * 0.1
    masks = {"none": None, "philox": Mask(p, g.shape, dev, INTER, seed=new_seed(dev)),
             "stream": Mask(p, g.shape, dev, INTER, keep=draw_mask(g.shape, p, dev))}
    for name, m in masks.items():  # values drift in place; the timing does not depend on them
        ms = timed(lambda m=m: lora_glu_backward_inplace(dh, g, u, "silu", dy_b=dy_b, a_d=a_d, s_d=2.0,
                                                         dropped_d=m))
        emit("dropout", f"lora_glu bwd, down mask {name}", ms, gbps=6 * g.numel() * 2 / ms / 1e6, ceiling=ceiling)


def bench_attn(emit):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, s = 4, 2048
    for shape, (hq, hkv, d) in {"8B": (32, 8, 128), "1B": (32, 8, 64)}.items():
        q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        go = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16)
        flop = 3.5 * 4 * b * hq * s * s * d / 2  # causal forward 2 GEMMs of half the square; backward 2.5x

        def sdpa(backend, gqa):
            def run():
                kk, vv = (k, v) if gqa else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                torch.autograd.grad(out, (q, k, v), go)
            return run

        cases = {f"sdpa {n}{' gqa' if g else ' repeat'}": sdpa(bk, g)
                 for n, bk in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("efficient", SDPBackend.EFFICIENT_ATTENTION)) for g in (True, False)}
        from tuneforge_kernels.varlen_attention import Packing, varlen_attention

        starts = tuple(range(0, (b + 1) * s, s))
        packing = Packing(torch.tensor(starts, device="cuda", dtype=torch.int32), starts, s)
        qf, kf, vf = (t.detach().transpose(1, 2).reshape(b * s, t.shape[1], d).requires_grad_() for t in (q, k, v))
        gf = go.transpose(1, 2).reshape(b * s, hq, d)

        def varlen():
            torch.autograd.grad(varlen_attention(qf, kf, vf, packing, d ** -0.5), (qf, kf, vf), gf)
        cases["varlen (ours, 4 documents)"] = varlen
        errors = {}
        fa4 = _fa4()
        if fa4 is not None:
            func, varlen_func = fa4
            qb, kb, vb = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))  # (B, S, H, D)
            gb = go.transpose(1, 2).contiguous()

            def first(out):
                return out[0] if isinstance(out, tuple) else out

            def fa4_batched():
                return torch.autograd.grad(first(func(qb, kb, vb, softmax_scale=d ** -0.5, causal=True)), (qb, kb, vb), gb)

            def fa4_varlen():
                out = first(varlen_func(qf, kf, vf, cu_seqlens_q=packing.cu_seqlens, cu_seqlens_k=packing.cu_seqlens,
                                        max_seqlen_q=s, max_seqlen_k=s, softmax_scale=d ** -0.5, causal=True))
                return torch.autograd.grad(out, (qf, kf, vf), gf)
            cases["fa4 (flash-attn-4)"] = fa4_batched
            cases["fa4 varlen (4 documents)"] = fa4_varlen
            try:  # the largest difference from cuDNN's output and gradients, relative to their largest value
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                want = (ref.transpose(1, 2), *(g.transpose(1, 2) for g in torch.autograd.grad(ref, (q, k, v), go)))
                out = first(func(qb, kb, vb, softmax_scale=d ** -0.5, causal=True))
                got = (out, *torch.autograd.grad(out, (qb, kb, vb), gb))
                errors["fa4 (flash-attn-4)"] = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                                   for a, b in zip(got, want))
            except Exception as e:  # noqa: BLE001
                print(f"attn {shape} fa4 check: {type(e).__name__}: {str(e)[:300]}")
        for name, fn in cases.items():
            try:
                ms = timed(fn)
            except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape says so
                print(f"attn {shape} {name}: {type(e).__name__}: {str(e)[:200]}")
                continue
            emit("attn", f"{shape} {name}", ms, tflops=flop / ms / 1e9, max_rel_err=errors.get(name))
        del q, k, v, go
        torch.cuda.empty_cache()


def _fa4():
    """FlashAttention-4's (flash_attn_func, flash_attn_varlen_func), or None (said why) where it is not
    installed (bench/fa4_wheels.sh) or this is not a Hopper-or-later GPU."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception as e:  # noqa: BLE001 - ImportError, or the DSL failing to load its libraries
        print(f"attn: no FlashAttention-4 ({type(e).__name__}: {str(e)[:200]})")
        return None
    if torch.cuda.get_device_capability()[0] < 9:
        print("attn: FlashAttention-4 needs a Hopper or later GPU")
        return None
    return flash_attn_func, flash_attn_varlen_func


def bench_varlen_pad(emit):
    """Can a packed batch replay as a CUDA graph (NOTES, session 9)? Its shape must not depend on the
    documents: ``cu_seqlens`` padded with empty documents to a bucket of document counts and ``max_len`` set
    to the row width. Checks that flash's variable-length kernel gives the same output and gradients that
    way (empty documents, a wider grid), how long it takes against the tight form, and that it captures."""
    from tuneforge_kernels.varlen_attention import Packing, varlen_attention

    g = torch.Generator().manual_seed(0)
    rows, width = 4, 2048
    bounds = [0]
    for r in range(rows):  # documents of a long-tailed length, each row filled exactly
        end = (r + 1) * width
        while bounds[-1] < end:
            n = int(torch.empty(1).log_normal_(5.99, 1.0, generator=g).clamp(16, width).item())
            bounds.append(min(bounds[-1] + n, end))
    docs = len(bounds) - 1
    bucket = 1 << (docs - 1).bit_length()
    padded = bounds + [bounds[-1]] * (bucket - docs)
    tight = Packing(torch.tensor(bounds, device="cuda", dtype=torch.int32), tuple(bounds),
                    max(b - a for a, b in zip(bounds, bounds[1:])))
    wide = Packing(torch.tensor(padded, device="cuda", dtype=torch.int32), tuple(bounds), width)
    for shape, (hq, hkv, d) in {"8B": (32, 8, 128), "1B": (32, 8, 64)}.items():
        q, k, v = (torch.randn(rows * width, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (hq, hkv, hkv))
        go = torch.randn(rows * width, hq, d, device="cuda", dtype=torch.bfloat16)

        def run(packing, leaves=(q, k, v)):
            out = varlen_attention(*leaves, packing, d ** -0.5)
            return tuple(t.detach() for t in (out, *torch.autograd.grad(out, leaves, go)))

        def fresh():  # new leaves: a capture may not wait on gradient accumulators of the default stream
            return tuple(t.detach().requires_grad_() for t in (q, k, v))

        ref, got = run(tight), run(wide)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, got))
        note = f"{docs} documents, bucket {bucket}, max |diff| {diff:.3g}"
        emit("varlen_pad", f"{shape} tight", timed(lambda: run(tight)), note=note)
        emit("varlen_pad", f"{shape} padded, max_len {width}", timed(lambda: run(wide)), note=note)
        try:  # forward and backward as one graph, replayed against the eager result
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(wide, fresh())
            torch.cuda.current_stream().wait_stream(side)
            graph, leaves = torch.cuda.CUDAGraph(), fresh()
            with torch.cuda.graph(graph):
                static = run(wide, leaves)
            graph.replay()
            torch.cuda.synchronize()
            replay = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, static))
            emit("varlen_pad", f"{shape} padded, one graph", timed(graph.replay), note=f"max |diff| {replay:.3g}")
        except Exception as e:  # noqa: BLE001 - the answer is the error
            print(f"varlen_pad {shape} capture: {type(e).__name__}: {str(e)[:300]}")
        del q, k, v, go
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only",
                    default="copy,gemm,ce,ce_rows,glu_plain,elementwise,proj,tuned,glu,attn,varlen_pad,aug,dropout,"
                            "residual,overlap,padk,block")
    args = ap.parse_args()
    rows = []

    def emit(group, name, ms, **kw):
        rec = {"group": group, "name": name, "ms": ms, **{k: v for k, v in kw.items() if v is not None},
               "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
        rows.append(rec)
        write_record("MICRO", rec, args.out)

    only = args.only.split(",")
    streams = {"copy", "ce_rows", "glu_plain", "elementwise", "glu", "dropout"}  # groups that report GB/s
    ceiling = bench_copy(emit) if streams & set(only) else None
    for group, fn in (("gemm", bench_gemm), ("ce", bench_ce), ("proj", bench_proj), ("tuned", bench_tuned),
                      ("attn", bench_attn), ("varlen_pad", bench_varlen_pad), ("aug", bench_aug),
                      ("residual", bench_residual), ("overlap", bench_overlap), ("padk", bench_padk),
                      ("block", bench_block)):
        if group in only:
            fn(emit)
            torch.cuda.empty_cache()
    if "ce_rows" in only:
        bench_ce_rows(emit, ceiling)
    if "glu_plain" in only:
        bench_glu_plain(emit, ceiling)
    if "elementwise" in only:
        bench_elementwise(emit, ceiling)
    if "glu" in only:
        bench_glu(emit, ceiling)
    if "dropout" in only:
        bench_dropout(emit, ceiling)
    print(f"\n{'group':<12} {'case':<36} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>8} {'of copy':>8}")
    for r in rows:
        frac = r["gbps"] / r["ceiling"] if r.get("gbps") and r.get("ceiling") else None
        print(f"{r['group']:<12} {r['name']:<36} {r['ms']:8.3f} "
              f"{r.get('tflops') or float('nan'):8.1f} {r.get('gbps') or float('nan'):8.0f} "
              f"{frac if frac is not None else float('nan'):8.2f}")


if __name__ == "__main__":
    main()
