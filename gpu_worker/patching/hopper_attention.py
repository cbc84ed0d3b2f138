"""FlashAttention-4's Hopper kernels (the ``flash-attn-4`` package, the ``hopper`` extra: CuTe DSL, compiled
on the GPU at first use) as the patched attention's causal path, batched and over packed rows.

Measured on an H100 (bench/NOTES.md, session 21): over packed rows 1.64x torch's variable-length kernel
at the 8B shape (the 8B packed-rows step -18 ms, 1B -7 ms), so ``patch_model``'s default (``"auto"``)
takes them there; batched, at cuDNN's rate at head size 128 and 6% faster at 64 (the 1B step 2% faster,
session 34), so ``"auto"`` takes them for batched rows at head size 64 (``BATCHED_HEAD_DIMS``), at the
other verified sizes where the layer's O is padded (lora.pad_frozen_o: FA4 writes its output into O's wide
input buffer, which cuDNN cannot; the 8B step 5-9 ms shorter than with cuDNN and the copy on an H100, session
44), and ``attention="fa4"`` at every verified size. It lives here, not in ``kernels/``, which imports only
torch and triton.

It takes the calls SDPA's causal flash path would take: no mask (the causal placeholder), no KV cache, no
logit softcap, no attention dropout, no sliding window shorter than the rows; bf16 or fp16 (float32 under
a half-precision autocast, cast as SDPA casts it) on a GPU of compute capability 9.x; head sizes FA4's SM90
kernels have (a multiple of 8 up to 256), of which ``patch_model`` hands it only those verified on a GPU
(``VERIFIED_HEAD_DIMS``). Anything else keeps SDPA (or the variable-length kernel of
``tuneforge_kernels.varlen_attention`` for packed rows).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from tuneforge_kernels.varlen_attention import Packing

BACKENDS = ("auto", "sdpa", "fa4")
# Head sizes whose FA4 gradients matched on a GPU (bench/fa4_layouts.py and the GPU test: 64 and 128, the
# sizes of Llama 3.x, Mistral, Qwen2.5 and Qwen3); others keep torch's kernels. FA4's SM90 backward gets
# head size 16 wrong (dq, dk and dv off by O(1) in every operand layout, while its forward is right: session
# 24, bench/results/2026-12-05-h100-v28-fa4-layouts.jsonl), which was the tiny Qwen3's failure in sessions
# 21 and 22; at head size 64 the Qwen3 case (q/k norms) passes.
VERIFIED_HEAD_DIMS = (64, 128)
# Head sizes at which ``"auto"`` takes FA4 for batched rows too: where its batched kernel beat cuDNN's. At head
# size 64 (the 1B shape, 4 x 2048 tokens) 0.798 against 0.847 ms a layer, forward and backward (session 21's
# micro), and the 1B step on an H100 96-97 ms against 98.6-99.0 (median; 83,802-84,481 tokens/s against
# 82,258-82,824, bench/NOTES.md, session 34); at 128 (8B) no faster (1.233 against 1.225 ms, the step +0.5%),
# so those rows keep cuDNN.
BATCHED_HEAD_DIMS = (64,)


@functools.cache
def _kernels():
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception as err:  # not installed, or its DSL libraries failed to load: said by ``unavailable``
        return err
    return flash_attn_func, flash_attn_varlen_func


def unavailable(device: torch.device) -> str | None:
    """Why FA4 cannot serve a model on ``device``, or None."""
    if device.type != "cuda":
        return "it runs on CUDA GPUs only"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return f"it has kernels for Hopper (compute capability 9.x) here, not {torch.cuda.get_device_name(device)}"
    kernels = _kernels()
    if isinstance(kernels, Exception):
        return f"flash-attn-4 is not importable ({type(kernels).__name__}: {kernels})"
    return None


def unverified(attn: nn.Module) -> str | None:
    """Why FA4 is not handed this attention layer yet although it could run it (``VERIFIED_HEAD_DIMS``), or
    None."""
    if attn.head_dim not in VERIFIED_HEAD_DIMS:
        return f"its head size {attn.head_dim} has not passed on a GPU yet"
    return None


_HALF = (torch.bfloat16, torch.float16)


def compute_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The dtype FA4 computes ``q``'s attention in: its own where it is bf16 or fp16, else autocast's, as SDPA
    casts under autocast (Qwen3's q/k norms hand float32 to attention when the model's weights are float32);
    None where neither is a half type."""
    if q.dtype in _HALF:
        return q.dtype
    if q.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in _HALF:
        return torch.get_autocast_dtype("cuda")
    return None


