"""Adapter dropout in the fused LoRA nodes (tuneforge_kernels/dropout.py): the ``stream`` masks as torch
draws them, the ``philox`` masks as the kernels compute them, and lora_mlp / lora_linears with dropout
against their float64 references drawing the same masks (one seed: the masks come from the default
generator, drawn in the same order and shapes)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tuneforge_kernels.dropout import (Mask, add_masked_input_grads_, draw_mask, drop, dropped_input_grads,
                                       dropped_input_products, philox_everywhere, philox_keep, seeded_by)
from tuneforge_kernels.lora_linear import lora_linears, lora_linears_reference
from tuneforge_kernels.lora_mlp import LoraWeights, lora_mlp, lora_mlp_reference
from tests.kernels.conftest import DEVICES, TOL, needs_cuda, needs_triton, rel_err

pytestmark = needs_triton


def _proj(out_f, in_f, rank, device, dtype, dropout, scale=2.0):
    w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f ** 0.5
    a = (torch.randn(rank, in_f, device=device) / in_f ** 0.5).requires_grad_()  # fp32 like PEFT
    b = (torch.randn(out_f, rank, device=device) * 0.1).requires_grad_()
    return LoraWeights(w, a, b, scale, dropout)


def _as64(projections):
    # float64 copies; an A shared by several projections stays one tensor
    copies = {}

    def leaf(t):
        if id(t) not in copies:
            copies[id(t)] = t.detach().double().requires_grad_()
        return copies[id(t)]

    return [LoraWeights(p.weight.double(), leaf(p.lora_a), leaf(p.lora_b), p.scale, p.dropout) for p in projections]


def _leaves(projections):
    seen, out = set(), []
    for t in (t for p in projections for t in (p.lora_a, p.lora_b)):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _kind(kind, device):
    """The block's masks of ``kind``: ``philox`` on the CPU too, or ``stream`` (the CPU's own; CUDA draws
    only ``philox``)."""
    if kind == "philox":
        return philox_everywhere()
    if device == "cuda":
        pytest.skip("CUDA draws philox masks only")
    return contextlib.nullcontext()


KINDS = ["stream", "philox"]


def _grads(fn, x, projections, dys, seed):
    """Outputs and gradients of ``fn(x, projections)`` (outputs a tuple) with the generator at ``seed``, and
    the generator's next draw (what the call consumed)."""
    torch.manual_seed(seed)
    if x.is_cuda:
        torch.cuda.manual_seed(seed)
    outs = fn(x, projections)
    leaves = [x, *_leaves(projections)]
    grads = torch.autograd.grad(outs, leaves, [d.to(o.dtype) for d, o in zip(dys, outs)])
    return [o.detach() for o in outs], grads, torch.rand(1, device=x.device).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_are_torch_dropouts_on_the_cpu(dtype):
    """The same stream as ``torch.nn.functional.dropout`` (what PEFT calls) on a tensor of any dtype, and
    ``drop`` rounds once with the scale a float32 multiplier (as CUDA's fused dropout computes)."""
    x = torch.randn(37, 53).to(dtype)
    torch.manual_seed(0)
    ours = Mask.draw(x.shape, 0.1, x.device)
    torch.manual_seed(0)
    peft = torch.nn.functional.dropout(x.float(), 0.1, training=True)
    assert torch.equal(ours.keep, peft != 0) and ours.keep.dtype == torch.bool
    torch.manual_seed(0)
    assert torch.equal(torch.native_dropout(x, 0.1, True)[1], ours.keep)
    scale = torch.tensor(1 / 0.9, dtype=torch.float32)
    assert torch.equal(drop(x, ours), (x.float() * ours.keep * scale).to(dtype))


def test_a_released_stream_mask_is_drawn_again_bit_for_bit():
    """A node keeps the generator's state, not the mask (``released``); ``again`` draws the same bits, and
    the default generator is not moved by it."""
    torch.manual_seed(3)
    first = Mask.draw((301, 77), 0.3, torch.device("cpu"))
    released = first.released()
    assert released.keep is None and not first.seeded
    next_draw = torch.rand(4)
    again = released.again()
    assert torch.equal(again.keep, first.keep)
    torch.manual_seed(3)
    Mask.draw((301, 77), 0.3, torch.device("cpu"))
    assert torch.equal(torch.rand(4), next_draw)


