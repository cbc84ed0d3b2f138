"""tuneforge_kernels.nf4: the one-pass NF4 dequantisation equals its plain-torch spec bit for bit (same float32
operations, one rounding to the output dtype), nested or not, on sizes that are not a multiple of the
kernel's block; on a GPU with bitsandbytes, it equals bitsandbytes' own dequantisation bit for bit."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.nf4 import NF4State, dequantize_nf4, dequantize_nf4_reference
from tests.kernels.conftest import DEVICES, needs_cuda, needs_triton

_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0]


def _state(shape, nested, dtype, device, blocksize=64, blocksize2=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, (n // 2, 1), generator=g, dtype=torch.uint8)
    common = dict(code=torch.tensor(_NF4), blocksize=blocksize, shape=shape, dtype=dtype)
    if nested:
        s = NF4State(absmax=torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8),
                     code2=torch.randn(256, generator=g).sort().values, blocksize2=blocksize2,
                     absmax2=torch.rand(-(-n_blocks // blocksize2), generator=g) + 0.5,
                     offset=torch.tensor(0.03125), **common)
    else:
        s = NF4State(absmax=torch.rand(n_blocks, generator=g) + 0.1, **common)
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(s).items()}
    return packed.to(device), NF4State(**moved)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(6, 64), (70, 130), (96, 1000)])
def test_equals_the_spec(device, nested, dtype, shape):
    packed, s = _state(shape, nested, dtype, device)
    out = dequantize_nf4(packed, s, impl="triton")
    ref = dequantize_nf4_reference(packed, s)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out, ref)  # the CPU interpreter rounds to nearest like the GPU (backend._cast_rounding_bf16)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiled,blocksize", [(True, 64), (True, 256), (False, 64), (False, 96)])
def test_both_kernels_equal_the_spec_on_partial_blocks(device, tiled, blocksize):
    """The tiled kernel (whole quantisation blocks per program) and the flat one (any blocksize: a
    non-power-of-two blocksize goes there) write every element, the last partial block included."""
    from tuneforge_kernels.nf4 import _launch

    shape = (70, 130)  # 9100 values: a partial last block for every blocksize here
    packed, s = _state(shape, True, torch.float32, device, blocksize=blocksize, blocksize2=4)
    out = torch.full(shape, float("nan"), device=device)
    _launch(packed.contiguous(), s, out, tiled=tiled, values=512)
    assert torch.equal(out, dequantize_nf4_reference(packed, s))


def test_nibble_order_and_scale():
    # byte 0x1E: element 0 is code[1] (high nibble), element 1 code[14]; absmax 2 on the whole block
    s = NF4State(code=torch.tensor(_NF4), absmax=torch.tensor([2.0]), blocksize=64, shape=(1, 2),
                 dtype=torch.float32)
    out = dequantize_nf4(torch.tensor([0x1E], dtype=torch.uint8), s, impl="triton")
    assert out.tolist() == [[2 * _NF4[1], 2 * _NF4[14]]]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(1024, 4096), (336, 520)])
def test_equals_bitsandbytes(nested, shape):
    bnb = pytest.importorskip("bitsandbytes")
    from gpu_worker.patching.lora import _nf4_state

    w = torch.randn(shape, device="cuda").to(torch.bfloat16)
    packed, qs = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    ours = dequantize_nf4(packed, _nf4_state(qs))
    assert torch.equal(ours, bnb.functional.dequantize_4bit(packed, qs))


@needs_triton
def test_pick_variant_keeps_the_fastest_bit_equal_one():
    from tuneforge_kernels.nf4 import VARIANTS, _launch, pick_variant

    packed, s = _state((70, 130), True, torch.float32, "cpu")
    expected = torch.empty(s.shape)
    _launch(packed, s, expected, tiled=False)  # the interpreter's own values (bit-equal to the spec here)
    times = iter([3.0, 1.0, 2.0])
    choice, outcomes = pick_variant(packed, s, expected, time_ms=lambda fn, cuda: next(times))
    assert list(outcomes) == list(VARIANTS) and choice == list(VARIANTS)[1]
    assert outcomes[choice] == 1.0

    # with the real clock every variant is timed
    choice, outcomes = pick_variant(packed, s, expected)
    assert choice in VARIANTS and all(isinstance(ms, float) and ms > 0 for ms in outcomes.values())


@needs_triton
def test_pick_variant_never_takes_a_variant_with_other_values_or_that_fails():
    from tuneforge_kernels.nf4 import pick_variant

    packed, s = _state((70, 130), False, torch.float32, "cpu")
    wrong = dequantize_nf4_reference(packed, s)
    wrong[3, 5] += 1.0
    choice, outcomes = pick_variant(packed, s, wrong, time_ms=lambda fn, cuda: 1.0)
    assert choice is None and set(outcomes.values()) == {"values differ"}

    # bitsandbytes' blocksizes are powers of two; any other goes to the flat kernel only
    packed, s = _state((70, 130), False, torch.float32, "cpu", blocksize=96)
    choice, outcomes = pick_variant(packed, s, dequantize_nf4_reference(packed, s))
    assert choice == "flat", outcomes
    tiled = [name for name in outcomes if name != "flat"]
    assert all(outcomes[name].startswith("ValueError: the tiled kernel needs") for name in tiled)


@pytest.mark.gpu
@needs_cuda
def test_pick_variant_on_the_gpu_picks_a_bit_equal_variant():
    bnb = pytest.importorskip("bitsandbytes")
    from gpu_worker.patching.lora import _nf4_state
    from tuneforge_kernels.nf4 import pick_variant

    w = torch.randn(1024, 4096, device="cuda").to(torch.bfloat16)
    packed, qs = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ref = bnb.functional.dequantize_4bit(packed, qs)
    choice, outcomes = pick_variant(packed, _nf4_state(qs), ref)
    assert choice is not None, outcomes
    assert torch.equal(dequantize_nf4(packed, _nf4_state(qs), variant=choice), ref)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("nested,shape,rows", [(False, (10, 96), (2, 7)), (False, (10, 96), (4, 10)),
                                               (True, (12, 128), (2, 6)), (True, (12, 128), (10, 12))])
def test_a_row_block_equals_the_whole_weights_rows(device, impl, nested, shape, rows):
    """Phi-3's fused weights expand one part at a time: the block's values are the whole weight's rows bit
    for bit, its bytes and statistics are views (no copy), the last block of a partial one included."""
    from tuneforge_kernels.nf4 import row_block

    packed, s = _state(shape, nested, torch.float32, device, blocksize2=4)
    start, stop = rows
    part, ps = row_block(packed, s, start, stop)
    assert part.data_ptr() == packed.data_ptr() + start * shape[1] // 2 and ps.shape == (stop - start, shape[1])
    assert ps.absmax.data_ptr() >= s.absmax.data_ptr()
    whole = dequantize_nf4(packed, s, impl=impl)
    assert torch.equal(dequantize_nf4(part, ps, impl=impl), whole[start:stop])


def test_a_row_block_that_does_not_begin_a_quantisation_block_is_refused():
    from tuneforge_kernels.nf4 import row_block

    packed, s = _state((10, 96), False, torch.float32, "cpu")
    assert row_block(packed, s, 1, 5) is None            # row 1 starts at value 96: inside block 1
    packed, s = _state((12, 128), True, torch.float32, "cpu", blocksize2=4)
    assert row_block(packed, s, 1, 5) is None            # value 128: a block, but not a nested block's start
    with pytest.raises(ValueError, match="not inside"):
        row_block(packed, s, 4, 13)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("nested", [True, False])
def test_a_fused_nf4_weights_parts_expand_alone(nested, monkeypatch):
    """gpu_worker.patching.lora: a part of a fused 4-bit weight (Phi-3's q/k/v) expands only its rows once
    the weight's kind has been checked against bitsandbytes, with bitsandbytes' values."""
    from types import SimpleNamespace

    bnb = pytest.importorskip("bitsandbytes")
    import tuneforge_kernels.nf4 as nf4
    from gpu_worker.patching import lora

    w = torch.randn(3 * 1024, 3072, device="cuda").to(torch.bfloat16)
    packed, qs = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    weight = lora._NF4Weight(SimpleNamespace(data=packed, quant_state=qs))
    ref = bnb.functional.dequantize_4bit(packed, qs)
    weight.dequantize()                                   # checks this kind of weight against bitsandbytes
    expanded = []
    real = nf4.dequantize_nf4
    monkeypatch.setattr(nf4, "dequantize_nf4", lambda p, s, **kw: expanded.append(s.shape) or real(p, s, **kw))
    parts = [lora._RowSlice(weight, i * 1024, (i + 1) * 1024) for i in range(3)]
    for i, part in enumerate(parts):
        assert torch.equal(part.dequantize(), ref[i * 1024:(i + 1) * 1024])
    assert expanded == [(1024, 3072)] * 3
