"""lora_linears (fused Q/K/V or O LoRA projections, hand-derived backward) against plain autograd in
float64."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.lora_linear import lora_linears, lora_linears_reference, pad_linear_weights, padded_linears
from tuneforge_kernels.lora_mlp import LoraWeights
from tests.kernels.conftest import (DEVICES, TOL, count_matmuls, count_ops, join_weights, needs_triton,
                                    record_copy_rows, rel_err)


def _proj(out_f, in_f, rank, device, dtype, with_lora=True, scale=2.0, bias=False):
    w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f ** 0.5
    b0 = torch.randn(out_f, device=device, dtype=dtype) if bias else None  # frozen, as Qwen2's q/k/v
    if not with_lora:
        return LoraWeights(w, bias=b0)
    a = (torch.randn(rank, in_f, device=device) / in_f ** 0.5).requires_grad_()
    b = (torch.randn(out_f, rank, device=device) * 0.1).requires_grad_()
    return LoraWeights(w, a, b, scale, bias=b0)


def _as64(p):
    bias = p.bias.double() if p.bias is not None else None
    if p.lora_a is None:
        return LoraWeights(p.weight.double(), bias=bias)
    return LoraWeights(p.weight.double(), p.lora_a.detach().double().requires_grad_(),
                       p.lora_b.detach().double().requires_grad_(), p.scale, p.dropout, bias=bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["qkv", "qkv_partial", "qkv_joined", "o", "qkv_bias", "qkv_joined_bias"])
def test_matches_reference(device, dtype, layout):
    # joined: the three base weights in one buffer (the patcher's layout for small models); bias: frozen
    # biases on q and v (and k without one), as Qwen2's
    torch.manual_seed(0)
    hidden, kv, rank, shape = (40, 12, 4, (3, 5)) if device == "cpu" else (4096, 1024, 16, (2, 1023))
    x = torch.randn(*shape, hidden, device=device, dtype=dtype).requires_grad_()
    if layout == "o":
        projs = [_proj(hidden, hidden, rank, device, dtype)]
    else:  # partial: K without an adapter, different scales
        bias = layout.endswith("bias")
        projs = [_proj(hidden, hidden, rank, device, dtype, scale=0.5, bias=bias),
                 _proj(kv, hidden, rank, device, dtype, with_lora=layout != "qkv_partial"),
                 _proj(kv, hidden, rank, device, dtype, bias=bias)]
    if layout.startswith("qkv_joined"):
        projs = join_weights(*projs)
    _assert_matches_float64(x, projs, dtype)


def _assert_matches_float64(x, projs, dtype):
    """lora_linears' outputs and every gradient (x's, each A's and B's) against the float64 reference."""
    outs = lora_linears(x, *projs, impl="triton")
    p64 = [_as64(p) for p in projs]
    x64 = x.detach().double().requires_grad_()
    refs = lora_linears_reference(x64, *p64)
    for o, r in zip(outs, refs):
        assert rel_err(o, r) < TOL[dtype]
    leaves = [x] + [t for p in projs for t in (p.lora_a, p.lora_b) if t is not None]
    leaves64 = [x64] + [t for p in p64 for t in (p.lora_a, p.lora_b) if t is not None]
    dys = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, leaves, dys)
    exp = torch.autograd.grad(refs, leaves64, [d.double() for d in dys])
    for a, b, leaf in zip(got, exp, leaves):
        assert a.dtype == leaf.dtype
        # bf16: products of bf16-rounded operands reduced over thousands of terms (as lora_mlp): 2e-2
        assert rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype])


def test_joined_weights_take_one_gemm_each_way():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, requires_grad=True)
    projs = [_proj(8, 8, 2, "cpu", torch.float32), _proj(4, 8, 2, "cpu", torch.float32),
             _proj(4, 8, 2, "cpu", torch.float32)]
    counts = []
    for ps in (projs, join_weights(*projs)):
        with count_matmuls() as n:
            outs = lora_linears(x, *ps, impl="triton")
            torch.autograd.grad(outs, [x], [torch.ones_like(o) for o in outs])
        counts.append(n["big"])
    assert counts[0] - counts[1] == 4, counts  # three base GEMMs each way, or one
    # the outputs are the column blocks of one product
    assert outs[1].data_ptr() == outs[0].data_ptr() + 8 * outs[0].element_size()


def test_adapters_are_cast_once_and_x_read_once_for_their_gradients(monkeypatch):
    # float32 adapters, bf16 compute (autocast's case): the six adapter weights of Q/K/V are cast in one
    # launch each way (not one per tensor), the three dA come from one GEMM over x and the three rank-r
    # dx terms from one pass over dx
    import tuneforge_kernels.lora_mlp as mlp

    casts = []
    real = mlp.cast_blocks
    monkeypatch.setattr(mlp, "cast_blocks", lambda pairs, impl=None, **kw: (casts.append(len(pairs)),
                                                                             real(pairs, impl=impl, **kw)))
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    projs = [_proj(8, 8, 2, "cpu", torch.bfloat16), _proj(4, 8, 2, "cpu", torch.bfloat16),
             _proj(4, 8, 2, "cpu", torch.bfloat16)]
    with count_ops() as fwd:
        outs = lora_linears(x, *projs, impl="triton")
    leaves = [x] + [t for p in projs for t in (p.lora_a, p.lora_b)]
    with count_ops() as bwd, count_matmuls([x]) as mm:
        grads = torch.autograd.grad(outs, leaves, [torch.randn_like(o) for o in outs])
    assert fwd["_to_copy"] == 0 and bwd["_to_copy"] == 0 and casts == [6, 6], (fwd, bwd, casts)
    assert all(g.dtype == torch.float32 for g in grads[1:])
    assert mm["reading"] == 1, mm  # d_b^T x for all three dA (the old code: one per projection)
    assert bwd["addmm_"] == 3 - 1 + 1, bwd  # dx: two base terms added onto the first, one rank-r pass
    p64 = [_as64(p) for p in projs]
    x64 = x.detach().double().requires_grad_()
    refs = lora_linears_reference(x64, *p64)
    dys = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(lora_linears(x, *projs, impl="triton"), leaves, dys)
    exp = torch.autograd.grad(refs, [x64] + [t for p in p64 for t in (p.lora_a, p.lora_b)],
                              [d.double() for d in dys])
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("join", [False, True])
def test_unused_output_gets_no_gradient_work(join):
    # only q's output is used: k/v adapters get zero-free None grads, x's grad only from q
    torch.manual_seed(1)
    x = torch.randn(4, 8, requires_grad=True)
    q, k, v = (_proj(8, 8, 2, "cpu", torch.float32) for _ in range(3))
    if join:  # the one-GEMM backward needs every output's gradient: here it takes q's alone
        q, k, v = join_weights(q, k, v)
    outs = lora_linears(x, q, k, v, impl="triton")
    outs[0].sum().backward()
    (ref_q,) = lora_linears_reference(x, q)
    gx = torch.autograd.grad(ref_q.sum(), x)[0]
    assert rel_err(x.grad, gx) < 1e-5 and k.lora_a.grad is None and v.lora_b.grad is None


@pytest.mark.parametrize("consumer", ["linears", "mlp"])
def test_norm_output_is_recomputed_not_saved(consumer):
    # rms_norm -> LoRA projections: the projections keep the norm's input (already kept by the norm),
    # not its output, and still produce the reference gradients
    from tuneforge_kernels.lora_mlp import lora_mlp, lora_mlp_reference
    from tuneforge_kernels.rms_norm import rms_norm, rms_norm_reference

    torch.manual_seed(3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(16) * 0.3 + 1
    if consumer == "linears":
        projs = [_proj(16, 16, 2, "cpu", torch.float32), _proj(8, 16, 2, "cpu", torch.float32)]
        fast = lambda h: lora_linears(h, *projs, impl="triton")  # noqa: E731
        slow = lambda h: lora_linears_reference(h, *projs)  # noqa: E731
    else:
        projs = [_proj(24, 16, 2, "cpu", torch.float32), _proj(24, 16, 2, "cpu", torch.float32),
                 _proj(16, 24, 2, "cpu", torch.float32)]
        fast = lambda h: (lora_mlp(h, *projs, impl="triton"),)  # noqa: E731
        slow = lambda h: (lora_mlp_reference(h, *projs),)  # noqa: E731
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        y = rms_norm(x, w, impl="triton")
        outs = fast(y)
    assert y.data_ptr() not in saved and x.data_ptr() in saved
    leaves = [x] + [t for p in projs for t in (p.lora_a, p.lora_b)]
    got = torch.autograd.grad([o.sum() for o in outs], leaves)
    refs = slow(rms_norm_reference(x, w))
    exp = torch.autograd.grad([o.sum() for o in refs], leaves)
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 1e-5


def test_checkpointing_keeps_no_layer_intermediate():
    # under non-reentrant activation checkpointing nothing inside the layer may outlive forward: a
    # tensor held by a ctx attribute instead of save_for_backward would (it did: +2.2 GB at 8B)
    import gc
    import weakref

    from torch.utils.checkpoint import checkpoint

    from tuneforge_kernels.rms_norm import rms_norm

    x = torch.randn(4, 16, requires_grad=True)
    w = torch.ones(16)
    p = _proj(16, 16, 2, "cpu", torch.float32)
    alive = []

    def layer(h):
        h2 = h * 2
        alive.append(weakref.ref(h2))
        return lora_linears(rms_norm(h2, w, impl="triton"), p, impl="triton")[0]

    out = checkpoint(layer, x, use_reentrant=False)
    gc.collect()
    assert alive[0]() is None
    out.sum().backward()
    assert x.grad is not None and p.lora_a.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_outputs_give_the_same_gradients(device):
    """``outputs=`` (an offload recompute that kept the projections' outputs): the given tensors come back
    as the outputs, and every gradient equals the one of the computing path, bit for bit (same kernels on
    the same inputs: backward never reads the outputs)."""
    torch.manual_seed(1)
    hidden, kv, rank = (40, 12, 4) if device == "cpu" else (512, 128, 16)
    projs = [_proj(hidden, hidden, rank, device, torch.float32), _proj(kv, hidden, rank, device, torch.float32,
                                                                     with_lora=False),
             _proj(kv, hidden, rank, device, torch.float32)]
    x = torch.randn(2, 7, hidden, device=device).requires_grad_()
    outs = lora_linears(x, *projs, impl="triton")
    kept = [o.detach().clone() for o in outs]
    replayed = lora_linears(x, *projs, impl="triton", outputs=kept)
    assert all(r is k for r, k in zip(replayed, kept)) and all(r.requires_grad for r in replayed)
    leaves = [x] + [t for p in projs for t in (p.lora_a, p.lora_b) if t is not None]
    dys = [torch.randn_like(o) for o in outs]
    for a, b in zip(torch.autograd.grad(outs, leaves, dys), torch.autograd.grad(replayed, leaves, dys)):
        assert torch.equal(a, b)


def test_replayed_outputs_must_match_the_projections():
    p = _proj(8, 6, 2, "cpu", torch.float32)
    x = torch.randn(3, 6)
    with pytest.raises(AssertionError):
        lora_linears(x, p, impl="triton", outputs=[torch.randn(3, 7)])


# Strided inputs (as test_lora_mlp.py's): ``sliced`` the first H columns of a wider tensor (x as (N, H) a
# view with row stride H + 5, read in place), ``transposed`` an (S, B, H) tensor transposed (flattening
# copies). Gradients are taken at the tensor x is a view of.
STRIDES = {"sliced": (lambda b, s, h: (b, s, h + 5), lambda t, h: t[..., 2:2 + h]),
           "transposed": (lambda b, s, h: (s, b, h), lambda t, h: t.transpose(0, 1))}
LAYOUTS_STRIDED = ["separate", "joined", "padded", "dropout", "bias"]


def _qkv_for(layout, hidden, kv, rank, device):
    if layout == "padded":  # the three frozen weights as row blocks of pad_linear_weights' buffer
        ws = [torch.randn(o, hidden, device=device) / hidden ** 0.5 for o in (hidden, kv, kv)]
        buf = pad_linear_weights(ws, [rank] * 3)
        starts = (0, hidden, hidden + kv)
        projs = [LoraWeights(buf[a:a + w.shape[0], :hidden],
                             (torch.randn(rank, hidden, device=device) / hidden ** 0.5).requires_grad_(),
                             (torch.randn(w.shape[0], rank, device=device) * 0.1).requires_grad_(), 2.0)
                 for a, w in zip(starts, ws)]
        assert padded_linears(projs) is not None
        return projs
    projs = [_proj(o, hidden, rank, device, torch.float32, scale=s, bias=layout == "bias")
             for o, s in ((hidden, 0.5), (kv, 2.0), (kv, 1.5))]
    if layout == "joined":
        projs = join_weights(*projs)
    if layout == "dropout":  # the three rank-r inputs from one pass of the dropout kernel over x
        projs = [LoraWeights(p.weight, p.lora_a, p.lora_b, p.scale, q) for p, q in zip(projs, (0.2, 0.1, 0.4))]
    return projs


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", sorted(STRIDES))
@pytest.mark.parametrize("layout", LAYOUTS_STRIDED)
def test_strided_x_matches_reference(device, how, layout):
    """Q/K/V outputs and every gradient against the float64 reference for a non-contiguous x, through each
    path x takes: separate weights, joined (one GEMM), padded (x copied into the wide buffer by copy_rows),
    adapter dropout (x read by the dropout kernels; the same seed draws the same masks), frozen biases.
    Forward leaves the columns around the view alone, and no gradient reaches them."""
    torch.manual_seed(6)
    hidden, kv, rank = 40, 12, 4
    projs = _qkv_for(layout, hidden, kv, rank, device)
    shape, view = STRIDES[how]
    base = torch.randn(*shape(3, 5, hidden), device=device).requires_grad_()
    x = view(base, hidden)
    assert not x.is_contiguous()
    before = base.detach().clone()
    torch.manual_seed(7)
    outs = lora_linears(x, *projs, impl="triton")
    assert torch.equal(base.detach(), before)
    p64 = [_as64(p) for p in projs]
    base64 = base.detach().double().requires_grad_()
    torch.manual_seed(7)
    refs = lora_linears_reference(view(base64, hidden), *p64)
    for o, r in zip(outs, refs):
        assert rel_err(o, r) < TOL[torch.float32]
    leaves = [base] + [t for p in projs for t in (p.lora_a, p.lora_b)]
    leaves64 = [base64] + [t for p in p64 for t in (p.lora_a, p.lora_b)]
    dys = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, leaves, dys)
    exp = torch.autograd.grad(refs, leaves64, [d.double() for d in dys])
    for a, b in zip(got, exp):
        assert rel_err(a, b) < TOL[torch.float32], rel_err(a, b)
    if how == "sliced":
        assert torch.count_nonzero(got[0][..., :2]) == 0 and torch.count_nonzero(got[0][..., 2 + hidden:]) == 0


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("landing", [True, False])
def test_the_rotations_gradients_land_where_the_padded_node_reads_them(device, landing, monkeypatch):
    """The patched attention's Q/K/V node and RoPE: with a GradLanding, RoPE's backward writes Q's and K's
    gradients into the padded node's backward buffer, which copies in only V's; every gradient is the
    float64 reference's either way."""
    import tuneforge_kernels.lora_linear as lora_linear
    from tuneforge_kernels.lora_linear import GradLanding
    from tuneforge_kernels.rope import rope, rope_reference

    copies = record_copy_rows(monkeypatch, lora_linear)
    torch.manual_seed(8)
    hidden, kv, rank, head, bsz, seq = 40, 12, 4, 4, 3, 5
    projs = _qkv_for("padded", hidden, kv, rank, device)
    pos = torch.arange(seq, device=device, dtype=torch.float64)[None, :, None] / (1.0 + torch.arange(head // 2,
                                                                                                       device=device))
    cos, sin = (torch.cat([f(pos)] * 2, dim=-1) for f in (torch.cos, torch.sin))

    def attention_inputs(x, ps, rotate, cos, sin, tag=None):
        q, k, v = lora_linears(x, *ps, impl="triton", landing=tag) if tag is not False else \
            lora_linears_reference(x, *ps)
        q, k, v = (t.view(bsz, seq, -1, head).transpose(1, 2) for t in (q, k, v))
        return (*rotate(q, k, cos, sin), v)

    x = torch.randn(bsz, seq, hidden, device=device).requires_grad_()
    tag = GradLanding() if landing else None
    outs = attention_inputs(x, projs, lambda *a: rope(*a, impl="triton", landing=tag), cos.float(), sin.float(), tag)
    p64 = [_as64(p) for p in projs]
    x64 = x.detach().double().requires_grad_()
    refs = attention_inputs(x64, p64, rope_reference, cos, sin, False)
    dys = [torch.randn_like(o) for o in outs]
    leaves = [x] + [t for p in projs for t in (p.lora_a, p.lora_b)]
    leaves64 = [x64] + [t for p in p64 for t in (p.lora_a, p.lora_b)]
    got = torch.autograd.grad(outs, leaves, dys)
    exp = torch.autograd.grad(refs, leaves64, [d.double() for d in dys])
    for a, b in zip(got, exp):
        assert rel_err(a, b) < TOL[torch.float32]
    assert copies == ([kv] if landing else [hidden, kv, kv])  # V's only: Q's and K's were written in place
    assert tag is None or tag.take() is None  # the backward took the buffer


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales", [(2.0, 2.0, 2.0), (0.5, 2.0, 1.5)])
def test_aligned_spare_columns_are_zeros_whatever_the_buffers_held(monkeypatch, nan_allocations, device, scales):
    # lora_mlp.PAD_ALIGN at 16 (CPU): ranks 3 + 5 + 4 get 16 spare columns beside H = 32 and O = 64; at 64 (GPU,
    # the 8B Q/K/V): 3 x 16 get 64. The last ones are zeros in the buffer and written as zeros into [x | s x A^T
    # | 0] and [dy .. | s dy B .. | 0] (allocations here are NaN until written)
    import tuneforge_kernels.lora_mlp as mlp_mod

    align, hidden, outs, ranks, dtype = (16, 32, (32, 16, 16), (3, 5, 4), torch.float32) if device == "cpu" else \
        (64, 4096, (4096, 1024, 1024), (16, 16, 16), torch.bfloat16)
    monkeypatch.setattr(mlp_mod, "PAD_ALIGN", align)
    ws = [(torch.randn(o, hidden) / hidden ** 0.5).to(device, dtype) for o in outs]
    buf = pad_linear_weights(ws, list(ranks))
    rows, r = sum(outs), sum(ranks)
    assert buf.shape == (rows + align, hidden + align) and not buf[:, hidden + r:].any() and not buf[rows + r:].any()
    starts = [sum(outs[:i]) for i in range(3)]
    projs = [LoraWeights(buf[a:a + o, :hidden],
                         (torch.randn(rk, hidden, device=device) / hidden ** 0.5).requires_grad_(),
                         (torch.randn(o, rk, device=device) * 0.1).requires_grad_(), s)
             for a, o, rk, s in zip(starts, outs, ranks, scales)]
    assert padded_linears(projs).data_ptr() == buf.data_ptr()
    x = torch.randn(3, 5 if device == "cpu" else 683, hidden, device=device, dtype=dtype, requires_grad=True)
    _assert_matches_float64(x, projs, dtype)
