"""Fused ``lm_head`` + cross-entropy that never materialises the full (tokens x vocab) logits.

The tokens are processed in chunks: one chunk's logits are computed by a matmul, a Triton kernel turns
them into per-row losses and overwrites them *in place* with d(loss)/d(logits), and two more matmuls
fold that into the hidden-state gradient (and, only when the head is trainable, the head's gradient).
The gradients are therefore computed during forward; backward only scales them by the incoming grad.

Semantics (the reference below is the spec):
- ``ignore_index`` rows contribute nothing to loss or gradient;
- ``label_smoothing`` as ``torch.nn.functional.cross_entropy`` defines it;
- ``softcap`` (Gemma 2): ``z = softcap * tanh(logits / softcap)``, applied in float32;
- normalisation: the summed loss is divided by ``num_items`` when given (the number of trained tokens
  across *all* gradient-accumulation micro-batches, as HF's Trainer passes ``num_items_in_batch``), else
  by this call's count of non-ignored labels; a zero count divides by 1, so a fully masked batch gives
  loss 0 and zero gradients, never NaN.
"""

from __future__ import annotations

import math

import torch

from tuneforge_kernels.backend import launcher, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _softcapped(z, softcap, HAS_SOFTCAP: tl.constexpr):
        if HAS_SOFTCAP:
            z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # softcap * tanh(z / softcap)
        return z

    @triton.jit
    def _ce_rows_kernel(
        LOGITS, LABELS, LOSS,
        stride_l, n_cols, ignore_index, smoothing, softcap,
        HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr, KEEP: tl.constexpr, LET_GO: tl.constexpr,
    ):
        # KEEP / LET_GO: L2 eviction policies ("" for none): pass 1's loads may ask L2 to keep each row for
        # pass 2, whose loads and stores may ask it to let go
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_l
        label = tl.load(LABELS + row)
        valid = label != ignore_index
        safe_label = tl.where(valid, label, 0)
        # pass 1: online max / sum-exp over the vocabulary
        m = -float("inf")
        s = 0.0
        sum_z = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(ptr + cols, mask=mask, other=0.0,
                        eviction_policy=KEEP).to(tl.float32)
            z = tl.where(mask, _softcapped(z, softcap, HAS_SOFTCAP), -float("inf"))  # cap(-inf) != -inf
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
        lse = m + tl.log(s)
        z_y = _softcapped(tl.load(ptr + safe_label).to(tl.float32), softcap, HAS_SOFTCAP)
        loss = lse - z_y
        if HAS_SMOOTHING:
            loss = (1.0 - smoothing) * loss + smoothing * (lse - sum_z / n_cols)
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        # pass 2: d loss / d logits, written over the logits
        if COMPUTE_GRAD:
            scale = tl.where(valid, 1.0, 0.0)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                z = tl.load(ptr + cols, mask=mask, other=0.0,
                            eviction_policy=LET_GO).to(tl.float32)
                z = _softcapped(z, softcap, HAS_SOFTCAP)
                g = tl.exp(z - lse) - tl.where(cols == safe_label, 1.0 - smoothing, 0.0)
                if HAS_SMOOTHING:
                    g -= smoothing / n_cols
                if HAS_SOFTCAP:
                    t = z / softcap
                    g *= 1.0 - t * t
                tl.store(ptr + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask,
                         eviction_policy=LET_GO)


def _rows_kernel_launch(logits, labels, loss, ignore_index, smoothing, softcap, compute_grad, *, block=None,
                        num_warps=None, keep=False):
    # logits: (C, V) unit stride on V, overwritten with grads when compute_grad; labels: (C,) int64;
    # loss: (C,) float32 out. block / num_warps / keep: bench/micro.py's ``ce_rows`` group compares them.
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1 and labels.shape == (n_rows,) and loss.shape == (n_rows,)
    # 32K-wide tiles with 32 warps: Liger's choice for a 128K vocabulary (4 loop trips per pass); on an H100 the
    # fastest of ten launches at the 1B step's 1024-row chunks (bench/NOTES.md, session 36)
    block = min(block or 32768, next_power_of_2(n_cols))
    launcher(_ce_rows_kernel, logits)[(n_rows,)](
        logits, labels, loss, logits.stride(0), n_cols, ignore_index, smoothing,
        softcap if softcap else 1.0,
        HAS_SOFTCAP=bool(softcap), HAS_SMOOTHING=smoothing > 0.0, COMPUTE_GRAD=compute_grad,
        BLOCK=block, KEEP="evict_last" if keep else "", LET_GO="evict_first" if keep else "",
        num_warps=num_warps or (32 if block >= 32768 else 8 if block >= 4096 else 4),
    )


