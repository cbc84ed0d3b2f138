"""The key/value cache of a running batch, stored left-padded so rows of different lengths decode together.

Rows join (after their prefill) and leave (when finished) between decode steps: joining pads the shorter
side on the left to a common length, leaving selects rows and drops leading columns that are padding in
every remaining row. The attention mask marks real positions; a row's next position id is its count of
real tokens, so padding never shifts rotary positions (what ``generate`` does for left-padded batches).

Between forward passes the batch is plain tensors: per layer keys and values ``[rows, kv_heads, length,
head_dim]``. A ``DynamicCache`` is built around them for each forward pass (handing the tensors to its
layers as they are: building it through ``update`` would copy the whole cache once more per step) and
read back after it. Full-attention decoder layers only.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclasses.dataclass
class KVBatch:
    keys: list[torch.Tensor]  # per layer [rows, kv_heads, length, head_dim]
    values: list[torch.Tensor]  # per layer [rows, kv_heads, length, head_dim]
    mask: torch.Tensor  # [rows, length], 1 where a real token is cached, 0 for left padding

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def from_cache(cls, cache: DynamicCache, mask: torch.Tensor) -> "KVBatch":
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        if any(k is None or k.shape[-2] != mask.shape[1] for k in keys):
            raise RuntimeError("the model's cache does not match its attention mask (unsupported cache layout)")
        return cls(keys, values, mask)

    def to_cache(self) -> DynamicCache:
        cache = DynamicCache()
        for k, v in zip(self.keys, self.values):
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        return cache

    def next_positions(self) -> torch.Tensor:
        """[rows, 1]: the position id of each row's next token."""
        return self.mask.sum(dim=1, keepdim=True)

    def step_mask(self) -> torch.Tensor:
        """[rows, length + 1]: the attention mask for a decode step feeding one token per row."""
        return torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)

    def after_step(self, cache: DynamicCache) -> "KVBatch":
        """The batch once a decode step has appended one real token to every row."""
        return KVBatch.from_cache(cache, self.step_mask())

    def concat(self, other: "KVBatch") -> "KVBatch":
        """Rows of ``self`` followed by rows of ``other``, left-padded to a common length."""
        length = max(self.length, other.length)
        a, b = self._left_pad(length), other._left_pad(length)
        return KVBatch(
            [torch.cat(p, dim=0) for p in zip(a.keys, b.keys)],
            [torch.cat(p, dim=0) for p in zip(a.values, b.values)],
            torch.cat([a.mask, b.mask], dim=0),
        )

    def select(self, rows: list[int]) -> "KVBatch | None":
        """Keep ``rows`` (in that order), trimming columns that are padding in all of them; None if empty."""
        if not rows:
            return None
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else mask.shape[1]
        return KVBatch(
            [k.index_select(0, index)[:, :, start:] for k in self.keys],
            [v.index_select(0, index)[:, :, start:] for v in self.values],
            mask[:, start:],
        )

    def _left_pad(self, length: int) -> "KVBatch":
        pad = length - self.length
        if pad == 0:
            return self

        def grow(t: torch.Tensor) -> torch.Tensor:
            zeros = t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3])
            return torch.cat([zeros, t], dim=2)

        return KVBatch(
            [grow(k) for k in self.keys],
            [grow(v) for v in self.values],
            torch.cat([self.mask.new_zeros(self.rows, pad), self.mask], dim=1),
        )