def test_keep_rate_and_bad_rates():
    torch.manual_seed(1)
    kept = draw_mask((400, 500), 0.05, torch.device("cpu")).float().mean().item()
    assert abs(kept - 0.95) < 0.002  # 200,000 draws: sigma ~0.0005
    for p in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="dropout must be in"):
            draw_mask((2, 2), p, torch.device("cpu"))


def _same(got, exp, device, dtype):
    # bit for bit, but through the interpreter in bf16: its float32 -> bf16 cast does not round to nearest
    if device == "cpu" and dtype == torch.bfloat16:
        return rel_err(got, exp) < TOL[dtype]
    return torch.equal(got, exp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_drop_kernel_is_torchs_ops(device, dtype, kind):
    """The one-pass kernel computes torch's two-op result (odd sizes, ragged last tiles), ``philox``'s bits
    computed in the kernel as ``Mask.bits`` computes them in torch; other layouts take torch's ops; a block
    of rows (``rows``) reads the whole mask's rows."""
    rows, cols = (37, 301) if device == "cpu" else (4099, 14337)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(rows, cols, generator=gen).to(device, dtype)
    with _kind(kind, device):
        m = Mask.draw((rows, cols), 0.3, torch.device(device))
        columns = Mask.draw((cols, rows), 0.3, torch.device(device))
    assert m.seeded == (kind == "philox")
    keep = m.bits((rows, cols))
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.7) < 0.03
    assert _same(drop(x, m, impl="triton"), drop(x, m, impl="reference"), device, dtype)
    assert torch.equal(drop(x.t(), columns, impl="triton"),
                       x.t().mul(columns.bits((cols, rows))).mul_(1 / 0.7))
    block = slice(4, rows - 3)
    assert _same(drop(x[block], m.rows(block), impl="triton"), drop(x, m, impl="reference")[block], device, dtype)


def _input_and_masks(rows, cols, n, device, dtype, kind, seed):
    """x (rows, cols), a block of a wider buffer's columns, n masks of ``kind`` over it, and the generator
    for the rest of the case."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols + 5, generator=gen).to(device, dtype)[:, 2:cols + 2]
    with _kind(kind, device):
        masks = [Mask.draw((rows, cols), p, torch.device(device)) for p in (0.3, 0.1, 0.5, 0.2)[:n]]
    return x, masks, gen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ranks", [(5,), (16, 3), (16, 3, 64), (4, 8, 16, 2), (70, 4)])
def test_dropped_input_products_in_one_pass(device, dtype, kind, ranks):
    """``dropped_input_products``: each adapter's ``drop(x) A^T`` from one pass over x (four adapters: two
    launches; a rank over 64, or on CUDA three adapters or more: drop, then a GEMM), side by side, against
    float64 with the same masks and against drop + GEMM; x a block of a wider buffer's rows."""
    rows, cols = (37, 301) if device == "cpu" else (4099, 4097)
    x, masks, gen = _input_and_masks(rows, cols, len(ranks), device, dtype, kind, seed=9)
    terms = [(torch.randn(r, cols, generator=gen).to(device, dtype) / cols ** 0.5, m) for r, m in zip(ranks, masks)]
    got = dropped_input_products(x, terms, impl="triton")
    assert got.shape == (rows, sum(ranks)) and got.dtype == dtype
    expected = torch.cat([(x.double() * m.bits((rows, cols)) / (1 - m.p)) @ a.double().t() for a, m in terms], 1)
    assert rel_err(got, expected) < TOL[dtype]
    two_step = torch.cat([drop(x, m, impl="reference") @ a.t() for a, m in terms], dim=1)
    assert rel_err(got, two_step) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ranks", [(5,), (16, 3, 64), (4, 8, 16, 2), (70, 4)])
def test_dropped_input_grads_in_one_pass(device, dtype, kind, ranks):
    """``dropped_input_grads``: each adapter's ``d_b^T drop(x)`` from one pass over x, its rows split over
    programs (300 rows on the CPU: 5 splits of 64, the last ragged), against float64 with the same masks
    and against drop + GEMM; four adapters: two launches; a rank over 64: drop, then a GEMM."""
    rows, cols = (300, 301) if device == "cpu" else (8191, 4097)
    x, masks, gen = _input_and_masks(rows, cols, len(ranks), device, dtype, kind, seed=10)
    terms = [(torch.randn(rows, r, generator=gen).to(device, dtype) / rows ** 0.5, m) for r, m in zip(ranks, masks)]
    got = dropped_input_grads(x, terms, impl="triton")
    for g, (d_b, m) in zip(got, terms, strict=True):
        assert g.shape == (d_b.shape[1], cols) and g.dtype == dtype
        expected = d_b.double().t() @ (x.double() * m.bits((rows, cols)) / (1 - m.p))
        assert rel_err(g, expected) < TOL[dtype]
        assert rel_err(g, d_b.t() @ drop(x, m, impl="reference")) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_terms", [1, 3, 4])
