"""Rotary position embedding applied to Q and K in one launch (HF's rotate-half convention), in place
when autograd allows it (inputs that are not views), else into fresh outputs of the same layout: autograd
cannot let one Function rewrite two views in place, and HF's q/k are views of the projections.

``cos``/``sin`` are HF's per-token tables ``(B, T, D)`` (as ``LlamaRotaryEmbedding`` returns them from
``position_ids``), so packed sequences whose position ids restart at each document rotate correctly, and
Llama-3 / YaRN / linear scalings (which live in the inverse frequencies) come for free. Only the first
half of each row is read: HF's tables repeat ``freqs`` twice.

Backward is the same rotation by the negated angle, from the incoming gradients into new buffers, or into
the blocks of a ``GradLanding`` (lora_linear.py) that the projections' node multiplies in its backward.
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import launcher, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _rope_kernel(
        Q, K, QO, KO, COS, SIN,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, so_b, so_h, so_t, sko_b, sko_h, sko_t, sc_b, sc_t,
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
        # int64: h * stride_h passes 2^31 for a contiguous (B, H, T, D) gradient at T * D * H > 2^31
        h = tl.arange(0, BLOCK_H).to(tl.int64)
        # Q heads
        qmask = (h[:, None] < n_q_heads) & dmask[None, :]
        qp = Q + b * sq_b + t * sq_t + h[:, None] * sq_h + d[None, :]
        q1 = tl.load(qp, mask=qmask, other=0.0).to(tl.float32)
        q2 = tl.load(qp + half, mask=qmask, other=0.0).to(tl.float32)
        qo = QO + b * so_b + t * so_t + h[:, None] * so_h + d[None, :]
        tl.store(qo, (q1 * cos[None, :] - q2 * sin[None, :]).to(QO.dtype.element_ty), mask=qmask)
        tl.store(qo + half, (q2 * cos[None, :] + q1 * sin[None, :]).to(QO.dtype.element_ty), mask=qmask)
        # K heads (GQA: usually fewer)
        kmask = (h[:, None] < n_k_heads) & dmask[None, :]
        kp = K + b * sk_b + t * sk_t + h[:, None] * sk_h + d[None, :]
        k1 = tl.load(kp, mask=kmask, other=0.0).to(tl.float32)
        k2 = tl.load(kp + half, mask=kmask, other=0.0).to(tl.float32)
        ko = KO + b * sko_b + t * sko_t + h[:, None] * sko_h + d[None, :]
        tl.store(ko, (k1 * cos[None, :] - k2 * sin[None, :]).to(KO.dtype.element_ty), mask=kmask)
        tl.store(ko + half, (k2 * cos[None, :] + k1 * sin[None, :]).to(KO.dtype.element_ty), mask=kmask)


def _launch(q, k, cos, sin, backward, q_out, k_out):
    # q: (B, Hq, T, D), k: (B, Hk, T, D) any strides with unit stride on D (HF's transposed views);
    # cos, sin: (B or 1, T, D), unit stride on D; q_out, k_out: like q, k (may be q, k: in place)
    bsz, n_q, seq, dim = q.shape
    assert k.shape[0] == bsz and k.shape[2] == seq and k.shape[3] == dim, (q.shape, k.shape)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    for t in (q, k, q_out, k_out):
        assert t.stride(3) == 1, "head_dim must be contiguous"
    assert dim % 2 == 0, "head_dim must be even"
    assert cos.shape == sin.shape and cos.shape[-2:] == (seq, dim) and cos.shape[0] in (1, bsz)
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1
    n_k = k.shape[1]
    sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
    block_h = next_power_of_2(max(n_q, n_k))
    block_d = next_power_of_2(dim // 2)
    # 4 warps: a program touches (32+8) heads x 128 dims of bf16 = 10 KB; memory-bound, untuned (NOTES.md)
    launcher(_rope_kernel, q)[(bsz * seq,)](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        sc_b, cos.stride(1),
        seq, n_q, n_k, dim // 2,
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


def _landed(landing, i: int, like: torch.Tensor) -> torch.Tensor | None:
    """Block i of ``landing`` (an ``(N, H * D)`` view, N = B * T) as a ``(B, H, T, D)`` gradient like ``like``,
    or None where the landing has no such block."""
    block = landing.block(i) if landing is not None else None
    b, h, t, d = like.shape
    if block is None or block.dtype != like.dtype or block.shape != (b * t, h * d):
        return None
    return block.view(b, t, h, d).transpose(1, 2)


def _new_grad(dq: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(dq) if dq.stride(3) == 1 else torch.empty(dq.shape, dtype=dq.dtype, device=dq.device)


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, inplace, landing):
        q_out, k_out = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
        _launch(q, k, cos, sin, False, q_out, k_out)
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.landing = landing
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _landed(ctx.landing, 0, dq), _landed(ctx.landing, 1, dk)
        dq_in = _new_grad(dq) if dq_in is None else dq_in
        dk_in = _new_grad(dk) if dk_in is None else dk_in
        dq = dq if dq.stride(3) == 1 else dq.contiguous()
        dk = dk if dk.stride(3) == 1 else dk.contiguous()
        _launch(dq, dk, cos, sin, True, dq_in, dk_in)
        return dq_in, dk_in, None, None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         impl: str | None = None, landing=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q (B, Hq, T, D)`` and ``k (B, Hk, T, D)`` by HF's ``cos``/``sin`` ``(B, T, D)``.

    The Triton path works in place (returning ``q``, ``k``) when neither is a view, else out of place;
    the reference path is always out of place. ``landing``: the ``GradLanding`` of the node whose outputs 0
    and 1 are ``q`` and ``k`` (as ``(B, T, H * D)``): the backward writes their gradients into its blocks."""
    if not use_triton(q, k, cos, sin, impl=impl):
        return rope_reference(q, k, cos, sin)
    inplace = q._base is None and k._base is None
    return _RopeFunction.apply(q, k, cos, sin, inplace, landing)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """The spec: transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
