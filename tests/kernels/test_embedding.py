"""tuneforge_kernels.embedding: the row gather equals F.embedding bit for bit (it copies, computes nothing),
from device memory and, on a GPU, from a pinned host table read through unified addressing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneforge_kernels.embedding import embedding_rows, embedding_rows_reference
from tests.kernels.conftest import DEVICES, needs_cuda, needs_triton


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,vocab,dim", [((3, 7), 50, 24), ((5,), 11, 130), ((2, 1, 4), 9, 4096)])
def test_gather_equals_f_embedding(device, dtype, shape, vocab, dim):
    g = torch.Generator().manual_seed(len(shape) * dim)
    w = torch.randn(vocab, dim, generator=g).to(device=device, dtype=dtype)
    ids = torch.randint(0, vocab, shape, generator=g).to(device)
    out = embedding_rows(ids, w, impl="triton")
    assert out.shape == (*shape, dim) and out.dtype == dtype
    assert torch.equal(out, F.embedding(ids, w))
    assert torch.equal(embedding_rows_reference(ids, w), F.embedding(ids, w))


@needs_triton
def test_strided_table_and_int32_ids():
    w = torch.randn(20, 48)[:, :40]  # row stride 48, unit stride on the row
    ids = torch.tensor([[19, 0, 3], [3, 7, 19]], dtype=torch.int32)
    assert torch.equal(embedding_rows(ids, w, impl="triton"), F.embedding(ids.long(), w))


def test_empty_ids():
    w = torch.randn(5, 8)
    out = embedding_rows(torch.zeros(0, 3, dtype=torch.long), w, impl="triton")
    assert out.shape == (0, 3, 8)


def test_a_trainable_table_is_refused():
    w = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        embedding_rows(torch.tensor([1]), w)


@pytest.mark.gpu
@needs_cuda
def test_gather_from_pinned_host_table():
    """The table's storage is pinned host memory (no device memory), read by the kernel over the link."""
    from gpu_worker.patching.memory import host_resident

    w = torch.randn(1000, 4096, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, 1000, (4, 300), device="cuda")
    before = torch.cuda.memory_allocated()
    host = host_resident(w)
    assert host.is_cuda and torch.cuda.memory_allocated() == before
    assert torch.equal(host, w)
    assert torch.equal(embedding_rows(ids, host), F.embedding(ids, w))
    assert torch.equal(F.embedding(ids, host), F.embedding(ids, w))


@pytest.mark.gpu
@needs_cuda
def test_int64_indexing_beyond_2_31_elements():
    """A table and an output of 2^31 + 8 x 4096 bf16 elements each (4.3 GB): ``idx * stride`` and
    ``row * stride`` overflow int32 for the last rows of either. The first and last ids read the table's
    last rows; compared on those rows of the output, not on the whole (it is a copy: bit for bit)."""
    dim = 4096
    vocab = (1 << 31) // dim + 8
    w = torch.randn(vocab, dim, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (vocab,), device="cuda")
    ends = torch.tensor([vocab - 1, 0, vocab - 2, vocab - 8], device="cuda")
    ids[:4], ids[-4:] = ends, ends
    out = embedding_rows(ids, w, impl="triton")
    assert (vocab - 8) * w.stride(0) >= 2 ** 31
    for rows in (slice(0, 4), slice(vocab - 4, vocab)):
        assert torch.equal(out[rows], F.embedding(ids[rows], w))
