"""Several small tensors copied (and cast) into blocks of wider buffers, in one launch.

The padded LoRA layouts (lora_mlp.py, lora_linear.py) keep each adapter inside its frozen weight's buffer
and copy the adapter's current value (float32 under autocast) into that block at every forward: six
copies a layout and layer, 192 launches of ~3.4 us in a 1B step (bench/NOTES.md, session 12, call 5),
each far too small to fill the GPU. Here one launch copies up to ``MAX_BLOCKS`` of them: program (t, b)
moves tile t of block b.

    dst_b[:, :] = src_b.to(dst_b.dtype)      (2D, dst_b with unit column stride, src_b any strides)

It also casts the adapters' gradients into their float32 parameters' buffer (lora_mlp.cast_group): those
are often strided views of a wider product (``d_b[0::2, :r]``), which ``torch.cat`` copies one launch each.
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
    def _copy_block(SRC, DST, ld_src, cs_src, ld_dst, n_rows, n_cols, tile, TILE: tl.constexpr):
        i = tile * TILE + tl.arange(0, TILE)
        r, c = (i // n_cols).to(tl.int64), i % n_cols
        mask = i < n_rows * n_cols
        v = tl.load(SRC + r * ld_src + c.to(tl.int64) * cs_src, mask=mask)  # cs_src == 1: specialised
        tl.store(DST + r * ld_dst + c, v.to(DST.dtype.element_ty), mask=mask)

    @triton.jit
    def _cast_blocks_kernel(S0, D0, LS0, CS0, LD0, R0, C0, S1, D1, LS1, CS1, LD1, R1, C1,
                            S2, D2, LS2, CS2, LD2, R2, C2, S3, D3, LS3, CS3, LD3, R3, C3,
                            S4, D4, LS4, CS4, LD4, R4, C4, S5, D5, LS5, CS5, LD5, R5, C5,
                            TILE: tl.constexpr):
        tile, block = tl.program_id(0), tl.program_id(1)
        if block == 0:
            _copy_block(S0, D0, LS0, CS0, LD0, R0, C0, tile, TILE)
        elif block == 1:
            _copy_block(S1, D1, LS1, CS1, LD1, R1, C1, tile, TILE)
        elif block == 2:
            _copy_block(S2, D2, LS2, CS2, LD2, R2, C2, tile, TILE)
        elif block == 3:
            _copy_block(S3, D3, LS3, CS3, LD3, R3, C3, tile, TILE)
        elif block == 4:
            _copy_block(S4, D4, LS4, CS4, LD4, R4, C4, tile, TILE)
        else:
            _copy_block(S5, D5, LS5, CS5, LD5, R5, C5, tile, TILE)


def _fits(dst: torch.Tensor, src: torch.Tensor) -> bool:
    return (dst.dim() == 2 and dst.shape == src.shape and dst.stride(1) == 1
            and dst.device == src.device and 0 < dst.numel() < 2 ** 31)


def cast_blocks(pairs: list[tuple[torch.Tensor, torch.Tensor]], impl: str | None = None) -> None:
    """``dst.copy_(src)`` for each ``(dst, src)``: 2D tensors of one shape, ``dst``'s rows contiguous
    (``stride(1) == 1``), in one launch per ``MAX_BLOCKS``; any other pair takes ``copy_``."""
    fast = []
    for d, s in pairs:
        if _fits(d, s) and use_triton(d, s, impl=impl):
            fast.append((d, s))
        else:
            d.copy_(s)
    for at in range(0, len(fast), MAX_BLOCKS):
        group = fast[at:at + MAX_BLOCKS]
        args = []
        for d, s in group + [group[0]] * (MAX_BLOCKS - len(group)):  # unused slots: never launched
            args += [s, d, s.stride(0), s.stride(1), d.stride(0), d.shape[0], d.shape[1]]
        tiles = max(triton.cdiv(d.numel(), _TILE) for d, _ in group)
        launcher(_cast_blocks_kernel, group[0][0])[(tiles, len(group))](*args, TILE=_TILE, num_warps=4)


def cast_blocks_reference(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The spec."""
    for d, s in pairs:
        d.copy_(s)
