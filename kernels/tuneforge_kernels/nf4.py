"""NF4 dequantisation of a bitsandbytes 4-bit weight (``quant_type="nf4"``, with or without double-quantised
absmax) into a dense ``(out, in)`` tensor, in one pass.

bitsandbytes does it in up to three launches (the 8-bit absmax through its code book, ``+ offset``, then the
4-bit values), at ~40% of the memory bandwidth on an H200 (bench/NOTES.md v7 profile: 20.8 + 1.7 + 1.7 ms
per 8B QLoRA step). Here one program expands ``BLOCK`` values: reads 0.5 byte and writes 2 per value.

Same arithmetic as bitsandbytes' CUDA kernels, rounding included (the result is bit-equal; a QLoRA model
checks that on its first weights, gpu_worker/patching/lora.py): with nested statistics
``absmax[b] = code2[qabsmax[b]] * absmax2[b // blocksize2]`` rounded to float32, then ``+ offset`` (two
roundings: the GPU build turns off multiply-add fusion, which would round once); each value is
``nf4_code[nibble] * absmax[k // blocksize]`` in float32, rounded once to the output dtype. Element ``k``
(row-major over ``(out, in)``) is the high nibble of byte ``k // 2`` when ``k`` is even, the low one when odd.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from tuneforge_kernels.backend import launcher, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# The flat kernel (v9): 4096 values per program, every value gathers its byte, code and (nested) three
# statistics. The tiled kernel (v10): a program takes ROWS whole quantisation blocks as a (ROWS, blocksize/2)
# tile of bytes, so each byte is read once for its two values and each block's scale once for its
# blocksize values; the two nibbles' values are interleaved on the way out. Which is faster depends on the
# GPU and the weight's shape, and neither has been timed against the other on a GPU (NOTES v10): a QLoRA
# model times the bit-equal ones on its first weight of each shape and keeps the fastest (``pick_variant``).
_BLOCK = 4096
_VALUES, _WARPS = 4096, 4  # tiled: whole blocks making 4096 values per program (64 of bitsandbytes' 64)

# name -> _launch's keyword arguments
VARIANTS = {
    "flat": {"tiled": False},
    "tiled-4096x4": {"tiled": True, "values": 4096, "warps": 4},
    "tiled-8192x8": {"tiled": True, "values": 8192, "warps": 8},
}

if triton is not None:

    @triton.jit
    def _block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, b, mask, blocksize2, NESTED: tl.constexpr):
        """The absmax of quantisation blocks ``b``: code2[q] * absmax2 + offset (two roundings) when nested."""
        if NESTED:
            q = tl.load(ABSMAX + b, mask=mask, other=0).to(tl.int32)
            scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + b // blocksize2, mask=mask, other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + b, mask=mask, other=0.0)
        return scale

    @triton.jit
    def _nf4_dequant_kernel(PACKED, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET, OUT, n, blocksize, blocksize2,
                            NESTED: tl.constexpr, BLOCK: tl.constexpr):
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = k < n
        byte = tl.load(PACKED + k // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(k % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(CODE + nibble)
        scale = _block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, k // blocksize, mask, blocksize2, NESTED)
        tl.store(OUT + k, (value * scale).to(OUT.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def _nf4_dequant_tiled_kernel(PACKED, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET, OUT, n, blocksize2,
                                  NESTED: tl.constexpr, QB: tl.constexpr, ROWS: tl.constexpr):
        b = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # this program's quantisation blocks
        j = b[:, None] * (QB // 2) + tl.arange(0, QB // 2)[None, :]    # their bytes, (ROWS, QB / 2)
        byte = tl.load(PACKED + j, mask=j < n // 2, other=0).to(tl.int32)
        hi = tl.load(CODE + (byte >> 4))
        lo = tl.load(CODE + (byte & 15))
        scale = _block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, b, b * QB < n, blocksize2, NESTED)
        # element 2i is byte i's high nibble, 2i + 1 its low one
        value = tl.interleave(hi * scale[:, None], lo * scale[:, None])
        k = b[:, None] * QB + tl.arange(0, QB)[None, :]
        tl.store(OUT + k, value.to(OUT.dtype.element_ty, fp_downcast_rounding="rtne"), mask=k < n)


@dataclass(frozen=True)
class NF4State:
    """What bitsandbytes' ``QuantState`` holds for an nf4 weight (``absmax`` uint8 with ``code2``/``absmax2``/
    ``blocksize2``/``offset`` when nested, else float32)."""

    code: torch.Tensor            # (16,) float32: the NF4 values
    absmax: torch.Tensor          # (n / blocksize,) uint8 (nested) or float32
    blocksize: int
    shape: tuple[int, ...]        # the dense weight's shape
    dtype: torch.dtype
    code2: torch.Tensor | None = None     # (256,) float32
    absmax2: torch.Tensor | None = None   # (n / blocksize / blocksize2,) float32
    blocksize2: int = 0
    offset: torch.Tensor | None = None    # () float32

    @property
    def nested(self) -> bool:
        return self.code2 is not None


def row_block(packed: torch.Tensor, state: NF4State, start: int, stop: int):
    """Rows ``[start, stop)`` of the dense ``(out, in)`` weight as their own ``(packed, NF4State)``: views of
    the bytes and of the statistics, no copy, or ``None`` where the first row does not begin a quantisation
    block (a nested one: ``blocksize * blocksize2`` values), so the slice's blocks would not line up with
    its statistics. Each value's arithmetic is the whole weight's, so the rows equal the whole weight's rows
    bit for bit. Phi-3's fused q/k/v and gate/up weights expand one part at a time this way instead of
    expanding the whole weight once per part (gpu_worker/patching/lora.py)."""
    cols = 1
    for d in state.shape[1:]:
        cols *= d
    if not 0 <= start < stop <= state.shape[0]:
        raise ValueError(f"rows [{start}, {stop}) are not inside a weight of {state.shape[0]} rows")
    first, last = start * cols, stop * cols
    span = state.blocksize * (state.blocksize2 if state.nested else 1)
    if first % span or first % 2 or last % 2:
        return None
    b0, b1 = first // state.blocksize, -(-last // state.blocksize)
    fields = dict(absmax=state.absmax.reshape(-1)[b0:b1], shape=(stop - start, *state.shape[1:]))
    if state.nested:
        fields["absmax2"] = state.absmax2.reshape(-1)[b0 // state.blocksize2:-(-b1 // state.blocksize2)]
    return packed.reshape(-1)[first // 2:last // 2], replace(state, **fields)


def _launch(packed, s: NF4State, out, *, tiled: bool = False, values: int = _VALUES, warps: int = _WARPS):
    # packed: uint8, n / 2 bytes (any shape, contiguous); out: s.shape, s.dtype, contiguous
    n = out.numel()
    assert packed.dtype == torch.uint8 and packed.is_contiguous() and packed.numel() * 2 == n
    assert out.is_contiguous() and n % 2 == 0 and s.code.numel() == 16 and s.code.dtype == torch.float32
    assert s.absmax.numel() * s.blocksize >= n
    if s.nested:
        assert s.absmax.dtype == torch.uint8 and s.code2.dtype == torch.float32 and s.absmax2.dtype == torch.float32
        args = (s.code2, s.absmax2, s.offset.reshape(1).float(), s.blocksize2)
    else:
        assert s.absmax.dtype == torch.float32
        args = (s.code, s.absmax, s.code, 1)  # unused pointers
    code2, absmax2, offset, blocksize2 = args
    kw = {} if not out.is_cuda else {"enable_fp_fusion": False}  # see the module docstring
    if tiled:
        if s.blocksize < 2 or s.blocksize & (s.blocksize - 1):
            raise ValueError(f"the tiled kernel needs a power-of-two blocksize (a tile's width), "
                             f"not {s.blocksize}")
        rows = max(1, values // s.blocksize)
        launcher(_nf4_dequant_tiled_kernel, out)[(triton.cdiv(triton.cdiv(n, s.blocksize), rows),)](
            packed, s.code, s.absmax, code2, absmax2, offset, out, n, blocksize2,
            NESTED=s.nested, QB=s.blocksize, ROWS=rows, num_warps=warps, **kw)
        return
    launcher(_nf4_dequant_kernel, out)[(triton.cdiv(n, _BLOCK),)](
        packed, s.code, s.absmax, code2, absmax2, offset, out, n, s.blocksize, blocksize2,
        NESTED=s.nested, BLOCK=_BLOCK, num_warps=4, **kw)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, *, impl: str | None = None,
                   variant: str = "flat") -> torch.Tensor:
    """The dense weight ``(out, in)`` in ``state.dtype``; ``variant`` names the kernel (``VARIANTS``)."""
    if not use_triton(packed, state.absmax, impl=impl):
        return dequantize_nf4_reference(packed, state)
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    _launch(packed.contiguous(), state, out, **VARIANTS[variant])
    return out


def _time_ms(fn, cuda: bool, repeats: int = 10) -> float:
    """Mean milliseconds of ``fn()`` over ``repeats`` back-to-back calls, after one warm-up call (CUDA events
    on the current stream when ``cuda``)."""
    fn()
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) * 1e3 / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def pick_variant(packed: torch.Tensor, state: NF4State, expected: torch.Tensor, *,
                 variants: dict | None = None, time_ms=_time_ms) -> tuple[str | None, dict]:
    """The fastest kernel variant whose output equals ``expected`` (bitsandbytes' values) bit for bit on this
    weight, or ``None`` if none does; with each variant's outcome: its mean milliseconds, or why it was
    not timed. Costs one launch per variant and ~11 per bit-equal one, once per weight shape."""
    packed = packed.contiguous()
    outcomes: dict = {}
    for name, kw in (variants or VARIANTS).items():
        out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
        try:
            _launch(packed, state, out, **kw)
        except Exception as e:  # noqa: BLE001  (a variant that cannot run here is skipped, with the reason)
            outcomes[name] = f"{type(e).__name__}: {e}"
            continue
        if not torch.equal(out, expected):
            outcomes[name] = "values differ"
            continue
        outcomes[name] = time_ms(lambda: _launch(packed, state, out, **kw), packed.is_cuda)
    timed = {name: ms for name, ms in outcomes.items() if isinstance(ms, float)}
    return (min(timed, key=timed.get) if timed else None), outcomes


def dequantize_nf4_reference(packed, s: NF4State):
    """The spec in plain torch (float32 throughout, one rounding to ``s.dtype`` at the end)."""
    b = packed.reshape(-1).to(torch.int64)
    nibbles = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)
    values = s.code.float()[nibbles]
    if s.nested:
        absmax = s.code2.float()[s.absmax.reshape(-1).long()] * s.absmax2.float().repeat_interleave(s.blocksize2)[
            :s.absmax.numel()]
        absmax = absmax + s.offset.float()
    else:
        absmax = s.absmax.reshape(-1).float()
    scale = absmax.repeat_interleave(s.blocksize)[:values.numel()]
    return (values * scale).to(s.dtype).reshape(s.shape)