def test_masked_terms_in_one_pass(device, dtype, kind, n_terms):
    """``add_masked_input_grads_``: every adapter's term of dx, masked by its own mask, in one pass (four:
    two launches), against float64 and against the reference's per-term ops; ranks past the kernel's
    rank tile (70: two chunks of 64) and under tl.dot's 16; ``out`` a block of a wider buffer's rows."""
    rows, cols = (37, 301) if device == "cpu" else (4099, 14337)
    gen = torch.Generator().manual_seed(8)
    ranks = [5, 70, 16, 3][:n_terms]
    wide = torch.randn(rows, cols + 7, generator=gen).to(device, dtype)
    out = wide[:, 3:cols + 3]
    with _kind(kind, device):
        masks = [Mask.draw((rows, cols), p, torch.device(device)) for p in (0.3, 0.1, 0.5, 0.2)[:n_terms]]
    terms = [(torch.randn(rows, r, generator=gen).to(device, dtype), torch.randn(r, cols, generator=gen).to(
        device, dtype) / r ** 0.5, m, s) for r, m, s in zip(ranks, masks, (0.5, 2.0, 1.0, 0.25))]
    expected = out.double()
    for d_b, a, m, s in terms:
        expected = expected + s / (1 - m.p) * (d_b.double() @ a.double()) * m.bits((rows, cols))
    before, ref = wide.clone(), out.clone()
    add_masked_input_grads_(out, terms, impl="triton")
    add_masked_input_grads_(ref, terms, impl="reference")
    assert rel_err(out, expected) < TOL[dtype] and rel_err(ref, expected) < TOL[dtype]
    outside = torch.ones_like(wide, dtype=torch.bool)
    outside[:, 3:cols + 3] = False
    assert torch.equal(wide[outside], before[outside])  # the buffer's other columns untouched


def test_philox_bits():
    """The ``philox`` kind: bits that depend on the seed, the salt, the row and the column, kept at the rate
    1 - p, a column's bits whatever the width; a released mask is the mask (8 bytes of seed), and drawing
    one moves the generator by one small draw."""
    seed = torch.tensor([987654321])
    rows = torch.arange(400, dtype=torch.int64)
    bits = philox_keep(seed, 0, rows, 501, 0.05)
    assert bits.shape == (400, 501) and abs(bits.float().mean().item() - 0.95) < 0.002  # sigma ~0.0005
    for other in (philox_keep(seed, 1, rows, 501, 0.05), philox_keep(seed + 1, 0, rows, 501, 0.05),
                  philox_keep(seed, 0, rows + 1, 501, 0.05)):
        assert (other != bits).float().mean().item() > 0.05  # independent: 2 p (1 - p) = 9.5% differ
    assert torch.equal(philox_keep(seed, 0, rows[7:99], 501, 0.05), bits[7:99])
    assert torch.equal(philox_keep(seed, 0, rows, 13, 0.05), bits[:, :13])
    with philox_everywhere():
        torch.manual_seed(0)
        m = Mask.draw((3, 5), 0.2, torch.device("cpu"))
        after = torch.rand(1).item()
    assert m.seeded and m.keep is None and m.released() is m and m.again() is m and m.seed.numel() == 1
    torch.manual_seed(0)
    torch.randint(2 ** 62, (1,))
    assert torch.rand(1).item() == after


