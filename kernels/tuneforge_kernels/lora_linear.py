"""LoRA projections as single autograd nodes with hand-derived backward: one projection (attention's O)
and the Q/K/V triple that reads the same input.

Why (bench/NOTES.md, profile of 2026-11-22): through PEFT each adapted projection costs, besides its
base matmul, a dropout call, a separate ``x A^T``, ``(.) B^T``, a scale, an add of two (tokens x out)
tensors in forward, and in backward an add per branch to accumulate ``dx``. Here the LoRA term is added
into the base output by ``addmm_`` (no separate add), the three ``x A^T`` of Q/K/V are one matmul, and
``dx`` is accumulated with ``addmm_`` into one buffer. Saved for backward: ``x`` and the rank-r
``x A^T`` only; no gradient is computed for frozen weights.

    y    = x W^T + s (x A^T) B^T
    dA   = s (dy B)^T x          dB = s dy^T (x A^T)
    dx   = dy W + s (dy B) A      (summed over Q, K, V for the triple)

``outputs`` ("replay") is for a checkpointed layer's recompute that kept the projections' outputs from its
forward (gpu_worker/patching/memory.py, ``offload`` mode): forward then computes only the rank-r ``x A^T``
that backward reads and returns the given tensors, so the base GEMMs (and, in QLoRA, the dequantisations)
of the recompute are skipped. Backward is unchanged: it never reads ``y``.

Adapter dropout (``LoraWeights.dropout``, dropout.py): an adapter with dropout reads ``x`` dropped by its own
mask (PEFT draws one per projection, in order), so its ``x A^T``, dA and dx term leave the batched GEMMs for
dropout.py's fused passes (x, or dx, read once for every adapter with dropout).
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import use_triton
from tuneforge_kernels.cast_blocks import cast_blocks
from tuneforge_kernels.copy_rows import copy_rows
from tuneforge_kernels.dropout import dropped_input_products
from tuneforge_kernels.lora_mlp import (PADDED_ONE_GEMM_MAX_HIDDEN, LoraWeights, _cast_grads, _compute_dtype, _draw,
                                        _fp8_input, _input_product, _joined_weights, _mm_into, _out_features,
                                        _project_reference, _redraw, _restore_x, _saved_input_product, _scaled_mm,
                                        _spans, _x_for_saving, adapter_input_terms, cast_group, frozen_input_grad,
                                        frozen_linear, held_for_backward, rows_of, spare_columns, spare_width,
                                        wide_input)


class _LoraLinearsFunction(torch.autograd.Function):
    """``n`` projections of one input ``x``; args: x, then (weight, lora_a, lora_b) per projection, then
    the n scales, the n adapters' dropouts (dropout.py) and the n frozen biases (None where none)."""

    @staticmethod
    def forward(ctx, x, n, outputs, *args):
        # outputs: None, or a list of the n outputs computed earlier (replay, module docstring)
        weights, lora = args[0:3 * n:3], (args[1:3 * n:3], args[2:3 * n:3])
        scales, dropouts, biases = args[3 * n:4 * n], args[4 * n:5 * n], args[5 * n:]
        dtype = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        # the adapters' weights in the compute dtype, the A's first: row blocks of one buffer
        cast = cast_group([*lora[0], *lora[1]], dtype)
        a_s, b_s = cast[:n], cast[n:]
        with_lora = [i for i in range(n) if a_s[i] is not None]
        a_all = rows_of([a_s[i] for i in with_lora]) if with_lora else None       # (sum r, in)
        # the adapters' dropout masks, in the projections' order (as PEFT draws them)
        dropped = [_draw(x2.shape, dropouts[i], i in with_lora, x2.device) for i in range(n)]
        if all(dropped[i] is not None for i in with_lora) and with_lora:  # x read once for every adapter
            xa_all = dropped_input_products(x2, [(a_s[i], dropped[i]) for i in with_lora], impl="triton")
        elif any(dropped):  # each adapter reads its own dropped input
            xa_all = torch.cat([_input_product(x2, a_s[i], dropped[i]) for i in with_lora], dim=1)
        else:
            xa_all = x2 @ a_all.t() if with_lora else None                          # (N, sum r)
        w_all = _joined_weights(weights, dtype) if outputs is None else None
        biases = [b.to(dtype) if b is not None else None for b in biases]
        if w_all is None:
            y_all = None
        elif any(b is not None for b in biases):  # the biases as the GEMM's C, one row for all projections
            y_all = torch.addmm(torch.cat([b if b is not None else x2.new_zeros(_out_features(w))
                                           for b, w in zip(biases, weights)]), x2, w_all.t())
        else:
            y_all = x2 @ w_all.t()                                                 # (N, sum out)
        outs, xas, col, col_y = [], [None] * n, 0, 0
        xq = _fp8_input(x2, weights) if outputs is None and y_all is None else None  # once for q, k and v
        for i in range(n):
            if outputs is not None:
                outs.append(outputs[i])
                continue
            if y_all is not None:  # one GEMM for all: each output is its column block
                y = y_all[:, col_y:col_y + _out_features(weights[i])]
                col_y += y.shape[1]
            else:
                y = frozen_linear(x2, weights[i], dtype, biases[i], xq=xq)          # (N, out_i)
            if a_s[i] is not None:
                r = a_s[i].shape[0]
                xas[i] = xa_all[:, col:col + r]
                col += r
                y.addmm_(xas[i], b_s[i].t(), alpha=scales[i])
            outs.append(y.view(*shape[:-1], y.shape[-1]))
        ctx.save_for_backward(xa_all, a_all, *b_s, *_x_for_saving(ctx, x, x2))
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None: no work for it
        ctx.n, ctx.weights, ctx.scales, ctx.dtype, ctx.shape = n, weights, scales, dtype, shape
        ctx.masks = [d.released() if d is not None else None for d in dropped]  # drawn again in backward
        ctx.with_lora = with_lora
        ctx.param_dtypes = [(lora[0][i].dtype, lora[1][i].dtype) if lora[0][i] is not None else None
                            for i in range(n)]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n = ctx.n
        xa_all, a_all, *rest = ctx.saved_tensors
        b_s = rest[:n]
        x2 = _restore_x(ctx, rest[n:])
        need = ctx.needs_input_grad
        dtype = ctx.dtype
        dx, dx_base_done = None, False
        grads = [None] * (3 * n)
        w_all = _joined_weights(ctx.weights, dtype) if need[0] else None
        if w_all is not None and all(dy is not None for dy in dys):
            # weights in one buffer: the gradients side by side and one GEMM for dx. One batched copy
            # (torch.cat), not a strided copy per gradient: those ran at ~1.5 TB/s (session 10's profile)
            dy_all = torch.cat([dy.reshape(-1, dy.shape[-1]).to(dtype) for dy in dys], dim=1)  # (N, sum out)
            dx, dx_base_done = dy_all @ w_all, True                                 # (N, in)
            dys = dy_all.split([dy.shape[-1] for dy in dys], dim=1)
        adapted, col = [], 0  # (projection, its rows of a_all, s (dy B)) of those with an adapter and a dy
        for i in range(n):
            dy = dys[i]
            r = b_s[i].shape[1] if b_s[i] is not None else 0
            rows = slice(col, col + r)
            col += r
            if dy is None:
                continue
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)                            # (N, out_i)
            if need[0] and not dx_base_done:
                if dx is None:
                    dx = frozen_input_grad(dy2, ctx.weights[i], dtype)              # (N, in)
                else:
                    frozen_input_grad(dy2, ctx.weights[i], dtype, out=dx, add=True)
            if not r:
                continue
            s = ctx.scales[i]
            if need[5 + 3 * i]:  # needs_input_grad: x, n, outputs, then (weight, a, b) per projection
                grads[3 * i + 2] = _scaled_mm(dy2.t(), xa_all[:, rows], s)                # (out, r)
            adapted.append((i, rows, _scaled_mm(dy2, b_s[i], s)))                   # (N, r)
        if adapted:
            # s (dy B) of every projection side by side: their dA in one GEMM and their dx terms in one
            # pass over dx (x and dx read once, not once per projection), but for those with dropout
            masks = _redraw(ctx.masks)
            parts = [(d_b, a_all[rows], masks[i]) for i, rows, d_b in adapted]
            d_as = adapter_input_terms(x2, parts, dx, [need[4 + 3 * i] for i, _, _ in adapted],
                                       a_all if len(adapted) == len(ctx.with_lora) else None)
            for (i, _, _), d_a in zip(adapted, d_as):
                grads[3 * i + 1] = d_a                                              # (r, in)
        # the adapters' gradients in their parameters' dtypes, in one cast: (a, b) for each projection
        dtypes = [t for pair in ctx.param_dtypes for t in (pair or (None, None))]
        cast = _cast_grads([g for i in range(n) for g in grads[3 * i + 1:3 * i + 3]], dtypes)
        grads[1::3], grads[2::3] = cast[0::2], cast[1::2]
        if dx is not None:
            dx = dx.view(ctx.shape)
        return (dx, None, None, *grads, *([None] * 3 * n))


