"""glu_gemm's GEMMs with the gated activation in their epilogues, against the float64 spec: the GEMM, the
rounding of its product that the unfused pair stores, then lora_glu's math. Odd shapes (tiles cut at every
edge, a K that is no multiple of the K tile), ranks that are not powers of two, each term present or not."""

from __future__ import annotations

import zlib

import pytest
import torch

from tuneforge_kernels.glu_gemm import (glu_gemm_backward, glu_gemm_backward_reference, glu_gemm_forward,
                                        glu_gemm_reference, supported)
from tests.kernels.conftest import DEVICES, needs_cuda, needs_triton, rel_err

pytestmark = needs_triton

# the CPU runs float32 (the interpreter), a GPU bf16: the dtypes supported() takes on each
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
# float32: the conftest's 1e-5 (a few roundings through short reductions). bf16: every output is rounded
# once from float32 (2^-9 an element) and the base products once before the terms, as the unfused pair
# rounds them; the reference rounds at the same places, so what remains is the GEMMs' summation order
# flipping a rounding of Yg or DH now and then: 1e-2, lora_glu's bf16 bound
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _case(rows, hidden, inter, ranks, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x, dy = rand(rows, hidden), rand(rows, hidden)
    wg, wu = rand(inter, hidden, scale=hidden ** -0.5), rand(inter, hidden, scale=hidden ** -0.5)
    wd = rand(hidden, inter, scale=inter ** -0.5)
    rg, ru, rd = ranks
    terms = {"xa_g": rand(rows, rg) if rg else None, "b_g": rand(inter, rg, scale=0.3) if rg else None,
             "s_g": 0.5, "xa_u": rand(rows, ru) if ru else None, "b_u": rand(inter, ru, scale=0.3) if ru else None,
             "s_u": 2.0}
    down = {"dy_b": rand(rows, rd) if rd else None, "a_d": rand(rd, inter, scale=0.3) if rd else None, "s_d": 1.5}
    return x, dy, wg, wu, wd, terms, down


def _wide(d):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("ranks", [(5, 16, 3), (0, 7, 0), (16, 0, 33), (0, 0, 0)])
def test_forward_and_backward_match_the_spec(device, act, ranks):
    dtype = DTYPE[device]
    rows, hidden, inter = (37, 72, 136) if device == "cpu" else (1029, 4104, 2056)
    seed = zlib.crc32(repr((act, ranks)).encode()) % 1000
    x, dy, wg, wu, wd, terms, down = _case(rows, hidden, inter, ranks, device, dtype, seed)
    assert supported(x, wg, wu, dtype=dtype) and supported(dy, wd, dtype=dtype)
    yg, yu, h = glu_gemm_forward(x, wg, wu, act, **terms)
    # the spec in float64 from the products rounded as stored (what the unfused GEMM writes)
    yg_ref, yu_ref = (x.double() @ wg.double().t()), (x.double() @ wu.double().t())
    assert rel_err(yg, yg_ref) < TOL[dtype] and rel_err(yu, yu_ref) < TOL[dtype]
    _, _, h_ref = glu_gemm_reference(x.double(), wg.double(), wu.double(), act, **_wide(terms))
    assert rel_err(h, h_ref) < TOL[dtype]
    h_b = glu_gemm_backward(dy, wd, yg, yu, act, **terms, **down)
    expected = glu_gemm_backward_reference(dy.double(), wd.double(), yg_ref, yu_ref, act, **_wide(terms),
                                           **_wide(down))
    for got, exp, name in zip((h_b, yg, yu), expected, ("h", "dg", "du")):
        assert rel_err(got, exp) < TOL[dtype], (name, rel_err(got, exp))


def test_the_spec_is_the_unfused_pair():
    # the references are what lora_mlp computes without these kernels: the GEMMs and lora_glu's reference
    # (forward), and autograd through it (backward)
    from tuneforge_kernels.lora_glu import lora_glu_reference

    x, dy, wg, wu, wd, terms, down = _case(9, 8, 12, (3, 2, 4), "cpu", torch.float64, seed=1)
    yg, yu, h = glu_gemm_reference(x, wg, wu, "gelu", **terms)
    ygr, yur = yg.clone().requires_grad_(), yu.clone().requires_grad_()
    h2 = lora_glu_reference(ygr, yur, "gelu", **terms)
    dh = dy @ wd + down["s_d"] * down["dy_b"] @ down["a_d"]
    dg, du = torch.autograd.grad(h2, (ygr, yur), dh)
    h_b, dg_b, du_b = glu_gemm_backward_reference(dy, wd, yg, yu, "gelu", **terms, **down)
    for a, b in ((h, h2), (h_b, h2), (dg_b, dg), (du_b, du)):
        assert rel_err(a, b) < 1e-12


def test_the_forward_products_are_halves_of_one_buffer():
    # lora_mlp's backward computes dx with one GEMM over joined gate/up weights when dg, du are column
    # halves of one tensor, as cuBLAS's product over the joined weights leaves them
    from tuneforge_kernels.lora_mlp import joined

    x, _, wg, wu, _, terms, _ = _case(5, 8, 12, (2, 2, 0), "cpu", torch.float32, seed=2)
    yg, yu, _ = glu_gemm_forward(x, wg, wu, "silu", **terms)
    assert joined([yg, yu], 1) is not None


def test_backward_takes_column_halves_in_place():
    x, dy, wg, wu, wd, terms, down = _case(11, 8, 20, (3, 0, 2), "cpu", torch.float32, seed=3)
    gu = torch.cat([x @ wg.t(), x @ wu.t()], dim=1)
    yg, yu = gu.split(20, dim=1)
    expected = glu_gemm_backward_reference(dy, wd, yg.clone(), yu.clone(), "silu", **terms, **down)
    h = glu_gemm_backward(dy, wd, yg, yu, "silu", **terms, **down)
    for got, exp in zip((h, yg, yu), expected):
        assert rel_err(got, exp) < 1e-5


def test_supported_takes_only_what_the_descriptors_can_read():
    w = torch.randn(12, 8)
    x = torch.randn(5, 8)
    assert supported(x, w, dtype=torch.float32)
    assert not supported(x, w, dtype=torch.bfloat16)  # a cast first: the unfused path
    assert not supported(x.bfloat16(), w.bfloat16(), dtype=torch.bfloat16)  # no bf16 on the interpreter
    assert not supported(torch.randn(5, 9)[:, :7], torch.randn(12, 7), dtype=torch.float32)  # row stride 36 B
    assert not supported(torch.randn(5, 8).t(), w, dtype=torch.float32)  # column stride 5
    assert not supported(torch.randn(41)[1:].view(5, 8), w, dtype=torch.float32)  # starts 4 B past 16

    class Quantised:  # a weight with dequantize() (QLoRA) is not a tensor the descriptor can read
        shape = (12, 8)

    assert not supported(x, Quantised(), dtype=torch.float32)


@pytest.mark.gpu
@needs_cuda
def test_float32_on_a_gpu_stays_unfused():
    # the tensor cores would multiply float32 as tf32: lora_mlp keeps cuBLAS and lora_glu there
    x, w = torch.randn(5, 8, device="cuda"), torch.randn(12, 8, device="cuda")
    assert not supported(x, w, dtype=torch.float32)
    assert supported(x.bfloat16(), w.bfloat16(), dtype=torch.bfloat16)
