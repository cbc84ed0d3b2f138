"""Where one training step's GPU time goes: torch.profiler over a few steps of one configuration of
bench/train_step.py (same model, LoRA and optimizer setup), kernels grouped by name, largest first.

    python3 bench/profile_step.py --shape 8B --method ours --ckpt off [--quant nf4] [--top 30] [--graphs on]
        [--pad on|off] [--stacks "Memcpy DtoD,_copy_rows"]

``--stacks``: for device kernels whose name contains one of these strings, the ATen ops that launched them, with
their Python frames where the profiler recorded any (on the H200 in session 43 it recorded none for these ops);
one more profiled step, with stacks on.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8B")
    ap.add_argument("--method", default="ours")
    ap.add_argument("--ckpt", default="off")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--graphs", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--pad", choices=["auto", "on", "off", "mlp"], default="auto")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--stacks", default="", help="comma-separated kernel name parts: print who launched them")
    a = ap.parse_args()
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    args = argparse.Namespace(shape=a.shape, method=a.method, ckpt=a.ckpt, quant=a.quant, rank=16, alpha=16,
                              model_path=None, graphs=a.graphs, pad=a.pad, model_dtype="bf16",
                              lora_dropout=a.lora_dropout)
    model, _ = train_step.setup_hf(args)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    vocab = train_step.SHAPES[a.shape]["vocab_size"]
    x = torch.randint(0, vocab, (a.batch, a.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(a.steps + 1)]
    marks[0].record()
    for i in range(a.steps):  # unprofiled step times, for the idle share below
        step()
        marks[i + 1].record()
    torch.cuda.synchronize()
    step_ms = [marks[i].elapsed_time(marks[i + 1]) for i in range(a.steps)]
    print(f"step_ms (no profiler) {[round(t, 1) for t in step_ms]}; peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total = sum(e.device_time_total for e in events) / a.steps / 1e3
    print(f"## {a.method} {a.shape} ckpt={a.ckpt} quant={a.quant}: {total:.1f} ms of kernels per step")
    rows = sorted(events, key=lambda e: -e.device_time_total)[:a.top]
    for e in rows:
        ms = e.device_time_total / a.steps / 1e3
        print(f"{ms:9.2f} ms {100 * ms / total:5.1f}% x{e.count // a.steps:<5d} {e.key[:110]}")
    _busy(prof, a.steps)
    _gaps(prof, a.steps, a.top)
    _matmuls(prof, a.steps, total, a.top)
    _matmuls(prof, a.steps, total, a.top, ops=("aten::copy_", "aten::cat", "aten::clone", "aten::_to_copy",
                                                "aten::add", "aten::add_", "aten::mul", "aten::fill_"),
             title="copies and elementwise ATen ops")
    if a.stacks:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            step()
            torch.cuda.synchronize()
        _stacks(prof, [p for p in a.stacks.split(",") if p])


def _stacks(prof, parts, frames=6):
    """For each ATen op (with its Python frames, where recorded) that launched a kernel whose name contains one
    of ``parts``: how many launches and how long, largest first."""
    from collections import defaultdict

    seen = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        for k in getattr(e, "kernels", []):
            if any(p in k.name for p in parts):
                own = [f for f in e.stack if "site-packages/torch" not in f][:frames]
                entry = seen[(k.name[:40], e.name, tuple(own))]
                entry[0] += 1
                entry[1] += k.duration / 1e3
    print(f"## who launched {parts}")
    for (kernel, op, stack), (n, ms) in sorted(seen.items(), key=lambda kv: -kv[1][1]):
        print(f"{ms:9.2f} ms x{n:<4d} {kernel} <- {op}")
        for f in stack:
            print(f"            {f}")


def _matmuls(prof, steps, total, top, ops=("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_grouped_mm"),
             title="matrix products"):
    """The matrix products (or other ``ops``) by operand shapes (the ATen op that launched them: forward and
    backward GEMMs of one projection land on different rows), with the device time each shape took. Ops
    inside a replayed CUDA graph are not seen (profile with ``--graphs off``)."""
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ops and e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    mm_total = sum(e.device_time_total for e in rows) / steps / 1e3
    print(f"## {title}: {mm_total:.1f} ms of {total:.1f} per step, by operand shapes")
    for e in rows[:top]:
        ms = e.device_time_total / steps / 1e3
        print(f"{ms:9.2f} ms x{e.count // steps:<5d} {e.key:<11} {str(e.input_shapes)[:100]}")


def _busy(prof, steps):
    """Wall span of the profiled steps on the device, the union of kernel intervals (busy), and the
    union of copies (Memcpy): span - busy is time the GPU computed nothing (waits on copies, launches)."""
    from torch.autograd import DeviceType

    spans = [(e.time_range.start, e.time_range.end, "memcpy" in e.name.lower())
             for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not spans:
        return

    def union(iv):
        iv = sorted(iv)
        tot, cur_s, cur_e = 0.0, None, None
        for s, e in iv:
            if cur_e is None or s > cur_e:
                tot += (cur_e - cur_s) if cur_e is not None else 0.0
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        return tot + ((cur_e - cur_s) if cur_e is not None else 0.0)

    wall = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
    kern = union([(s, e) for s, e, c in spans if not c])
    copy = union([(s, e) for s, e, c in spans if c])
    print(f"per step: device span {wall / steps / 1e3:.1f} ms, kernels busy {kern / steps / 1e3:.1f} ms, "
          f"copies busy {copy / steps / 1e3:.1f} ms, no kernel running {(wall - kern) / steps / 1e3:.1f} ms")


def _gaps(prof, steps, top, floor_us=8.0, long_us=1000.0):
    """Where the device sat idle: the gaps between one kernel's end and the next one's start longer
    than ``floor_us``, summed by the pair of kernels around them (a host sync, a launch-bound stretch
    of small ops), largest first. The profiled steps start after a ``synchronize``: until the host is ahead
    again (the first kernel of ``long_us`` or more), the device waits on every launch. Those gaps are an
    artifact of the measurement (the timed loops run their steps back to back, so they pay them once per
    run, not per step) and are reported apart (session 46: session 45's "step start idle")."""
    from collections import defaultdict

    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end, e.name)
                     for e in prof.events() if e.device_type == DeviceType.CUDA)
    ahead = next((s for s, e, _ in kernels if e - s >= long_us), float("inf"))
    by_pair, total, startup, end, prev = defaultdict(lambda: [0.0, 0]), 0.0, 0.0, None, None
    for s, e, name in kernels:
        if end is not None and s - end > floor_us:
            if s <= ahead:
                startup += s - end
            else:
                gap = by_pair[(prev[:48], name[:48])]
                gap[0] += s - end
                gap[1] += 1
                total += s - end
        if end is None or e > end:
            end, prev = e, name
    print(f"## gaps over {floor_us:.0f} us: {total / steps / 1e3:.1f} ms per step, by the kernels around them; "
          f"besides {startup / 1e3:.2f} ms in all before the first kernel of {long_us / 1e3:.0f} ms "
          f"(the host catching up after the synchronize before the profiled steps)")
    for (before, after), (us, n) in sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{us / steps / 1e3:9.2f} ms x{n // steps:<5d} {before:<48} -> {after}")


if __name__ == "__main__":
    main()
