"""lora_mlp over the padded layout (frozen weights stored with the adapters' r spare rows and columns):
the values and gradients of the float64 reference, the rank-r terms carried by the GEMMs (the activation
kernel gets none, nothing adds onto an output afterwards), and the layouts it must not take for padded."""

from __future__ import annotations

import pytest
import torch

import tuneforge_kernels.lora_mlp as mlp_mod
from tuneforge_kernels import gated_gemm, lora_glu
from tuneforge_kernels.lora_mlp import (LoraWeights, gate_up_rows, interleaved, lora_mlp, lora_mlp_reference,
                                        pad_weights, padded)
from tests.kernels.conftest import DEVICES, TOL, count_ops, needs_triton, rel_err

pytestmark = needs_triton


def _padded_parts(hidden, inter, ranks, scales, device, dtype, seed=0, interleave=False):
    torch.manual_seed(seed)
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    ws = [(torch.randn(o, i) / i ** 0.5).to(device, dtype) for o, i in shapes]
    gu, d = pad_weights(*ws, ranks, interleave=interleave)
    gate_rows, up_rows = gate_up_rows(inter, interleave)
    views = (gu[gate_rows, :hidden], gu[up_rows, :hidden], d[:hidden, :inter])
    parts = []
    for w, r, s, (o, i) in zip(views, ranks, scales, shapes):
        a = (torch.randn(r, i, device=device) / i ** 0.5).requires_grad_()  # fp32 like PEFT
        b = (torch.randn(o, r, device=device) * 0.1).requires_grad_()
        parts.append(LoraWeights(w, a, b, s))
    return parts


def _as64(p: LoraWeights):
    return LoraWeights(p.weight.double().contiguous(), p.lora_a.detach().double().requires_grad_(),
                       p.lora_b.detach().double().requires_grad_(), p.scale)


def _spy_glu(monkeypatch):
    """The keyword arguments lora_mlp passes to the activation kernels, forward and backward."""
    calls = []
    for name in ("lora_glu_forward", "lora_glu_backward_inplace"):
        real = getattr(lora_glu, name)
        monkeypatch.setattr(lora_glu, name, lambda *a, _real=real, **kw: calls.append(kw) or _real(*a, **kw))
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", [(2.0, 2.0, 2.0), (0.5, 0.75, 1.5)])  # x A^T for gate and up: 1 GEMM / 2
@pytest.mark.parametrize("one_gemm", [True, False])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("carries", [True, False])
def test_padded_matches_reference(monkeypatch, device, dtype, scales, one_gemm, residual, carries):
    # one_gemm: gate and up by one GEMM over both weights (small models) or one each; carries: the input
    # gradient's GEMM gives the rank-r products too (DX_CARRIES_PRODUCTS), or they come first
    monkeypatch.setattr(mlp_mod, "PADDED_ONE_GEMM_MAX_HIDDEN", 1 << 30 if one_gemm else 0)
    monkeypatch.setattr(mlp_mod, "DX_CARRIES_PRODUCTS", carries)
    hidden, inter, ranks, shape = (24, 52, (3, 5, 4), (2, 7)) if device == "cpu" else \
        (4096, 14336, (16, 16, 16), (2, 1023))
    gate, up, down = _padded_parts(hidden, inter, ranks, scales, device, dtype)
    assert padded(gate, up, down) is not None
    x = torch.randn(*shape, hidden, device=device, dtype=dtype).requires_grad_()
    res = torch.randn(*shape, hidden, device=device, dtype=dtype) if residual else None
    calls = _spy_glu(monkeypatch)
    _assert_matches_float64(x, (gate, up, down), dtype, res)
    # the activation kernels computed no rank-r term: the GEMMs carried them all
    assert len(calls) == 2 and not any(kw.get("xa_g") is not None or kw.get("dy_b") is not None for kw in calls)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", [(2.0, 2.0, 2.0), (0.5, 0.75, 1.5)])  # s dg B_g | s du B_u: 1 GEMM / 2
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("carries", [True, False])
def test_interleaved_matches_reference(monkeypatch, device, dtype, scales, residual, carries):
    # gate and up rows interleaved (gated_gemm.py's layout): the SwiGLU inside the GEMMs' epilogues (QuACK on
    # a Hopper GPU, its float32 reference on the CPU), no lora_glu pass; the same function and gradients
    monkeypatch.setattr(mlp_mod, "DX_CARRIES_PRODUCTS", carries)
    if device == "cuda" and gated_gemm.unavailable(torch.device("cuda"), "silu", torch.bfloat16) is not None:
        pytest.skip(gated_gemm.unavailable(torch.device("cuda"), "silu", torch.bfloat16))
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the fused epilogues take bf16 (the patcher interleaves only then)")
    hidden, inter, ranks, shape = (24, 52, (3, 5, 4), (2, 7)) if device == "cpu" else \
        (4096, 14336, (16, 16, 16), (2, 1023))
    gate, up, down = _padded_parts(hidden, inter, ranks, scales, device, dtype, interleave=True)
    assert padded(gate, up, down) is not None and interleaved(gate, up)
    assert not interleaved(*_padded_parts(hidden, inter, ranks, scales, device, dtype)[:2])
    glu_calls = _spy_glu(monkeypatch)
    fused = []
    for name in ("gated_forward", "gated_backward"):
        real = getattr(gated_gemm, name)
        monkeypatch.setattr(gated_gemm, name, lambda *a, _real=real, _n=name, **kw: fused.append(_n) or _real(*a, **kw))
    x = torch.randn(*shape, hidden, device=device, dtype=dtype).requires_grad_()
    res = torch.randn(*shape, hidden, device=device, dtype=dtype) if residual else None
    _assert_matches_float64(x, (gate, up, down), dtype, res)
    assert fused == ["gated_forward", "gated_backward"] and not glu_calls
    # a replaced weight undoes the layout, as for the concatenated one
    assert padded(gate, up, LoraWeights(down.weight.clone(), down.lora_a, down.lora_b, 2.0)) is None


