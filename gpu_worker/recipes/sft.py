"""Supervised LoRA fine-tuning: setup, train, save.

Reads top to bottom. Setup loads the base model and the data, wraps the model with a LoRA adapter
(``spec.adapter``), applies the training kernels if asked (``gpu_worker.patching``; the stock path if
they are unavailable, with a log line saying why) and, when resuming, loads the checkpoint. The loop
then runs optimizer steps until ``total_steps``:

- a step is ``gradient_accumulation_steps`` micro-batches of ``batch_size`` examples (the last step of
  an epoch may have fewer); its loss is the sum of token losses over the whole step divided by the
  number of trained (assistant) tokens in it, so accumulation equals one big batch;
- AdamW, gradient clipping at ``max_grad_norm``, learning rate linear warmup then linear decay
  (``lr_at``), a pure function of the step, so the schedule's state is the step number;
- after every step a MetricsEvent (``tokens`` = trained tokens so far, ``tokens_per_second`` =
  non-padding tokens processed per second in that step); validation loss at the eval points (every
  ``eval_every_steps``, or each epoch end when 0) and at the end; a checkpoint every
  ``checkpoint_every_steps`` and at the end.

Stopping (``should_stop``, polled before every micro-batch): a half-done step is abandoned, the state
of the last finished step is checkpointed, and a StoppedEvent returned. The random state saved with a
checkpoint is the one at its step boundary, so a resumed run replays exactly the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from gpu_worker import checkpoint as ckpt
from gpu_worker.contract import (
    AdapterManifest,
    CheckpointEvent,
    CompletedEvent,
    JobSpec,
    LogEvent,
    MetricsEvent,
    StoppedEvent,
)
from gpu_worker.data import DataPosition, Dataset, collate, epoch_batches, load_dataset, sequential_batches
from gpu_worker.loading import load_model, load_tokenizer
from gpu_worker.recipes import RunContext
from gpu_worker.recipes.model_setup import apply_memory_mode_and_kernels, wrap_with_lora
from gpu_worker.storage import delete_prefix, put_dir


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): ``warmup_steps`` linear steps up to
    ``peak``, reached at step ``warmup_steps + 1``, then linear decay to ``peak / (total - warmup)``
    at the last step (never zero: every step learns something)."""
    if step <= warmup_steps:
        return peak * step / (warmup_steps + 1)
    return peak * (total_steps - step + 1) / (total_steps - warmup_steps)


@dataclasses.dataclass
class _Plan:
    """The shape of the run, fixed by the data and hyperparameters (identical on resume)."""

    batch_size: int
    accumulation: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int  # 0: at each epoch end

    @classmethod
    def make(cls, spec: JobSpec, n_examples: int) -> "_Plan":
        hp = spec.hyperparameters
        batches = math.ceil(n_examples / hp.batch_size)
        steps = math.ceil(batches / hp.gradient_accumulation_steps)
        total = steps * hp.n_epochs
        warmup = min(math.ceil(hp.warmup_ratio * total), total - 1)
        return cls(hp.batch_size, hp.gradient_accumulation_steps, batches, steps, total, warmup, spec.runtime.eval_every_steps)

    def is_eval_step(self, step: int) -> bool:
        if self.eval_every:
            return step % self.eval_every == 0
        return step % self.steps_per_epoch == 0


