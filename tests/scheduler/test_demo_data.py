"""The demo task's data: valid chat files, balanced, deterministic, and held-out means unseen."""

from __future__ import annotations

import pytest

from scheduler.demo_data import DEMO_HYPERPARAMETERS, LABELS, exact_match, make_dataset


def _review(row) -> str:
    return row["messages"][0]["content"]


def test_splits_are_disjoint_balanced_and_well_formed():
    from gpu_worker.validation import validate_lines
    import json

    train, valid, test = make_dataset(400, 50, 100, seed=0)
    assert (len(train), len(valid), len(test)) == (400, 50, 100)
    reviews = [_review(r) for r in train + valid + test]
    assert len(set(reviews)) == len(reviews)  # no test question was seen in training
    for rows in (train, valid):
        assert validate_lines([json.dumps(r) for r in rows]).ok
        assert {r["messages"][1]["content"] for r in rows} == set(LABELS)
    assert sum(r["answer"] == "positive" for r in test) in range(35, 66)
    assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" for r in test)


def test_same_seed_same_data():
    assert make_dataset(20, 5, 5, seed=3) == make_dataset(20, 5, 5, seed=3)
    assert make_dataset(20, 5, 5, seed=3) != make_dataset(20, 5, 5, seed=4)


def test_exact_match_is_strict():
    _, _, test = make_dataset(0, 0, 4, seed=0)
    answers = [r["answer"] for r in test]
    assert exact_match(answers, test) == 1.0
    assert exact_match([a + " " for a in answers], test) == 1.0  # surrounding whitespace is not content
    assert exact_match([a.upper() for a in answers], test) == 0.0
    assert exact_match(["positive, I think"] * 4, test) == 0.0
    with pytest.raises(ValueError):
        exact_match(answers[:1], test)


def test_recommended_hyperparameters_are_what_the_api_takes():
    assert set(DEMO_HYPERPARAMETERS) == {"n_epochs", "batch_size", "learning_rate_multiplier", "lora_rank", "lora_alpha"}
    assert all(v > 0 for v in DEMO_HYPERPARAMETERS.values())
