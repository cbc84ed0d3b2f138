"""cast_blocks (Triton): several adapters cast into the blocks of a wider buffer in one launch, bit for bit as
``copy_``, the rest of the buffer untouched, and anything else handed to ``copy_``."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.cast_blocks import MAX_BLOCKS, cast_blocks, cast_blocks_reference
from tests.kernels.conftest import DEVICES, needs_cuda, needs_triton

pytestmark = needs_triton


def _layout(device, n_blocks, big):
    # a padded layer's buffer (bf16) and float32 adapters for disjoint blocks of it, as the layouts place
    # them: tall ones (out x r) in the columns after the weight, wide ones (r x in) in the rows under it;
    # ranks that differ, sizes that are not multiples of the tile, sources with a row stride of their own
    h, o = (2048, 8192) if big else (40, 70)
    ranks = [16 + b for b in range(n_blocks)]
    buf = torch.full((o + sum(ranks), h + sum(ranks)), 7.0, device=device, dtype=torch.bfloat16)
    pairs = []
    for b, r in enumerate(ranks):
        at = sum(ranks[:b])
        if b % 2:
            dst, src = buf[o + at:o + at + r, 3:h], torch.randn(r, h + 5, device=device)[:, 2:h - 1]
        else:
            dst, src = buf[b:o, h + at:h + at + r], torch.randn(o - b, r, device=device)
        pairs.append((dst, src))
    return buf, pairs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_blocks", [1, MAX_BLOCKS, MAX_BLOCKS + 2])
def test_casts_every_block_as_copy_does_and_nothing_else(device, n_blocks):
    buf, pairs = _layout(device, n_blocks, big=device != "cpu")
    want = buf.clone()
    cast_blocks_reference([(want.as_strided(d.shape, d.stride(), d.storage_offset()), s)
                           for d, s in pairs])
    cast_blocks(pairs, impl="triton")
    assert torch.equal(buf, want)  # the blocks bit for bit (round to nearest), the rest still 7


def test_other_layouts_take_copy():
    src = torch.randn(6, 10)
    dsts = [torch.zeros(10, 6).t(), torch.zeros(6, 20)[:, ::2], torch.zeros(6, 10, dtype=torch.bfloat16)]
    cast_blocks([(d, src) for d in dsts], impl="triton")
    for d in dsts[:2]:
        assert torch.equal(d, src)
    assert torch.equal(dsts[2], src.to(torch.bfloat16))  # the kernel's cast (interpreted: rounded to nearest)
    cast_blocks([(torch.zeros(0, 4), torch.zeros(0, 4))], impl="triton")  # empty: nothing to launch


@pytest.mark.parametrize("device", DEVICES)
def test_strided_sources_widen_into_float32_blocks(device):
    # the adapters' gradients (lora_mlp.cast_group): bf16 views of wider products, every other row, transposed,
    # a column slice, cast into consecutive float32 blocks of one flat buffer in one launch
    wide = torch.randn(70, 40, device=device).to(torch.bfloat16)
    sources = [wide[0::2, :16], wide[1::2, 16:35], wide[:, :24].t(), wide[3:9, 5:]]
    flat = torch.full((sum(s.numel() for s in sources) + 3,), 7.0, device=device)
    dsts, at = [], 0
    for s in sources:
        dsts.append(flat[at:at + s.numel()].view(s.shape))
        at += s.numel()
    cast_blocks(list(zip(dsts, sources)), impl="triton")
    for d, s in zip(dsts, sources):
        assert torch.equal(d, s.float())
    assert (flat[at:] == 7.0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16])
def test_scaled_blocks_are_the_promoted_product_rounded_once(device, dst_dtype):
    # a dA read from its norm's input (rms_norm.NormRecipe) multiplied by the norm's float32 weight along its
    # columns as it is cast: bit for bit torch's (src * scale).to(dst) (bf16 widened, one float32 product,
    # rounded once), beside unscaled blocks of the same launch and a scaled pair that takes copy_
    torch.manual_seed(3)
    wide = torch.randn(48, 40, device=device).to(torch.bfloat16)
    sources = [wide[:16], wide[16:35], wide[35:].t(), wide[:7, 3:]]
    scales = [torch.randn(40, device=device), None, None, torch.randn(37, device=device)]
    flat = torch.full((sum(s.numel() for s in sources),), 7.0, device=device, dtype=dst_dtype)
    dsts, at = [], 0
    for s in sources:
        dsts.append(flat[at:at + s.numel()].view(s.shape))
        at += s.numel()
    cast_blocks(list(zip(dsts, sources)), impl="triton", scales=scales)
    for d, s, k in zip(dsts, sources, scales):
        assert torch.equal(d, (s if k is None else s * k).to(dst_dtype))
    odd = torch.zeros(16, 40, dtype=dst_dtype, device=device).t()  # not a layout for the kernel: copy_
    cast_blocks([(odd, sources[0].t())], impl="triton", scales=[torch.randn(16, device=device)])
    with pytest.raises(ValueError):
        cast_blocks([(dsts[0], sources[0])], impl="triton", scales=[])


@pytest.mark.parametrize("device", DEVICES)
def test_the_hard_values_round_as_torch_does(device):
    # ties (to even, either way), the largest finite float32 (rounds to inf), inf, NaN, bf16 subnormals and
    # zeros of both signs. On the CPU this checks our interpreted launches' cast (backend._cast_rounding_bf16:
    # Triton's interpreter truncates)
    low = torch.arange(64, dtype=torch.int32) << 16
    ties = torch.cat([low | 0x8000, (low | 0x18000), -(low | 0x8000)]).view(torch.float32)  # mantissas even/odd
    hard = torch.tensor([3.4028235e38, -3.4028235e38, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40,
                         0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
    src = torch.cat([ties, hard, torch.randn(77)]).view(1, -1).to(device)
    dst = torch.zeros_like(src, dtype=torch.bfloat16)
    cast_blocks([(dst, src)], impl="triton")
    want = src.to(torch.bfloat16)
    assert torch.equal(dst.isnan(), want.isnan())
    assert torch.equal(dst.nan_to_num().view(torch.int16), want.nan_to_num().view(torch.int16))


@pytest.mark.gpu
@needs_cuda
def test_int64_indexing_beyond_2_31_elements():
    """A padded layer's buffer of 2^31 + 8 x 8208 bf16 elements (4.3 GB, hidden 8192 + rank 16): the tall
    block (B's columns after the weight) has row offsets ``r * ld`` past 2^31 in its last rows though it
    holds 4M elements (the kernel takes blocks under 2^31 elements); its source is a column slice of an
    equally long float32 tensor (8.6 GB), so ``r * ld_src`` passes 2^31 too. The blocks as ``copy_`` casts
    them (round to nearest even on the GPU), the weight's part and the corner still 7."""
    h, r = 8192, 16
    ld = h + r
    o = -(-(1 << 31) // ld) + 8  # the last 8 rows start at 2^31 elements or past
    buf = torch.full((o + r, ld), 7.0, device="cuda", dtype=torch.bfloat16)
    tall_src = torch.randn(o, ld, device="cuda")[:, 5:5 + r]
    wide_src = torch.randn(r, h, device="cuda")
    assert (o - 8) * ld >= 2 ** 31 and buf[:o, h:].numel() < 2 ** 31
    cast_blocks([(buf[:o, h:], tall_src), (buf[o:, :h], wide_src)], impl="triton")
    assert torch.equal(buf[:o, h:], tall_src.to(torch.bfloat16))
    assert torch.equal(buf[o:, :h], wide_src.to(torch.bfloat16))
    assert (buf[:o, :h] == 7.0).all() and (buf[o:, h:] == 7.0).all()
