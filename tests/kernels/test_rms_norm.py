"""rms_norm (Triton) against rms_norm_reference evaluated in float64."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.rms_norm import norm_recipe, rms_norm, rms_norm_reference
from tests.kernels.conftest import DEVICES, TOL, count_ops, needs_cuda, needs_triton, rel_err

pytestmark = needs_triton


def _inputs(device, dtype, rows, cols, contiguous):
    base = torch.randn(rows, 2 * cols + 3, device=device, dtype=dtype)
    x = base[:, 1:2 * cols + 1:2] if not contiguous else base[:, :cols].contiguous()  # stride-2 view
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama, Gemma (1 + w)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("weight_trainable", [True, False])
def test_matches_reference(device, dtype, offset, with_residual, weight_trainable):
    torch.manual_seed(0)
    rows, cols = (7, 37) if device == "cpu" else (1023, 4099)
    x = _inputs(device, dtype, rows, cols, contiguous=False).requires_grad_()
    w = (torch.randn(cols, device=device, dtype=dtype) * 0.5 + 1).requires_grad_(weight_trainable)
    r = torch.randn(rows, cols, device=device, dtype=dtype).requires_grad_() if with_residual else None
    out = rms_norm(x, w, 1e-5, offset=offset, residual=r, impl="triton")
    leaves = [x, r, w] if with_residual else [x, w]
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = rms_norm_reference(ref_leaves[0], ref_leaves[-1], 1e-5, offset=offset,
                             residual=ref_leaves[1] if with_residual else None)
    outs, refs = (out, ref) if with_residual else ((out,), (ref,))
    grads_out = [torch.randn_like(o) for o in outs]
    for o, rf in zip(outs, refs):
        assert rel_err(o, rf) < TOL[dtype]
    want = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad(outs, want, grads_out)
    exp = torch.autograd.grad(refs, [t for t in ref_leaves if t.requires_grad],
                              [g.double() for g in grads_out])
    for a, b in zip(got, exp):
        assert rel_err(a, b) < TOL[dtype]
    if not weight_trainable:
        assert w.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_bf16_output_on_a_float32_stream_keeps_the_stream_float32(device, offset):
    """A float32 model under bf16 autocast (HF Trainer's bf16=True on float32 weights): the attention's bf16
    output is added to a float32 residual stream. HF's `residual + h` is float32, and so is what its norm
    reads; the fused kernel must round neither the new stream nor the normalised rows to bf16 (it rounded
    both: the decoder never sent it mixed dtypes, a direct caller would have lost precision)."""
    torch.manual_seed(2)
    rows, cols = (6, 37) if device == "cpu" else (1023, 4099)
    h = torch.randn(rows, cols, device=device).bfloat16().requires_grad_()
    stream = torch.randn(rows, cols, device=device, requires_grad=True)
    w = torch.randn(cols, device=device) * 0.5 + 1
    y, s = rms_norm(h, w, 1e-5, offset=offset, residual=stream, impl="triton")
    y_ref, s_ref = rms_norm_reference(h, w, 1e-5, offset=offset, residual=stream)
    assert s.dtype == s_ref.dtype == torch.float32 and y.dtype == y_ref.dtype == torch.float32
    assert torch.equal(s, s_ref)  # one exact float32 add
    assert rel_err(y, y_ref) < TOL[torch.float32]
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    got = torch.autograd.grad((y, s), (h, stream), (gy, gs))
    exp = torch.autograd.grad((y_ref, s_ref), (h, stream), (gy, gs))
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert rel_err(got[1], exp[1]) < TOL[torch.float32] and rel_err(got[0], exp[0]) < TOL[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_input_adds_the_inputs_other_gradient_in_the_kernel(device, dtype):
    # (y, x): a decoder layer's input goes to its norm and along the residual stream; the gradient that
    # comes back along the stream is added to the norm's input gradient by the backward kernel
    torch.manual_seed(1)
    rows, cols = (5, 37) if device == "cpu" else (1023, 4099)
    x = _inputs(device, dtype, rows, cols, contiguous=True).requires_grad_()
    w = torch.randn(cols, device=device, dtype=dtype) * 0.5 + 1
    y, same = rms_norm(x, w, 1e-5, with_input=True, impl="triton")
    assert torch.equal(same, x)
    gy, gs = torch.randn_like(y), torch.randn_like(x)
    got = torch.autograd.grad((y, same), x, (gy, gs))[0]
    x64 = x.detach().double().requires_grad_()
    ref = rms_norm_reference(x64, w.double(), 1e-5)
    exp = torch.autograd.grad((ref, x64), x64, (gy.double(), gs.double()))[0]
    assert rel_err(got, exp) < TOL[dtype]
    assert rel_err(rms_norm(x, w, 1e-5, with_input=True)[0], ref) < TOL[dtype]  # the reference path too


def test_frozen_weight_gets_no_gradient_work():
    # the weight-gradient flag is off, so backward returns None for it (no partial-sum buffer)
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.ones(16)
    rms_norm(x, w, impl="triton").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and w.grad is None


def test_cpu_default_is_reference():
    x, w = torch.randn(4, 8), torch.randn(8)
    assert torch.equal(rms_norm(x, w), rms_norm_reference(x, w))


@pytest.mark.gpu
@needs_cuda
def test_int64_indexing_beyond_2_31_elements():
    # 2^31 + 8 * 4096 bf16 elements (4.3 GB): row * stride overflows int32 in the last rows
    cols = 4096
    rows = (1 << 31) // cols + 8
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    y = rms_norm(x, w, impl="triton")
    tail = slice(rows - 16, rows)
    assert rel_err(y[tail], rms_norm_reference(x[tail].double(), w.double())) < TOL[torch.bfloat16]


@pytest.mark.parametrize("offset,module", [(0.0, "LlamaRMSNorm"), (1.0, "GemmaRMSNorm")])
def test_output_dtype_and_rounding_follow_hf(offset, module):
    # bf16 activations through a float32 weight (fp32 master weights under autocast; Qwen3's q/k norms
    # see exactly this): Llama's form returns float32 (weight * x_hat.to(bf16)), Gemma's bf16
    pytest.importorskip("transformers")
    from importlib import import_module

    family = "llama" if offset == 0.0 else "gemma"
    hf_cls = getattr(import_module(f"transformers.models.{family}.modeling_{family}"), module)
    torch.manual_seed(4)
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    hf = hf_cls(40, eps=1e-6)
    with torch.no_grad():
        hf.weight.normal_(0, 0.5)
    want = hf(x)
    got = rms_norm(x, hf.weight.detach(), 1e-6, offset=offset, impl="triton")
    assert got.dtype == want.dtype == (torch.float32 if offset == 0.0 else torch.bfloat16)
    # x_hat is rounded to bf16 in both (Llama) or the output is (Gemma): one bf16 rounding apart at most
    assert rel_err(got, want) < TOL[torch.bfloat16]
    assert rms_norm_reference(x, hf.weight.detach(), 1e-6, offset=offset).dtype == want.dtype


def test_all_zero_rows_stay_finite():
    # padding rows are all zeros: rstd = 1/sqrt(eps), the output and every gradient stay finite (0)
    x = torch.randn(4, 33)
    x[1] = 0.0
    x.requires_grad_()
    w = torch.randn(33, requires_grad=True)
    y = rms_norm(x, w, 1e-6, impl="triton")
    gx, gw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert torch.equal(y[1], torch.zeros(33))
    ref = rms_norm_reference(x.detach().double(), w.detach().double(), 1e-6)
    assert rel_err(y, ref) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_spare_columns_change_no_value(device):
    # spare: y is the first columns of a wider buffer its consumer may fill (the padded MLP's [x | s x A^T]);
    # the values and gradients are those without, whatever the consumer writes there
    torch.manual_seed(2)
    seq, cols, spare = (3, 37, 5) if device == "cpu" else (511, 4096, 32)
    x = torch.randn(2, seq, cols, device=device, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(cols, device=device, dtype=torch.bfloat16) * 0.5 + 1
    y, _ = rms_norm(x, w, 1e-5, with_input=True, spare=spare, impl="triton")
    plain, _ = rms_norm(x, w, 1e-5, with_input=True, impl="triton")
    assert y.stride()[-2:] == (cols + spare, 1) and y._tf_spare_columns == spare
    assert not hasattr(plain, "_tf_spare_columns") and plain.is_contiguous()
    assert torch.equal(y, plain)
    rows = y.numel() // cols  # the consumer's write, as lora_mlp's: over the same memory, not a view of y
    y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), (rows, cols + spare), (cols + spare, 1))[:, cols:] \
        .fill_(3.0)
    assert torch.equal(y, plain)
    gy = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(plain, x, gy)[0])
    # the reference path ignores the hint
    assert torch.equal(rms_norm(x, w, 1e-5, spare=spare, impl="reference"), rms_norm_reference(x, w, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("with_residual", [False, True])
def test_recipe_product_is_the_product_with_the_output(device, dtype, offset, with_residual):
    # g^T y from the norm's input and rstd (an adapter's dA without recomputing y): the float64 product
    # with the reference's y, within the tolerance of a bf16 output
    rows, cols = 37, 70
    torch.manual_seed(1)
    x = torch.randn(rows, cols, device=device, dtype=dtype) * 3
    res = torch.randn(rows, cols, device=device, dtype=dtype) if with_residual else None
    w = torch.randn(cols, device=device, dtype=dtype) * 0.2 + (0.0 if offset else 1.0)
    out = rms_norm(x, w, 1e-5, offset=offset, residual=res, impl="triton")
    y = out[0] if with_residual else out
    recipe = norm_recipe(y)
    g = torch.randn(rows, 5, device=device, dtype=dtype)
    got = recipe.product(g, *recipe.tensors())
    assert got.dtype == torch.float32 and got.shape == (5, cols)
    ref_y = rms_norm_reference(x.double(), w.double(), 1e-5, offset=offset,
                               residual=res.double() if with_residual else None)
    ref_y = ref_y[0] if with_residual else ref_y
    assert rel_err(got, g.double().t() @ ref_y) < TOL[dtype]
    # and the recompute it replaces gives the bit-identical output
    assert torch.equal(recipe.recompute(*recipe.tensors()), y)
    # each product rounded where the casts' form rounds it (bit-identical)
    x2, weight, rstd = recipe.tensors()
    gs = (g.float() * rstd[:, None]).to(g.dtype)
    wf = weight.float() + offset if offset else weight.float()
    assert torch.equal(got, (gs.t() @ x2).float() * wf)
    # unscaled: the product before w, which the caller's cast multiplies by (lora_mlp._cast_grads' scales)
    p, k = recipe.product(g, *recipe.tensors(), scaled=False)
    assert p.dtype == dtype and k.dtype == torch.float32 and torch.equal(p * k, got)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_recipe_product_keeps_a_frozen_weights_float_copy_until_it_changes(offset):
    # the product's float32 (w + offset) is cast once for a frozen weight and made again after an in-place
    # update (its version); a trainable weight's is cast every call
    torch.manual_seed(2)
    x = torch.randn(9, 24, dtype=torch.bfloat16)
    w = torch.randn(24, dtype=torch.bfloat16)
    g = torch.randn(9, 3, dtype=torch.bfloat16)

    def product():
        recipe = norm_recipe(rms_norm(x, w, 1e-5, offset=offset, impl="triton"))
        with count_ops() as ops:
            got = recipe.product(g, *recipe.tensors())
        return got, ops["_to_copy"]

    first, casts = product()
    assert casts == 1
    again, casts = product()
    assert casts == 0 and torch.equal(again, first)
    with torch.no_grad():
        w.mul_(2)
    changed, casts = product()
    assert casts == 1 and not torch.equal(changed, first)
    x2, _, rstd = norm_recipe(rms_norm(x, w, 1e-5, offset=offset, impl="triton")).tensors()
    gs = (g.float() * rstd[:, None]).to(g.dtype)
    assert torch.equal(changed, (gs.t() @ x2).float() * (w.float() + offset))
    w.requires_grad_()
    assert product()[1] == 1 and product()[1] == 1
