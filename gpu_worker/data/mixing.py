"""Which examples train: several files mixed with weights, and the automatic held-out split.

A training file of weight ``w`` contributes ``round(w * n)`` of its ``n`` examples to every epoch
(at least one): weight 1 takes each example once, 2 repeats each twice, 0.5 takes a seeded half.
Repeats are whole passes over the file plus a seeded subset for the fraction, so a file's examples
appear as evenly as the count allows. The held-out split takes a seeded ``fraction`` of the
training examples (at least one, never all) before mixing. Everything depends only on the seed.
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def mixed_count(n: int, weight: float) -> int:
    return max(1, round(n * weight)) if n else 0


def mix(groups: Sequence[Sequence[T]], weights: Sequence[float], seed: int) -> list[T]:
    """The examples of one epoch's pool: each group resampled to ``mixed_count``, in group order
    (the epoch shuffle comes after)."""
    out: list[T] = []
    for g, (items, weight) in enumerate(zip(groups, weights)):
        target = mixed_count(len(items), weight)
        rng = random.Random(f"tuneforge-mix:{seed}:{g}")
        full, rest = divmod(target, len(items)) if items else (0, 0)
        out.extend(x for _ in range(full) for x in items)
        out.extend(items[i] for i in sorted(rng.sample(range(len(items)), rest)))
    return out


def hold_out(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out): a seeded ``fraction`` of ``items``, order kept in both."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    n_valid = min(max(1, round(fraction * len(items))), len(items) - 1)
    chosen = set(random.Random(f"tuneforge-split:{seed}").sample(range(len(items)), n_valid))
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]
