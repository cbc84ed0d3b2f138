"""Every Triton kernel our ops launch compiles for the GPUs the worker trains on (sm_90: H100, H200), checked
on a machine without one. Triton's interpreter, which runs the kernels on the CPU in the other tests, does
not check what only the compiler does: a kernel reading a global that is not a constexpr, types that do
not unify, a ``tl.dot`` of shapes the tensor cores do not take (session 17 found the first in a kernel
that passed every interpreter test). The ops run once on small CPU tensors through the interpreter; each
launch's signature (argument types, constexprs, warps) is recorded and compiled to a cubin by Triton's
own NVIDIA backend (its ptxas ships with Triton)."""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import pkgutil
import subprocess
import sys

import pytest
import torch

import tuneforge_kernels
from tests.kernels.conftest import needs_triton

pytestmark = needs_triton

_POINTERS = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
             torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
             torch.float8_e4m3fn: "*fp8e4nv"}


def _ptxas_available() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def _signature(kernel, args, kwargs):
    """Triton's compile signature of one launch: ``({arg: type or "constexpr"}, {constexpr: value}, warps)``.
    ``kernel``: the JITFunction, or the InterpretedFunction it is where TRITON_INTERPRET was set at import
    (kernels/conftest.py): the parameters are read from the Python function."""
    fn = getattr(kernel, "fn", kernel)
    values = dict(zip(inspect.signature(fn).parameters, args))
    values.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
    sig, consts = {}, {}
    for name, param in inspect.signature(fn).parameters.items():
        v = values[name] if name in values else param.default
        if "constexpr" in str(param.annotation) or v is None:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _POINTERS[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    return sig, consts, kwargs.get("num_warps", 4)


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch of the test, recorded (unique signatures) and still run through the interpreter."""
    return record_launches(monkeypatch)


def record_launches(monkeypatch) -> dict:
    """From now on (until ``monkeypatch`` is undone) every launch of our kernels is recorded into the returned
    dict, one entry per signature, and still run through the interpreter (bench/ptxas_report.py uses it too)."""
    from tuneforge_kernels import backend

    seen = {}
    real = backend.launcher

    def record(kernel, args, kwargs):
        sig, consts, warps = _signature(kernel, args, kwargs)
        if consts.get("PREC") == "ieee" and "*bf16" in sig.values():
            consts["PREC"] = "native"  # CUDA's bf16 dot (the interpreter has none: "ieee" on the CPU)
        fn = getattr(kernel, "fn", kernel)
        key = (fn.__module__, fn.__name__, tuple(sig.items()), repr(sorted(consts.items())), warps)
        seen.setdefault(key, (fn.__module__, fn.__name__, sig, consts, warps))

    class Recording:  # launcher(kernel, like)[grid](*args, **kwargs), each launch recorded, then run
        def __init__(self, kernel, like):
            self.kernel, self.run = kernel, real(kernel, like)

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                record(self.kernel, args, kwargs)
                return self.run[grid](*args, **kwargs)

            return call

    for info in pkgutil.iter_modules(tuneforge_kernels.__path__):
        module = importlib.import_module(f"tuneforge_kernels.{info.name}")
        if getattr(module, "launcher", None) is real:
            monkeypatch.setattr(module, "launcher", Recording)
    return seen


# compiles the recorded launches in a fresh interpreter: with TRITON_INTERPRET set at import (as the kernel
# tests set it) ``triton.jit`` gives interpreted functions, which the compiler cannot call from a kernel
_COMPILE = """
import os, pickle, sys, importlib, subprocess, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
failures = []
for module, name, sig, consts, warps in pickle.load(open(sys.argv[1], "rb")):
    try:
        kernel = getattr(importlib.import_module(module), name)
        compiled = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps})
        assert compiled.asm.get("cubin"), "no cubin"
        if len(sys.argv) > 2:  # --report: ptxas's resource line (registers, spills) for each launch
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                ptx.write(compiled.asm["ptx"])
                ptx.flush()
                out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx.name, "-o", os.devnull],
                                     capture_output=True, text=True)
            lines = [l.split(":", 1)[-1].strip() for l in (out.stdout + out.stderr).splitlines()
                     if "registers" in l or "spill" in l or "C7515" in l]
            print("\\t".join(["REPORT", module, name, str(warps), repr(sorted(consts.items())), " | ".join(lines)]),
                  flush=True)
    except Exception as err:  # every failure reported, not only the first
        failures.append(f"{module}.{name} {consts}: {type(err).__name__}: {str(err)[-600:]}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def compile_all(launches, tmp_path, report: bool = False) -> subprocess.CompletedProcess:
    """The recorded launches compiled for sm_90 in a fresh interpreter; ``report``: each one's ``REPORT`` line
    (ptxas's registers and spill bytes) on its stdout."""
    path = tmp_path / "launches.pkl"
    path.write_bytes(pickle.dumps(list(launches.values())))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "kernels"), root,
                                                        os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", _COMPILE, str(path), *(["--report"] if report else [])],
                          capture_output=True, text=True, env=env, timeout=1500)


