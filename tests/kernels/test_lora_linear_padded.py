"""lora_linears over the padded layout (Q/K/V's frozen weights stored with their adapters' spare rows and
columns): the values and gradients of the float64 reference, the rank-r terms carried by the GEMMs (no
pass adds onto an output or onto dx afterwards), an input with spare columns not copied, and the layouts
it must not take for padded."""

from __future__ import annotations

import pytest
import torch

import tuneforge_kernels.lora_linear as lin_mod
import tuneforge_kernels.lora_mlp as mlp_mod
from tuneforge_kernels.lora_linear import lora_linears, lora_linears_reference, pad_linear_weights, padded_linears
from tuneforge_kernels.lora_mlp import LoraWeights
from tests.kernels.conftest import DEVICES, TOL, count_ops, needs_triton, rel_err

pytestmark = needs_triton


def _padded_qkv(hidden, outs, ranks, scales, device, dtype, seed=0):
    torch.manual_seed(seed)
    ws = [(torch.randn(o, hidden) / hidden ** 0.5).to(device, dtype) for o in outs]
    buf = pad_linear_weights(ws, list(ranks))
    parts, start = [], 0
    for o, r, s in zip(outs, ranks, scales):
        a = (torch.randn(r, hidden, device=device) / hidden ** 0.5).requires_grad_()  # fp32 like PEFT
        b = (torch.randn(o, r, device=device) * 0.1).requires_grad_()
        parts.append(LoraWeights(buf[start:start + o, :hidden], a, b, s))
        start += o
    return parts


def _as64(p: LoraWeights):
    return LoraWeights(p.weight.double().contiguous(), p.lora_a.detach().double().requires_grad_(),
                       p.lora_b.detach().double().requires_grad_(), p.scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", [(2.0, 2.0, 2.0), (0.5, 0.75, 1.5)])  # x A^T for the three: 1 GEMM / 3
@pytest.mark.parametrize("one_gemm", [True, False])
@pytest.mark.parametrize("unused", [None, 1])  # an output nobody reads: its gradient arrives as None
def test_padded_matches_reference(monkeypatch, device, dtype, scales, one_gemm, unused):
    monkeypatch.setattr(lin_mod, "PADDED_ONE_GEMM_MAX_HIDDEN", 1 << 30 if one_gemm else 0)
    hidden, outs, ranks, shape = (40, (40, 12, 12), (3, 5, 4), (3, 5)) if device == "cpu" else \
        (4096, (4096, 1024, 1024), (16, 16, 16), (2, 1023))
    projs = _padded_qkv(hidden, outs, ranks, scales, device, dtype)
    assert padded_linears(projs) is not None
    x = torch.randn(*shape, hidden, device=device, dtype=dtype).requires_grad_()
    got_outs = lora_linears(x, *projs, impl="triton")
    p64 = [_as64(p) for p in projs]
    x64 = x.detach().double().requires_grad_()
    refs = lora_linears_reference(x64, *p64)
    for o, r in zip(got_outs, refs):
        assert o.dtype == dtype and rel_err(o, r) < TOL[dtype]
    used = [i for i in range(3) if i != unused]
    leaves = [x] + [t for p in projs for t in (p.lora_a, p.lora_b)]
    leaves64 = [x64] + [t for p in p64 for t in (p.lora_a, p.lora_b)]
    dys = [torch.randn_like(got_outs[i]) for i in used]
    got = torch.autograd.grad([got_outs[i] for i in used], leaves, dys, allow_unused=True)
    exp = torch.autograd.grad([refs[i] for i in used], leaves64, [d.double() for d in dys], allow_unused=True)
    for k, (a, b, leaf) in enumerate(zip(got, exp, leaves)):
        if b is None:  # the unused projection's A and B: no gradient reaches them
            assert k in (1 + 2 * unused, 2 + 2 * unused) and (a is None or not a.any())
            continue
        assert a.dtype == leaf.dtype
        assert rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype])  # as test_lora_linear's