def run(spec: JobSpec, ctx: RunContext) -> CompletedEvent | StoppedEvent:
    # --- setup ---------------------------------------------------------------------------------------
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    # Tokenizer and data before the weights: a bad file fails in seconds, not after a large download.
    tokenizer = load_tokenizer(spec.base_model, data_dir=ctx.data_dir)
    hp = spec.hyperparameters
    train = load_dataset(ctx.store, spec.training_file_key, tokenizer, hp.max_seq_length, param="training_file")
    valid = None
    if spec.validation_file_key:
        valid = load_dataset(ctx.store, spec.validation_file_key, tokenizer, hp.max_seq_length, param="validation_file")
    _report_data(ctx, "training", train, hp.max_seq_length)
    if valid is not None:
        _report_data(ctx, "validation", valid, hp.max_seq_length)
    model = load_model(spec.base_model, data_dir=ctx.data_dir, device=ctx.device, dtype=spec.runtime.dtype)

    model = wrap_with_lora(model, spec.adapter)
    for message, level in apply_memory_mode_and_kernels(model, spec.runtime):
        ctx.emit(LogEvent(level=level, message=message))
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    plan = _Plan.make(spec, len(train.examples))

    step, tokens, position, last_ckpt = 0, 0, DataPosition(), None
    if spec.resume_from_key:
        state, rng = ckpt.load_checkpoint(ctx.store, spec.resume_from_key, model=model, optimizer=optimizer)
        _check_resumable(spec, state, plan)
        step, tokens = state["step"], state["trained_tokens"]
        position = DataPosition.from_dict(state["data_position"])
        last_ckpt = spec.resume_from_key.rstrip("/")
        ckpt.restore_rng(rng)
        ctx.emit(LogEvent(message=f"Resumed from checkpoint at step {step} of {plan.total_steps}"))
    ctx.emit(LogEvent(message=f"Training {plan.total_steps} steps on {len(train.examples)} examples ({device})"))

    def save(at_step: int, rng: dict[str, Any], train_loss: float | None, valid_loss: float | None) -> str:
        key = ckpt.checkpoint_key(spec.output_prefix, at_step)
        state = {
            "step": at_step,
            "trained_tokens": tokens,
            "data_position": position.to_dict(),
            "lr_schedule": {"kind": "linear", "peak": hp.learning_rate, "warmup_steps": plan.warmup_steps, "total_steps": plan.total_steps},
            "plan": dataclasses.asdict(plan),
            "base_model": spec.base_model,
            "adapter": spec.adapter.model_dump(mode="json"),
            "job_id": spec.job_id,
        }
        ckpt.save_checkpoint(ctx.store, key, model=model, optimizer=optimizer, rng=rng, state=state, base_model=spec.base_model)
        ctx.emit(CheckpointEvent(step=at_step, key=key, train_loss=train_loss, valid_loss=valid_loss))
        return key

    # --- train ---------------------------------------------------------------------------------------
    model.train()
    train_loss = valid_loss = None
    order = epoch_batches(len(train.examples), plan.batch_size, spec.seed, position.epoch)
    while step < plan.total_steps:
        if position.batch_index >= plan.batches_per_epoch:
            position = DataPosition(position.epoch + 1, 0)
            order = epoch_batches(len(train.examples), plan.batch_size, spec.seed, position.epoch)
        rng_at_step_start = ckpt.capture_rng()
        micro = [[train.examples[i] for i in b] for b in order[position.batch_index : position.batch_index + plan.accumulation]]
        started = time.perf_counter()
        result = _train_step(model, micro, tokenizer.pad_token_id, device, ctx.should_stop)
        if result is None:  # asked to stop mid-step: the step never happened
            optimizer.zero_grad(set_to_none=True)
            if step and last_ckpt != ckpt.checkpoint_key(spec.output_prefix, step):
                last_ckpt = save(step, rng_at_step_start, train_loss, valid_loss)
            return _stopped(ctx, step, last_ckpt)
        step_loss, step_tokens, seen_tokens = result
        grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm).item()
        lr = lr_at(step + 1, peak=hp.learning_rate, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += step_tokens
        position = DataPosition(position.epoch, position.batch_index + len(micro))
        elapsed = max(time.perf_counter() - started, 1e-9)
        train_loss = step_loss
        valid_loss = None
        if valid is not None and (plan.is_eval_step(step) or step == plan.total_steps):
            valid_loss = _evaluate(model, valid, plan.batch_size, tokenizer.pad_token_id, device)
        ctx.emit(
            MetricsEvent(
                step=step,
                total_steps=plan.total_steps,
                epoch=position.epoch + position.batch_index / plan.batches_per_epoch,
                train_loss=train_loss,
                learning_rate=lr,
                tokens=tokens,
                valid_loss=valid_loss,
                tokens_per_second=seen_tokens / elapsed,
                grad_norm=grad_norm,
            )
        )
        if step % spec.runtime.checkpoint_every_steps == 0 or step == plan.total_steps:
            last_ckpt = save(step, ckpt.capture_rng(), train_loss, valid_loss)
        if ctx.should_stop() and step < plan.total_steps:
            if last_ckpt != ckpt.checkpoint_key(spec.output_prefix, step):
                last_ckpt = save(step, ckpt.capture_rng(), train_loss, valid_loss)
            return _stopped(ctx, step, last_ckpt)

    # --- save ----------------------------------------------------------------------------------------
    return _finish(spec, ctx, model, step, tokens)


def _train_step(model, micro_batches, pad_id: int, device, should_stop) -> tuple[float, int, int] | None:
    """Forward and backward over one optimizer step's micro-batches; returns (mean token loss,
    trained tokens, non-padding tokens), or None if asked to stop before it finished."""
    batches = [collate(m, pad_id) for m in micro_batches]
    # Tokens that carry a loss after the causal shift: the first position of a row never does.
    n_trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_seen = sum(int(b["attention_mask"].sum()) for b in batches)
    total = 0.0
    for batch in batches:
        if should_stop():
            return None
        batch = {k: v.to(device) for k, v in batch.items()}
        # num_items_in_batch makes the model's loss sum(token losses) / n_trained over the whole
        # step, so micro-batches of unequal token counts add up to the loss of one big batch.
        loss = model(**batch, num_items_in_batch=n_trained).loss
        loss.backward()
        total += loss.item()
    return total, n_trained, n_seen


@torch.no_grad()
def _evaluate(model, data: Dataset, batch_size: int, pad_id: int, device) -> float:
    """Mean token loss over the whole validation set (dropout off)."""
    model.eval()
    loss_sum, n = 0.0, 0
    try:
        for idx in sequential_batches(len(data.examples), batch_size):
            batch = collate([data.examples[i] for i in idx], pad_id, device)
            count = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += model(**batch, num_items_in_batch=count).loss.item() * count
            n += count
    finally:
        model.train()
    return loss_sum / max(n, 1)


def _report_data(ctx: RunContext, what: str, data: Dataset, max_len: int) -> None:
    ctx.emit(LogEvent(message=f"Loaded {len(data.examples)} {what} examples"))
    if data.truncated:
        ctx.emit(LogEvent(level="warn", message=f"{data.truncated} {what} examples were longer than max_seq_length={max_len} tokens and were truncated"))
    if data.dropped:
        ctx.emit(LogEvent(level="warn", message=f"{data.dropped} {what} examples had no assistant token left after truncation and were skipped"))


def _check_resumable(spec: JobSpec, state: dict[str, Any], plan: _Plan) -> None:
    if state.get("base_model") != spec.base_model or state.get("adapter") != spec.adapter.model_dump(mode="json"):
        raise ckpt.CheckpointError(f"checkpoint {spec.resume_from_key!r} was made for another base model or adapter configuration")
    if state.get("plan", {}).get("total_steps") != plan.total_steps:
        raise ckpt.CheckpointError(f"checkpoint {spec.resume_from_key!r} was made for another data set or hyperparameters")


def _stopped(ctx: RunContext, step: int, key: str | None) -> StoppedEvent:
    event = StoppedEvent(step=step, checkpoint_key=key)
    ctx.emit(event)
    return event


def _finish(spec: JobSpec, ctx: RunContext, model, step: int, tokens: int) -> CompletedEvent:
    import tempfile

    prefix = f"{spec.output_prefix.rstrip('/')}/adapter"
    delete_prefix(ctx.store, prefix)
    with tempfile.TemporaryDirectory(prefix="tuneforge-adapter-") as tmp:
        files = ckpt.save_adapter(model, Path(tmp), base_model=spec.base_model)
        put_dir(ctx.store, tmp, prefix)
    manifest = AdapterManifest(job_id=spec.job_id, base_model=spec.base_model, adapter=spec.adapter, key=prefix, files=tuple(files), trained_tokens=tokens)
    event = CompletedEvent(manifest=manifest, trained_tokens=tokens, steps=step)
    ctx.emit(event)
    return event