def test_gated_gemm_reference_is_lora_glu():
    # the epilogues' float32 reference against lora_glu's over the same interleaved preact
    torch.manual_seed(0)
    n, k, i = 11, 20, 36
    xa, w, dya, w_d = torch.randn(n, k), torch.randn(2 * i, k), torch.randn(n, k), torch.randn(k, i)
    pre, h = torch.empty(n, 2 * i), torch.empty(n, i)
    gated_gemm.gated_forward(xa, w, pre, h, impl="reference")
    assert torch.allclose(pre, xa @ w.t(), atol=1e-5)
    g, u = pre[:, 0::2].contiguous(), pre[:, 1::2].contiguous()
    assert torch.allclose(h, lora_glu.lora_glu_reference(g, u, "silu"), atol=1e-5)
    dgu, h2 = torch.empty(n, 2 * i), torch.empty(n, i)
    gated_gemm.gated_backward(dya, w_d, pre, dgu, h2, impl="reference")
    dh = dya @ w_d
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    dg, du = torch.autograd.grad(lora_glu.lora_glu_reference(g64, u64, "silu"), (g64, u64), dh.double())
    assert torch.allclose(dgu[:, 0::2], dg.float(), atol=1e-4) and torch.allclose(dgu[:, 1::2], du.float(), atol=1e-4)
    assert torch.allclose(h2, h, atol=1e-5)
    # in place over the preact, as the padded MLP calls it
    gated_gemm.gated_backward(dya, w_d, pre, pre, h2, impl="reference")
    assert torch.equal(pre, dgu)
    with pytest.raises(ValueError, match="impl"):
        gated_gemm.gated_forward(xa, w, pre, h, impl="triton")


def _assert_matches_float64(x, parts, dtype, residual=None):
    """lora_mlp's output and every gradient (x's, each A's and B's) against the float64 reference."""
    out = lora_mlp(x, *parts, "silu", impl="triton", residual=residual)
    p64 = [_as64(p) for p in parts]
    x64 = x.detach().double().requires_grad_()
    ref = lora_mlp_reference(x64, *p64, "silu")
    if residual is not None:
        ref = ref + residual.double()
    assert rel_err(out, ref) < TOL[dtype]
    leaves = [x] + [t for p in parts for t in (p.lora_a, p.lora_b)]
    leaves64 = [x64] + [t for p in p64 for t in (p.lora_a, p.lora_b)]
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dy)
    exp = torch.autograd.grad(ref, leaves64, dy.double())
    for a, b, leaf in zip(got, exp, leaves):
        assert a.dtype == leaf.dtype
        assert rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype])  # as test_lora_mlp's bound


