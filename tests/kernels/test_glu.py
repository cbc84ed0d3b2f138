"""swiglu and geglu (exact and tanh) against their references in float64, incl. the in-place backward."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.geglu import geglu, geglu_backward_inplace, geglu_reference
from tuneforge_kernels.swiglu import swiglu, swiglu_backward_inplace, swiglu_reference
from tests.kernels.conftest import DEVICES, TOL, needs_cuda, needs_triton, rel_err

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


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_int64_indexing_beyond_2_31_elements(op):
    # 2^31 + 4096 bf16 elements (4.3 GB a tensor): the last programs' offsets overflow int32
    n = (1 << 31) + 4096
    g = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    u = torch.randn_like(g)
    h = OPS[op][0](g, u)
    tail = slice(n - 8192, n)
    ref = OPS[op][1](g[tail].double(), u[tail].double())
    assert rel_err(h[tail], ref) < TOL[torch.bfloat16]
    del h
    dh = torch.randn_like(g)
    gr, ur = g[tail].double().requires_grad_(), u[tail].double().requires_grad_()
    dg, du = torch.autograd.grad(OPS[op][1](gr, ur), (gr, ur), dh[tail].double())
    if op == "swiglu":
        swiglu_backward_inplace(dh, g, u)
    else:
        geglu_backward_inplace(dh, g, u, "none")
    assert rel_err(dh[tail], ref) < TOL[torch.bfloat16]
    assert rel_err(g[tail], dg) < TOL[torch.bfloat16] and rel_err(u[tail], du) < TOL[torch.bfloat16]
