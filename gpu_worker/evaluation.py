"""Evaluation during and after training: validation loss, exact match, early stopping, the eval gate.

- ``valid_loss``: mean token loss over the whole validation set (the tokens that carry a label).
- ``exact_match``: for chat/completion data, the model's greedy answer to each validation example's
  prompt (everything before its last trained span: the assistant's last turn) must reproduce that
  span token for token, end-of-turn token included, so an answer that does not stop is wrong.
  Examples whose labels cover the whole sequence (raw text, ``train_on_inputs``) have no prompt and
  are not scored; if none is left, exact match is ``None``.
- ``BestTracker``: best validation loss so far, its step, and evaluations without improvement
  (early stopping's patience). It is JSON-able so checkpoints carry it and a resumed run keeps it.
- ``gate_report``: the evaluation gate's verdict from base and tuned measurements; a regression is
  a higher validation loss or, where scored, a lower exact match than the base model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from gpu_worker.contract import EvalReport

IGNORE_INDEX = -100


class EvalRegression(RuntimeError):
    """The tuned model is worse than its base on the validation set and the job asked to fail then."""

    failure_code = "eval_regression"
    param = "evaluation.fail_on_regression"

    def __init__(self, report: EvalReport, adapter_key: str):
        super().__init__(f"{report.reason}; the trained weights were kept at {adapter_key!r} but not registered")
        self.report = report
        self.adapter_key = adapter_key


def valid_loss(model, examples: Sequence, *, batch_size: int, pad_id: int, device) -> float:
    """Mean token loss over ``examples`` (dropout off; the model is put back in train mode)."""
    import torch

    from gpu_worker.data import collate

    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(list(examples[start : start + batch_size]), pad_id, device)
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                if not count:
                    continue
                loss_sum += model(**batch, num_items_in_batch=count).loss.item() * count
                n += count
    finally:
        model.train(was_training)
    return loss_sum / max(n, 1)


def answer_pairs(examples: Sequence, limit: int) -> list[tuple[list[int], list[int]]]:
    """Up to ``limit`` ``(prompt_ids, target_ids)``: the target is an example's last run of labelled
    tokens, the prompt every token before it. Examples trained from their first token are skipped."""
    pairs = []
    for e in examples:
        if len(pairs) >= limit:
            break
        labels = list(e.labels)
        end = len(labels)
        while end and labels[end - 1] == IGNORE_INDEX:
            end -= 1
        start = end
        while start and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if start == 0 or end == 0:
            continue
        ids = list(e.input_ids)
        pairs.append((ids[:start], ids[start:end]))
    return pairs


def exact_match(model, pairs: Sequence[tuple[list[int], list[int]]], *, pad_id: int, eos_id: int | None, device) -> float | None:
    """Fraction of ``pairs`` whose greedy continuation equals the target (None if there are none).
    Generation stops at the target's length: tokens after it cannot change the verdict."""
    import torch

    if not pairs:
        return None
    was_training = model.training
    model.eval()
    hits = 0
    try:
        with torch.no_grad():
            for prompt, target in pairs:
                ids = torch.tensor([prompt], dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=len(target),
                    do_sample=False,
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                )
                hits += out[0, len(prompt) :].tolist() == list(target)
    finally:
        model.train(was_training)
    return hits / len(pairs)


@dataclasses.dataclass
class BestTracker:
    """Best validation loss so far and early stopping's count of evaluations without improvement."""

    patience: int | None = None
    best_step: int | None = None
    best_loss: float | None = None
    bad_evals: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation; True if it is the best so far (ties keep the earlier step)."""
        if self.best_loss is None or loss < self.best_loss:
            self.best_step, self.best_loss, self.bad_evals = step, loss, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, patience: int | None) -> "BestTracker":
        if not d:
            return cls(patience)
        return cls(patience, d.get("best_step"), d.get("best_loss"), int(d.get("bad_evals", 0)))


@dataclasses.dataclass(frozen=True)
class Measurement:
    valid_loss: float | None
    exact_match: float | None
    reward: float | None = None  # GRPO: mean reward of greedy completions


def measure(model, examples: Sequence, pairs, *, batch_size: int, pad_id: int, eos_id: int | None, device) -> Measurement:
    return Measurement(
        valid_loss(model, examples, batch_size=batch_size, pad_id=pad_id, device=device),
        exact_match(model, pairs, pad_id=pad_id, eos_id=eos_id, device=device),
    )


def gate_report(base: Measurement, tuned: Measurement, *, examples: int) -> EvalReport:
    """Tuned vs base: passed unless the tuned model's validation loss is higher (or NaN), or its
    exact match or mean reward lower, than the base model's (each compared when both have it)."""
    reasons = []
    # written so that a NaN loss or reward (diverged) is a regression
    if tuned.valid_loss is not None and base.valid_loss is not None and not tuned.valid_loss <= base.valid_loss:
        reasons.append(f"validation loss {tuned.valid_loss:.4f} (tuned) > {base.valid_loss:.4f} (base)")
    if tuned.exact_match is not None and base.exact_match is not None and tuned.exact_match < base.exact_match:
        reasons.append(f"exact match {tuned.exact_match:.3f} (tuned) < {base.exact_match:.3f} (base)")
    if tuned.reward is not None and base.reward is not None and not tuned.reward >= base.reward:
        reasons.append(f"mean reward {tuned.reward:.4f} (tuned) < {base.reward:.4f} (base)")
    return EvalReport(
        base_valid_loss=base.valid_loss,
        tuned_valid_loss=tuned.valid_loss,
        base_exact_match=base.exact_match,
        tuned_exact_match=tuned.exact_match,
        base_reward=base.reward,
        tuned_reward=tuned.reward,
        examples=examples,
        passed=not reasons,
        reason=("the tuned model regressed: " + "; ".join(reasons)) if reasons else None,
    )