def test_draws_inside_seeded_by_take_its_seed_and_salts():
    """What a CUDA graph's capture records (graphs.py): draws that read one static seed tensor with salts
    0, 1, 2... in their order, touching no generator; the same seed and salt give the same bits."""
    seed = torch.tensor([42])
    with philox_everywhere():
        torch.manual_seed(5)
        with seeded_by(seed) as count:
            masks = [Mask.draw((6, 7), 0.3, torch.device("cpu")) for _ in range(3)]
            assert count() == 3
        after = torch.rand(1).item()
        again = Mask.draw((6, 7), 0.3, torch.device("cpu"))
    assert [m.salt for m in masks] == [0, 1, 2] and all(m.seed is seed for m in masks)
    torch.manual_seed(5)
    assert torch.rand(1).item() == after
    assert again.seed is not seed  # outside the block: a fresh seed
    bits = [m.bits((6, 7)) for m in masks]
    assert not torch.equal(bits[0], bits[1])
    seed.fill_(43)  # the tensor is read when the bits are computed (a graph refreshes it before a replay)
    assert not torch.equal(masks[0].bits((6, 7)), bits[0])


@pytest.mark.gpu
@needs_cuda
def test_int64_drop_beyond_2_31_elements():
    n = 2 ** 31 + 4099
    x = torch.randn(n // 4096 + 1, 4096, device="cuda", dtype=torch.bfloat16)
    m = Mask.draw(x.shape, 0.25, x.device)
    y = drop(x, m, impl="triton")
    tail = slice(-3, None)
    keep = philox_keep(m.seed, m.salt, torch.arange(x.shape[0] - 3, x.shape[0], device="cuda"), x.shape[1], m.p)
    assert torch.equal(y[tail], x[tail].mul(keep).mul_(1 / 0.75))


def _mlp_case(layout, device, dtype):
    hidden, inter, rank = (24, 52, 4) if device == "cpu" else (4096, 14336, 16)
    p = {"all": (0.3, 0.1, 0.2), "down_only": (0.0, 0.0, 0.25), "gate_only": (0.4, 0.0, 0.0),
         "shared_a": (0.3, 0.3, 0.2), "rank_over_kernel_limit": (0.3, 0.1, 0.2)}[layout]
    gate, up = _proj(inter, hidden, rank, device, dtype, p[0]), _proj(inter, hidden, rank, device, dtype, p[1])
    down = _proj(hidden, inter, rank, device, dtype, p[2], scale=0.5)
    if layout == "shared_a":  # Phi-3's gate_up_proj split by rows: one adapter, one mask
        w = torch.cat([gate.weight, up.weight])
        b = torch.cat([gate.lora_b, up.lora_b]).detach().requires_grad_()
        gate, up = (LoraWeights(w[:inter], gate.lora_a, b[:inter], 2.0, p[0]),
                    LoraWeights(w[inter:], gate.lora_a, b[inter:], 2.0, p[0]))
    return [gate, up, down]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["all", "down_only", "gate_only", "shared_a", "rank_over_kernel_limit"])
@pytest.mark.parametrize("deferred_rows", [None, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_mlp_with_dropout_matches_the_reference(monkeypatch, device, dtype, layout, deferred_rows, kind):
    """Every gradient against the float64 reference with the same masks; the generator left where the
    reference leaves it (the same draws); ``deferred_rows``: the recompute's deferred MLP (output unused,
    backward in blocks of rows: 3 blocks on the CPU, the last ragged) draws them too."""
    import tuneforge_kernels.lora_mlp as mod

    if layout == "rank_over_kernel_limit":  # the down term and the dropped h outside the activation kernel
        monkeypatch.setattr("tuneforge_kernels.lora_glu.MAX_RANK", 3 if device == "cpu" else 15)
    if deferred_rows is not None:
        monkeypatch.setattr(mod, "_DEFERRED_ROWS", deferred_rows if device == "cpu" else 400)
    torch.manual_seed(2)
    projections = _mlp_case(layout, device, dtype)
    n = 9 if device == "cpu" else 1023
    x = torch.randn(n, projections[2].weight.shape[0], device=device, dtype=dtype).requires_grad_()
    dy = [torch.randn(x.shape, device=device, dtype=torch.float64)]
    unused = deferred_rows is not None
    monkeypatch.setattr("tuneforge_kernels.dropout._seeds.cpu", kind == "philox")
    if kind == "stream" and device == "cuda":
        pytest.skip("CUDA draws philox masks only")
    out, got, after = _grads(lambda t, ps: (lora_mlp(t, *ps, impl="triton", output_unused=unused),), x,
                             projections, dy, seed=3)
    x64 = x.detach().double().requires_grad_()
    ref, exp, after_ref = _grads(lambda t, ps: (lora_mlp_reference(t, *ps),), x64, _as64(projections), dy, seed=3)
    if not unused:
        assert rel_err(out[0], ref[0]) < TOL[dtype]
    assert after == after_ref
    for a, b in zip(got, exp):
        assert rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype]), (rel_err(a, b))
    # and the masks matter: without dropout the gradients differ
    plain = [LoraWeights(p.weight, p.lora_a, p.lora_b, p.scale) for p in projections]
    _, without, _ = _grads(lambda t, ps: (lora_mlp(t, *ps, impl="triton"),), x, plain, dy, seed=3)
    assert rel_err(without[0], got[0]) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k_dropout", [0.0, 0.1])