@pytest.mark.parametrize("interleave", [False, True])
def test_no_pass_adds_onto_an_output(monkeypatch, interleave):
    # unpadded, the down projection's term is added onto y and the adapters' input-gradient terms onto dx
    # (addmm_ passes over (tokens x hidden)); padded, none onto y. The input gradient: with
    # DX_CARRIES_PRODUCTS one GEMM reads [dg | du] for dx and the rank-r products, and one addmm_ adds their
    # term onto dx; else the products' GEMM reads [dg | du] first and the input gradient's GEMM carries the term
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, inter, ranks = 16, 40, (2, 3, 4)
    gate, up, down = _padded_parts(hidden, inter, ranks, (2.0,) * 3, "cpu", torch.float32, interleave=interleave)
    plain = [LoraWeights(p.weight.contiguous(), p.lora_a, p.lora_b, p.scale) for p in (gate, up, down)]
    x = torch.randn(9, hidden, requires_grad=True)
    products = (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
                torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default)

    class WideReads(TorchDispatchMode):  # the matrix products reading dg, du or both (I or more of gu's columns)
        count, storage = 0, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products:
                mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
                self.count += any(max(m.shape) >= inter and m.untyped_storage().data_ptr() == self.storage
                                  for m in mats)
            return func(*args, **(kwargs or {}))

    seen = {}
    for name, parts, carries in (("carries", (gate, up, down), True), ("first", (gate, up, down), False),
                                 ("plain", plain, True)):
        monkeypatch.setattr(mlp_mod, "DX_CARRIES_PRODUCTS", carries)
        y = lora_mlp(x, *parts, impl="triton")
        wide = WideReads()
        wide.storage = y.grad_fn.saved_tensors[0].untyped_storage().data_ptr()  # gu: [g | u | spare], then [dg | du ..]
        with count_ops() as n, wide:
            y.sum().backward()
        seen[name] = n["addmm_"], wide.count
    # [dg | du] read by dx's GEMM (with the products, or after them), dB's (one GEMM over both interleaved,
    # one each else) and, first, the products' (the same)
    per_half = 1 if interleave else 2
    assert seen["carries"] == (1, 1 + per_half) and seen["first"] == (0, per_half + 1 + per_half), seen
    assert seen["plain"][0] > 1, seen


def test_rank_r_products_are_saved_apart_in_one_launch(monkeypatch):
    # the forward keeps s x A^T and s h A_d^T for the backward out of their wide buffers (x's and h's), both
    # copied by one cast_blocks launch into one small buffer: no clone of each
    gate, up, down = _padded_parts(16, 40, (2, 3, 4), (2.0,) * 3, "cpu", torch.bfloat16)
    calls, real = [], mlp_mod.cast_blocks
    monkeypatch.setattr(mlp_mod, "cast_blocks", lambda pairs, impl=None, **kw: (
        calls.append([(d.shape, d.dtype, s.dtype) for d, s in pairs]), real(pairs, impl=impl, **kw)))
    x = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    with count_ops() as n:
        y = lora_mlp(x, gate, up, down, impl="triton")
    assert n["clone"] == 0, n
    assert calls[-1] == [((9, 5), torch.bfloat16, torch.bfloat16), ((9, 4), torch.bfloat16, torch.bfloat16)]
    _, xa, xa_d, *_ = y.grad_fn.saved_tensors
    assert xa.shape == (9, 5) and xa_d.shape == (9, 4) and xa.is_contiguous() and xa_d.is_contiguous()
    assert xa.untyped_storage().nbytes() == (9 * 5 + 9 * 4) * 2  # not a view of the (N, H + R) buffer
    s_x_a = 2.0 * x.detach() @ torch.cat([gate.lora_a, up.lora_a]).detach().to(torch.bfloat16).t()
    assert rel_err(xa, s_x_a) < 1e-2