# The padded layout (lora_mlp.py's, for projections of one input: Q/K/V, or one projection: O). The frozen
# weights of n projections (out_i x H) with adapters of ranks r_i are stored in one (O + S) x (H + S) buffer,
# O = sum out_i, R = sum r_i, S = lora_mlp.spare_width(R, H, O) >= R (its last S - R rows and columns zeros):
#
#     [W_1  B_1  0   ..]        forward:   [x | s_1 x A_1^T | s_2 x A_2^T ..] @ rows 0:O ^T = every y_i with its
#     [W_2  0    B_2 ..]                   term (one GEMM up to PADDED_ONE_GEMM_MAX_HIDDEN, one per projection
#     [ .. ]                               above: the zero blocks keep the terms apart)
#     [A_1  .          ]        backward:  [dy_1 | dy_2 .. | s_1 dy_1 B_1 | ..] @ columns 0:H = dx with every term
#     [A_2  .          ]
#
# The parameters are views of their blocks; the adapters' current values are copied into theirs at every
# forward. Saves (per 8B layer) the rank-r addmm_ passes over each y and the accumulation of k's and v's
# dx (bench/NOTES.md, session 12). For O alone (n = 1) the gain is in backward: its output gradient's producer
# (the fused decoder layer's post-attention norm, rms_norm's grad_spare) leaves the spare columns after its
# rows, so ``[dy | s dy B]`` is written in place and dx is one GEMM, where the unpadded node adds ``s (dy B) A``
# over (N x H) in a pass of its own. Its forward copies the attention's output into ``[x | s x A^T]``, a pass
# of the size of the unpadded ``addmm_`` it replaces, unless the attention wrote it there (FlashAttention-4's
# batched path, gpu_worker/patching/hopper_attention.py; bench/NOTES.md, session 44).


