"""Causal attention over packed rows: several documents per row, no token attending across a boundary.

A packed batch marks its documents by ``position_ids`` restarting at 0 (what a flattening collator and
``gpu_worker.data.packing`` produce). transformers turns that into a (rows, 1, S, S) document mask for
SDPA, whose masked kernels are far slower than the unmasked flash kernel; here the documents become
``cu_seqlens`` (the start of every document in the flattened tokens) once per forward, and every layer
calls flash attention's variable-length kernel with them: no mask, no host sync per layer.

- ``packed_sequences(position_ids)``: the ``Packing`` of a batch, or None when each row is one
  document (plain causal attention is then as fast) or the positions are not packed-row positions.
  The documents' starts are read back to the host once per forward (nonzero and a small copy).
- ``varlen_attention(q, k, v, packing, scale)``: q ``(T, Hq, D)``, k/v ``(T, Hkv, D)`` with ``T`` the
  flattened tokens; grouped-query heads allowed. On CUDA (bf16/fp16, head_dim <= 256) torch's
  ``torch.nn.attention.varlen.varlen_attn``; elsewhere (and as the reference) causal SDPA per document.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuneforge_kernels.backend import use_triton


@dataclass(frozen=True)
class Packing:
    cu_seqlens: torch.Tensor  # int32 (documents + 1,), on the tokens' device; padded: see packed_sequences
    starts: tuple[int, ...] | None  # the documents' starts on the host, the total last (the reference's
    max_len: int                    # slices); None in a CUDA graph's capture, which only the flash path serves


def packed_sequences(position_ids: torch.Tensor, bucket: int = 0) -> Packing | None:
    """The documents of a (rows, S) batch whose positions run 0, 1, ... and restart at 0 at each new
    document; None if every row is a single document or the positions are anything else (left padding,
    a KV cache's offsets).

    ``bucket`` > 0: shapes that do not depend on the documents, for a CUDA graph (gpu_worker/patching/
    graphs.py): ``cu_seqlens`` padded with empty documents (the total repeated) to ``max(bucket, the
    next power of two of the document count)`` entries plus one, and ``max_len`` the row width. Flash's
    variable-length kernel gives the same values that way (bench/NOTES.md, session 10: one bf16 ulp)."""
    if position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return None
    pos = position_ids
    starts = pos == 0
    well_formed = starts[:, 0].all() & ((pos[:, 1:] == pos[:, :-1] + 1) | starts[:, 1:]).all()
    first = torch.nonzero(starts.reshape(-1)).flatten()
    ok, *host = torch.cat([well_formed.view(1).long(), first]).tolist()  # the forward's host read
    if not ok or len(host) <= pos.shape[0]:
        return None
    total = pos.numel()
    bounds = (*host, total)
    max_len = max(b - a for a, b in zip(bounds, bounds[1:]))
    padded = bounds
    if bucket:
        docs = len(bounds) - 1
        padded = bounds + (total,) * (max(bucket, 1 << (docs - 1).bit_length()) - docs)
        max_len = pos.shape[1]
    cu = torch.tensor(padded, dtype=torch.int32).to(pos.device, non_blocking=True)
    return Packing(cu, bounds, max_len)


@functools.cache
def _flash_varlen():
    """torch's varlen_attn and which of its keywords this release has (they changed between releases:
    ``is_causal`` in 2.10, ``window_size`` and ``scale`` later, ``enable_gqa`` from 2.12); None where it
    does not exist."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, {name: name in params for name in ("is_causal", "window_size", "scale", "enable_gqa")}


def _flash_ok(q: torch.Tensor, k: torch.Tensor, scale: float) -> bool:
    api = _flash_varlen()
    if api is None or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    _, has = api
    if not (has["is_causal"] or has["window_size"]):
        return False
    if not has["scale"] and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        return False
    # grouped-query heads: the flash kernel takes fewer K/V heads natively (``enable_gqa``, where it
    # exists, only opens the cuDNN backend to them)
    return q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and q.shape[1] % k.shape[1] == 0


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, scale: float,
                     impl: str | None = None) -> torch.Tensor:
    if use_triton(q, k, v, impl=impl) and _flash_ok(q, k, scale):
        fn, has = _flash_varlen()
        kw = {"is_causal": True} if has["is_causal"] else {"window_size": (-1, 0)}
        if has["scale"]:
            kw["scale"] = scale
        if has["enable_gqa"] and q.shape[1] != k.shape[1]:
            kw["enable_gqa"] = True
        cu, n = packing.cu_seqlens, packing.max_len
        return fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, n, n, **kw)
    return varlen_attention_reference(q, k, v, packing, scale)


def varlen_attention_reference(q, k, v, packing: Packing, scale: float) -> torch.Tensor:
    out = []
    for a, b in zip(packing.starts, packing.starts[1:]):
        qd, kd, vd = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale,
                                           enable_gqa=qd.shape[1] != kd.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)
