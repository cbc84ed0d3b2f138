"""Shared helpers for the kernel tests: where the Triton path runs and how errors are measured.

On a machine without CUDA the Triton kernels run through Triton's interpreter on CPU tensors (small
shapes only); with CUDA they are compiled. Cases that need a real GPU carry ``gpu`` and ``needs_cuda``.
"""

from __future__ import annotations

import os

import pytest
import torch

# Harmless with our per-launch interpreter (kernels/tuneforge_kernels/backend.py) and what the brief's CI
# expects.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton not installed")

# The Triton path is tested on the CPU interpreter everywhere and, where there is a GPU, compiled too.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]


def record_copy_rows(monkeypatch, module) -> list[int]:
    """The widths of the blocks ``module``'s ``copy_rows`` writes from here on, in order: the copies into a
    padded GEMM's wide operand that a producer writing in place saves."""
    seen, real = [], module.copy_rows

    def recorded(dst, src, **kwargs):
        seen.append(dst.shape[1])
        return real(dst, src, **kwargs)

    monkeypatch.setattr(module, "copy_rows", recorded)
    return seen


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (METHOD.md's measure); NaN anywhere fails any tolerance."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# Tolerances on rel_err, justified once for every op: each kernel computes in float32 and rounds its
# outputs once. float32 inputs: a few float32 roundings (unit roundoff 6e-8) through reductions of a
# few hundred terms land near 1e-6, so 1e-5 leaves room but would catch any wrong term. bfloat16
# inputs compared with a float64 reference: the output rounding alone is up to 2^-9 = 2e-3 per
# element (about 1e-3 in norm), and inputs to later steps are bf16-rounded too, so 1e-2.
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2}


def join_weights(*projections):
    """The projections with their base weights copied into one buffer, consecutive row blocks (the
    patcher's ``join_frozen_weights`` layout)."""
    from tuneforge_kernels.lora_mlp import LoraWeights

    buffer = torch.cat([p.weight for p in projections])
    out, start = [], 0
    for p in projections:
        out.append(LoraWeights(buffer[start:start + p.weight.shape[0]], p.lora_a, p.lora_b, p.scale, p.dropout,
                               p.bias))
        start += p.weight.shape[0]
    return out


class _CountingMode:
    """A context manager that shows every ATen op run inside it to ``self.count(func, args)`` and returns
    ``self.counts``."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.count(func, args)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self.counts

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


class count_ops(_CountingMode):  # noqa: N801  (a context manager used like a function)
    """Counts the ATen ops run inside it by name (``aten._to_copy.default`` -> ``_to_copy``)."""

    def __init__(self):
        from collections import Counter

        self.counts = Counter()

    def count(self, func, args):
        self.counts[func.__name__.split(".")[0]] += 1


class count_matmuls(_CountingMode):  # noqa: N801  (a context manager used like a function)
    """Counts the matrix products run inside it: ``big`` those whose operands are all larger than
    rank-sized (both inner and outer dimensions over 2), ``all`` every one, ``reading`` those with an
    operand in the storage of one of ``tensors`` (say, the base weights)."""

    OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
           torch.ops.aten.mm.out)

    def __init__(self, tensors=()):
        self.storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.counts = {"big": 0, "all": 0, "reading": 0}

    def count(self, func, args):
        if func in self.OPS:
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2][-2:]
            self.counts["all"] += 1
            self.counts["big"] += all(min(m.shape) > 2 for m in mats)
            self.counts["reading"] += any(m.untyped_storage().data_ptr() in self.storages for m in mats)


@pytest.fixture
def nan_allocations(monkeypatch):
    """Every ``new_empty`` full of NaN: a spare column the padded layouts read before they write it shows."""
    real = torch.Tensor.new_empty

    def new_empty(self, *size, **kw):
        out = real(self, *size, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
