"""The training process's CUDA allocator settings: expandable segments, unless the operator chose others."""

from __future__ import annotations

from gpu_worker.allocator import CUDA_ALLOC_CONF, configure_cuda_allocator


def test_expandable_segments_unless_the_operator_set_their_own():
    env: dict[str, str] = {}
    assert configure_cuda_allocator(env) == CUDA_ALLOC_CONF == "expandable_segments:True"
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert configure_cuda_allocator(mine) == "max_split_size_mb:128"
    assert mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