def pad_linear_weights(weights: list[torch.Tensor], ranks: list[int]) -> torch.Tensor:
    """The padded layout's buffer for these frozen ``(out_i, in)`` weights and adapter ranks, the weights
    copied in (zeros elsewhere). The caller makes the parameters views of its row blocks ``[o_i:o_i + out_i,
    :in]``, which ``padded_linears`` recognises."""
    h, rows, r = weights[0].shape[1], sum(w.shape[0] for w in weights), sum(ranks)
    sp = spare_width(r, h, rows)
    buf = weights[0].new_zeros(rows + sp, h + sp)
    start = 0
    for w in weights:
        buf[start:start + w.shape[0], :h] = w
        start += w.shape[0]
    return buf


def padded_linears(projections) -> torch.Tensor | None:
    """The padded layout's buffer when the projections' frozen weights are laid out in it for their adapters'
    current ranks (an adapter of another rank, a projection without one or sharing another's A, a replaced or
    quantised weight: None, and they run unpadded)."""
    if not projections or any(p.lora_a is None or not isinstance(p.weight, torch.Tensor) for p in projections):
        return None
    first = projections[0].weight
    h, rows = first.shape[1], sum(p.weight.shape[0] for p in projections)
    sp = spare_width(sum(p.lora_a.shape[0] for p in projections), h, rows)
    if len({id(p.lora_a) for p in projections}) < len(projections):
        return None
    step = 0
    for p in projections:
        w = p.weight
        if w.shape[1] != h or w.dtype != first.dtype or w.stride() != (h + sp, 1) \
                or w.data_ptr() != first.data_ptr() + step * w.element_size() \
                or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        step += w.shape[0] * (h + sp)
    return _spans(first, rows + sp, h + sp)


