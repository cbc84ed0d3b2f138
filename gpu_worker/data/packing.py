"""Sample packing: several examples laid end to end in one row, each still seeing only itself.

``pack`` groups tokenized examples into rows of at most ``max_seq_length`` tokens (best fit,
longest first: rows come out nearly full) and records each row's example lengths. ``collate`` turns
such rows into ``input_ids``/``labels`` plus ``position_ids`` restarting at 0 for every example,
``use_cache=False`` and no ``attention_mask``: transformers (``masking_utils.find_packed_sequence_indices``) reads the
restarts and builds a block-diagonal causal mask for eager and SDPA attention, flash-attention takes
the same position ids as variable-length sequences, and a model patched with our kernels on a GPU
runs ``tuneforge_kernels.varlen_attention`` (flash's variable-length kernel, no mask) on them. The first label of every example is
already ``IGNORE_INDEX`` (``encoding.py``), so the last token of one example is never trained to
predict the first token of the next. A test checks a packed batch gives the padded batch's losses.
"""

from __future__ import annotations

import bisect
import random
from array import array
from typing import Sequence

from gpu_worker.data.encoding import Example


def pack(examples: Sequence[Example], max_seq_length: int, seed: int = 0) -> list[Example]:
    """Rows of whole examples, each at most ``max_seq_length`` tokens. Deterministic: ties in length
    are broken by a seeded order, so rows mix examples from everywhere in the data."""
    order = list(range(len(examples)))
    random.Random(f"tuneforge-pack:{seed}").shuffle(order)
    order.sort(key=lambda i: -len(examples[i].input_ids))  # stable: the shuffle breaks ties
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row) sorted: best fit is the first that fits
    for i in order:
        n = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_seq_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    out = []
    for members in rows:
        ids, labels = array("i"), array("i")
        for i in members:
            ids.extend(examples[i].input_ids)
            labels.extend(examples[i].labels)
        out.append(Example(ids, labels, tuple(len(examples[i].input_ids) for i in members)))
    return out


def position_ids(seq_lens: Sequence[int], width: int) -> list[int]:
    """0..n-1 for each example, then 0.. again for the padding after them (its own sequence)."""
    out = [p for n in seq_lens for p in range(n)]
    return out + list(range(width - len(out)))
