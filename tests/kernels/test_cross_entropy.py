"""fused_linear_cross_entropy (chunked Triton) against full-logits cross-entropy in float64."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from tests.kernels.conftest import DEVICES, TOL, needs_triton, rel_err

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(device, dtype, case):
    n, hidden, vocab = (37, 24, 301) if device == "cpu" else (1031, 4096, 128256)
    h, w, labels = _case(device, dtype, n, hidden, vocab)
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, impl="triton", **CASES[case])
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = fused_linear_cross_entropy_reference(hr, wr, labels, **CASES[case])
    assert rel_err(loss, ref) < TOL[dtype]
    got = torch.autograd.grad(loss * 1.7, (h, w))
    exp = torch.autograd.grad(ref * 1.7, (hr, wr))
    for a, b in zip(got, exp):
        assert rel_err(a, b) < TOL[dtype]


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