def _chunk_rows(n_rows: int, hidden: int, vocab: int, chunk_logits: int | None = None) -> int:
    # default: one chunk's logits about the size of the hidden states (Liger's rule): at 8192 tokens and a
    # 128K vocabulary, 256 rows (66 MB of bf16 logits) at 8B and 1B. ``chunk_logits``: as many rows as
    # fit that many logits (a power of two), for speed over memory: 2^27 (256 MB in bf16) is 1024 rows of
    # a 128K vocabulary, which ran the training step 0.6% faster at both 1B and 8B on an H200 (interleaved,
    # bench/NOTES.md session 10; v5's single sample against it was the host-bound 1B step's noise)
    if chunk_logits:
        return max(1, 1 << max(0, (chunk_logits // vocab).bit_length() - 1))
    return max(1, next_power_of_2(math.ceil(n_rows / math.ceil(vocab / hidden))))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


def _denominator(labels, ignore_index, num_items, reduction):
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=labels.device)
    if num_items is None:
        num_items = (labels != ignore_index).sum()
    num_items = torch.as_tensor(num_items, device=labels.device).float()
    return num_items.clamp(min=1.0)  # fully masked batch: 0 / 1, never 0 / 0


class _FusedLinearCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, smoothing, softcap, num_items, reduction,
                grad_wanted, chunk_logits):
        # grad_wanted: autograd runs forward under no_grad, so the caller says whether grads are wanted
        dtype = _compute_dtype(hidden)
        h, w = hidden.to(dtype), weight.to(dtype)
        n_rows, n_hidden = h.shape
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute_grad = grad_wanted and (need_dh or need_dw)
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=h.device)      # (N,)
        dh = torch.empty_like(h) if compute_grad and need_dh else None             # (N, H)
        dw = (torch.zeros(w.shape, dtype=torch.float32, device=h.device)           # (V, H)
              if compute_grad and need_dw else None)
        step = _chunk_rows(n_rows, n_hidden, w.shape[0], chunk_logits)
        for start in range(0, n_rows, step):
            end = min(start + step, n_rows)
            logits = h[start:end] @ w.t()                                           # (C, V)
            _rows_kernel_launch(logits, labels[start:end], loss_rows[start:end], ignore_index,
                                smoothing, softcap, compute_grad)
            if dh is not None:
                torch.mm(logits, w, out=dh[start:end])
            if dw is not None:
                dw += logits.t() @ h[start:end]  # per-chunk product in the compute dtype, sum in fp32
            del logits
        denom = _denominator(labels, ignore_index, num_items, reduction)
        if dh is not None:
            dh = (dh / denom).to(hidden.dtype)
        if dw is not None:
            dw = (dw / denom).to(weight.dtype)
        ctx.save_for_backward(dh, dw)
        return loss_rows.sum() / denom

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        dh = dh * grad_out.to(dh.dtype) if dh is not None else None
        dw = dw * grad_out.to(dw.dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               softcap: float | None = None, num_items=None, reduction: str = "mean",
                               chunk_logits: int | None = None, impl: str | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden (..., H) @ weight (V, H)^T`` against ``labels (...)`` (already shifted).

    ``num_items``: int or 0-dim tensor, the token count to divide by (see the module docstring);
    ``reduction="sum"`` returns the plain sum. ``chunk_logits``: the logits one chunk may hold (None: about
    the hidden states' size; more is faster and holds more memory, see ``_chunk_rows``).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).contiguous()
    assert labels.shape[0] == hidden.shape[0], (tuple(hidden.shape), tuple(labels.shape))
    assert weight.shape[1] == hidden.shape[1], (tuple(hidden.shape), tuple(weight.shape))
    if not use_triton(hidden, weight, labels, impl=impl):
        return fused_linear_cross_entropy_reference(
            hidden, weight, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
            softcap=softcap, num_items=num_items, reduction=reduction)
    return _FusedLinearCEFunction.apply(hidden, weight, labels.long(), int(ignore_index),
                                        float(label_smoothing), float(softcap or 0.0), num_items,
                                        reduction, torch.is_grad_enabled(), chunk_logits)


def fused_linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100, label_smoothing=0.0,
                                         softcap=None, num_items=None, reduction="mean"):
    """The spec: full logits in the compute dtype, loss in float32 (what HF's ForCausalLMLoss does)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    dtype = _compute_dtype(hidden)
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum",
                                             label_smoothing=label_smoothing)
    return loss / _denominator(labels, ignore_index, num_items, reduction)
