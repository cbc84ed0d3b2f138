"""Mixing weights, the held-out split and duplicate handling."""

from __future__ import annotations

from array import array
from collections import Counter

from gpu_worker.data import Example
from gpu_worker.data.dedupe import Item, dedupe
from gpu_worker.data.mixing import hold_out, mix, mixed_count


def test_weights_scale_each_files_share_of_an_epoch():
    a, b, c = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(7)], [f"c{i}" for i in range(20)]
    pool = mix([a, b, c], [1.0, 2.5, 0.25], seed=1)
    counts = Counter(x[0] for x in pool)
    assert counts == {"a": 10, "b": round(7 * 2.5), "c": 5}
    assert Counter(pool)["a3"] == 1  # weight 1: each example once
    per_b = Counter(x for x in pool if x[0] == "b")
    assert set(per_b) == set(b) and set(per_b.values()) <= {2, 3}  # repeats as even as the count allows
    assert len(set(x for x in pool if x[0] == "c")) == 5  # a subset, not a repeat
    assert pool == mix([a, b, c], [1.0, 2.5, 0.25], seed=1)
    assert pool != mix([a, b, c], [1.0, 2.5, 0.25], seed=2)
    assert mixed_count(3, 0.01) == 1  # a listed file always contributes


def test_weights_are_respected_in_expectation_over_batches():
    from gpu_worker.data import epoch_batches

    a, b = [("a", i) for i in range(30)], [("b", i) for i in range(30)]
    pool = mix([a, b], [1.0, 3.0], seed=0)
    firsts = Counter()
    for epoch in range(200):
        first_batch = epoch_batches(len(pool), 8, seed=5, epoch=epoch)[0]
        firsts.update(pool[i][0] for i in first_batch)
    share_b = firsts["b"] / sum(firsts.values())
    assert abs(share_b - 0.75) < 0.03  # 1600 draws: 3 standard deviations is ~0.03


def test_held_out_split_is_deterministic_by_seed_and_disjoint():
    items = list(range(100))
    train, valid = hold_out(items, 0.1, seed=7)
    assert (train, valid) == hold_out(items, 0.1, seed=7)
    assert valid != hold_out(items, 0.1, seed=8)[1]
    assert len(valid) == 10 and sorted(train + valid) == items and not set(train) & set(valid)
    assert hold_out([1, 2], 0.01, seed=0)[1] != []  # at least one held out
    assert hold_out([1], 0.3, seed=0) == ([1], [])  # never all of it


def _item(ids, labels, line, near=b"n", source=0):
    return Item(Example(array("i", ids), array("i", labels)), source, line, near)


def test_dedupe_removes_exact_repeats_and_reports_near_ones():
    items = [
        _item([1, 2, 3], [-100, 2, 3], 1, b"x"),
        _item([1, 2, 3], [-100, 2, 3], 2, b"x"),  # exact repeat
        _item([1, 2, 4], [-100, 2, 4], 3, b"x"),  # same normalised text, other tokens
        _item([1, 2, 3], [-100, -100, 3], 4, b"y"),  # same tokens, other labels: not a duplicate
        _item([5], [-100], 1, b"x", source=1),  # near-duplicate from another file
    ]
    kept, report = dedupe(items, remove=True)
    assert [(i.source, i.line) for i in kept] == [(0, 1), (0, 3), (0, 4), (1, 1)]
    assert (report.removed, report.exact, report.near) == (1, 1, 2)
    assert report.near_pairs[0] == ((0, 3), (0, 1))
    kept_all, off = dedupe(items, remove=False)
    assert len(kept_all) == 5 and (off.removed, off.exact) == (0, 1)


def test_the_automatic_split_holds_out_five_percent_from_a_hundred_examples_up():
    from gpu_worker.data.mixing import AUTO_SPLIT_MAX, AUTO_SPLIT_MIN_EXAMPLES, held_out_count

    assert AUTO_SPLIT_MIN_EXAMPLES == 100 and AUTO_SPLIT_MAX == 1000
    # unset (None): automatic; 0: none; a fraction: that share, at least one, never all
    assert [held_out_count(n, None) for n in (0, 10, 99, 100, 119, 130, 5000, 20000, 100000)] == [0, 0, 0, 5, 6, 6, 250, 1000, 1000]
    assert [held_out_count(n, 0.0) for n in (10, 1000)] == [0, 0]
    assert [held_out_count(n, 0.25) for n in (1, 2, 3, 16)] == [0, 1, 1, 4]
    train, held = hold_out(list(range(200)), None, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(200)) and (train, held) == hold_out(list(range(200)), None, seed=3)
    assert hold_out(list(range(200)), 0.0, seed=3) == (list(range(200)), [])
