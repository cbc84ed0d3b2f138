"""Several small tensors copied (and cast) into blocks of wider buffers, in one launch.

The padded LoRA layouts (lora_mlp.py, lora_linear.py) keep each adapter inside its frozen weight's buffer
and copy the adapter's current value (float32 under autocast) into that block at every forward: six
copies a layout and layer, 192 launches of ~3.4 us in a 1B step (bench/NOTES.md, session 12, call 5),
each far too small to fill the GPU. Here one launch copies up to ``MAX_BLOCKS`` of them: program (t, b)
moves tile t of block b.

    dst_b[:, :] = src_b.to(dst_b.dtype)      (2D, dst_b with unit column stride, src_b any strides)
    dst_b[:, :] = (src_b.float() * scale_b).to(dst_b.dtype)      (a block given a float32 column scale)

It also casts the adapters' gradients into their float32 parameters' buffer (lora_mlp.cast_group): those
are often strided views of a wider product (``d_b[0::2, :r]``), which ``torch.cat`` copies one launch each,
and an adapter's dA read from its norm's input is still to be multiplied by the norm's weight along its columns
(rms_norm.NormRecipe): the cast does it, where a multiply of its own was a launch a node.
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import launcher, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_BLOCKS = 6
_TILE = 1024  # elements a program: an adapter block is 16 x 2048 to 8192 x 16 at 1B, 32-128 tiles

if triton is not None:

    @triton.jit
    def _copy_block(SRC, DST, SCALE, ld_src, cs_src, ld_dst, n_rows, n_cols, tile, TILE: tl.constexpr,
                    SCALED: tl.constexpr):
        i = tile * TILE + tl.arange(0, TILE)
        r, c = (i // n_cols).to(tl.int64), i % n_cols
        mask = i < n_rows * n_cols
        v = tl.load(SRC + r * ld_src + c.to(tl.int64) * cs_src, mask=mask)  # cs_src == 1: specialised
        if SCALED:
            v = v.to(tl.float32) * tl.load(SCALE + c, mask=mask)
        tl.store(DST + r * ld_dst + c, v.to(DST.dtype.element_ty), mask=mask)

    @triton.jit
    def _cast_blocks_kernel(S0, D0, K0, LS0, CS0, LD0, R0, C0, S1, D1, K1, LS1, CS1, LD1, R1, C1,
                            S2, D2, K2, LS2, CS2, LD2, R2, C2, S3, D3, K3, LS3, CS3, LD3, R3, C3,
                            S4, D4, K4, LS4, CS4, LD4, R4, C4, S5, D5, K5, LS5, CS5, LD5, R5, C5,
                            TILE: tl.constexpr, SCALED: tl.constexpr):
        # SCALED: bit b set when block b has a column scale (K_b; else K_b is any pointer, never read)
        tile, block = tl.program_id(0), tl.program_id(1)
        if block == 0:
            _copy_block(S0, D0, K0, LS0, CS0, LD0, R0, C0, tile, TILE, (SCALED & 1) != 0)
        elif block == 1:
            _copy_block(S1, D1, K1, LS1, CS1, LD1, R1, C1, tile, TILE, (SCALED & 2) != 0)
        elif block == 2:
            _copy_block(S2, D2, K2, LS2, CS2, LD2, R2, C2, tile, TILE, (SCALED & 4) != 0)
        elif block == 3:
            _copy_block(S3, D3, K3, LS3, CS3, LD3, R3, C3, tile, TILE, (SCALED & 8) != 0)
        elif block == 4:
            _copy_block(S4, D4, K4, LS4, CS4, LD4, R4, C4, tile, TILE, (SCALED & 16) != 0)
        else:
            _copy_block(S5, D5, K5, LS5, CS5, LD5, R5, C5, tile, TILE, (SCALED & 32) != 0)


def _fits(dst: torch.Tensor, src: torch.Tensor) -> bool:
    return (dst.dim() == 2 and dst.shape == src.shape and dst.stride(1) == 1
            and dst.device == src.device and 0 < dst.numel() < 2 ** 31)


def cast_blocks(pairs: list[tuple[torch.Tensor, torch.Tensor]], impl: str | None = None,
                scales: list[torch.Tensor | None] | None = None) -> None:
    """``dst.copy_(src)`` for each ``(dst, src)``: 2D tensors of one shape, ``dst``'s rows contiguous
    (``stride(1) == 1``), in one launch per ``MAX_BLOCKS``; any other pair takes ``copy_``. ``scales``: per
    pair None or a float32 ``(columns,)`` vector, and then ``dst.copy_(src * scale)`` (in float32: ``src``
    widened, one product, rounded once to ``dst``'s dtype, as torch's promotion computes it)."""
    scales = scales if scales is not None else [None] * len(pairs)
    fast = []
    for (d, s), k in zip(pairs, scales, strict=True):
        if _fits(d, s) and (k is None or _fits_scale(k, d)) and use_triton(d, s, k, impl=impl):
            fast.append((d, s, k))
        else:
            d.copy_(s if k is None else s * k)
    for at in range(0, len(fast), MAX_BLOCKS):
        group = fast[at:at + MAX_BLOCKS]
        args, scaled = [], 0
        for b, (d, s, k) in enumerate(group + [group[0]] * (MAX_BLOCKS - len(group))):  # unused: never launched
            scaled |= (k is not None and b < len(group)) << b
            args += [s, d, s if k is None else k, s.stride(0), s.stride(1), d.stride(0), d.shape[0], d.shape[1]]
        tiles = max(triton.cdiv(d.numel(), _TILE) for d, _, _ in group)
        launcher(_cast_blocks_kernel, group[0][0])[(tiles, len(group))](*args, TILE=_TILE, SCALED=scaled,
                                                                         num_warps=4)


def _fits_scale(k: torch.Tensor, d: torch.Tensor) -> bool:
    return k.dtype == torch.float32 and k.shape == (d.shape[1],) and k.stride() == (1,) and k.device == d.device


def cast_blocks_reference(pairs: list[tuple[torch.Tensor, torch.Tensor]],
                          scales: list[torch.Tensor | None] | None = None) -> None:
    """The spec."""
    for (d, s), k in zip(pairs, scales if scales is not None else [None] * len(pairs), strict=True):
        d.copy_(s if k is None else s * k)
