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
