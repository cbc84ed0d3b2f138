"""Reading projections as LoraWeights: Phi-3's fused modules split by output rows compute exactly the
unsplit projection, for a plain weight and for one only available through dequantize() (NF4)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.patching.lora import split_rows
from tuneforge_kernels.lora_mlp import LoraWeights, _project_reference


class _Packed:
    """Stands in for a bitsandbytes 4-bit weight: the (out, in) tensor only through dequantize()."""

    def __init__(self, w):
        self.w = w

    def dequantize(self):
        return self.w


@pytest.mark.parametrize("packed", [False, True])
def test_split_rows_concatenate_to_the_whole_projection(packed):
    torch.manual_seed(0)
    w, a, b = torch.randn(10, 6), torch.randn(3, 6), torch.randn(10, 3)
    whole = LoraWeights(_Packed(w) if packed else w, a, b, 2.0)
    parts = split_rows(whole, [4, 6])
    x = torch.randn(5, 6)
    got = torch.cat([_project_reference(x, p) for p in parts], dim=-1)
    assert torch.allclose(got, _project_reference(x, whole), rtol=1e-6, atol=1e-6)
    assert all(p.lora_a is a for p in parts)  # shared A: autograd sums its two gradients
    assert parts[1].lora_b.data_ptr() == b[4:].data_ptr()  # a view of B: its gradient lands in B
