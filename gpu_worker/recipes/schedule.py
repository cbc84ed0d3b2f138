"""The shape of a training run, shared by every recipe: how many optimizer steps, when to evaluate,
the learning rate at each step (pure functions of the spec and the data size, so a resumed run lays
out exactly the steps of the uninterrupted one), the optimizer step itself and the metrics event
each step reports."""

from __future__ import annotations

import dataclasses
import math

import torch

from gpu_worker.contract import Hyperparameters, JobSpec, LRScheduler, MetricsEvent
from gpu_worker.data import DataPosition


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int, kind: LRScheduler | str = LRScheduler.linear) -> float:
    """Learning rate of optimizer step ``step`` (1-based): ``warmup_steps`` linear steps up to
    ``peak``, reached at step ``warmup_steps + 1``; then, with ``progress`` going from 0 at that step
    towards 1 (never reaching it: every step learns something), ``linear`` ``peak * (1 - progress)``,
    ``cosine`` ``peak * (1 + cos(pi * progress)) / 2`` (transformers' cosine schedule after warmup),
    ``constant`` ``peak``."""
    if step <= warmup_steps:
        return peak * step / (warmup_steps + 1)
    progress = (step - warmup_steps - 1) / (total_steps - warmup_steps)
    kind = LRScheduler(kind)
    if kind == LRScheduler.constant:
        return peak
    if kind == LRScheduler.cosine:
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)


@dataclasses.dataclass
class RunPlan:
    """The shape of the run, fixed by the data and hyperparameters (identical on resume)."""

    batch_size: int
    accumulation: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int  # 0: at each epoch end

    @classmethod
    def make(cls, spec: JobSpec, n_examples: int) -> "RunPlan":
        hp = spec.hyperparameters
        batches = math.ceil(n_examples / hp.batch_size)
        steps = math.ceil(batches / hp.gradient_accumulation_steps)
        total = steps * hp.n_epochs
        warmup = min(math.ceil(hp.warmup_ratio * total), total - 1)
        return cls(hp.batch_size, hp.gradient_accumulation_steps, batches, steps, total, warmup, spec.runtime.eval_every_steps)

    def is_eval_step(self, step: int) -> bool:
        if step == self.total_steps:
            return True
        if self.eval_every:
            return step % self.eval_every == 0
        return step % self.steps_per_epoch == 0


def check_resumable(spec: JobSpec, state: dict, plan: RunPlan) -> None:
    """A checkpoint resumes only the run it was made for: same base model, adapter, method (when the
    checkpoint records one) and run shape. Raises ``CheckpointError``."""
    from gpu_worker.checkpoint import CheckpointError

    key = spec.resume_from_key
    if state.get("base_model") != spec.base_model or state.get("adapter") != spec.adapter.model_dump(mode="json"):
        raise CheckpointError(f"checkpoint {key!r} was made for another base model or adapter configuration")
    if state.get("method", spec.method.value) != spec.method.value:
        raise CheckpointError(f"checkpoint {key!r} was made by a {state.get('method')} run, not {spec.method.value}")
    if state.get("plan", {}).get("total_steps") != plan.total_steps:
        raise CheckpointError(f"checkpoint {key!r} was made for another data set or hyperparameters")


def optimizer_step(optimizer, params, *, step: int, plan: RunPlan, hp: Hyperparameters) -> tuple[float, float]:
    """Clip the gradients, apply the scheduled learning rate of optimizer step ``step + 1``, step and
    clear the gradients. Returns (gradient norm before clipping, learning rate)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm).item()
    lr = lr_at(step + 1, peak=hp.learning_rate, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps, kind=hp.lr_scheduler)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def metrics_event(
    *, step: int, plan: RunPlan, position: DataPosition, train_loss: float, lr: float, tokens: int,
    tokens_per_second: float, seconds_per_step: float, grad_norm: float, gpu_memory_gb: float | None,
    valid_loss: float | None = None, exact_match: float | None = None,
) -> MetricsEvent:
    return MetricsEvent(
        step=step,
        total_steps=plan.total_steps,
        epoch=position.epoch + position.batch_index / plan.batches_per_epoch,
        train_loss=train_loss,
        learning_rate=lr,
        tokens=tokens,
        valid_loss=valid_loss,
        tokens_per_second=tokens_per_second,
        grad_norm=grad_norm,
        gpu_memory_gb=gpu_memory_gb,
        eta_seconds=seconds_per_step * (plan.total_steps - step),
        exact_match=exact_match,
    )