def test_no_pass_adds_onto_an_output_or_dx():
    # unpadded, each adapter's term is added onto its y (addmm_) and K's and V's dx and the terms onto dx;
    # padded, the GEMMs carry every term
    projs = _padded_qkv(16, (16, 8, 8), (2, 3, 4), (2.0,) * 3, "cpu", torch.float32)
    plain = [LoraWeights(p.weight.contiguous(), p.lora_a, p.lora_b, p.scale) for p in projs]
    x = torch.randn(9, 16, requires_grad=True)
    counts = []
    for parts in (projs, plain):
        with count_ops() as n:
            sum(o.sum() for o in lora_linears(x, *parts, impl="triton")).backward()
        counts.append(n["addmm_"])
    assert counts[0] == 0 < counts[1], counts


def test_every_db_comes_from_one_gemm_over_the_gradients():
    # Q, K and V's dB: one matrix product over [dy_q | dy_k | dy_v] and every s x A^T (its diagonal blocks), not
    # one each; with one B frozen, one each for the others
    from tests.kernels.conftest import count_matmuls

    projs = _padded_qkv(16, (16, 8, 8), (2, 3, 4), (2.0, 0.5, 1.5), "cpu", torch.float32)
    x = torch.randn(9, 16, requires_grad=True)
    dys = [torch.randn(9, o) for o in (16, 8, 8)]
    seen = []
    for frozen in (None, 1):
        for i, p in enumerate(projs):
            p.lora_b.requires_grad_(i != frozen)
            p.lora_b.grad = None
        outs = lora_linears(x, *projs, impl="triton")
        with count_matmuls() as n:
            torch.autograd.backward(outs, dys)
        seen.append(n["all"])
        trained = [p.lora_b for p in projs if p.lora_b.requires_grad]
        exp = torch.autograd.grad(lora_linears_reference(x, *projs), trained, dys)
        got = [b.grad for b in trained]
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, exp))
    # dx's, every dA's (one) and the dB's (count_matmuls leaves out the s dy B products, addmm.out here): one
    # where all are wanted, two for two
    assert seen == [3, 4], seen


