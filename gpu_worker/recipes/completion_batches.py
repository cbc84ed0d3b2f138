"""Batches of prompt + completion for the preference, KTO and GRPO recipes (torch), from the token ids
``gpu_worker.data_preference`` loads (torch-free: the control plane's token counter imports it)."""

from __future__ import annotations

from array import array
from typing import Any

from gpu_worker.data import IGNORE_INDEX


def collate_completions(prompts: list[array], completions: list[array], pad_token_id: int, device=None, *, pack_width: int | None = None) -> dict[str, Any]:
    """``prompt + completion`` sequences as a batch: ``input_ids`` and ``labels`` (the completion's
    tokens; ``IGNORE_INDEX`` on the prompt and the padding), plus

    - unpacked (``pack_width`` None): one right-padded row per sequence and ``attention_mask``;
    - packed: sequences placed first-fit (longest first) into rows of at most ``pack_width`` tokens,
      ``position_ids`` restarting at each sequence (transformers then keeps attention inside each
      one) and ``unpack``: ``[N, L-1]`` indices into the flattened ``[rows, width-1]`` shifted label
      grid giving each sequence's next-token positions in order (-1 past its end), so per-sequence
      log-probs come out exactly as the unpacked batch lays them out (``preference_loop.token_logps``).
    """
    import torch

    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    starts = [len(p) for p in prompts]
    if pack_width is None:
        places = [(row, 0) for row in range(len(seqs))]
        width = max(len(q) for q in seqs)
    else:
        places, fill = [(0, 0)] * len(seqs), []  # (row, offset) of each sequence; tokens used per row
        for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
            if len(seqs[i]) > pack_width:
                raise ValueError(f"a sequence of {len(seqs[i])} tokens does not fit rows of {pack_width}")
            row = next((r for r, used in enumerate(fill) if used + len(seqs[i]) <= pack_width), len(fill))
            if row == len(fill):
                fill.append(0)
            places[i], fill[row] = (row, fill[row]), fill[row] + len(seqs[i])
        width = max(fill)
    rows = 1 + max(r for r, _ in places)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for seq, start, (row, at) in zip(seqs, starts, places):
        ids[row, at : at + len(seq)] = torch.tensor(seq, dtype=torch.long)
        labels[row, at + start : at + len(seq)] = ids[row, at + start : at + len(seq)]
        positions[row, at : at + len(seq)] = torch.arange(len(seq))
        mask[row, at : at + len(seq)] = 1
    batch = {"input_ids": ids, "labels": labels}
    if pack_width is None:
        batch["attention_mask"] = mask
    else:
        longest = max(len(q) for q in seqs) - 1
        unpack = torch.full((len(seqs), longest), -1, dtype=torch.long)
        for n, (seq, (row, at)) in enumerate(zip(seqs, places)):
            unpack[n, : len(seq) - 1] = row * (width - 1) + at + torch.arange(len(seq) - 1)
        batch |= {"position_ids": positions, "unpack": unpack, "tokens": mask.sum()}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def batch_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens of a ``collate_completions`` batch, packed or not."""
    return int(batch["tokens"] if "unpack" in batch else batch["attention_mask"].sum())
