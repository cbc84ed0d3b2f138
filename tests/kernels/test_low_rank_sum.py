"""low_rank_sum (``a + c + p @ b^T`` in one pass): the float64 spec on odd shapes and ranks, with and without
``c``, strided operands (the padded down projection's: columns of wider buffers), and what it hands to the
reference."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.low_rank_sum import MAX_RANK, low_rank_sum, low_rank_sum_reference
from tests.kernels.conftest import DEVICES, TOL, needs_triton, rel_err

pytestmark = needs_triton


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 16, 37])
@pytest.mark.parametrize("with_c", [False, True])
def test_matches_float64(device, dtype, rank, with_c):
    n, h = (45, 300) if device == "cpu" else (8191, 4096)
    g = torch.Generator(device=device).manual_seed(rank)
    # a and p as column blocks of one wider buffer (the N-augmented GEMM's output), b a column block too
    out = torch.randn(n, h + 64, device=device, dtype=dtype, generator=g)
    a, p = out[:, :h], out[:, h:h + rank]
    b = torch.randn(h, rank + 3, device=device, dtype=dtype, generator=g)[:, 1:rank + 1]
    c = torch.randn(n, h, device=device, dtype=dtype, generator=g) if with_c else None
    y = low_rank_sum(a, c, p, b, impl="triton")
    want = a.double() + p.double() @ b.double().t() + (c.double() if with_c else 0)
    assert y.shape == (n, h) and y.dtype == dtype and y.is_contiguous()
    assert rel_err(y, want) < TOL[dtype]


def test_the_reference_serves_what_the_kernel_does_not_take():
    # a rank over MAX_RANK, a column-strided a: the reference's result, not an error
    a, c = torch.randn(5, 40), torch.randn(5, 40)
    p, b = torch.randn(5, MAX_RANK + 1), torch.randn(40, MAX_RANK + 1)
    assert torch.equal(low_rank_sum(a, c, p, b, impl="triton"), low_rank_sum_reference(a, c, p, b))
    at = torch.randn(40, 5).t()
    p, b = torch.randn(5, 3), torch.randn(40, 3)
    assert torch.equal(low_rank_sum(at, None, p, b, impl="triton"), low_rank_sum_reference(at, None, p, b))
    assert low_rank_sum(torch.randn(0, 8), None, torch.randn(0, 2), torch.randn(8, 2), impl="triton").shape == (0, 8)
