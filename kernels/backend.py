"""The choice, per call, between an op's Triton implementation and its plain-torch reference.

Rules (one place, so every op behaves the same):
- ``impl="reference"`` always runs the reference; ``impl="triton"`` always runs Triton (an error if
  Triton is missing), on CUDA tensors compiled, on CPU tensors through Triton's interpreter, which
  needs ``TRITON_INTERPRET=1`` in the environment *before* triton is first imported (the tests'
  conftest sets it on machines without CUDA).
- ``impl=None`` (the default) runs Triton when every tensor is on CUDA and Triton imports, else the
  reference. ``TUNEFORGE_KERNELS=0`` in the environment forces the reference everywhere (debugging).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor | None, impl: str | None = None) -> bool:
    if impl not in (None, "triton", "reference"):
        raise ValueError(f"impl must be None, 'triton' or 'reference', got {impl!r}")
    if impl == "reference":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' asked for, but triton is not installed")
        on_cpu = any(t is not None and not t.is_cuda for t in tensors)
        if on_cpu and not interpreter_requested():
            raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    if os.environ.get("TUNEFORGE_KERNELS", "1") == "0" or not triton_available():
        return False
    return all(t is None or t.is_cuda for t in tensors)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def sm_count(device_index: int = 0) -> int:
    if not torch.cuda.is_available():
        return 4  # interpreter: a few programs are enough to exercise the grid-stride loops
    return torch.cuda.get_device_properties(device_index).multi_processor_count
