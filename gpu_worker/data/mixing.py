"""Which examples train: several files mixed with weights, and the automatic held-out split.

A training file of weight ``w`` contributes ``round(w * n)`` of its ``n`` examples to every epoch
(at least one): weight 1 takes each example once, 2 repeats each twice, 0.5 takes a seeded half.
Repeats are whole passes over the file plus a seeded subset for the fraction, so a file's examples
appear as evenly as the count allows. The held-out split (when the job has no validation file)
takes a seeded ``validation_split`` of the training examples (at least one, never all) before
mixing; without one (``None``) it is automatic: ``AUTO_SPLIT_FRACTION`` of them once there are
``AUTO_SPLIT_MIN_EXAMPLES``, at most ``AUTO_SPLIT_MAX``; ``0`` holds out nothing. Everything depends
only on the seed.
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


# The automatic split: 5% is the usual held-out share for fine-tuning sets of hundreds to thousands of
# examples. Below 100 examples it would be under 5 examples, too few for a validation loss to rank
# checkpoints, while costing the training set; above 20,000 the cap keeps each evaluation (a forward
# pass over the set, or for GRPO a greedy generation per prompt) to a bounded share of a step's time.
AUTO_SPLIT_FRACTION = 0.05
AUTO_SPLIT_MIN_EXAMPLES = 100
AUTO_SPLIT_MAX = 1000


def held_out_count(n: int, split: float | None) -> int:
    """How many of ``n`` training examples the held-out split takes (``split`` as
    ``DataOptions.validation_split``: None automatic, 0 none)."""
    if split is None:
        return min(AUTO_SPLIT_MAX, max(1, round(AUTO_SPLIT_FRACTION * n))) if n >= AUTO_SPLIT_MIN_EXAMPLES else 0
    if split <= 0 or n < 2:
        return 0
    return min(max(1, round(split * n)), n - 1)


def hold_out(items: Sequence[T], split: float | None, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out): a seeded ``held_out_count`` of ``items``, order kept in both."""
    n_valid = held_out_count(len(items), split)
    if not n_valid:
        return list(items), []
    chosen = set(random.Random(f"tuneforge-split:{seed}").sample(range(len(items)), n_valid))
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]
