"""swiglu and geglu (exact and tanh) against their references in float64, incl. the in-place backward."""

from __future__ import annotations

import pytest
import torch

from kernels.geglu import geglu, geglu_backward_inplace, geglu_reference
from kernels.swiglu import swiglu, swiglu_backward_inplace, swiglu_reference
from tests.kernels.conftest import DEVICES, TOL, needs_triton, rel_err

pytestmark = needs_triton

OPS = {
    "swiglu": (lambda g, u: swiglu(g, u, impl="triton"), swiglu_reference),
    "geglu": (lambda g, u: geglu(g, u, impl="triton"), geglu_reference),
    "geglu_tanh": (lambda g, u: geglu(g, u, "tanh", impl="triton"),
                   lambda g, u: geglu_reference(g, u, "tanh")),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", sorted(OPS))
def test_matches_reference(device, dtype, op):
    torch.manual_seed(0)
    fn, ref_fn = OPS[op]
    rows, cols = (5, 1031) if device == "cpu" else (4099, 14337)
    gu = torch.randn(rows, 2 * cols, device=device, dtype=dtype) * 3
    g, u = gu[:, :cols].requires_grad_(), gu[:, cols:].requires_grad_()  # non-contiguous halves
    g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
    out = fn(g, u)
    gr, ur = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = ref_fn(gr, ur)
    assert rel_err(out, ref) < TOL[dtype]
    dh = torch.randn_like(out)
    got = torch.autograd.grad(out, (g, u), dh)
    exp = torch.autograd.grad(ref, (gr, ur), dh.double())
    for a, b in zip(got, exp):
        assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("op", ["swiglu", "geglu", "geglu_tanh"])
def test_backward_inplace_overwrites_with_h_dg_du(op):
    torch.manual_seed(1)
    g, u, dh = (torch.randn(3, 77) for _ in range(3))
    gr, ur = g.double().requires_grad_(), u.double().requires_grad_()
    ref = OPS[op][1](gr, ur)
    dg, du = torch.autograd.grad(ref, (gr, ur), dh.double())
    if op == "swiglu":
        swiglu_backward_inplace(dh, g, u)
    else:
        geglu_backward_inplace(dh, g, u, "tanh" if op == "geglu_tanh" else "none")
    assert rel_err(dh, ref) < 1e-5 and rel_err(g, dg) < 1e-5 and rel_err(u, du) < 1e-5
