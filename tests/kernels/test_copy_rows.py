"""copy_rows (Triton) into the first columns of a wider buffer: the values copied exactly, the columns after
them untouched, and any other layout handed to ``copy_``."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.copy_rows import copy_rows, copy_rows_reference
from tests.kernels.conftest import DEVICES, needs_cuda, needs_triton

pytestmark = needs_triton


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copies_into_the_first_columns_of_a_wider_buffer(device, dtype):
    # rows and columns that are not multiples of the tile (8 x 1024), a source with a row stride of its own
    rows, cols, spare = (13, 1030, 7) if device == "cpu" else (8191, 4099, 33)
    src = torch.randn(rows, cols + 5, device=device, dtype=dtype)[:, 2:cols + 2]
    buf = torch.full((rows, cols + spare), 7.0, device=device, dtype=dtype)
    out = copy_rows(buf[:, :cols], src, impl="triton")
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:, :cols], src)  # a copy: bit for bit
    assert (buf[:, cols:] == 7.0).all()    # the spare columns are the consumer's


def test_other_layouts_take_copy_and_match_the_reference():
    src = torch.randn(6, 10)
    for dst in (torch.zeros(10, 6).t(), torch.zeros(6, 10, dtype=torch.float64), torch.zeros(6, 20)[:, ::2]):
        want = copy_rows_reference(dst.clone(), src)
        assert torch.equal(copy_rows(dst, src, impl="triton"), want)
    empty = torch.zeros(0, 4)
    assert copy_rows(empty, torch.zeros(0, 4), impl="triton").shape == (0, 4)


@pytest.mark.gpu
@needs_cuda
def test_int64_indexing_beyond_2_31_elements():
    """A source and a buffer of 2^31 + 8 x 4104 bf16 elements each (4.3 GB), both with a row stride wider
    than the copy: ``row * stride`` overflows int32 in the last 8 rows. Every row compared (a copy: bit for
    bit, no float64 copy needed) and the spare columns still 7."""
    cols, ld = 4096, 4104
    rows = -(-(1 << 31) // ld) + 8
    src = torch.randn(rows, ld, device="cuda", dtype=torch.bfloat16)[:, 3:cols + 3]
    buf = torch.full((rows, ld), 7.0, device="cuda", dtype=torch.bfloat16)
    assert (rows - 8) * ld >= 2 ** 31
    copy_rows(buf[:, :cols], src, impl="triton")
    assert torch.equal(buf[:, :cols], src)
    assert (buf[:, cols:] == 7.0).all()