@pytest.mark.parametrize("interleave", [False, True])
def test_carried_products_are_read_where_the_gemm_left_them(interleave):
    # with DX_CARRIES_PRODUCTS, dx's GEMM gives [dgu W | s dg B_g | s du B_u | 0]: the products' term of dx and
    # dA_g, dA_u read them in that output, with no copy into gu's spare columns (a launch a layer); the values
    # are test_padded_matches_reference's and test_interleaved_matches_reference's
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, inter = 16, 40
    gate, up, down = _padded_parts(hidden, inter, (2, 3, 4), (2.0, 0.5, 1.0), "cpu", torch.float32,
                                   interleave=interleave)
    x = torch.randn(9, hidden, requires_grad=True)
    y = lora_mlp(x, gate, up, down, impl="triton")
    gu = y.grad_fn.saved_tensors[0]  # [g | u | spare], then [dg | du | spare]

    class SpareWrites(TorchDispatchMode):  # copies into gu's columns from 2I on
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dst = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if func is torch.ops.aten.copy_.default and dst.dim() == 2 \
                    and dst.untyped_storage().data_ptr() == gu.untyped_storage().data_ptr():
                self.count += (dst.storage_offset() - gu.storage_offset()) % gu.stride(0) >= 2 * inter
            return func(*args, **(kwargs or {}))

    with SpareWrites() as spare:
        y.backward(torch.randn_like(y))
    assert spare.count == 0
    assert all(p.lora_a.grad is not None and p.lora_b.grad is not None for p in (gate, up, down))


def test_padded_finds_only_the_layout_for_the_current_ranks():
    hidden, inter, ranks = 16, 40, (2, 3, 4)
    gate, up, down = _padded_parts(hidden, inter, ranks, (2.0,) * 3, "cpu", torch.float32)
    assert padded(gate, up, down) is not None
    # an adapter of another rank (a new adapter set after patching): the spare columns no longer fit
    wider = LoraWeights(up.weight, torch.randn(4, hidden), torch.randn(inter, 4), 2.0)
    assert padded(gate, wider, down) is None
    # a weight replaced by a tensor of its own (a safe merge, .to()): no buffer holds all three
    assert padded(gate, up, LoraWeights(down.weight.clone(), down.lora_a, down.lora_b, 2.0)) is None
    # gate and up sharing one A (Phi-3's split gate_up_proj)
    assert padded(gate, LoraWeights(up.weight, gate.lora_a, up.lora_b[:, :2], 2.0), down) is None
    # no adapter on one of them
    assert padded(gate, up, LoraWeights(down.weight)) is None
    # and unpadded, the MLP still computes the same function over the strided weights
    x = torch.randn(5, hidden)
    ref = lora_mlp_reference(x, gate, wider, down)
    assert rel_err(lora_mlp(x, gate, wider, down, impl="triton"), ref) < 1e-5


def test_output_unused_runs_unpadded(monkeypatch):
    # a checkpointed layer's recompute (deferred MLP) keeps its own path over the padded weights
    gate, up, down = _padded_parts(16, 40, (2, 3, 4), (2.0,) * 3, "cpu", torch.float32)
    calls = _spy_glu(monkeypatch)
    x = torch.randn(9, 16, requires_grad=True)
    lora_mlp(x, gate, up, down, impl="triton", output_unused=True).sum().backward()
    assert calls[-1].get("xa_g") is not None  # the backward's kernel adds the gate's term itself


