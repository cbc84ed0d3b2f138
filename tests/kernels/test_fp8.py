"""FP8 (e4m3) GEMMs for frozen weights: the row quantisation against its spec, and the LoRA nodes with FP8
weights against their reference (kernels/tuneforge_kernels/fp8.py).

Tolerances: e4m3 keeps 3 mantissa bits, so one rounding moves a value by up to 2^-4 of itself (relative
RMS about 2^-4 / sqrt(3) = 0.036 for values spread over a binade). The nodes and their reference quantise
the same operands, but an input that differs in its last bit (bf16 rounding upstream, another order of
summation) can land on the other side of an e4m3 rounding boundary: forward outputs agree within 2e-2.
The kernels' input gradients also round ``dy`` to e4m3, which the straight-through reference does not:
6e-2 for every gradient. Against exact bf16 the mode's forward stays within 6e-2, which is what it costs.
"""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels import fp8
from tuneforge_kernels.fp8 import E4M3_MAX, Fp8Weight, quantize_rows, quantize_rows_reference
from tuneforge_kernels.lora_linear import lora_linears, lora_linears_reference
from tuneforge_kernels.lora_mlp import LoraWeights, lora_mlp, lora_mlp_reference
from tests.kernels.conftest import DEVICES, needs_cuda, needs_triton, rel_err

pytestmark = needs_triton

