"""The left-padded batch cache: joining and leaving rows keeps each row's cached keys and values and
its positions intact, and padding shared by every row is trimmed away."""

from __future__ import annotations

import torch

from gpu_worker.engine.kvcache import KVBatch


def batch(lengths: list[int], width: int, layers: int = 2, seed: int = 0) -> KVBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    keys = [torch.randn(len(lengths), 2, width, 4, generator=g) * mask[:, None, :, None] for _ in range(layers)]
    values = [torch.randn(len(lengths), 2, width, 4, generator=g) * mask[:, None, :, None] for _ in range(layers)]
    return KVBatch(keys, values, mask)


def real(kv: KVBatch, row: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A row's cached entries without its padding."""
    keep = kv.mask[row].bool()
    return [k[row][:, keep] for k in kv.keys], [v[row][:, keep] for v in kv.values]


def test_concat_then_select_keeps_every_row():
    a, b = batch([3, 5], 5, seed=1), batch([2, 7, 4], 7, seed=2)
    both = a.concat(b)
    assert both.rows == 5 and both.length == 7
    originals = [(a, 0), (a, 1), (b, 0), (b, 1), (b, 2)]
    for row, (src, i) in enumerate(originals):
        for got, want in zip(real(both, row), real(src, i)):
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert both.next_positions().flatten().tolist() == [3, 5, 2, 7, 4]


def test_select_trims_padding_no_remaining_row_needs():
    kv = batch([2, 7, 4], 7)
    kept = kv.select([2, 0])
    assert kept.length == 4 and kept.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    for got, want in zip(real(kept, 0), real(kv, 2)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert kv.select([]) is None


def test_cache_round_trip_shares_tensors():
    kv = batch([3, 1], 3)
    cache = kv.to_cache()
    assert all(layer.keys is k for layer, k in zip(cache.layers, kv.keys))
    assert cache.get_seq_length() == 3
    back = KVBatch.from_cache(cache, kv.mask)
    assert all(torch.equal(x, y) for x, y in zip(back.values, kv.values))
    assert kv.step_mask().tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
