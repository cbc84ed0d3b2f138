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
        from triton.runtime.interpreter import InterpretedFunction, _patch_lang
        from triton.runtime.jit import JITFunction

        _bind_core_global()

        def run(*args, **kwargs):
            kwargs.pop("num_warps", None)
            kwargs.pop("num_stages", None)
            saved = JITFunction.__call__
            JITFunction.__call__ = lambda self, *a, **kw: self.fn(*a, **kw)
            # the interpreter patches only the language modules the kernel's globals name; triton's
            # own helpers (tl.zeros -> core.full) need triton.language.core patched too
            scope = _patch_lang(_names_core)
            try:
                return InterpretedFunction(self.fn)[grid](*args, **kwargs)
            finally:
                scope.restore()
                JITFunction.__call__ = saved

        return run


def _names_core():
    """Stand-in whose globals name ``triton.language.core`` (see ``_Interpreted``)."""


def _bind_core_global() -> None:
    import triton.language as tl

    _names_core.__globals__["tl"] = tl
    _names_core.__globals__["_tl_core"] = tl.core
