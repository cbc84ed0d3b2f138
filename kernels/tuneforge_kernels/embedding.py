"""Row gather of a frozen embedding table: ``out[i] = weight[ids[i]]``, the forward of ``F.embedding``
(no ``max_norm``, no gradient for the table: it is frozen).

Why a kernel of our own: in the ``offload`` memory mode (gpu_worker/patching/memory.py) a frozen, untied
input embedding lives in pinned host memory and the GPU reads the batch's rows from it over the host
link (unified addressing: a pinned host pointer is a valid device pointer). Such reads cross PCIe, where
wide, many-in-flight requests matter: one program copies one whole row with 16-byte accesses. On device
memory it is an ordinary gather. Exact: every value is copied, none is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge_kernels.backend import launcher, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _embedding_rows_kernel(IDS, W, OUT, dim, stride_w, stride_o, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        idx = tl.load(IDS + row).to(tl.int64)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = d < dim
            tl.store(OUT + row * stride_o + d, tl.load(W + idx * stride_w + d, mask=mask), mask=mask)


def _launch(ids, weight, out):
    # ids: (N,) int32/int64 contiguous, every value in [0, V); weight: (V, D), unit stride on D (device or
    # unified-addressed host memory); out: (N, D), unit stride on D, weight's dtype
    n = ids.shape[0]
    dim = weight.shape[1]
    assert ids.dim() == 1 and ids.is_contiguous()
    assert weight.stride(1) == 1 and out.stride(1) == 1 and out.shape == (n, dim)
    assert out.dtype == weight.dtype
    # a whole 4096-wide bf16 row (8 KB) per program, 4 warps: 64 bytes in flight per thread; untuned
    # (bench/hostlink.py times it against torch's gather on the same host-resident table)
    block_d = min(next_power_of_2(dim), 4096)
    if n:
        launcher(_embedding_rows_kernel, out)[(n,)](ids, weight, out, dim, weight.stride(0), out.stride(0),
                                                     BLOCK_D=block_d, num_warps=4)


def embedding_rows(ids: torch.Tensor, weight: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """``weight[ids]`` with the shape of ``F.embedding(ids, weight)``; ``weight (V, D)`` must be frozen
    (the output carries no gradient towards it). Ids out of range are the caller's error, as in torch."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("embedding_rows gathers from a frozen table; this weight requires grad")
    if not use_triton(ids, weight, impl=impl):
        return embedding_rows_reference(ids, weight)
    flat = ids.reshape(-1).contiguous()
    out = torch.empty(flat.shape[0], weight.shape[1], dtype=weight.dtype, device=ids.device)
    _launch(flat, weight, out)
    return out.view(*ids.shape, weight.shape[1])


def embedding_rows_reference(ids, weight):
    """The spec: ``F.embedding`` without max_norm."""
    return F.embedding(ids, weight.detach())