def takes(attn: nn.Module, q: torch.Tensor, rows: int) -> bool:
    """Whether the layer's attention over rows of ``rows`` tokens (``q`` its queries) can run on FA4."""
    window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
    dropout = attn.attention_dropout if attn.training else 0.0
    return (q.is_cuda and compute_dtype(q) is not None and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and getattr(attn, "attn_logit_softcapping", None) is None and not dropout and (window is None or window >= rows)
            and getattr(attn, "is_causal", True))


def batched_rows(attn: nn.Module, attention: str | None) -> bool:
    """Whether a layer set to ``attention`` (``"fa4"``, ``"auto"`` or None) hands its batched (unpacked) rows
    to FA4: ``"fa4"`` always, ``"auto"`` at ``BATCHED_HEAD_DIMS`` and where its padded O takes FA4's output in
    place (module docstring)."""
    return attention == "fa4" or (attention == "auto" and (
        attn.head_dim in BATCHED_HEAD_DIMS or bool(attn.__dict__.get("_tf_o_input_spare"))))


def _cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands in FA4's compute dtype (views stay views: FA4 takes any layout with unit stride on the head
    dimension, checked for the patched attention's layouts by bench/fa4_layouts.py)."""
    dtype = compute_dtype(tensors[0])
    return tuple(t.to(dtype) for t in tensors)


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # (out, lse) where the release returns both


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, spare: int = 0) -> torch.Tensor:
    """Causal attention of ``q (B, Hq, S, D)`` (grouped-query ``k``, ``v``: (B, Hkv, S, D)): ``(B, S, Hq, D)``,
    as transformers' attention functions return it. The patched attention's q/k/v are transposed views of
    (B, S, H, D) tensors, FA4's layout: transposing back copies nothing.

    ``spare``: the output is written as the first ``Hq D`` columns of a ``(B S, Hq D + spare)`` buffer, whose
    other columns the consumer fills (the padded O's ``[x | s x A^T]``, lora_linear: no copy of the output
    into it), and carries ``_tf_spare_columns`` and ``_tf_held_for_backward`` (``_CausalInto`` saves it, so O
    keeps a view of its columns, not a copy: lora_mlp.held_for_backward)."""
    q, k, v = _cast(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if spare:
        out = _CausalInto.apply(q, k, v, scale, spare)
        out._tf_spare_columns, out._tf_held_for_backward = spare, True
        return out
    func, _ = _kernels()
    return _first(func(q, k, v, softmax_scale=scale, causal=True))


class _CausalInto(torch.autograd.Function):
    """FA4's batched causal attention (its forward and backward, as ``flash_attn_func``'s node calls them)
    with the output in a wider buffer (``causal``'s ``spare``). FA4 takes any output layout with unit stride
    on the head dimension and 16-byte aligned strides; the buffer's rows are ``Hq D + spare`` wide."""

    @staticmethod
    def forward(ctx, q, k, v, scale, spare):
        from flash_attn.cute.interface import _flash_attn_fwd

        b, s, h, d = q.shape
        out = q.new_empty(b * s, h * d + spare)[:, :h * d].view(b, s, h, d)
        out, lse = _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, out=out, return_lse=True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from flash_attn.cute.interface import _flash_attn_bwd

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, ctx.scale, True)[:3]
        return dq, dk, dv, None, None


def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, scale: float) -> torch.Tensor:
    """Causal attention within each document of packed rows: q ``(T, Hq, D)``, k/v ``(T, Hkv, D)`` -> ``(T, Hq, D)``."""
    _, func = _kernels()
    q, k, v = _cast(q, k, v)
    cu, n = packing.cu_seqlens, packing.max_len
    return _first(func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n, softmax_scale=scale,
                       causal=True))