def train_step(model_type, dropout, memory_mode="off"):
    from gpu_worker.patching import patch_model
    from tests.gpu_worker.patching.conftest import build_lora_model, tiny_config

    model = build_lora_model(tiny_config(model_type), dtype=torch.bfloat16, lora_dropout=dropout)
    patch_model(model, impl="triton", memory_mode=memory_mode)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()


def other_ops():
    """The kernels a tiny model's step does not launch, each called once as the GPU would (bf16)."""
    from tests.kernels.test_nf4 import _state
    from tuneforge_kernels.cast_blocks import cast_blocks
    from tuneforge_kernels.cross_entropy import fused_linear_cross_entropy
    from tuneforge_kernels.dropout import Mask, drop
    from tuneforge_kernels.embedding import embedding_rows
    from tuneforge_kernels.fp8 import quantize_rows
    from tuneforge_kernels.geglu import geglu_backward_inplace, geglu_forward
    from tuneforge_kernels.nf4 import VARIANTS, dequantize_nf4
    from tuneforge_kernels.swiglu import swiglu_backward_inplace, swiglu_forward

    g, u, dh = (torch.randn(8, 48, dtype=torch.bfloat16) for _ in range(3))
    swiglu_backward_inplace(dh, g, u)
    swiglu_forward(g, u)
    for approximate in ("none", "tanh"):
        geglu_forward(g, u, approximate)
        geglu_backward_inplace(dh.clone(), g.clone(), u.clone(), approximate)
    drop(g, Mask.draw(g.shape, 0.1, g.device), impl="triton")  # philox (the caller's philox_everywhere)
    cast_blocks([(torch.empty(8, 48, dtype=torch.bfloat16), torch.randn(8, 48))], impl="triton")
    cast_blocks([(torch.empty(8, 48), g)], impl="triton", scales=[torch.rand(48)])  # a dA times its norm's weight
    embedding_rows(torch.randint(0, 16, (2, 5)), torch.randn(16, 48, dtype=torch.bfloat16), impl="triton")
    quantize_rows(g, impl="triton")
    quantize_rows(g, torch.rand(48) + 0.5, pad=True, impl="triton")
    hidden = torch.randn(6, 48, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([1, -100, 3, 4, 5, 6])
    fused_linear_cross_entropy(hidden, torch.randn(32, 48, dtype=torch.bfloat16), labels, label_smoothing=0.1,
                               impl="triton").backward()  # the models' steps train without smoothing
    for nested in (False, True):
        packed, state = _state((16, 64), nested, torch.bfloat16, "cpu")
        for variant in VARIANTS:
            dequantize_nf4(packed, state, impl="triton", variant=variant)


def trial():
    """What the recorded launches come from: a step of four families' tiny bf16 models with adapter dropout,
    one without, one in ``offload``, and the other ops."""
    from tuneforge_kernels.dropout import philox_everywhere

    with philox_everywhere():  # CUDA's masks: the seeded kernels
        for model_type in ("llama", "qwen2", "gemma2", "phi3"):
            train_step(model_type, 0.1)
        train_step("llama", 0.0)
        train_step("llama", 0.1, memory_mode="offload")
        other_ops()


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_every_kernel_compiles_for_sm90(launches, tmp_path):
    trial()
    kernels = {key[1] for key in launches}
    defined = {name for info in pkgutil.iter_modules(tuneforge_kernels.__path__)
               for name, value in vars(importlib.import_module(f"tuneforge_kernels.{info.name}")).items()
               if name.endswith("_kernel") and hasattr(value, "fn")}
    assert kernels == defined, (sorted(defined - kernels), sorted(kernels - defined))  # every kernel, launched
    done = compile_all(launches, tmp_path)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
