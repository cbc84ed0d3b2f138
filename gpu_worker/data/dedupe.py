"""Duplicate examples across a job's training files: exact ones removed, near ones reported.

Exact means the same tokens and the same labels (so a conversation uploaded twice, or once as chat
and once as ShareGPT, counts once); near means the same text once lowercased, punctuation stripped
and whitespace collapsed (``validation.near_key``, the rule the upload report uses), which is only
reported: deciding that two answers differing in a comma are the same is the user's call.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

from gpu_worker.data.encoding import Example

MAX_REPORTED = 5  # near-duplicate pairs named in the log; the count covers all of them


@dataclasses.dataclass(frozen=True)
class Item:
    """An example with where it came from, as the loader tracks it until batches are made."""

    example: Example
    source: int  # index of its training file (0: the primary file)
    line: int
    near: bytes  # validation.near_key of its record


@dataclasses.dataclass(frozen=True)
class DedupeReport:
    removed: int  # exact duplicates dropped (0 when dedupe is off)
    exact: int  # exact duplicates found
    near: int  # near-duplicates found (exact ones excluded), kept
    near_pairs: tuple[tuple[tuple[int, int], tuple[int, int]], ...]  # ((source, line), (source, first line))


def exact_key(example: Example) -> bytes:
    """What makes two examples the same: their tokens and labels."""
    h = hashlib.blake2b(example.input_ids.tobytes(), digest_size=16)
    h.update(example.labels.tobytes())
    return h.digest()


def dedupe(items: Sequence[Item], *, remove: bool) -> tuple[list[Item], DedupeReport]:
    """Items in order, exact repeats of an earlier item dropped when ``remove``; the report counts
    both kinds either way."""
    seen_exact: set[bytes] = set()
    seen_near: dict[bytes, tuple[int, int]] = {}
    kept, exact, near, pairs = [], 0, 0, []
    for item in items:
        key = exact_key(item.example)
        if key in seen_exact:
            exact += 1
            if not remove:
                kept.append(item)
            continue
        seen_exact.add(key)
        first = seen_near.setdefault(item.near, (item.source, item.line))
        if first != (item.source, item.line):
            near += 1
            if len(pairs) < MAX_REPORTED:
                pairs.append(((item.source, item.line), first))
        kept.append(item)
    return kept, DedupeReport(exact if remove else 0, exact, near, tuple(pairs))


def overlap(valid: Sequence[Item], train: Sequence[Item]) -> int:
    """Validation examples that are also training examples (their loss says little)."""
    keys = {exact_key(i.example) for i in train}
    return sum(exact_key(i.example) in keys for i in valid)