class GradLanding:
    """Where a padded layout's node (``_PaddedLinearsFunction``) wants its outputs' gradients: as column blocks
    of the ``(N, O + S)`` buffer ``[dy_1 | dy_2 .. | s_1 dy_1 B_1 | .. | 0]`` its backward multiplies. A producer
    of those gradients that is handed the landing (the rotary embedding's backward, which writes Q's and K's,
    rope.py) writes them into ``block(i)``, and the node's backward copies in only the others: at 1B, Q's and
    K's copies were 41 MB read and written a layer (bench/NOTES.md, session 35). The node's forward sets the
    layout; until then (another path computed the projections) ``block`` answers None."""

    def __init__(self):
        self.layout = None  # (rows N, width O + S, column starts, widths out_i, dtype, device)
        self._buffer = None

    def block(self, i: int) -> torch.Tensor | None:
        """Output i's ``(N, out_i)`` block of the buffer (allocated at the first call), or None."""
        if self.layout is None:
            return None
        n, width, starts, outs, dtype, device = self.layout
        if self._buffer is None:
            self._buffer = torch.empty(n, width, dtype=dtype, device=device)
        return self._buffer[:, starts[i]:starts[i] + outs[i]]

    def take(self) -> torch.Tensor | None:
        """The buffer, if a producer wrote into it (once: the landing lets go of it)."""
        buffer, self._buffer = self._buffer, None
        return buffer


def _lands_in(dy: torch.Tensor, block: torch.Tensor) -> bool:
    """Whether a gradient (as ``(N, out)``) is the landing's block itself: its producer wrote it there."""
    return dy.data_ptr() == block.data_ptr() and dy.stride() == block.stride() and dy.dtype == block.dtype \
        and dy.shape == block.shape


