"""Evaluation components against hand computations: validation loss is the mean token cross-entropy,
exact match is the greedy argmax continuation, early stopping counts evaluations, and the gate's
verdict follows both numbers."""

from __future__ import annotations

from array import array

import pytest
import torch

from gpu_worker import evaluation as ev
from gpu_worker.data import Example

IGN = ev.IGNORE_INDEX


@pytest.fixture(scope="module")
def model_and_tok(micro_model_dir):
    from gpu_worker.loading import load_base_model

    model, tok = load_base_model(str(micro_model_dir), data_dir=micro_model_dir, device="cpu")
    return model.eval(), tok


def _chat_example(tok, question, answer):
    from gpu_worker.data import tokenize_messages

    msgs = [{"role": "user", "content": question, "weight": 1}, {"role": "assistant", "content": answer, "weight": 1}]
    return tokenize_messages(tok, msgs, 128)[0]


def test_valid_loss_is_the_mean_cross_entropy_over_labelled_tokens(model_and_tok):
    model, tok = model_and_tok
    examples = [_chat_example(tok, "What is the capital of France?", "Paris"), _chat_example(tok, "One, two,", "three, four, five"),
                _chat_example(tok, "Classify: the food was great.", "positive")]
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # one at a time, no padding: the reference
            ids = torch.tensor([list(e.input_ids)])
            labels = torch.tensor(list(e.labels))
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[1:]
            keep = target != IGN
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    got = ev.valid_loss(model, examples, batch_size=2, pad_id=tok.pad_token_id, device="cpu")
    assert got == pytest.approx(total / count, rel=1e-5)
    assert not model.training


def test_answer_pairs_split_at_the_last_trained_span():
    e = Example(array("i", [1, 2, 3, 4, 5, 6, 7, 8]), array("i", [IGN, IGN, 3, 4, IGN, IGN, 7, 8]))
    text = Example(array("i", [1, 2, 3]), array("i", [1, 2, 3]))  # raw text: trained from the first token
    assert ev.answer_pairs([text, e, e], limit=1) == [([1, 2, 3, 4, 5, 6], [7, 8])]
    assert ev.answer_pairs([text], limit=5) == []


def _greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_exact_match_is_the_greedy_continuation(model_and_tok):
    model, tok = model_and_tok
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for q in ("What is the capital of France?", "Monday Tuesday", "The weather today is")]
    own = [(list(p), _greedy(model, p, 4)) for p in prompts]
    kw = dict(pad_id=tok.pad_token_id, eos_id=None, device="cpu")
    assert ev.exact_match(model, own, **kw) == 1.0
    wrong_last = [(p, t[:-1] + [(t[-1] + 1) % 100]) for p, t in own]
    assert ev.exact_match(model, own[:1] + wrong_last[1:], **kw) == pytest.approx(1 / 3)
    assert ev.exact_match(model, [], **kw) is None


def test_best_tracker_counts_evaluations_without_improvement():
    t = ev.BestTracker(patience=2)
    assert [t.update(s, loss) for s, loss in [(1, 3.0), (2, 2.0), (3, 2.0), (4, 2.5)]] == [True, True, False, False]
    assert t.best_step == 2 and t.exhausted
    again = ev.BestTracker.from_dict(t.to_dict(), patience=2)
    assert again == t
    assert not ev.BestTracker(patience=None).exhausted
    assert ev.BestTracker.from_dict(None, 3) == ev.BestTracker(3)


@pytest.mark.parametrize(
    "base, tuned, passed, words",
    [
        ((2.0, 0.5), (1.5, 0.6), True, []),
        ((2.0, None), (2.1, None), False, ["validation loss 2.1000 (tuned) > 2.0000 (base)"]),
        ((2.0, 0.5), (1.9, 0.4), False, ["exact match 0.400 (tuned) < 0.500 (base)"]),
        ((2.0, 0.5), (float("nan"), 0.5), False, ["validation loss nan (tuned)"]),
    ],
)
def test_gate_verdict(base, tuned, passed, words):
    report = ev.gate_report(ev.Measurement(*base), ev.Measurement(*tuned), examples=7)
    assert report.passed is passed and report.examples == 7
    assert (report.base_valid_loss, report.base_exact_match) == base and report.tuned_exact_match == tuned[1]
    for w in words:
        assert w in report.reason
    assert (report.reason is None) == passed
