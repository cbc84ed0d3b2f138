"""Packed-row attention: the documents found from position ids, and attention inside each of them only,
against SDPA under an explicit document mask (float64 on CPU; bf16 flash against the reference on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.conftest import TOL, needs_cuda, rel_err
from tuneforge_kernels.varlen_attention import (_flash_ok, packed_sequences, varlen_attention,
                                                varlen_attention_reference)


def _positions(rows):
    return torch.tensor([[p for n in row for p in range(n)] for row in rows])


def test_packed_sequences_finds_every_document_across_rows():
    packing = packed_sequences(_positions([[5, 3, 9], [17]]))
    assert packing.starts == (0, 5, 8, 17, 34)
    assert packing.cu_seqlens.dtype == torch.int32 and packing.cu_seqlens.tolist() == [0, 5, 8, 17, 34]
    assert packing.max_len == 17


@pytest.mark.parametrize("positions", [
    _positions([[12], [12]]),  # a document per row: plain causal attention does it
    torch.arange(3, 15)[None],  # a KV cache's offset
    torch.tensor([[0, 1, 2, 4, 5, 0, 1]]),  # a gap
    torch.tensor([[1, 2, 0, 1]]),  # a row that does not start a document
    torch.arange(6)[None, None],  # not (rows, S)
])
def test_packed_sequences_is_none_for_anything_else(positions):
    assert packed_sequences(positions) is None


def _document_mask_reference(q, k, v, starts, scale):
    """SDPA over all tokens at once under a causal same-document mask (what transformers builds)."""
    doc = torch.zeros(q.shape[0], dtype=torch.long)
    for i, a in enumerate(starts[1:-1]):
        doc[a:] = i + 1
    mask = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask,
                                       scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def _qkv(lens, hq, hkv, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    return [torch.randn(t, h, d, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
            for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("lens,hq,hkv,d", [([7, 1, 13, 4], 6, 2, 24), ([33, 19], 4, 4, 40)])
def test_reference_matches_a_document_mask(lens, hq, hkv, d):
    packing = packed_sequences(_positions([lens]))
    q, k, v = _qkv(lens, hq, hkv, d, torch.float64, "cpu", seed=len(lens))
    scale = 0.37
    out = varlen_attention(q, k, v, packing, scale)
    ref = _document_mask_reference(q, k, v, packing.starts, scale)
    assert rel_err(out, ref) < 1e-12
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    refs = torch.autograd.grad(ref, (q, k, v), dy)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, refs))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (12, 12, 64)])
def test_flash_matches_the_reference_on_the_gpu(hq, hkv, d):
    lens = [1, 700, 33, 1314, 1999, 46, 3]  # two rows of 2048
    packing = packed_sequences(_positions([lens[:4], lens[4:]]).cuda())
    q, k, v = _qkv(lens, hq, hkv, d, torch.bfloat16, "cuda", seed=hq)
    assert _flash_ok(q, k, d ** -0.5), "torch's varlen flash kernel should take this case"
    out = varlen_attention(q, k, v, packing, d ** -0.5)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = varlen_attention_reference(*ref_inputs, packing, d ** -0.5)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    refs = torch.autograd.grad(ref, ref_inputs, dy.double())
    assert all(rel_err(a, b) < TOL[torch.bfloat16] for a, b in zip(grads, refs))