FORWARD_TOL, GRAD_TOL, COST_TOL = 2e-2, 6e-2, 6e-2


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _assert_same_codes(got: torch.Tensor, want: torch.Tensor, values: torch.Tensor | None = None):
    diff = (_bits(got) != _bits(want)).cpu()
    if diff.any():
        at = values.float().cpu()[diff[:values.shape[0]]][:8].tolist() if values is not None else "?"
        got, want = got.float().cpu()[diff][:8].tolist(), want.float().cpu()[diff][:8].tolist()
        raise AssertionError(f"{int(diff.sum())} codes differ; at {at}: {got} != {want}")


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_rounds_every_midpoint_to_even(device):
    # a row whose largest magnitude is 448 has scale 1: the kernel rounds the values themselves. Every
    # finite e4m3 value, every midpoint between neighbours (ties: to even), and points just off them.
    codes = torch.arange(256, dtype=torch.uint8).view(fp8.E4M3).float()
    grid = codes[torch.isfinite(codes)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([grid, mids, mids * (1 + 2 ** -12), mids * (1 - 2 ** -12)])
    row = torch.cat([row, row.new_zeros((-row.numel()) % 16)]).to(device)
    q, s = quantize_rows(row[None], impl="triton")
    want_q, want_s = quantize_rows_reference(row[None].cpu())
    assert s.item() == 1.0 and want_s.item() == 1.0
    _assert_same_codes(q.cpu(), want_q, row[None])


def test_reference_rounds_each_row_to_e4m3_with_its_own_scale():
    torch.manual_seed(0)
    x = torch.randn(9, 80, dtype=torch.float64) * torch.logspace(-3, 3, 9, dtype=torch.float64)[:, None]
    x[4] = 0  # a row of zeros: zeros, and a finite scale
    x[5, 3] = -1e4  # one large value sets its row's scale
    q, s = quantize_rows_reference(x)
    assert q.dtype == fp8.E4M3 and s.shape == (9, 1) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and (s > 0).all()
    assert (q[4].float() == 0).all()
    live = [i for i in range(9) if i != 4]
    # each row's largest magnitude is the largest code
    assert torch.equal(q.float()[live].abs().amax(1), torch.full((8,), E4M3_MAX))
    assert q.float()[5, 3] == -E4M3_MAX
    back = fp8.dequantize_rows(q, s).double()
    # e4m3 normals round within 2^-4 of the value; below 2^-6 (subnormal codes) within 2^-10 of the scale
    bound = torch.maximum(x.abs() * 2 ** -4, s.double() * 2 ** -10) * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()


def test_column_scales_multiply_before_rounding_and_rows_pad_with_zeros():
    torch.manual_seed(1)
    x, c = torch.randn(5, 32), torch.rand(32) + 0.5
    q, s = quantize_rows_reference(x, c)
    q2, s2 = quantize_rows_reference(x * c)
    assert torch.equal(_bits(q), _bits(q2)) and torch.equal(s, s2)
    qp, sp = quantize_rows(x, c, pad=True, impl="reference")
    assert qp.shape == (16, 32) and sp.shape == (16, 1)
    assert torch.equal(_bits(qp[:5]), _bits(q)) and (qp[5:].float() == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_cols", [False, True])
def test_kernel_matches_reference(device, dtype, with_cols):
    torch.manual_seed(2)
    # odd rows, columns over several of the kernel's 2048-column blocks on the GPU, a row stride of its own
    n, k = (23, 48) if device == "cpu" else (4099, 14336)
    x = (torch.randn(n, k + 8, device=device, dtype=dtype) * 3)[:, 4:k + 4]
    x[1] = 0
    c = torch.rand(k, device=device) + 0.5 if with_cols else None
    for pad in (False, True):
        q, s = quantize_rows(x, c, pad=pad, impl="triton")
        want_q, want_s = quantize_rows_reference(x, c, rows=fp8.padded_rows(n) if pad else n)
        assert q.shape == want_q.shape and s.shape == want_s.shape
        assert torch.equal(s, want_s)  # IEEE division in the kernel: the same scales bit for bit
        _assert_same_codes(q, want_q, x)


@pytest.mark.gpu
@needs_cuda
def test_int64_indexing_past_2_31_elements():
    n, k = 65_600, 32_768  # 2.15e9 elements
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    q, s = quantize_rows(x)
    tail = slice(n - 3, n)
    want_q, want_s = quantize_rows_reference(x[tail])
    assert torch.equal(s[tail], want_s) and torch.equal(_bits(q[tail]), _bits(want_q))


def _weight(out_f, in_f, device, dtype):
    return torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f ** 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_and_input_gradient_against_the_spec(device, dtype):
    torch.manual_seed(3)
    n, k, o = (37, 64, 48) if device == "cpu" else (4099, 4096, 1024)  # rows padded to a multiple of 16
    w = Fp8Weight(_weight(o, k, device, dtype))
    x = torch.randn(n, k, device=device, dtype=dtype).requires_grad_()
    y = fp8.fp8_linear(x, w)
    ref = fp8.fp8_linear_reference(x, w)
    assert y.shape == (n, o) and y.dtype == dtype
    # the same products; float32 on a GPU: Hopper's FP8 tensor cores add them in an accumulator narrower
    # than float32 before promoting it (measured 1.4e-4 on the H200)
    assert rel_err(y, ref) < (1e-2 if dtype == torch.bfloat16 or device == "cuda" else 1e-5)
    dy = torch.randn_like(y)
    (want,) = torch.autograd.grad(ref, x, dy)
    assert rel_err(fp8.fp8_input_grad(dy, w), want) < GRAD_TOL
    # the column-major copy made once for several input gradients (the deferred MLP): the same values
    assert torch.equal(fp8.fp8_input_grad(dy, w.for_input_grads()), fp8.fp8_input_grad(dy, w))


@pytest.mark.parametrize("device", DEVICES)
def test_the_mode_costs_at_most_its_rounding_against_exact_bf16(device):
    torch.manual_seed(4)
    n, k, o = (40, 96, 64) if device == "cpu" else (8192, 4096, 4096)
    weight = _weight(o, k, device, torch.bfloat16)
    w = Fp8Weight(weight)
    x = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    exact = x.double() @ weight.double().t()
    assert rel_err(fp8.fp8_linear(x, w), exact) < COST_TOL
    dy = torch.randn(n, o, device=device, dtype=torch.bfloat16)
    assert rel_err(fp8.fp8_input_grad(dy, w), dy.double() @ weight.double()) < COST_TOL


def test_weight_copy_knows_when_its_source_changed():
    p = torch.nn.Parameter(torch.randn(32, 16), requires_grad=False)
    w = Fp8Weight(p)
    assert w.matches(p) and w.shape == (32, 16)
    with torch.no_grad():
        p.mul_(2)  # an in-place write through the parameter
    assert not w.matches(p)
    assert not Fp8Weight(p).matches(torch.nn.Parameter(p.detach().clone()))  # another storage
    part = w.rows(16, 32)
    assert part.shape == (16, 16) and torch.equal(part.dequantize(), w.dequantize()[16:])
    assert not fp8.fp8_eligible(torch.randn(30, 16)) and not fp8.fp8_eligible(torch.randn(16))


def _lora(out_f, in_f, rank, device, dtype):
    a = (torch.randn(rank, in_f, device=device) / in_f ** 0.5).requires_grad_()
    b = (torch.randn(out_f, rank, device=device) * 0.1).requires_grad_()
    return LoraWeights(Fp8Weight(_weight(out_f, in_f, device, dtype)), a, b, scale=2.0)


def _check_node(device, dtype, run, run_reference, x, projections):
    out = run(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = run_reference(x_ref)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert rel_err(o, r) < FORWARD_TOL
    dys = [torch.randn_like(o) for o in outs]
    leaves = [x] + [t for p in projections for t in (p.lora_a, p.lora_b) if t is not None]
    got = torch.autograd.grad(outs, leaves, dys)
    want = torch.autograd.grad(refs, [x_ref] + leaves[1:], dys)
    for g, w, leaf in zip(got, want, leaves):
        assert g.dtype == leaf.dtype
        assert rel_err(g, w) < GRAD_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("output_unused", [False, True])
def test_mlp_with_fp8_weights_matches_its_reference(device, dtype, output_unused):
    torch.manual_seed(5)
    hidden, inter, rank, shape = (32, 64, 4, (2, 7)) if device == "cpu" else (4096, 14336, 16, (2, 1023))
    gate, up, down = (_lora(inter, hidden, rank, device, dtype), _lora(inter, hidden, rank, device, dtype),
                      _lora(hidden, inter, rank, device, dtype))
    x = torch.randn(*shape, hidden, device=device, dtype=dtype).requires_grad_()
    if output_unused:  # the deferred recompute: only the gradients are the node's
        out = lora_mlp(x, gate, up, down, impl="triton", output_unused=True)
        x_ref = x.detach().clone().requires_grad_()
        ref = lora_mlp_reference(x_ref, gate, up, down)
        dy = torch.randn_like(ref)
        leaves = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
        got = torch.autograd.grad(out, leaves, dy)
        want = torch.autograd.grad(ref, [x_ref] + leaves[1:], dy)
        assert all(rel_err(g, w) < GRAD_TOL for g, w in zip(got, want))
        return
    _check_node(device, dtype, lambda t: lora_mlp(t, gate, up, down, impl="triton"),
                lambda t: lora_mlp_reference(t, gate, up, down), x, (gate, up, down))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qkv_with_fp8_weights_matches_its_reference(device, dtype):
    torch.manual_seed(6)
    hidden, kv, rank, shape = (64, 32, 4, (3, 5)) if device == "cpu" else (4096, 1024, 16, (2, 1023))
    projections = (_lora(hidden, hidden, rank, device, dtype), _lora(kv, hidden, rank, device, dtype),
                   LoraWeights(Fp8Weight(_weight(kv, hidden, device, dtype))))  # v without an adapter
    x = torch.randn(*shape, hidden, device=device, dtype=dtype).requires_grad_()
    _check_node(device, dtype, lambda t: lora_linears(t, *projections, impl="triton"),
                lambda t: lora_linears_reference(t, *projections), x, projections)
