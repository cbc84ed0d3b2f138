"""lora_glu's kernels (the gated activation with the adapters' rank-r terms inside) against the float64
reference, each term present or not, on odd shapes and ranks that are not powers of two."""

from __future__ import annotations

import zlib

import pytest
import torch

from tuneforge_kernels.lora_glu import (FWD_TILE, MAX_RANK, fusable, lora_glu, lora_glu_backward_inplace,
                                        lora_glu_forward, lora_glu_reference)
from tests.kernels.conftest import DEVICES, TOL, needs_cuda, needs_triton, rel_err

pytestmark = needs_triton


def _case(rows, cols, ranks, device, dtype, seed):
    """Base products, the three terms' operands (None where ``ranks[i]`` is 0), and scales."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    yg, yu, dh = rand(rows, cols, scale=2.0), rand(rows, cols), rand(rows, cols)
    rg, ru, rd = ranks
    terms = {"xa_g": rand(rows, rg) if rg else None, "b_g": rand(cols, rg, scale=0.3) if rg else None,
             "s_g": 0.5, "xa_u": rand(rows, ru) if ru else None, "b_u": rand(cols, ru, scale=0.3) if ru else None,
             "s_u": 2.0}
    down = {"dy_b": rand(rows, rd) if rd else None, "a_d": rand(rd, cols, scale=0.3) if rd else None, "s_d": 1.5}
    return yg, yu, dh, terms, down


def _expected(yg, yu, dh, act, terms, down):
    """h and (dg, du) through autograd of the reference in float64, dh with the down term added."""
    ygr, yur = yg.double().requires_grad_(), yu.double().requires_grad_()
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in terms.items()}
    h = lora_glu_reference(ygr, yur, act, **wide)
    dh_full = dh.double()
    if down["dy_b"] is not None:
        dh_full = dh_full + down["s_d"] * down["dy_b"].double() @ down["a_d"].double()
    dg, du = torch.autograd.grad(h, (ygr, yur), dh_full)
    return h, dg, du


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("ranks", [(5, 16, 3), (0, 7, 0), (16, 0, 33), (0, 0, 0)])
def test_forward_and_inplace_backward_match_reference(device, dtype, act, ranks):
    rows, cols = (37, 301) if device == "cpu" else (4099, 14337)
    # a seed per case that every process agrees on (hash() of a str is salted per process: PYTHONHASHSEED)
    seed = zlib.crc32(repr((act, ranks)).encode()) % 1000
    yg, yu, dh, terms, down = _case(rows, cols, ranks, device, dtype, seed=seed)
    h_ref, dg_ref, du_ref = _expected(yg, yu, dh, act, terms, down)
    h = lora_glu_forward(yg, yu, act, **terms)
    assert rel_err(h, h_ref) < TOL[dtype]
    g_buf, u_buf, dh_buf = yg.clone(), yu.clone(), dh.clone()
    lora_glu_backward_inplace(dh_buf, g_buf, u_buf, act, **terms, **down)
    assert rel_err(dh_buf, h_ref) < TOL[dtype]
    assert rel_err(g_buf, dg_ref) < TOL[dtype]
    assert rel_err(u_buf, du_ref) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["stream", "philox"])
def test_backward_with_the_down_adapters_dropout(device, dtype, kind):
    """The down adapter read ``h`` dropped (dropout.py): its term of ``dh`` is masked and scaled, and ``dh``
    comes back as ``h`` dropped, rounded as the forward's ``drop`` rounded it: bit for bit in float32 on the
    CPU (the interpreter's float32 -> bf16 cast does not round to nearest: 72% of a random sample differ
    from torch's, so bf16 is compared within its tolerance there). ``philox``: the kernel computes the
    bits from the seed, as ``Mask.bits`` does in torch, for a block of rows starting mid-tensor."""
    from tuneforge_kernels.dropout import Mask, drop

    rows, cols = (37, 301) if device == "cpu" else (4099, 14337)
    p = 0.3
    yg, yu, dh, terms, down = _case(rows, cols, (5, 16, 3), device, dtype, seed=11)
    if kind == "stream":
        mask = (torch.rand(rows, cols, generator=torch.Generator().manual_seed(12)) > p).to(device)
        drawn = Mask(p, mask.shape, mask.device, cols, keep=mask)
    else:
        seed = torch.tensor([0x1234_5678_9ABC], device=device)
        drawn = Mask(p, (rows + 5, cols), yg.device, cols, seed=seed, salt=3).rows(slice(5, rows + 5))
        mask = drawn.bits((rows, cols))
        assert abs(mask.float().mean().item() - (1 - p)) < 0.02
    ygr, yur = yg.double().requires_grad_(), yu.double().requires_grad_()
    h = lora_glu_reference(ygr, yur, "silu", **{k: v.double() if isinstance(v, torch.Tensor) else v
                                                   for k, v in terms.items()})
    term = down["s_d"] * (down["dy_b"].double() @ down["a_d"].double()) * mask / (1 - p)
    dg_ref, du_ref = torch.autograd.grad(h, (ygr, yur), dh.double() + term)
    h_dropped = drop(lora_glu_forward(yg, yu, "silu", **terms), drawn)
    lora_glu_backward_inplace(dh, yg, yu, "silu", **terms, **down, dropped_d=drawn)
    if device == "cpu" and dtype == torch.float32:
        assert torch.equal(dh, h_dropped)
    else:
        assert rel_err(dh, h_dropped) < TOL[dtype]
    assert rel_err(yg, dg_ref) < TOL[dtype]
    assert rel_err(yu, du_ref) < TOL[dtype]


def test_every_output_element_is_written(monkeypatch):
    """h comes from torch.empty_like: poisoned with NaN here, so a tile that skipped an edge row or column
    (33 x 129: neither 16 x 256 nor 32 x 128 tiles divide it) would leave NaN behind."""
    import tuneforge_kernels.lora_glu as mod

    monkeypatch.setattr(mod.torch, "empty_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
    yg, yu, dh, terms, down = _case(33, 129, (4, 4, 4), "cpu", torch.float32, seed=3)
    h_ref, _, _ = _expected(yg, yu, dh, "silu", terms, down)
    h = mod.lora_glu_forward(yg, yu, "silu", **terms)
    assert torch.isfinite(h).all() and rel_err(h, h_ref) < 1e-5


@pytest.mark.parametrize("tile", [FWD_TILE, (32, 128, 4), (16, 1024, 8)])
def test_tiles_cover_odd_shapes(monkeypatch, tile):
    """The kernels' tile (and others micro.py times: v13's, the widest) through the interpreter: rows and
    columns that no tile divides, every term present; the outputs start as NaN so a skipped edge shows."""
    import tuneforge_kernels.lora_glu as mod

    monkeypatch.setattr(mod, "FWD_TILE", tile)
    monkeypatch.setattr(mod, "BWD_TILE", tile)
    yg, yu, dh, terms, down = _case(tile[0] + 3, tile[1] * 2 + 5, (3, 4, 5), "cpu", torch.float32, seed=8)
    h_ref, dg_ref, du_ref = _expected(yg, yu, dh, "gelu_tanh", terms, down)
    monkeypatch.setattr(mod.torch, "empty_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
    assert rel_err(lora_glu_forward(yg, yu, "gelu_tanh", **terms), h_ref) < 1e-5
    lora_glu_backward_inplace(dh, yg, yu, "gelu_tanh", **terms, **down)
    assert rel_err(dh, h_ref) < 1e-5 and rel_err(yg, dg_ref) < 1e-5 and rel_err(yu, du_ref) < 1e-5


@pytest.mark.parametrize("tile", [(8, 512, 4), (4, 1024, 4), (64, 64, 4)])
def test_plain_launches_take_their_own_tiles(monkeypatch, tile):
    """Launches without rank-r terms (the padded MLP's) take ``PLAIN_FWD_TILE`` / ``PLAIN_BWD_TILE``, which
    bench/micro.py's ``glu_plain`` times (some of its candidates here), and cover rows and columns no tile
    divides; launches with a term keep ``FWD_TILE`` / ``BWD_TILE``."""
    import tuneforge_kernels.lora_glu as mod

    monkeypatch.setattr(mod, "PLAIN_FWD_TILE", tile)
    monkeypatch.setattr(mod, "PLAIN_BWD_TILE", (16, 128, 4))
    monkeypatch.setattr(mod, "BWD_TILE", (32, 64, 4))
    grids, real_grid = [], mod._grid
    monkeypatch.setattr(mod, "_grid", lambda rows, cols, t: grids.append(t) or real_grid(rows, cols, t))
    yg, yu, dh, terms, down = _case(tile[0] + 3, tile[1] + 5, (0, 0, 0), "cpu", torch.float32, seed=9)
    h_ref, dg_ref, du_ref = _expected(yg, yu, dh, "silu", terms, down)
    monkeypatch.setattr(mod.torch, "empty_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
    assert rel_err(lora_glu_forward(yg, yu, "silu"), h_ref) < 1e-5
    lora_glu_backward_inplace(dh, yg, yu, "silu")
    assert rel_err(dh, h_ref) < 1e-5 and rel_err(yg, dg_ref) < 1e-5 and rel_err(yu, du_ref) < 1e-5
    yg, yu, dh, terms, down = _case(5, 7, (2, 0, 0), "cpu", torch.float32, seed=10)
    lora_glu_forward(yg, yu, "silu", **terms)
    lora_glu_backward_inplace(dh, yg, yu, "silu", **terms)
    assert grids == [tile, (16, 128, 4), FWD_TILE, (32, 64, 4)]


def test_strided_rows_and_column_slices_of_a_wider_product():
    """x A^T for gate and up comes out of one GEMM as column slices of an (N, r_g + r_u) tensor."""
    yg, yu, dh, terms, down = _case(19, 70, (3, 5, 0), "cpu", torch.float32, seed=4)
    both = torch.cat([terms["xa_g"], terms["xa_u"]], dim=1)
    sliced = dict(terms, xa_g=both[:, :3], xa_u=both[:, 3:])
    assert not sliced["xa_u"].is_contiguous()
    assert rel_err(lora_glu_forward(yg, yu, "gelu", **sliced), lora_glu_forward(yg, yu, "gelu", **terms)) == 0


def test_output_into_the_rows_of_a_wider_buffer():
    """``out``: h written into the first I columns of an (N, I + r) buffer (the padded MLP's input of the
    down projection), the spare columns untouched."""
    yg, yu, dh, terms, down = _case(19, 70, (3, 5, 0), "cpu", torch.float32, seed=5)
    buf = torch.full((19, 70 + 6), 7.0)
    lora_glu_forward(yg, yu, "silu", **terms, out=buf[:, :70])
    assert rel_err(buf[:, :70], lora_glu_forward(yg, yu, "silu", **terms)) == 0
    assert (buf[:, 70:] == 7.0).all()


def test_gate_and_up_as_the_column_halves_of_one_product():
    """Joined gate/up weights give one (N, 2I) product: g and u are its halves (row stride 2I) while h and
    dh are (N, I) tensors of their own; backward leaves dg and du side by side in the product."""
    yg, yu, dh, terms, down = _case(21, 67, (3, 4, 5), "cpu", torch.float32, seed=7)
    h_ref, dg_ref, du_ref = _expected(yg, yu, dh, "silu", terms, down)
    gu = torch.cat([yg, yu], dim=1)
    g, u = gu.split(67, dim=1)
    assert rel_err(lora_glu_forward(g, u, "silu", **terms), h_ref) < 1e-5
    dh_buf = dh.clone()
    lora_glu_backward_inplace(dh_buf, g, u, "silu", **terms, **down)
    assert rel_err(dh_buf, h_ref) < 1e-5
    assert rel_err(gu[:, :67], dg_ref) < 1e-5 and rel_err(gu[:, 67:], du_ref) < 1e-5


def test_reference_path_and_rank_limit():
    yg, yu, _, terms, _ = _case(6, 20, (2, 2, 0), "cpu", torch.float32, seed=5)
    assert rel_err(lora_glu(yg, yu, "silu", **terms, impl="reference"),
                   lora_glu(yg, yu, "silu", **terms, impl="triton")) < 1e-6
    assert fusable(None, torch.empty(4, MAX_RANK)) and not fusable(torch.empty(4, MAX_RANK + 1))


@pytest.mark.gpu
@needs_cuda
def test_int64_indexing_beyond_2_31_elements():
    rows, cols = 150_001, 14_336  # 2.15e9 elements per tensor
    yg, yu, dh, terms, down = _case(rows, cols, (16, 16, 16), "cuda", torch.bfloat16, seed=6)
    tail = slice(rows - 3, rows)  # the last rows: past 2^31 elements from the base pointer
    row_terms = ("xa_g", "xa_u", "dy_b")
    cut = {k: (v[tail] if k in row_terms and v is not None else v) for k, v in {**terms, **down}.items()}
    h_ref, dg_ref, du_ref = _expected(yg[tail], yu[tail], dh[tail], "silu",
                                      {k: cut[k] for k in terms}, {k: cut[k] for k in down})
    lora_glu_backward_inplace(dh, yg, yu, "silu", **terms, **down)
    assert rel_err(dh[tail], h_ref) < TOL[torch.bfloat16]
    assert rel_err(yg[tail], dg_ref) < TOL[torch.bfloat16] and rel_err(yu[tail], du_ref) < TOL[torch.bfloat16]


def test_the_benchmarks_tile_flag_names_this_modules_tiles():
    """bench/train_step.py's ``--glu-tile`` sets lora_glu's tiles by name (an A/B in the step): every name it
    sets is one this module reads, so a rename cannot leave the flag setting a tile no launch uses."""
    import importlib.util
    from pathlib import Path

    import tuneforge_kernels.lora_glu as mod

    path = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    names = {name for kind in bench.GLU_TILE_KINDS.values() for name in kind}
    assert names == {name for name in vars(mod) if name.endswith("_TILE")}
    assert bench._tile_arg("bwd=16,512,8") == ("bwd", (16, 512, 8))
    assert bench._tile_arg("32,128,8") == ("terms", (32, 128, 8))
