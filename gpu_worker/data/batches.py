"""Order and batches: a deterministic shuffle per (seed, epoch), a resumable position, and collation
into tensors (padded rows, or packed rows with per-example position ids)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from gpu_worker.data.encoding import IGNORE_INDEX, Example
from gpu_worker.data.packing import position_ids


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the data stream is: the next batch to read is ``batch_index`` of epoch ``epoch``."""

    epoch: int = 0
    batch_index: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataPosition":
        return cls(epoch=int(d["epoch"]), batch_index=int(d["batch_index"]))


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each batch of ``epoch``: a shuffle that depends only on (seed, epoch)."""
    order = list(range(n_examples))
    random.Random(f"tuneforge-data:{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def sequential_batches(n_examples: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n_examples))) for i in range(0, n_examples, batch_size)]


def collate(examples: list[Example], pad_token_id: int, device=None, *, packing: bool | None = None,
            width: int | None = None) -> dict[str, Any]:
    """Right-pad a batch to its longest row, or to ``width`` if that is longer (the SFT recipe pads packed
    rows to the packing width: every step the same shape, which the patched model's CUDA graphs replay).
    Plain rows: ``input_ids``, ``attention_mask``, ``labels``. Packed rows (``packing``; default: whether
    any row is packed): ``input_ids``, ``labels``, ``position_ids`` restarting at 0 per example,
    ``use_cache`` (False) and no ``attention_mask``, which is how transformers is told to keep attention
    inside each example. Padding never carries a label, whatever its id (it may equal EOS)."""
    import torch

    packed = any(e.seq_lens for e in examples) if packing is None else packing
    width = max(max(len(e.input_ids) for e in examples), width or 0)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.frombuffer(e.input_ids, dtype=torch.int32).long()
        labels[row, :n] = torch.frombuffer(e.labels, dtype=torch.int32).long()
        mask[row, :n] = 1
    if packed:
        pos = torch.tensor([position_ids(e.seq_lens or (len(e.input_ids),), width) for e in examples], dtype=torch.long)
        # No KV cache: transformers only reads packing from position ids when there is none, and a
        # model called with its default use_cache=True builds one even in training, which silently
        # lets examples attend to each other (measured: logits off by >1 on the micro Llama). A 0-d
        # tensor so that recipes moving every value with `.to(device)` keep working.
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": torch.tensor(False)}
    else:
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def token_counts(examples: list[Example]) -> tuple[int, int]:
    """(tokens carrying a loss, real tokens processed) of a batch of rows, packed or not: what a
    recipe reports as trained tokens and tokens per second, without looking at padding or masks."""
    return sum(e.trained_tokens for e in examples), sum(len(e.input_ids) for e in examples)
