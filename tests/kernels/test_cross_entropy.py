"""fused_linear_cross_entropy (chunked Triton) and its per-row kernel against full-logits cross-entropy in
float64; rows wider than one vocabulary tile on the CPU too; offsets past 2^31 elements on a GPU."""

from __future__ import annotations

import pytest
import torch

import tuneforge_kernels.cross_entropy as ce
from tuneforge_kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from tests.kernels.conftest import DEVICES, TOL, needs_cuda, needs_triton, rel_err

pytestmark = needs_triton

CASES = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 3.0},
    "num_items": {"num_items": 40},
    "sum": {"reduction": "sum"},
}


def _case(device, dtype, n, hidden, vocab, seed=0):
    torch.manual_seed(seed)
    h = torch.randn(n, 2 * hidden, device=device, dtype=dtype)[:, ::2]  # non-contiguous rows
    w = torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden ** 0.5
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[::4] = -100
    return h, w, labels


def _assert_fused_matches_reference(h, w, labels, case, dtype):
    """The fused op's loss and both gradients against the float64 reference, within ``TOL[dtype]``."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, impl="triton", **CASES[case])
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = fused_linear_cross_entropy_reference(hr, wr, labels, **CASES[case])
    assert rel_err(loss, ref) < TOL[dtype]
    got = torch.autograd.grad(loss * 1.7, (h, w))
    exp = torch.autograd.grad(ref * 1.7, (hr, wr))
    for a, b in zip(got, exp):
        assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(device, dtype, case):
    n, hidden, vocab = (37, 24, 301) if device == "cpu" else (1031, 4096, 128256)
    h, w, labels = _case(device, dtype, n, hidden, vocab)
    _assert_fused_matches_reference(h, w, labels, case, dtype)


def test_fully_masked_batch_is_zero_not_nan():
    h, w, labels = _case("cpu", torch.float32, 9, 8, 50)
    h.requires_grad_()
    labels[:] = -100
    loss = fused_linear_cross_entropy(h, w, labels, impl="triton")
    (dh,) = torch.autograd.grad(loss, (h,))
    assert loss.item() == 0.0 and torch.count_nonzero(dh) == 0


def test_frozen_head_gets_no_gradient():
    h, w, labels = _case("cpu", torch.float32, 9, 8, 50)
    h.requires_grad_()
    fused_linear_cross_entropy(h, w, labels, impl="triton").backward()
    assert h.grad is not None and w.grad is None


def test_grad_accumulation_with_num_items_equals_one_big_batch():
    # k micro-batches each normalised by the total trained tokens == one batch of all of them
    h, w, labels = _case("cpu", torch.float32, 40, 16, 97, seed=3)
    labels[5:17] = -100  # uneven trained-token counts across the micro-batches
    h = h.detach().requires_grad_()
    total = (labels != -100).sum()
    acc = sum(fused_linear_cross_entropy(h[i:i + 10], w, labels[i:i + 10], num_items=total, impl="triton")
              for i in range(0, 40, 10))
    (g_acc,) = torch.autograd.grad(acc, (h,))
    big = fused_linear_cross_entropy(h, w, labels, impl="triton")
    (g_big,) = torch.autograd.grad(big, (h,))
    assert rel_err(acc, big) < 1e-6 and rel_err(g_acc, g_big) < 1e-6


@pytest.mark.parametrize("rows", [7, 64])
def test_chunking_covers_every_row(monkeypatch, rows):
    # several chunks, the last one ragged (130 = 18 x 7 + 4, 2 x 64 + 2): loss and gradient of every row
    import tuneforge_kernels.cross_entropy as ce

    monkeypatch.setattr(ce, "_chunk_rows", lambda *_: rows)
    h, w, labels = _case("cpu", torch.float32, 130, 32, 64, seed=4)
    h = h.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, impl="triton")
    (g,) = torch.autograd.grad(loss, (h,))
    h64 = h.detach().double().requires_grad_()
    ref = fused_linear_cross_entropy_reference(h64, w.double(), labels)
    (g_ref,) = torch.autograd.grad(ref, (h64,))
    assert rel_err(loss, ref) < 1e-5 and rel_err(g, g_ref) < 1e-5


def test_chunk_rows_rule():
    from tuneforge_kernels.cross_entropy import _chunk_rows

    # the benchmark shapes (8192 tokens, 128K vocabulary): 256 rows, logits about the hidden states' size
    assert _chunk_rows(8192, 4096, 128256) == 256 and _chunk_rows(8192, 2048, 128256) == 256
    # few rows: a power of two at or above their count
    assert _chunk_rows(40, 4096, 128256) == 2 and _chunk_rows(3, 64, 64) == 4


def test_chunk_logits_sets_the_rows_per_chunk_and_keeps_the_values():
    from tuneforge_kernels.cross_entropy import _chunk_rows

    assert _chunk_rows(8192, 2048, 128256) == 256  # the default: about the hidden states' size
    assert _chunk_rows(8192, 2048, 128256, 1 << 27) == 1024  # 2^27 logits of a 128K vocabulary
    assert _chunk_rows(8192, 2048, 300000, 1000) == 1  # never under one row
    torch.manual_seed(7)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (37,))
    ref = fused_linear_cross_entropy(h, w, y, impl="triton")
    got = fused_linear_cross_entropy(h, w, y, chunk_logits=8 * 50, impl="triton")  # chunks of 8 rows
    assert rel_err(got, ref) < 1e-6
    assert rel_err(torch.autograd.grad(got, h)[0], torch.autograd.grad(ref, h)[0]) < 1e-6


# Rows wider than one vocabulary tile. The kernel's tile is min(32768, next_power_of_2(V)): at V <= 301 (the
# CPU cases above) a row is one tile, and the running max / sum-exp rescaling and the smoothing sum across
# tiles run only in the GPU case. At V = 70001 a row is three tiles, the last 4465 wide (masked); under the
# interpreter one launch over a few such rows takes ~0.1 s.
WIDE_VOCAB = 70001
ROW_CASES = {"plain": (0.0, None), "smoothing": (0.1, None), "softcap": (0.0, 10.0), "both": (0.1, 10.0)}


def _wide_rows(dtype):
    """Logits and labels placed where the online softmax can go wrong: the max in the first, a middle or
    the last (ragged) tile, a max that rises through every tile; labels on either side of a tile boundary,
    in the ragged tile, and one ignored row."""
    v, tile = WIDE_VOCAB, 32768
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(7, v, generator=gen) * 2
    # spikes of 100: exp(100 - m) overflows float32 unless m is the running max of every tile so far
    z[1, -1] = 100.0        # max in the ragged last tile: the sum so far rescaled at the last step
    z[2, 0] = 100.0         # max in the first tile: every later tile's exp(z - m) underflows
    z[3] += torch.linspace(-12.0, 12.0, v)  # each tile raises the running max
    z[4, tile + 7] = 100.0  # max in the middle tile
    labels = torch.tensor([5, v - 1, tile, tile - 1, tile + 7, 2 * tile + 100, -100])
    return z.to(dtype), labels


def _rows_reference(z, labels, smoothing, softcap):
    """Per-row losses and d(loss_i)/d(logits) in float64: torch's cross-entropy of the softcapped logits."""
    z64 = z.double().requires_grad_()
    zc = softcap * torch.tanh(z64 / softcap) if softcap else z64
    loss = torch.nn.functional.cross_entropy(zc, labels, ignore_index=-100, reduction="none",
                                             label_smoothing=smoothing)
    (grad,) = torch.autograd.grad(loss.sum(), z64)
    return loss.detach(), grad