def test_padded_finds_only_the_layout_for_the_current_ranks():
    q, k, v = _padded_qkv(16, (16, 8, 8), (2, 3, 4), (2.0,) * 3, "cpu", torch.float32)
    assert padded_linears([q, k, v]) is not None
    # an adapter of another rank (set after patching): the spare columns no longer fit
    wider = LoraWeights(k.weight, torch.randn(5, 16), torch.randn(8, 5), 2.0)
    assert padded_linears([q, wider, v]) is None
    # a weight replaced by a tensor of its own; no adapter on one; one A shared; a single projection
    assert padded_linears([q, k, LoraWeights(v.weight.clone(), v.lora_a, v.lora_b, 2.0)]) is None
    assert padded_linears([q, LoraWeights(k.weight), v]) is None
    assert padded_linears([q, LoraWeights(k.weight, q.lora_a, k.lora_b[:, :2], 2.0), v]) is None
    assert padded_linears([q]) is None  # one projection of a three-projection layout is not O's layout
    # and unpadded, the same function over the strided weights
    x = torch.randn(5, 16)
    for o, r in zip(lora_linears(x, q, wider, v, impl="triton"), lora_linears_reference(x, q, wider, v)):
        assert rel_err(o, r) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_projection_matches_reference(device, dtype):
    # attention's O alone in the layout (lora.pad_frozen_o)
    hidden, rank, shape = (40, 3, (3, 5)) if device == "cpu" else (4096, 16, (2, 1023))
    (o,) = _padded_qkv(hidden, (hidden,), (rank,), (2.0,), device, dtype)
    assert padded_linears([o]) is not None
    x = torch.randn(*shape, hidden, device=device, dtype=dtype).requires_grad_()
    (y,) = lora_linears(x, o, impl="triton")
    o64, x64 = _as64(o), x.detach().double().requires_grad_()
    (ref,) = lora_linears_reference(x64, o64)
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, o.lora_a, o.lora_b], dy)
    exp = torch.autograd.grad(ref, [x64, o64.lora_a, o64.lora_b], dy.double())
    for a, b in zip(got, exp):
        assert rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_o_gradient_from_a_norm_with_spare_columns_is_not_copied(monkeypatch, dtype):
    # O's output into the post-attention norm (rms_norm with a residual and grad_spare, the fused decoder
    # layer's): the norm's backward writes dy as the first columns of [dy | s dy B], O's backward fills the
    # rest in place and runs one GEMM for dx, no rank-r pass onto it; the residual gets the same gradient.
    # Without the spare columns dy is copied into a new buffer; the same values either way
    from tuneforge_kernels.rms_norm import rms_norm

    hidden, rank = 24, 3
    (o,) = _padded_qkv(hidden, (hidden,), (rank,), (2.0,), "cpu", dtype)
    sp = padded_linears([o]).shape[0] - hidden
    attn = torch.randn(2, 7, hidden, dtype=dtype, requires_grad=True)
    res = torch.randn(2, 7, hidden, dtype=dtype, requires_grad=True)
    w = torch.randn(hidden, dtype=dtype) * 0.2 + 1
    g_y, g_s = torch.randn(2, 7, hidden, dtype=dtype), torch.randn(2, 7, hidden, dtype=dtype)
    copies, real = [], lin_mod.copy_rows
    for mod in (lin_mod, mlp_mod):  # dy's copy, and the forward's x (lora_mlp.wide_input)
        monkeypatch.setattr(mod, "copy_rows", lambda dst, src, **kw: copies.append(dst.shape) or real(dst, src, **kw))
    results = []
    for grad_spare in (sp, 0):
        copies.clear()
        (y,) = lora_linears(attn, o, impl="triton")
        h, s = rms_norm(y, w, 1e-5, residual=res, grad_spare=grad_spare, impl="triton")
        with count_ops() as n:
            grads = torch.autograd.grad([h, s], [attn, res, o.lora_a, o.lora_b], [g_y, g_s])
        results.append((grads, len(copies), n["addmm_"]))
    assert [(c, a) for _, c, a in results] == [(1, 0), (2, 0)]  # the forward's copy of x; dy's without
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    # and against the unpadded node over the same weights
    plain = LoraWeights(o.weight.contiguous(), o.lora_a, o.lora_b, o.scale)
    (y,) = lora_linears(attn, plain, impl="triton")
    h, s = rms_norm(y, w, 1e-5, residual=res, impl="triton")
    for a, b in zip(results[0][0], torch.autograd.grad([h, s], [attn, res, o.lora_a, o.lora_b], [g_y, g_s])):
        assert rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype])


@pytest.mark.parametrize("held", [True, False])
def test_o_keeps_a_view_of_its_products_where_the_input_buffer_is_held_anyway(held):
    # the attention's output written into O's [x | s x A^T] (hopper_attention.causal's spare), which FA4's node
    # saves for its own backward (held_for_backward): O saves its products as a view of that buffer, no copy;
    # an input nobody is known to hold gets a copy, so that O's saved tensors do not keep (N, H + R) alive
    hidden, rank = 24, 3
    (o,) = _padded_qkv(hidden, (hidden,), (rank,), (2.0,), "cpu", torch.bfloat16)
    sp = padded_linears([o]).shape[0] - hidden
    wide = torch.randn(14, hidden + sp, dtype=torch.bfloat16)
    x = wide[:, :hidden].view(2, 7, hidden).requires_grad_()
    x._tf_spare_columns, x._tf_held_for_backward = sp, held
    with count_ops() as n:
        (y,) = lora_linears(x, o, impl="triton")
    products = y.grad_fn.saved_tensors[0]
    assert (products.untyped_storage().data_ptr() == wide.untyped_storage().data_ptr()) == held
    assert n["clone"] == (not held)
    assert torch.equal(products, wide[:, hidden:hidden + rank])  # s x A^T, where the GEMM wrote it
    ref = lora_linears_reference(x.detach().double(), _as64(o))[0]
    assert rel_err(y, ref) < 2e-2
    grads = torch.autograd.grad(y, [x, o.lora_a, o.lora_b], torch.ones_like(y))
    x64, o64 = x.detach().double().requires_grad_(), _as64(o)
    exp = torch.autograd.grad(lora_linears_reference(x64, o64)[0], [x64, o64.lora_a, o64.lora_b],
                              torch.ones_like(ref))
    assert all(rel_err(a, b) < 2e-2 for a, b in zip(grads, exp))


