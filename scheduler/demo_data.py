"""The README demo's task: sentiment of short synthetic reviews, as OpenAI chat fine-tuning data.

Pure standard library (the control plane and the demo script import it without torch).

Each review mentions one or two things (the food, the staff, the room...) with adjectives of one
polarity drawn from fixed word lists, in one of several sentence shapes; the assistant answers exactly
"positive" or "negative". The random-weight built-in model ("tuneforge-tiny") cannot do this at all;
a LoRA fine-tune learns which words carry which polarity and gets reviews it never saw right. Held-out
test reviews are new sentences: no test review text appears in the training or validation rows.

Measured on the 2-core development machine (CPU, float32, kernels on their CPU reference path),
through the real SFT recipe with ``DEMO_HYPERPARAMETERS`` (learning rate = 2e-4 x 10 = 2e-3),
``make_dataset(400, 50, 100, seed=7)`` and job seed 42, as the demo runs it: 200 optimizer steps,
24 s of training with one torch thread (the machine was shared and loaded: 190 s with two threads
fighting other processes); valid loss (answer and end-of-turn tokens) 0.50 after
the first epoch, 0.11 at the end; held-out exact match: base model 0/100,
tuned 100/100. With data seed 0: tuned 98/100. Fewer epochs learn less: 3 epochs at 2e-3 gave
94/100, 3 epochs at 4e-3 gave 83/100 (too hot for this tiny model). The whole ``python -m scheduler
demo`` (platform start, upload, training in a worker process, 200 chat requests) took 35 s, the job
22 s of it; exact match base 0/100, tuned 100/100; 3,200 trained tokens (2 per example and epoch).
"""

from __future__ import annotations

import random
from typing import Any

POSITIVE = (
    "great", "good", "wonderful", "excellent", "lovely", "amazing", "friendly", "delightful", "superb",
    "pleasant", "fantastic", "brilliant", "charming", "perfect", "tasty", "clean", "helpful", "beautiful",
    "cozy", "fresh", "kind", "impressive", "enjoyable", "generous",
)
NEGATIVE = (
    "bad", "terrible", "awful", "horrible", "rude", "dirty", "boring", "disappointing", "poor", "cold",
    "noisy", "slow", "broken", "ugly", "unpleasant", "mediocre", "stale", "annoying", "expensive",
    "dull", "weak", "greasy", "smelly", "crowded",
)
SUBJECTS = (
    "food", "service", "staff", "room", "coffee", "movie", "book", "hotel", "bread", "soup", "music",
    "view", "price", "app", "waiter", "garden", "bed", "story", "ending", "support", "location", "menu",
)
_SHAPES = (
    "The {s1} was {a1}.",
    "The {s1} was {a1} and the {s2} was {a2}.",
    "I found the {s1} {a1}, and the {s2} {a2}.",
    "{A1} {s1}, {a2} {s2}.",
    "What a {a1} {s1}! The {s2} was {a2} too.",
    "Honestly, the {s1} was {a1}.",
    "Our {s1} was {a1} and quite {a2}.",
    "A {a1} {s1} with a {a2} {s2}.",
)
QUESTION = "Review: {review}\nIs this review positive or negative?"
LABELS = ("positive", "negative")

N_TRAIN, N_VALID, N_TEST = 400, 50, 100
# Base LoRA learning rate of the platform; the API multiplies it by learning_rate_multiplier.
DEMO_BASE_LEARNING_RATE = 2e-4
DEMO_HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 4,
    "batch_size": 8,
    "learning_rate_multiplier": 10.0,
    "lora_rank": 16,
    "lora_alpha": 32,
}


def _review(rng: random.Random, label: str) -> str:
    words = POSITIVE if label == "positive" else NEGATIVE
    s1, s2 = rng.sample(SUBJECTS, 2)
    a1, a2 = rng.sample(words, 2)
    shape = rng.choice(_SHAPES)
    return shape.format(s1=s1, s2=s2, a1=a1, a2=a2, A1=a1.capitalize())


def make_dataset(n_train: int, n_valid: int, n_test: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Build ``(train_rows, valid_rows, test_rows)``: balanced labels, every review text distinct.

    Train and valid rows are chat examples ``{"messages": [user, assistant]}``; test rows are
    ``{"messages": [user], "answer": "positive" | "negative"}`` for exact-match scoring.
    """
    if min(n_train, n_valid, n_test) < 0:
        raise ValueError("dataset sizes must be non-negative")
    rng = random.Random(f"tuneforge-demo:{seed}")
    total = n_train + n_valid + n_test
    seen: set[str] = set()
    items: list[tuple[str, str]] = []
    attempts = 0
    while len(items) < total:
        attempts += 1
        if attempts > 50 * total + 1000:
            raise ValueError(f"cannot make {total} distinct reviews from the word lists")
        label = LABELS[len(items) % 2]
        review = _review(rng, label)
        if review not in seen:
            seen.add(review)
            items.append((review, label))
    rng.shuffle(items)
    train, valid, test = items[:n_train], items[n_train : n_train + n_valid], items[n_train + n_valid :]
    return [_chat(r, a) for r, a in train], [_chat(r, a) for r, a in valid], [_question(r, a) for r, a in test]


def _chat(review: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION.format(review=review)}, {"role": "assistant", "content": answer}]}


def _question(review: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION.format(review=review)}], "answer": answer}


def exact_match(predictions: list[str], test_rows: list[dict]) -> float:
    """Fraction of test rows whose prediction, stripped, equals the expected answer exactly."""
    if len(predictions) != len(test_rows):
        raise ValueError("one prediction per test row is required")
    if not test_rows:
        return 0.0
    return sum(p.strip() == row["answer"] for p, row in zip(predictions, test_rows)) / len(test_rows)