# The launches bench/micro.py's ``ce_rows`` compares: the shipped one, L2 eviction hints, narrower tiles
# (5 and 9 of them a row here) with fewer warps.
LAUNCHES = {"shipped": {}, "keep": {"keep": True}, "16k": {"block": 16384, "num_warps": 16, "keep": True},
            "8k": {"block": 8192, "num_warps": 8}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(ROW_CASES))
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_rows_wider_than_one_vocab_tile_match_reference(dtype, case, launch):
    """The row kernel alone: each row's loss, and the gradient it writes over the logits (zero for the
    ignored row); without the gradient pass the logits are left as they were and the losses are the same."""
    smoothing, softcap = ROW_CASES[case]
    z, labels = _wide_rows(dtype)
    loss_ref, grad_ref = _rows_reference(z, labels, smoothing, softcap)
    logits, loss = z.clone(), torch.empty(z.shape[0])
    ce._rows_kernel_launch(logits, labels, loss, -100, smoothing, softcap or 0.0, True, **LAUNCHES[launch])
    # the losses are float32 whatever the logits' dtype: sums of 70001 terms, a few float32 roundings
    assert rel_err(loss, loss_ref) < TOL[torch.float32], rel_err(loss, loss_ref)
    assert rel_err(logits, grad_ref) < TOL[dtype], rel_err(logits, grad_ref)
    assert torch.count_nonzero(logits[-1]) == 0
    kept, loss_only = z.clone(), torch.empty(z.shape[0])
    ce._rows_kernel_launch(kept, labels, loss_only, -100, smoothing, softcap or 0.0, False, **LAUNCHES[launch])
    assert torch.equal(kept, z) and torch.equal(loss_only, loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_over_a_vocab_wider_than_one_tile(dtype, case):
    """fused_linear_cross_entropy end to end at V = 70001 on the CPU (three tiles a row), every case of
    ``CASES`` with ignored rows (``_case`` ignores every fourth), loss and both gradients."""
    h, w, labels = _case("cpu", dtype, 9, 16, WIDE_VOCAB, seed=12)
    _assert_fused_matches_reference(h, w, labels, case, dtype)


# Past 2^31 elements (GPU only): the row kernel offsets ``row * stride`` in int64; a chunk's logits can
# pass 2^31 elements when ``chunk_logits`` allows it. bf16 logits of a 128K vocabulary, 4.3 GB.
_BIG_VOCAB = 128256
_BIG_ROWS = -(-(1 << 31) // _BIG_VOCAB) + 8  # 16752 rows: the last 8 start at 2^31 elements or past


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", ["plain", "both"])
def test_int64_indexing_beyond_2_31_elements(case):
    smoothing, softcap = ROW_CASES[case]
    torch.manual_seed(13)
    logits = torch.randn(_BIG_ROWS, _BIG_VOCAB, device="cuda", dtype=torch.bfloat16) * 2
    labels = torch.randint(0, _BIG_VOCAB, (_BIG_ROWS,), device="cuda")
    labels[-2] = -100
    tail = slice(_BIG_ROWS - 4, _BIG_ROWS)
    assert (_BIG_ROWS - 8) * logits.stride(0) >= 2 ** 31
    loss_ref, grad_ref = _rows_reference(logits[tail].cpu(), labels[tail].cpu(), smoothing, softcap)
    loss = torch.empty(_BIG_ROWS, device="cuda")
    ce._rows_kernel_launch(logits, labels, loss, -100, smoothing, softcap or 0.0, True)
    assert rel_err(loss[tail], loss_ref) < TOL[torch.float32]
    assert rel_err(logits[tail], grad_ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@needs_cuda
def test_int64_indexing_in_one_fused_chunk_beyond_2_31_logits():
    """One chunk of 16752 rows x 128256 (``chunk_logits`` 2^32 allows 32768 rows): its logits pass 2^31
    elements. Only the first two and last four rows are trained, so the reference needs their logits
    alone: the same loss (the same count divides it), their rows of dh, dW from them, zero dh elsewhere."""
    torch.manual_seed(14)
    hidden = 1024
    h = torch.randn(_BIG_ROWS, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(_BIG_VOCAB, hidden, device="cuda", dtype=torch.bfloat16) / hidden ** 0.5).requires_grad_()
    labels = torch.full((_BIG_ROWS,), -100, device="cuda")
    trained = torch.tensor([0, 1, *range(_BIG_ROWS - 4, _BIG_ROWS)], device="cuda")
    labels[trained] = torch.randint(0, _BIG_VOCAB, (len(trained),), device="cuda")
    assert ce._chunk_rows(_BIG_ROWS, hidden, _BIG_VOCAB, 1 << 32) >= _BIG_ROWS
    loss = fused_linear_cross_entropy(h, w, labels, label_smoothing=0.1, softcap=30.0, chunk_logits=1 << 32)
    dh, dw = torch.autograd.grad(loss, (h, w))
    hr, wr = h.detach()[trained].double().requires_grad_(), w.detach().double().requires_grad_()
    ref = fused_linear_cross_entropy_reference(hr, wr, labels[trained], label_smoothing=0.1, softcap=30.0)
    dh_ref, dw_ref = torch.autograd.grad(ref, (hr, wr))
    assert rel_err(loss, ref) < TOL[torch.bfloat16]
    assert rel_err(dh[trained], dh_ref) < TOL[torch.bfloat16] and rel_err(dw, dw_ref) < TOL[torch.bfloat16]
    assert torch.count_nonzero(dh[2:_BIG_ROWS - 4]) == 0
