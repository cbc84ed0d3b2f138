"""Rotary position embedding applied to Q and K in one launch, in place (HF's rotate-half convention).

``cos``/``sin`` are HF's per-token tables ``(B, T, D)`` (as ``LlamaRotaryEmbedding`` returns them from
``position_ids``), so packed sequences whose position ids restart at each document rotate correctly, and
Llama-3 / YaRN / linear scalings (which live in the inverse frequencies) come for free. Only the first
half of each row is read: HF's tables repeat ``freqs`` twice.

Backward is the same rotation by the negated angle, again in place on the incoming gradients.
"""

from __future__ import annotations

import torch

from kernels.backend import launcher, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _rope_kernel(
        Q, K, COS, SIN,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sc_b, sc_t,
        seq_len, n_q_heads, n_k_heads, half,
        BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        tok = tl.program_id(0)
        b = (tok // seq_len).to(tl.int64)
        t = (tok % seq_len).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        cos = tl.load(COS + b * sc_b + t * sc_t + d, mask=dmask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + b * sc_b + t * sc_t + d, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:
            sin = -sin
        h = tl.arange(0, BLOCK_H)
        # Q heads
        qmask = (h[:, None] < n_q_heads) & dmask[None, :]
        qp = Q + b * sq_b + t * sq_t + h[:, None] * sq_h + d[None, :]
        q1 = tl.load(qp, mask=qmask, other=0.0).to(tl.float32)
        q2 = tl.load(qp + half, mask=qmask, other=0.0).to(tl.float32)
        tl.store(qp, (q1 * cos[None, :] - q2 * sin[None, :]).to(Q.dtype.element_ty), mask=qmask)
        tl.store(qp + half, (q2 * cos[None, :] + q1 * sin[None, :]).to(Q.dtype.element_ty), mask=qmask)
        # K heads (GQA: usually fewer)
        kmask = (h[:, None] < n_k_heads) & dmask[None, :]
        kp = K + b * sk_b + t * sk_t + h[:, None] * sk_h + d[None, :]
        k1 = tl.load(kp, mask=kmask, other=0.0).to(tl.float32)
        k2 = tl.load(kp + half, mask=kmask, other=0.0).to(tl.float32)
        tl.store(kp, (k1 * cos[None, :] - k2 * sin[None, :]).to(K.dtype.element_ty), mask=kmask)
        tl.store(kp + half, (k2 * cos[None, :] + k1 * sin[None, :]).to(K.dtype.element_ty), mask=kmask)


def _launch(q, k, cos, sin, backward):
    # q: (B, Hq, T, D), k: (B, Hk, T, D) any strides with unit stride on D (HF's transposed views);
    # cos, sin: (B or 1, T, D), unit stride on D. Rotates q and k in place.
    bsz, n_q, seq, dim = q.shape
    assert k.shape[0] == bsz and k.shape[2] == seq and k.shape[3] == dim, (q.shape, k.shape)
    assert dim % 2 == 0 and q.stride(3) == 1 and k.stride(3) == 1, "head_dim must be even and contiguous"
    assert cos.shape == sin.shape and cos.shape[-2:] == (seq, dim) and cos.shape[0] in (1, bsz)
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1
    n_k = k.shape[1]
    sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
    block_h = next_power_of_2(max(n_q, n_k))
    block_d = next_power_of_2(dim // 2)
    # 4 warps: a program touches (32+8) heads x 128 dims of bf16 = 10 KB; memory-bound, untuned (NOTES.md)
    launcher(_rope_kernel, q)[(bsz * seq,)](
        q, k, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), sc_b, cos.stride(1),
        seq, n_q, n_k, dim // 2,
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        _launch(q, k, cos, sin, backward=False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # autograd may hand us buffers it shares elsewhere: rotate private (contiguous) copies
        dq = dq.clone(memory_format=torch.contiguous_format)
        dk = dk.clone(memory_format=torch.contiguous_format)
        _launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q (B, Hq, T, D)`` and ``k (B, Hk, T, D)`` by HF's ``cos``/``sin`` ``(B, T, D)``; in place
    on the Triton path (returns the same tensors), out of place on the reference path."""
    if not use_triton(q, k, cos, sin, impl=impl):
        return rope_reference(q, k, cos, sin)
    return _RopeFunction.apply(q, k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """The spec: transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