class _PaddedLinearsFunction(torch.autograd.Function):
    """lora_linears over the padded layout (above): the same function and gradients as
    ``_LoraLinearsFunction``, with ``x A^T`` saved scaled by s (so dB = dy^T (s x A^T)). Args: x, n, the
    buffer, then the n A's, the n B's, the n scales, a ``GradLanding`` or None."""

    @staticmethod
    def forward(ctx, x, n, buf, *args):
        a_s, b_s, scales, landing = args[:n], args[n:2 * n], args[2 * n:3 * n], args[3 * n]
        dtype, shape = _compute_dtype(x), x.shape
        hd, outs, ranks = shape[-1], [b.shape[0] for b in b_s], [a.shape[0] for a in a_s]
        rows, r = sum(outs), sum(ranks)
        sp = buf.shape[1] - hd  # the spare columns: r rounded up (lora_mlp.PAD_ALIGN)
        starts, cols = [sum(outs[:i]) for i in range(n)], [sum(ranks[:i]) for i in range(n)]
        # the adapters' current values into their blocks (the casts to the compute dtype), one launch
        cast_blocks([pair for i in range(n) for pair in (
            (buf[starts[i]:starts[i] + outs[i], hd + cols[i]:hd + cols[i] + ranks[i]], b_s[i]),
            (buf[rows + cols[i]:rows + cols[i] + ranks[i], :hd], a_s[i]))])
        x2 = x.reshape(-1, hd).to(dtype)
        xa = wide_input(x, x2, sp)                                                # [x | s x A^T | 0] below
        xs = xa[:, :hd]  # x read from the wide buffer either way: one GEMM layout, the same values
        # buf's rows after the last A are zeros: the (last) GEMM writes the padding's zeros too
        if len(set(scales)) == 1:
            _mm_into(xa[:, hd:], xs, buf[rows:, :hd].t(), scales[0])
        else:
            for i in range(n):
                width = ranks[i] if i < n - 1 else sp - cols[i]
                _mm_into(xa[:, hd + cols[i]:hd + cols[i] + width], xs,
                         buf[rows + cols[i]:rows + cols[i] + width, :hd].t(), scales[i])
        if hd <= PADDED_ONE_GEMM_MAX_HIDDEN:
            y_all = xa @ buf[:rows].t()                                              # (N, O): column blocks
            ys = [y_all[:, starts[i]:starts[i] + outs[i]] for i in range(n)]
        else:
            ys = [xa @ buf[starts[i]:starts[i] + outs[i]].t() for i in range(n)]     # (N, out_i)
        # the rank-r products leave the wide buffer (kept, x's would hold the whole (N, H + R)), unless x's
        # producer holds that buffer for its own backward anyway (FA4's output in O's: no copy to launch)
        products = xa[:, hd:hd + r]
        if not (held_for_backward(x) and xa.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()):
            products = products.clone()
        ctx.save_for_backward(products, *_x_for_saving(ctx, x, x2))
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None
        ctx.buf, ctx.scales, ctx.layout = buf, scales, (outs, ranks, starts, cols)
        ctx.dtype, ctx.shape, ctx.landing = dtype, shape, landing
        if landing is not None:
            landing.layout = (xa.shape[0], rows + sp, starts, outs, dtype, x.device)
        ctx.param_dtypes = [t.dtype for t in (*a_s, *b_s)]
        return tuple(y.view(*shape[:-1], y.shape[1]) for y in ys)

    @staticmethod
    def backward(ctx, *dys):
        xa, *x_saved = ctx.saved_tensors
        buf, scales, (outs, ranks, starts, cols) = ctx.buf, ctx.scales, ctx.layout
        n, need, hd = len(outs), ctx.needs_input_grad, ctx.shape[-1]
        rows, sp = sum(outs), buf.shape[1] - hd
        dya = ctx.landing.take() if ctx.landing is not None else None             # [dy_1 | .. | s dy B .. | 0]
        if dya is None and n == 1 and dys[0] is not None and spare_columns(dys[0]) == sp:
            # O: the gradient's producer left the spare columns after its rows (rms_norm's grad_spare)
            dy = dys[0].reshape(-1, rows)
            dya = _spans(dy, dy.shape[0], rows + sp) if dy.dtype == ctx.dtype else None
        if dya is None:
            dya = xa.new_empty(xa.shape[0], rows + sp)
        for i, dy in enumerate(dys):
            block = dya[:, starts[i]:starts[i] + outs[i]]
            if dy is None:
                block.zero_()
            else:
                dy = dy.reshape(-1, outs[i])
                if not _lands_in(dy, block):
                    copy_rows(block, dy.to(ctx.dtype), impl="triton")
            width = ranks[i] if i < n - 1 else sp - cols[i]  # the last: B, then buf's zero columns
            _mm_into(dya[:, rows + cols[i]:rows + cols[i] + width], block,
                     buf[starts[i]:starts[i] + outs[i], hd + cols[i]:hd + cols[i] + width], scales[i])
        dx = (dya @ buf[:, :hd]).view(ctx.shape) if need[0] else None            # every term: one GEMM
        grads_a, grads_b, k = [None] * n, [None] * n, None  # k: the dA's column scale (a norm's weight), if any
        if any(need[3:3 + n]):
            d_a, k = _saved_input_product(ctx, x_saved, dya[:, rows:rows + sum(ranks)])  # (R, H): every dA
            grads_a = [d_a[cols[i]:cols[i] + ranks[i]] if need[3 + i] else None for i in range(n)]
        if n > 1 and all(need[3 + n:3 + 2 * n]):
            # every dB from one GEMM over [dy_1 | .. | dy_n] and all of s x A^T, its diagonal blocks kept: dy is
            # read by one launch (and cuBLAS's one split-K reduction) instead of n; the blocks off the diagonal
            # are rank-wide, inside the tiles a skinny GEMM computes anyway
            d_b = dya[:, :rows].t() @ xa[:, :sum(ranks)]                                # (rows, R)
            grads_b = [d_b[starts[i]:starts[i] + outs[i], cols[i]:cols[i] + ranks[i]] for i in range(n)]
        else:
            for i in range(n):
                if need[3 + n + i]:
                    grads_b[i] = dya[:, starts[i]:starts[i] + outs[i]].t() @ xa[:, cols[i]:cols[i] + ranks[i]]
        grads = _cast_grads([*grads_a, *grads_b], ctx.param_dtypes, scales=[k] * n + [None] * n)
        return (dx, None, None, *grads, *([None] * n), None)


