"""rope (Triton, in place on Q and K) against transformers' apply_rotary_pos_emb formula in float64."""

from __future__ import annotations

import pytest
import torch

from tuneforge_kernels.rope import _launch, rope, rope_reference
from tests.kernels.conftest import DEVICES, TOL, needs_cuda, needs_triton, rel_err

pytestmark = needs_triton


def _cos_sin(position_ids, dim, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    freqs = position_ids[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("as_view", [False, True])  # in place / out of place (autograd forbids in place)
def test_matches_reference_with_packed_positions(device, dtype, as_view):
    torch.manual_seed(0)
    bsz, n_q, n_k, seq, dim = (2, 6, 2, 11, 24) if device == "cpu" else (3, 32, 8, 1000, 128)
    # two documents packed in row 0: positions restart at 4; row 1 is a plain sequence
    pos = torch.arange(seq, device=device).repeat(bsz, 1)
    pos[0, 4:] -= 4
    cos, sin = _cos_sin(pos, dim, device)
    # HF's layout: (B, T, H, D) projections viewed as (B, H, T, D): non-contiguous
    q0 = torch.randn(bsz, seq, n_q, dim, device=device, dtype=dtype).transpose(1, 2)
    k0 = torch.randn(bsz, seq, n_k, dim, device=device, dtype=dtype).transpose(1, 2)
    ql, kl = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qi, ki = ql * 1, kl * 1  # * 1: not leaves
    if as_view:
        qi, ki = qi[:, :], ki[:, :]
    qo, ko = rope(qi, ki, cos.to(dtype), sin.to(dtype), impl="triton")
    assert (qo.data_ptr() == qi.data_ptr()) != as_view
    qr_l, kr_l = q0.double().requires_grad_(), k0.double().requires_grad_()
    qr, kr = rope_reference(qr_l, kr_l, cos.to(dtype).double(), sin.to(dtype).double())
    assert rel_err(qo, qr) < TOL[dtype] and rel_err(ko, kr) < TOL[dtype]
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    got = torch.autograd.grad((qo, ko), (ql, kl), (gq, gk))
    exp = torch.autograd.grad((qr, kr), (qr_l, kr_l), (gq.double(), gk.double()))
    for a, b in zip(got, exp):
        assert rel_err(a, b) < TOL[dtype]


def test_in_place_returns_same_storage():
    q = torch.randn(1, 3, 2, 8)  # not views: rotated in place
    k = torch.randn(1, 1, 2, 8)
    cos, sin = _cos_sin(torch.arange(2)[None], 8, "cpu")
    qo, ko = rope(q, k, cos.float(), sin.float(), impl="triton")
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()


def test_position_zero_is_identity():
    q = torch.randn(1, 3, 1, 16)
    k = torch.randn(1, 1, 1, 16)
    cos, sin = _cos_sin(torch.zeros(1, 1, dtype=torch.long), 16, "cpu")
    qo, ko = rope(q.clone(), k.clone(), cos.float(), sin.float(), impl="triton")
    assert torch.equal(qo, q) and torch.equal(ko, k)


@pytest.mark.gpu
@needs_cuda
def test_int64_indexing_beyond_2_31_elements():
    # q in HF's (B, T, H, D) layout with T * H * D > 2^31 (4.3 GB of bf16): the last tokens' offsets
    # overflow int32 (forward), and a gradient whose head stride puts head 31 past 2^31 (backward)
    heads, dim = 32, 128
    seq = (1 << 31) // (heads * dim) + 8
    q = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, seq, 8, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = (t.to(torch.bfloat16) for t in _cos_sin(torch.arange(seq, device="cuda")[None], dim, "cuda"))
    qo, ko = rope(q, k, cos, sin, impl="triton")
    tail = slice(seq - 16, seq)
    qr, kr = rope_reference(q[:, :, tail].double(), k[:, :, tail].double(), cos[:, tail].double(),
                            sin[:, tail].double())
    assert rel_err(qo[:, :, tail], qr) < TOL[torch.bfloat16] and rel_err(ko[:, :, tail], kr) < TOL[torch.bfloat16]
    del qo, ko
    # a gradient laid out (B, H, T, D) with a padded T axis: head 31 starts past 2^31 elements
    dq = torch.randn(1, heads, seq + 20000, dim, device="cuda", dtype=torch.bfloat16)[:, :, :seq]
    dk = torch.randn(1, 8, seq, dim, device="cuda", dtype=torch.bfloat16)
    assert (heads - 1) * dq.stride(1) > 2 ** 31
    dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
    _launch(dq, dk, cos, sin, True, dq_in, dk_in)
    # the backward is the rotation by the negated angle: the reference with -sin
    dqr, dkr = rope_reference(dq[:, :, tail].double(), dk[:, :, tail].double(), cos[:, tail].double(),
                              -sin[:, tail].double())
    assert rel_err(dq_in[:, :, tail], dqr) < TOL[torch.bfloat16]
    assert rel_err(dk_in[:, :, tail], dkr) < TOL[torch.bfloat16]
