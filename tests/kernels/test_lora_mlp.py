"""lora_mlp's hand-derived backward against plain autograd through lora_mlp_reference in float64."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.lora_mlp import LoraWeights, joined, lora_mlp, lora_mlp_reference, pad_weights, padded
from tests.kernels.conftest import (DEVICES, TOL, count_matmuls, count_ops, join_weights, needs_triton,
                                    record_copy_rows, rel_err)

pytestmark = needs_triton


def _proj(out_f, in_f, rank, device, dtype, with_lora=True):
    w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f ** 0.5
    if not with_lora:
        return LoraWeights(w)
    a = (torch.randn(rank, in_f, device=device) / in_f ** 0.5).requires_grad_()  # fp32 like PEFT
    b = (torch.randn(out_f, rank, device=device) * 0.1).requires_grad_()
    return LoraWeights(w, a, b, scale=2.0)


def _small_mlp():
    # gate, up, down of a small float32 CPU MLP (hidden 8, intermediate 12, rank 2)
    return (_proj(12, 8, 2, "cpu", torch.float32), _proj(12, 8, 2, "cpu", torch.float32),
            _proj(8, 12, 2, "cpu", torch.float32))


def _count_calls(monkeypatch, name: str) -> list:
    """Every call of ``tuneforge_kernels.lora_mlp.<name>`` from now on appends to the returned list."""
    import tuneforge_kernels.lora_mlp as mod

    calls, real = [], getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a: calls.append(1) or real(*a))
    return calls


def _as64(p: LoraWeights):
    if p.lora_a is None:
        return LoraWeights(p.weight.double())
    return LoraWeights(p.weight.double(), p.lora_a.detach().double().requires_grad_(),
                       p.lora_b.detach().double().requires_grad_(), p.scale, p.dropout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("down_lora", [True, False])
@pytest.mark.parametrize("join", [False, True])
def test_matches_reference(device, dtype, act, down_lora, join):
    # join: gate's and up's base weights in one buffer (the patcher's layout for small models): one GEMM
    # for both, g and u the column halves of its output
    torch.manual_seed(0)
    hidden, inter, rank, shape = (24, 52, 4, (2, 7)) if device == "cpu" else (4096, 14336, 16, (2, 1023))
    x = torch.randn(*shape, hidden, device=device, dtype=dtype).requires_grad_()
    gate, up = _proj(inter, hidden, rank, device, dtype), _proj(inter, hidden, rank, device, dtype)
    if join:
        gate, up = join_weights(gate, up)
    down = _proj(hidden, inter, rank, device, dtype, with_lora=down_lora)
    out = lora_mlp(x, gate, up, down, act, impl="triton")
    g64, u64, d64 = _as64(gate), _as64(up), _as64(down)
    x64 = x.detach().double().requires_grad_()
    ref = lora_mlp_reference(x64, g64, u64, d64, act)
    assert rel_err(out, ref) < TOL[dtype]
    leaves = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b) if t is not None]
    leaves64 = [x64] + [t for p in (g64, u64, d64) for t in (p.lora_a, p.lora_b) if t is not None]
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dy)
    exp = torch.autograd.grad(ref, leaves64, dy.double())
    for a, b, leaf in zip(got, exp, leaves):
        assert a.dtype == leaf.dtype
        # bf16: the gradients pass through several bf16 matmuls with reductions over thousands
        # of terms, each rounding its output: 2e-2 (the one place the bf16 bound is doubled)
        assert rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype])


def test_joined_gate_up_weights_take_one_gemm_each_way():
    torch.manual_seed(2)
    x = torch.randn(6, 8, requires_grad=True)
    gate, up, down = _small_mlp()
    counts = []
    for g, u in ((gate, up), join_weights(gate, up)):
        with count_matmuls() as n:
            lora_mlp(x, g, u, down, impl="triton").sum().backward()
        counts.append(n["big"])
    # forward gate+up, backward dx: two products fewer over the (tokens x intermediate) operands
    assert counts[1] == counts[0] - 2, counts


def test_down_projections_rank_r_input_is_kept_not_recomputed():
    # dB_d reads h A_d^T: the forward's product (N x r) is saved, so A_d is read by one product only
    torch.manual_seed(4)
    x = torch.randn(6, 8, requires_grad=True)
    gate, up, down = _small_mlp()
    with count_matmuls([down.lora_a]) as n:
        lora_mlp(x, gate, up, down, impl="triton").sum().backward()
    assert n["reading"] == 1 and down.lora_b.grad is not None


def test_adapters_are_cast_in_one_go_each_way(monkeypatch):
    # float32 adapters, bf16 compute: the six adapter weights are cast by one launch in forward (not one op
    # per tensor, nor a cat and a cast), the six gradients by one in backward, and gate's and up's A are one
    # tensor for x A^T
    import tuneforge_kernels.lora_mlp as mod

    casts = []
    real = mod.cast_blocks
    monkeypatch.setattr(mod, "cast_blocks", lambda pairs, impl=None, **kw: (
        casts.append([(d.dtype, s.dtype) for d, s in pairs]), real(pairs, impl=impl, **kw)))
    torch.manual_seed(5)
    x = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    gate, up, down = (_proj(12, 8, 2, "cpu", torch.bfloat16), _proj(12, 8, 2, "cpu", torch.bfloat16),
                      _proj(8, 12, 2, "cpu", torch.bfloat16))
    with count_ops() as fwd:
        y = lora_mlp(x, gate, up, down, impl="triton")
    assert casts == [[(torch.bfloat16, torch.float32)] * 6]
    with count_ops() as bwd:
        y.sum().backward()
    assert casts[1:] == [[(torch.float32, torch.bfloat16)] * 6]
    assert fwd["_to_copy"] == 0 and fwd["cat"] == 0 and bwd["_to_copy"] == 0, (fwd, bwd)
    assert all(p.lora_a.grad.dtype == torch.float32 and p.lora_b.grad is not None for p in (gate, up, down))


@pytest.mark.parametrize("residual_dtype", [torch.bfloat16, torch.float32])
def test_residual_is_added_by_the_down_projection(residual_dtype):
    # residual + mlp(x): in the compute dtype the down GEMM adds it (no separate add, the residual's
    # gradient is dy itself); in another dtype it is added as HF adds it (promoting to float32)
    torch.manual_seed(6)
    x = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    gate, up, down = (_proj(12, 8, 2, "cpu", torch.bfloat16), _proj(12, 8, 2, "cpu", torch.bfloat16),
                      _proj(8, 12, 2, "cpu", torch.bfloat16))
    res = torch.randn(6, 8, dtype=residual_dtype, requires_grad=True)
    with count_ops() as ops:
        out = lora_mlp(x, gate, up, down, impl="triton", residual=res)
    assert out.dtype == residual_dtype
    assert ops["add"] == (residual_dtype != torch.bfloat16), ops
    ref = res.detach().double() + lora_mlp_reference(x.detach().double(), *(_as64(p) for p in (gate, up, down)))
    assert rel_err(out, ref) < 1e-2
    dy = torch.randn_like(out)
    gx, gres = torch.autograd.grad(out, (x, res), dy)
    assert torch.equal(gres, dy)
    plain = torch.autograd.grad(lora_mlp(x, gate, up, down, impl="triton"), x, dy.to(torch.bfloat16))[0]
    assert torch.equal(gx, plain)


def test_joined_finds_only_one_buffer_laid_out_in_order():
    buf = torch.randn(10, 4)
    a, b, c = buf[:3], buf[3:7], buf[7:]
    assert joined([a, b, c], 0).data_ptr() == buf.data_ptr() and joined([a, b, c], 0).shape == (10, 4)
    assert joined([b, c], 0).equal(buf[3:])
    assert joined([b, a], 0) is None                      # out of order
    assert joined([a, c], 0) is None                      # a gap
    assert joined([a, torch.randn(4, 4)], 0) is None      # another allocation
    assert joined([a, b.double()], 0) is None
    cols = torch.randn(5, 12)
    left, right = cols[:, :5], cols[:, 5:11]
    both = joined([left, right], 1)
    assert both.shape == (5, 11) and both.equal(cols[:, :11]) and both.stride() == (12, 1)
    assert joined([right, left], 1) is None
    assert joined([cols[:4, :5], cols[:4, 6:]], 1) is None


def test_frozen_base_weights_get_no_grad():
    x = torch.randn(5, 8, requires_grad=True)
    gate, up, down = _small_mlp()
    lora_mlp(x, gate, up, down, impl="triton").sum().backward()
    assert all(p.weight.grad is None for p in (gate, up, down))
    assert all(p.lora_a.grad is not None and p.lora_b.grad is not None for p in (gate, up, down))


def test_quantized_style_weight_object_is_dequantized_one_transient_at_a_time():
    import weakref

    alive = []  # weak references to every expanded weight handed out

    class Packed:  # stands in for an NF4 weight: anything with dequantize()
        def __init__(self, w):
            self.w = w

        def dequantize(self):
            # QLoRA must never hold two expanded weights at once: the others must be gone by now
            assert not [r for r in alive if r() is not None], "another expanded weight is still alive"
            out = self.w.clone()
            alive.append(weakref.ref(out))
            return out

    torch.manual_seed(2)
    x = torch.randn(3, 8, requires_grad=True)
    gate, up, down = _small_mlp()
    packed = [LoraWeights(Packed(p.weight), p.lora_a, p.lora_b, p.scale) for p in (gate, up, down)]
    out = lora_mlp(x, *packed, impl="triton")
    assert rel_err(out, lora_mlp_reference(x, gate, up, down)) < 1e-6
    out.sum().backward()
    assert len(alive) == 6  # three in forward, three in backward


@pytest.mark.parametrize("layout", ["up_without_lora", "shared_a", "x_frozen", "rank_over_kernel_limit"])
def test_adapter_layouts_match_reference(monkeypatch, layout):
    # the backward batches the gate/up LoRA terms into one GEMM: it must stay right when only one of
    # them has an adapter (scales differ), when both share one A (Phi-3's fused gate_up_proj, split by
    # rows: autograd sums A's two gradients, B's row slices land in one B), when x needs no gradient and
    # when a rank is over what the activation kernels take
    torch.manual_seed(3)
    hidden, inter, rank = 24, 20, 4
    x = torch.randn(2, 5, hidden, requires_grad=layout != "x_frozen")
    gate, up = _proj(inter, hidden, rank, "cpu", torch.float32), _proj(inter, hidden, rank, "cpu", torch.float32)
    d = _proj(hidden, inter, rank, "cpu", torch.float32)
    down = LoraWeights(d.weight, d.lora_a, d.lora_b, scale=0.5)
    if layout == "up_without_lora":
        up = LoraWeights(up.weight)
    if layout == "rank_over_kernel_limit":  # the rank-r terms are added by addmm_ passes, not in the kernels
        monkeypatch.setattr("tuneforge_kernels.lora_glu.MAX_RANK", rank - 1)
    if layout == "shared_a":
        w = torch.cat([gate.weight, up.weight])
        b = torch.cat([gate.lora_b, up.lora_b]).detach().requires_grad_()
        gate, up = (LoraWeights(w[:inter], gate.lora_a, b[:inter], 2.0),
                    LoraWeights(w[inter:], gate.lora_a, b[inter:], 2.0))
        leaves = [gate.lora_a, b, down.lora_a, down.lora_b]
    else:
        leaves = [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b) if t is not None]
    if x.requires_grad:
        leaves = [x] + leaves
    got = torch.autograd.grad(lora_mlp(x, gate, up, down, impl="triton").sum(), leaves)
    exp = torch.autograd.grad(lora_mlp_reference(x, gate, up, down).sum(), leaves)
    for a, e in zip(got, exp):
        assert rel_err(a, e) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [None, 4])
def test_output_unused_gives_the_same_gradients(monkeypatch, device, dtype, block_rows):
    """With ``output_unused`` forward computes nothing and backward recomputes g and u in blocks of rows;
    for the same incoming gradient every gradient is the full forward's: bit for bit in one block, up to
    summation order in several (4 rows: 3 blocks, the last one ragged; 400 of 1023 on the GPU)."""
    import tuneforge_kernels.lora_mlp as mod

    if block_rows is not None:
        monkeypatch.setattr(mod, "_DEFERRED_ROWS", block_rows)
    torch.manual_seed(5)
    hidden, inter, rank, n = (24, 52, 4, 9) if device == "cpu" else (4096, 14336, 16, 1023)
    if device == "cuda" and block_rows is not None:
        monkeypatch.setattr(mod, "_DEFERRED_ROWS", 400)
    gate, up, down = (_proj(inter, hidden, rank, device, dtype), _proj(inter, hidden, rank, device, dtype),
                      _proj(hidden, inter, rank, device, dtype))
    x = torch.randn(n, hidden, device=device, dtype=dtype).requires_grad_()
    leaves = [x] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    dy = torch.randn(n, hidden, device=device, dtype=dtype)
    grads = {}
    for unused in (False, True):
        out = lora_mlp(x, gate, up, down, impl="triton", output_unused=unused)
        assert out.shape == (n, hidden) and out.dtype == dtype
        grads[unused] = torch.autograd.grad(out, leaves, dy)
    for a, b in zip(grads[True], grads[False]):
        if block_rows is None:
            assert torch.equal(a, b)
        else:  # block GEMMs may sum in another order (BLAS blocking), the adapter terms over blocks:
            # float32 reductions over ~1000 rows and 14336 columns (2.3e-6 seen on an H200)
            assert rel_err(a, b) < TOL[dtype], rel_err(a, b)


def test_gate_and_up_share_one_product_in_every_mode(monkeypatch):
    # without dropout the rank-r products of gate's and up's A read x in one GEMM, the deferred backward's
    # blocks included (a list of no masks is no dropout)
    calls = _count_calls(monkeypatch, "_input_product")
    gate, up, down = _small_mlp()
    x = torch.randn(3, 8, requires_grad=True)
    lora_mlp(x, gate, up, down, impl="triton", output_unused=True).sum().backward()
    assert calls == []
    lora_mlp(x, gate, up, down, impl="triton").sum().backward()
    assert calls == [1]  # the down projection's h A_d^T


def test_output_unused_skips_the_down_projection(monkeypatch):
    calls = _count_calls(monkeypatch, "_act_forward")
    gate, up, down = _small_mlp()
    x = torch.randn(3, 8, requires_grad=True)
    lora_mlp(x, gate, up, down, impl="triton", output_unused=True)
    assert calls == []
    lora_mlp(x, gate, up, down, impl="triton")
    assert calls == [1]


# Strided inputs: ``x`` the way a caller may hand it over, a view whose (B, S, H) is not contiguous.
# ``sliced``: the first H columns of a wider tensor, so x as (N, H) is a view with row stride H + 5 that the
# GEMMs, the dropout kernels and copy_rows read in place; ``transposed``: an (S, B, H) tensor transposed,
# whose flattening is a copy. Gradients are taken at the tensor x is a view of: nothing may reach the
# columns outside the view, and forward may not write them.
STRIDES = {"sliced": (lambda b, s, h: (b, s, h + 5), lambda t, h: t[..., 2:2 + h]),
           "transposed": (lambda b, s, h: (s, b, h), lambda t, h: t.transpose(0, 1))}


def _strided_x(how, b, s, h, device, dtype):
    """The tensor x is a view of (the gradients' leaf) and the function that makes x from it."""
    shape, view = STRIDES[how]
    base = torch.randn(*shape(b, s, h), device=device, dtype=dtype).requires_grad_()
    return base, lambda t: view(t, h)


def _padded_mlp(hidden, inter, ranks, device, dtype):
    # the three frozen weights as views of pad_weights' buffers (the padded layout), float32 adapters
    ws = [torch.randn(o, i, device=device, dtype=dtype) / i ** 0.5 for o, i in
          ((inter, hidden), (inter, hidden), (hidden, inter))]
    gu, d = pad_weights(*ws, ranks)
    views = (gu[:inter, :hidden], gu[inter:2 * inter, :hidden], d[:hidden, :inter])
    return [LoraWeights(w, (torch.randn(r, w.shape[1], device=device) / w.shape[1] ** 0.5).requires_grad_(),
                        (torch.randn(w.shape[0], r, device=device) * 0.1).requires_grad_(), 2.0)
            for w, r in zip(views, ranks)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", sorted(STRIDES))
@pytest.mark.parametrize("layout", ["separate", "joined", "padded", "dropout"])
def test_strided_x_matches_reference(device, how, layout):
    """Forward and every gradient against the float64 reference for a non-contiguous x, through each path
    x takes: separate weights, gate/up joined (one GEMM), the padded layout (x copied into the wide buffer
    by copy_rows), adapter dropout (x read by the dropout kernels; the same seed draws the same masks)."""
    torch.manual_seed(8)
    hidden, inter, rank = 24, 52, 4
    if layout == "padded":
        gate, up, down = _padded_mlp(hidden, inter, (3, 5, 4), device, torch.float32)
        assert padded(gate, up, down) is not None
    else:
        gate, up, down = (_proj(o, i, rank, device, torch.float32)
                          for o, i in ((inter, hidden), (inter, hidden), (hidden, inter)))
    if layout == "joined":
        gate, up = join_weights(gate, up)
    if layout == "dropout":
        gate, up, down = (LoraWeights(p.weight, p.lora_a, p.lora_b, p.scale, q)
                          for p, q in zip((gate, up, down), (0.3, 0.1, 0.2)))
    base, view = _strided_x(how, 2, 7, hidden, device, torch.float32)
    x = view(base)
    assert not x.is_contiguous()
    before = base.detach().clone()
    torch.manual_seed(9)
    out = lora_mlp(x, gate, up, down, impl="triton")
    assert torch.equal(base.detach(), before)  # the columns around the view untouched
    p64 = [_as64(p) for p in (gate, up, down)]
    base64 = base.detach().double().requires_grad_()
    torch.manual_seed(9)
    ref = lora_mlp_reference(view(base64), *p64)
    assert rel_err(out, ref) < TOL[torch.float32]
    leaves = [base] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    leaves64 = [base64] + [t for p in p64 for t in (p.lora_a, p.lora_b)]
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dy)
    exp = torch.autograd.grad(ref, leaves64, dy.double())
    for a, b in zip(got, exp):
        assert rel_err(a, b) < TOL[torch.float32], rel_err(a, b)
    if how == "sliced":
        assert torch.count_nonzero(got[0][..., :2]) == 0 and torch.count_nonzero(got[0][..., 2 + hidden:]) == 0


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_spare", [0, 4, 3])
def test_the_next_norms_input_gradient_leaves_the_padded_mlps_columns(device, grad_spare, monkeypatch):
    """A decoder layer's padded MLP (the residual added by its GEMM) under the next layer's input norm: with
    ``grad_spare`` the down projection's rank, the norm's backward leaves those columns after its input
    gradient's rows, and the MLP writes ``s dy B_d`` there instead of copying ``dy`` into a wider buffer (3:
    another rank, copied). Every gradient is the float64 reference's either way."""
    import tuneforge_kernels.lora_mlp as lora_mlp_module
    from tuneforge_kernels.rms_norm import rms_norm, rms_norm_reference

    copies = record_copy_rows(monkeypatch, lora_mlp_module)
    torch.manual_seed(10)
    hidden, inter = 24, 52
    gate, up, down = _padded_mlp(hidden, inter, (3, 5, 4), device, torch.float32)
    w = torch.randn(hidden, device=device) * 0.1 + 1.0
    x, residual = (torch.randn(2, 7, hidden, device=device).requires_grad_() for _ in range(2))
    # the MLP's input as the post-attention norm leaves it (gate's and up's ranks after its rows)
    normed = rms_norm(x, w, spare=8, impl="triton")
    y = lora_mlp(normed, gate, up, down, impl="triton", residual=residual)
    out, stream = rms_norm(y, w, with_input=True, grad_spare=grad_spare, impl="triton")
    p64 = [_as64(p) for p in (gate, up, down)]
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, residual))
    y64 = r64 + lora_mlp_reference(rms_norm_reference(x64, w.double()), *p64)
    out64 = rms_norm_reference(y64, w.double())
    d_out, d_stream = torch.randn_like(out), torch.randn_like(stream)
    leaves = [x, residual] + [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]
    leaves64 = [x64, r64] + [t for p in p64 for t in (p.lora_a, p.lora_b)]
    got = torch.autograd.grad((out, stream), leaves, (d_out, d_stream))
    exp = torch.autograd.grad((out64, y64), leaves64, (d_out.double(), d_stream.double()))
    for a, b in zip(got, exp):
        assert rel_err(a, b) < TOL[torch.float32], rel_err(a, b)
    assert copies == ([] if grad_spare == 4 else [hidden])  # dy's copy into [dy | s dy B_d], or none