def test_input_with_spare_columns_is_not_copied(monkeypatch):
    # x from rms_norm(spare=R) (the fused layer's input norm): s x A^T goes into those columns; only the
    # three dy are copied (into [dq | dk | dv | s dy B]); without them x is copied in too
    from tuneforge_kernels.rms_norm import rms_norm

    ranks = (2, 3, 4)
    projs = _padded_qkv(24, (24, 8, 8), ranks, (2.0,) * 3, "cpu", torch.bfloat16)
    h = torch.randn(2, 7, 24, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(24, dtype=torch.bfloat16) * 0.2 + 1
    copies, real = [], lin_mod.copy_rows
    for mod in (lin_mod, mlp_mod):  # the dy copies, and x's (lora_mlp.wide_input)
        monkeypatch.setattr(mod, "copy_rows", lambda dst, src, **kw: copies.append(dst.shape) or real(dst, src, **kw))
    results = []
    for spare in (sum(ranks), 0):
        copies.clear()
        x = rms_norm(h, w, 1e-5, spare=spare, impl="triton")
        outs = lora_linears(x, *projs, impl="triton")
        grads = torch.autograd.grad(outs, [h, *(p.lora_a for p in projs), projs[2].lora_b],
                                    [torch.ones_like(o) for o in outs])
        results.append((outs, grads, len(copies)))
    assert [n for *_, n in results] == [3, 4]
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert mlp_mod.spare_columns(rms_norm(h, w, 1e-5, spare=9, impl="triton")) == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norm_outputs_adapters_read_its_input_not_a_recompute(monkeypatch, dtype):
    # x from rms_norm: the backward's every dA from the norm's input and rstd (NormRecipe.product), no norm
    # forward run again; the dA's those of the same x given as a plain tensor
    import tuneforge_kernels.rms_norm as norm_mod

    projs = _padded_qkv(24, (24, 8, 8), (2, 3, 4), (2.0,) * 3, "cpu", dtype)
    h = torch.randn(2, 7, 24, dtype=dtype)
    w = torch.randn(24, dtype=dtype) * 0.2 + 1
    launches, real = [], norm_mod._fwd_launch
    monkeypatch.setattr(norm_mod, "_fwd_launch", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    x = norm_mod.rms_norm(h, w, 1e-5, spare=9, impl="triton")
    plain = x.detach().clone()
    grads = []
    for inp in (x, plain):
        outs = lora_linears(inp, *projs, impl="triton")
        launches.clear()
        grads.append(torch.autograd.grad(outs, [p.lora_a for p in projs], [torch.ones_like(o) for o in outs]))
        assert launches == []
    for a, b in zip(*grads):
        assert rel_err(a, b) < TOL[dtype]
    # the norm's weight multiplies every dA in the gradients' cast: bit for bit the product's own multiply
    monkeypatch.setattr(lin_mod, "_saved_input_product", lambda ctx, saved, g: (ctx.recipe.product(g, *saved), None))
    outs = lora_linears(x, *projs, impl="triton")
    multiplied = torch.autograd.grad(outs, [p.lora_a for p in projs], [torch.ones_like(o) for o in outs])
    assert all(torch.equal(a, b) for a, b in zip(multiplied, grads[0]))
