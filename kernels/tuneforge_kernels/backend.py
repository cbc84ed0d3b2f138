"""The choice, per call, between an op's Triton implementation and its plain-torch reference.

Rules (one place, so every op behaves the same):
- ``impl="reference"`` always runs the reference; ``impl="triton"`` always runs Triton (an error if
  Triton is missing): compiled on CUDA tensors, through Triton's interpreter on CPU tensors (small
  shapes only: that is how CI, which has no GPU, checks the kernels themselves).
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


def use_triton(*tensors: torch.Tensor | None, impl: str | None = None) -> bool:
    if impl not in (None, "triton", "reference"):
        raise ValueError(f"impl must be None, 'triton' or 'reference', got {impl!r}")
    if impl == "reference":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' asked for, but triton is not installed")
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


def launcher(kernel, like: torch.Tensor):
    """``kernel`` itself for CUDA tensors; for CPU tensors an interpreted twin, indexable by grid.

    ``TRITON_INTERPRET=1`` only works if set before triton is first imported (transformers imports
    triton early), so instead the interpreter is applied per launch: our kernel's Python function runs
    in ``InterpretedFunction``, and for the duration of the launch a nested call of a compiled-mode
    ``@triton.jit`` helper (``tl.sigmoid``, ours) calls its Python function directly.
    """
    if like.is_cuda:
        return kernel
    return _Interpreted(kernel)


class _Interpreted:
    def __init__(self, kernel):
        self.fn = kernel.fn

    def __getitem__(self, grid):
        from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder, _patch_lang
        from triton.runtime.jit import JITFunction

        _bind_core_global()

        def run(*args, **kwargs):
            kwargs.pop("num_warps", None)
            kwargs.pop("num_stages", None)
            saved, saved_cast = JITFunction.__call__, InterpreterBuilder.cast_impl
            JITFunction.__call__ = lambda self, *a, **kw: self.fn(*a, **kw)
            InterpreterBuilder.cast_impl = _cast_rounding_bf16(saved_cast)
            # the interpreter patches only the language modules the kernel's globals name; triton's
            # own helpers (tl.zeros -> core.full) need triton.language.core patched too
            scope = _patch_lang(_names_core)
            try:
                return InterpretedFunction(self.fn)[grid](*args, **kwargs)
            finally:
                scope.restore()
                JITFunction.__call__, InterpreterBuilder.cast_impl = saved, saved_cast

        return run


def _cast_rounding_bf16(cast_impl):
    """The interpreter's cast, but float32 -> bfloat16 rounded to nearest even as the GPU's ``cvt.rn.bf16.f32``
    and torch's ``.to(torch.bfloat16)`` do: Triton 3.6's interpreter truncates (explicit ``rtne`` too), which
    doubles the error of every bf16 store and so of every CPU check of a bf16 kernel (measured: a bf16 RMSNorm
    6.2e-3 from float64, against 2.9e-3 for torch's ops; bench/NOTES.md, session 29)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def cast(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast_impl(self, src, dst_type)
        bits = np.asarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # carries into the exponent
        quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
        return TensorHandle(np.where(np.isnan(src.data), quiet_nan, rounded), dst_type.scalar)

    return cast


def _names_core():
    """Stand-in whose globals name ``triton.language.core`` (see ``_Interpreted``)."""


def _bind_core_global() -> None:
    import triton.language as tl

    _names_core.__globals__["tl"] = tl
    _names_core.__globals__["_tl_core"] = tl.core