@pytest.mark.parametrize("device", DEVICES)
def test_input_with_spare_columns_is_not_copied(monkeypatch, device):
    # x from rms_norm(spare=the layout's spare columns) (the fused layer's post-attention norm): the MLP
    # writes s x A^T into those columns and copies only dy; an x without them (or with the wrong count) is
    # copied in
    from tuneforge_kernels.rms_norm import rms_norm

    hidden, inter, ranks = (24, 52, (3, 5, 4)) if device == "cpu" else (2048, 8192, (16, 16, 16))
    gate, up, down = _padded_parts(hidden, inter, ranks, (2.0, 2.0, 2.0), device, torch.bfloat16)
    h = torch.randn(2, 9, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device=device, dtype=torch.bfloat16) * 0.2 + 1
    copies = []
    real = mlp_mod.copy_rows
    monkeypatch.setattr(mlp_mod, "copy_rows", lambda dst, src, **kw: copies.append(dst.shape) or real(dst, src, **kw))
    results = []
    # the layout's spare columns: r_g + r_u, rounded up to PAD_ALIGN at the GPU's shapes
    for spare in (mlp_mod.spare_width(ranks[0] + ranks[1], hidden, inter), 0, 1):
        copies.clear()
        x = rms_norm(h, w, 1e-5, spare=spare, impl="triton")
        out = lora_mlp(x, gate, up, down, "silu", impl="triton")
        grads = torch.autograd.grad(out, [h, gate.lora_a, up.lora_b, down.lora_a], torch.ones_like(out))
        results.append((out, grads, len(copies)))
    assert [n for *_, n in results] == [1, 2, 2]  # dy only, then x and dy
    for out, grads, _ in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


def test_unpadded_paths_take_an_input_with_spare_columns():
    # the norm still leaves spare columns after an adapter of another rank undid the padded layout: the
    # unpadded MLP and Q/K/V read the row-strided input as they read any other
    from tuneforge_kernels.lora_linear import lora_linears, lora_linears_reference
    from tuneforge_kernels.rms_norm import rms_norm

    gate, up, down = _padded_parts(24, 52, (3, 5, 4), (2.0,) * 3, "cpu", torch.float32)
    plain = [LoraWeights(p.weight.contiguous(), p.lora_a, p.lora_b, p.scale) for p in (gate, up, down)]
    h = torch.randn(2, 5, 24, requires_grad=True)
    w = torch.randn(24) * 0.2 + 1
    x = rms_norm(h, w, 1e-5, spare=7, impl="triton")
    assert not x.is_contiguous()
    ref_x = x.detach().contiguous().requires_grad_()
    out, ref = lora_mlp(x, *plain, impl="triton"), lora_mlp_reference(ref_x, *plain)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(torch.autograd.grad(out.sum(), h)[0],
                   torch.autograd.grad(rms_norm(h, w, 1e-5, impl="triton"), h,
                                       torch.autograd.grad(ref.sum(), ref_x)[0])[0]) < 1e-5
    q = lora_linears(x, plain[0], plain[1], impl="triton")
    for a, b in zip(q, lora_linears_reference(x.detach(), plain[0], plain[1])):
        assert rel_err(a, b) < 1e-5