def test_linears_with_dropout_match_the_reference(device, dtype, replay, kind, k_dropout):
    """Q/K/V with dropout on q and v, k without (its adapter stays in the batched GEMMs) or with (the three
    rank-r inputs from one pass over x); ``replay``: an ``offload`` recompute given the outputs still draws
    the masks and gives the same gradients."""
    torch.manual_seed(4)
    hidden, kv, rank = (40, 12, 4) if device == "cpu" else (4096, 1024, 16)
    projections = [_proj(hidden, hidden, rank, device, dtype, 0.2, scale=0.5),
                   _proj(kv, hidden, rank, device, dtype, k_dropout), _proj(kv, hidden, rank, device, dtype, 0.4)]
    x = torch.randn(3, 5 if device == "cpu" else 341, hidden, device=device, dtype=dtype).requires_grad_()
    dys = [torch.randn(*x.shape[:-1], p.weight.shape[0], device=device, dtype=torch.float64) for p in projections]
    with _kind(kind, device):
        outs, got, after = _grads(lambda t, ps: lora_linears(t, *ps, impl="triton"), x, projections, dys, seed=5)
        x64 = x.detach().double().requires_grad_()
        refs, exp, after_ref = _grads(lambda t, ps: lora_linears_reference(t, *ps), x64, _as64(projections), dys,
                                      seed=5)
    assert after == after_ref
    for o, r in zip(outs, refs):
        assert rel_err(o, r) < TOL[dtype]
    for a, b in zip(got, exp):
        assert rel_err(a, b) < (2e-2 if dtype == torch.bfloat16 else TOL[dtype])
    if replay:
        kept = [o.clone() for o in outs]
        with _kind(kind, device):
            _, replayed, _ = _grads(lambda t, ps: lora_linears(t, *ps, impl="triton", outputs=kept), x,
                                    projections, dys, seed=5)
        for a, b in zip(got, replayed):
            assert torch.equal(a, b)


def test_dropout_is_off_for_projections_without_an_adapter():
    # a rate on a projection without an adapter draws nothing (PEFT has no dropout module there)
    x, w_o, w_g, w_u, w_d = torch.randn(3, 6), torch.randn(8, 6), torch.randn(10, 6), torch.randn(10, 6), \
        torch.randn(6, 10)
    torch.manual_seed(0)
    lora_linears(x, LoraWeights(w_o, dropout=0.5), impl="triton")
    lora_mlp(x, *(LoraWeights(w, dropout=0.5) for w in (w_g, w_u, w_d)), impl="triton")
    after = torch.rand(1).item()
    torch.manual_seed(0)
    assert torch.rand(1).item() == after


@pytest.mark.parametrize("kind", KINDS)
def test_the_nodes_keep_no_masks(kind):
    """What the fused nodes save for backward with dropout is what they save without it: no mask (drawn again
    in backward), no dropped input."""
    def saved(p):
        torch.manual_seed(6)
        gate, up, down = (_proj(20, 12, 4, "cpu", torch.float32, p), _proj(20, 12, 4, "cpu", torch.float32, p),
                          _proj(12, 20, 4, "cpu", torch.float32, p))
        qkv = [_proj(12, 12, 4, "cpu", torch.float32, p) for _ in range(3)]
        x = torch.randn(7, 12, requires_grad=True)
        sizes = []

        def pack(t):
            sizes.append((t.dtype, t.numel()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lora_linears(x, *qkv, impl="triton")
            lora_mlp(x, gate, up, down, impl="triton")
        return sorted(sizes, key=str)

    with _kind(kind, "cpu"):
        with_dropout = saved(0.2)
    assert with_dropout == saved(0.0) and all(dtype != torch.bool for dtype, _ in with_dropout)