def lora_linears(x: torch.Tensor, *projections: LoraWeights, impl: str | None = None,
                 outputs: list[torch.Tensor] | None = None, landing: GradLanding | None = None):
    """``tuple(x W_i^T + s_i (x A_i^T) B_i^T for each projection)``; one node, one ``x A^T`` matmul.

    ``outputs``: these values, computed earlier from the same ``x`` and weights (replay, module
    docstring): returned as the outputs without recomputing them; the caller guarantees they are equal.
    A permission: the reference path recomputes.

    ``landing``: where the padded layout's backward takes the gradients that their producers wrote in place
    (``GradLanding``); the other paths leave it unset."""
    for p in projections:
        assert (p.lora_a is None) == (p.lora_b is None), "lora_a and lora_b come together"
    if not use_triton(x, *(p.lora_a for p in projections), impl=impl):
        return tuple(lora_linears_reference(x, *projections))
    if outputs is not None:
        outputs = list(outputs)
        lead = x.shape[:-1]
        assert len(outputs) == len(projections), (len(outputs), len(projections))
        for o, p in zip(outputs, projections):
            assert o.shape == (*lead, _out_features(p.weight)) and not o.requires_grad, (o.shape, lead)
    dropouts = [float(p.dropout) if p.lora_a is not None else 0.0 for p in projections]
    plain = not any(dropouts) and all(p.bias is None for p in projections)  # the padded layout has neither
    buf = padded_linears(projections) if outputs is None and plain else None
    if buf is not None and buf.dtype == _compute_dtype(x):
        return _PaddedLinearsFunction.apply(x, len(projections), buf, *(p.lora_a for p in projections),
                                            *(p.lora_b for p in projections), *(float(p.scale) for p in projections),
                                            landing)
    flat = [t for p in projections for t in (p.weight, p.lora_a, p.lora_b)]
    return _LoraLinearsFunction.apply(x, len(projections), outputs, *flat,
                                      *(float(p.scale) for p in projections), *dropouts,
                                      *(p.bias for p in projections))


def lora_linears_reference(x, *projections: LoraWeights):
    """The spec, through plain autograd: what PEFT's LoRA ``Linear`` computes per projection, adapter dropout
    drawn in their order (dropout.py)."""
    x = x.to(_compute_dtype(x))
    return tuple(_project_reference(x, p) for p in projections)