# PAD_ALIGN, shapes, dtype: on the CPU 16 over small multiples of it; on a GPU 64 at the 8B shapes
ALIGNED = {"cpu": (16, 32, 48, (3, 5, 4), torch.float32), "cuda": (64, 4096, 14336, (16, 16, 16), torch.bfloat16)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales", [(2.0, 2.0, 2.0), (0.5, 0.75, 1.5)])
@pytest.mark.parametrize("one_gemm", [True, False])
def test_aligned_spare_columns_are_zeros_whatever_the_buffers_held(monkeypatch, nan_allocations, device, scales,
                                                                    one_gemm):
    # PAD_ALIGN rounds the spare columns up where H and I are multiples of it (ranks 3 + 5 and 4 get 16 spare
    # columns each at align 16, 16 + 16 and 16 get 64 at 64), the last ones zeros in the weights and written as
    # zeros in every activation buffer (allocations here are NaN until written), so the GEMMs' sums stay those
    # of the reference
    align, hidden, inter, ranks, dtype = ALIGNED[device]
    monkeypatch.setattr(mlp_mod, "PAD_ALIGN", align)
    monkeypatch.setattr(mlp_mod, "PADDED_ONE_GEMM_MAX_HIDDEN", 1 << 30 if one_gemm else 0)
    gate, up, down = _padded_parts(hidden, inter, ranks, scales, device, dtype)
    gu_w, d_w = padded(gate, up, down)
    r, rd = ranks[0] + ranks[1], ranks[2]
    assert gu_w.shape == (2 * inter + align, hidden + align) and d_w.shape == (hidden + align, inter + align)
    assert not gu_w[:, hidden + r:].any() and not gu_w[2 * inter + r:].any()
    assert not d_w[:, inter + rd:].any() and not d_w[hidden + rd:].any()
    assert mlp_mod.spare_width(r, hidden + align // 2, inter) == r  # H not a multiple: the ranks' columns
    x = torch.randn(3, 5 if device == "cpu" else 683, hidden, device=device, dtype=dtype, requires_grad=True)
    _assert_matches_float64(x, (gate, up, down), dtype)


def test_trial_run_answers_why_the_epilogues_cannot_serve(monkeypatch):
    # the patcher's check before it interleaves: QuACK's kernels (here stand-ins on the CPU) once, in the
    # padded layout's shapes, against the float32 reference
    def epilogues(forward, backward):
        gated_gemm.trial.cache_clear()
        monkeypatch.setattr(gated_gemm, "_quack", lambda: (forward, backward, None))
        return gated_gemm.trial(torch.device("cpu"), "silu", 64, 128, 64, 64)

    def right_forward(xa, w_t, activation, preact_out, postact_out, **kw):
        gated_gemm.gated_forward(xa, w_t.t(), preact_out, postact_out, impl="reference")

    def right_backward(dya, w_d, preact, activation, dx_out, postact_out, **kw):
        gated_gemm.gated_backward(dya, w_d, preact, dx_out, postact_out, impl="reference")

    def wrong_backward(dya, w_d, preact, activation, dx_out, postact_out, **kw):
        right_backward(dya, w_d, preact, activation, dx_out, postact_out)
        dx_out.mul_(2)  # a wrong dg, du

    def failing(*a, **kw):
        raise RuntimeError("no fail-closed semantic key\nmore")

    assert epilogues(right_forward, right_backward) is None
    assert "failed a trial run (RuntimeError: no fail-closed semantic key)" in epilogues(failing, right_backward)
    assert "disagreed with the reference in a trial run (dg/du" in epilogues(right_forward, wrong_backward)

    def silent(*a, **kw):
        raise RuntimeError()

    assert "failed a trial run (RuntimeError: )" in epilogues(right_forward, silent)
    gated_gemm.trial.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norm_outputs_adapters_read_its_input_not_a_recompute(monkeypatch, dtype):
    # x from rms_norm: dA_g, dA_u from the norm's input and rstd (NormRecipe.product), no norm forward run
    # again; the dA's those of the same x given as a plain tensor
    import tuneforge_kernels.rms_norm as norm_mod

    gate, up, down = _padded_parts(24, 52, (3, 5, 4), (2.0, 2.0, 2.0), "cpu", dtype)
    real_product = mlp_mod._saved_input_product
    h = torch.randn(2, 7, 24, dtype=dtype)
    w = torch.randn(24, dtype=dtype) * 0.2 + 1
    launches, real = [], norm_mod._fwd_launch
    monkeypatch.setattr(norm_mod, "_fwd_launch", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    x = norm_mod.rms_norm(h, w, 1e-5, impl="triton")
    grads = []
    for inp in (x, x.detach().clone()):
        out = lora_mlp(inp, gate, up, down, "silu", impl="triton")
        launches.clear()
        grads.append(torch.autograd.grad(out, [gate.lora_a, up.lora_a], torch.ones_like(out)))
        assert launches == []
    for a, b in zip(*grads):
        assert rel_err(a, b) < TOL[dtype]
    # the norm's weight multiplies dA_g, dA_u in the gradients' cast: bit for bit the product's own multiply
    monkeypatch.setattr(mlp_mod, "_saved_input_product", lambda ctx, saved, g: (
        (ctx.recipe.product(g, *saved), None) if ctx.recipe is not None else real_product(ctx, saved, g)))
    out = lora_mlp(x, gate, up, down, "silu", impl="triton")
    multiplied = torch.autograd.grad(out, [gate.lora_a, up.lora_a], torch.ones_like(out))
    assert all(torch.equal(a, b) for a, b in zip(multiplied, grads[0]))
