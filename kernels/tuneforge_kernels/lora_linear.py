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
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import use_triton
from tuneforge_kernels.lora_mlp import (LoraWeights, _cast_grads, _compute_dtype, _dense, _joined_weights,
                                        _out_features, _project_reference, _restore_x, _scaled_mm, _x_for_saving,
                                        cast_group, rows_of)


class _LoraLinearsFunction(torch.autograd.Function):
    """``n`` projections of one input ``x``; args: x, then (weight, lora_a, lora_b) per projection, then
    the n scales."""

    @staticmethod
    def forward(ctx, x, n, outputs, *args):
        # outputs: None, or a list of the n outputs computed earlier (replay, module docstring)
        weights, lora, scales = args[0:3 * n:3], (args[1:3 * n:3], args[2:3 * n:3]), args[3 * n:]
        dtype = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        # the adapters' weights in the compute dtype, the A's first: row blocks of one buffer
        cast = cast_group([*lora[0], *lora[1]], dtype)
        a_s, b_s = cast[:n], cast[n:]
        with_lora = [i for i in range(n) if a_s[i] is not None]
        a_all = rows_of([a_s[i] for i in with_lora]) if with_lora else None       # (sum r, in)
        xa_all = x2 @ a_all.t() if with_lora else None                              # (N, sum r)
        w_all = _joined_weights(weights, dtype) if outputs is None else None
        y_all = x2 @ w_all.t() if w_all is not None else None                     # (N, sum out)
        outs, xas, col, col_y = [], [None] * n, 0, 0
        for i in range(n):
            if outputs is not None:
                outs.append(outputs[i])
                continue
            if y_all is not None:  # one GEMM for all: each output is its column block
                y = y_all[:, col_y:col_y + _out_features(weights[i])]
                col_y += y.shape[1]
            else:
                y = x2 @ _dense(weights[i], dtype).t()                              # (N, out_i)
            if a_s[i] is not None:
                r = a_s[i].shape[0]
                xas[i] = xa_all[:, col:col + r]
                col += r
                y.addmm_(xas[i], b_s[i].t(), alpha=scales[i])
            outs.append(y.view(*shape[:-1], y.shape[-1]))
        ctx.save_for_backward(xa_all, a_all, *b_s, *_x_for_saving(ctx, x, x2))
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None: no work for it
        ctx.n, ctx.weights, ctx.scales, ctx.dtype, ctx.shape = n, weights, scales, dtype, shape
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
                w = _dense(ctx.weights[i], dtype)
                if dx is None:
                    dx = dy2 @ w                                                    # (N, in)
                else:
                    dx.addmm_(dy2, w)
            if not r:
                continue
            s = ctx.scales[i]
            if need[5 + 3 * i]:  # needs_input_grad: x, n, outputs, then (weight, a, b) per projection
                grads[3 * i + 2] = _scaled_mm(dy2.t(), xa_all[:, rows], s)                # (out, r)
            adapted.append((i, rows, _scaled_mm(dy2, b_s[i], s)))                   # (N, r)
        if adapted:
            # s (dy B) of every projection side by side: their dA in one GEMM and their dx terms in one
            # pass over dx (x and dx read once, not once per projection)
            d_b = torch.cat([d for _, _, d in adapted], dim=1) if len(adapted) > 1 else adapted[0][2]
            if any(need[4 + 3 * i] for i, _, _ in adapted):
                d_a = d_b.t() @ x2                                                  # (sum r, in)
                col = 0
                for i, rows, _ in adapted:
                    r = rows.stop - rows.start
                    if need[4 + 3 * i]:
                        grads[3 * i + 1] = d_a[col:col + r]                         # (r, in)
                    col += r
            if dx is not None:
                a_used = a_all if len(adapted) == len(ctx.with_lora) else \
                    torch.cat([a_all[rows] for _, rows, _ in adapted])
                dx.addmm_(d_b, a_used)
        # the adapters' gradients in their parameters' dtypes, in one cast: (a, b) for each projection
        dtypes = [t for pair in ctx.param_dtypes for t in (pair or (None, None))]
        cast = _cast_grads([g for i in range(n) for g in grads[3 * i + 1:3 * i + 3]], dtypes)
        grads[1::3], grads[2::3] = cast[0::2], cast[1::2]
        if dx is not None:
            dx = dx.view(ctx.shape)
        return (dx, None, None, *grads, *([None] * n))


def lora_linears(x: torch.Tensor, *projections: LoraWeights, impl: str | None = None,
                 outputs: list[torch.Tensor] | None = None):
    """``tuple(x W_i^T + s_i (x A_i^T) B_i^T for each projection)``; one node, one ``x A^T`` matmul.

    ``outputs``: these values, computed earlier from the same ``x`` and weights (replay, module
    docstring): returned as the outputs without recomputing them; the caller guarantees they are equal.
    A permission: the reference path recomputes."""
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
    flat = [t for p in projections for t in (p.weight, p.lora_a, p.lora_b)]
    return _LoraLinearsFunction.apply(x, len(projections), outputs, *flat,
                                      *(float(p.scale) for p in projections))


def lora_linears_reference(x, *projections: LoraWeights):
    """The spec, through plain autograd: what PEFT's LoRA ``Linear`` (dropout 0) computes per projection."""
    x = x.to(_compute_dtype(x))
    return tuple(_project_reference(x, p) for p in projections)
