"""The training loop shared by the preference and RL recipes (DPO/IPO/ORPO/SimPO, KTO, GRPO).

One loop, varied objectives (an ``Objective`` says how to read its data and what one micro-batch's
loss is); everything else is the SFT recipe's contract, kept identical so the control plane sees
one kind of trainer:

- a step is ``gradient_accumulation_steps`` micro-batches of ``batch_size`` examples; its loss is
  the sum of per-example losses over the whole step divided by the number of examples in it, so
  accumulation equals one big batch;
- AdamW (no decay on vectors), clipping at ``max_grad_norm``, the learning rate a pure function of
  the step (``schedule.lr_at``, the same schedules as SFT), so the schedule's state is the step number;
- after every step a MetricsEvent, and a LogEvent ``"<method> step N: {json}"`` with the objective's
  own metrics (rewards/margins/accuracies, KL, mean reward...); validation loss at the eval points
  when the objective has one; a checkpoint every ``checkpoint_every_steps`` and at the end
  (``gpu_worker.checkpoint``: adapter, optimizer, data position, RNG);
- ``should_stop`` polled before every micro-batch: a half-done step is abandoned, the last finished
  step is checkpointed and a StoppedEvent returned; the RNG saved is the one at the step boundary, so
  a resumed run (sampling included) replays the uninterrupted one.

The reference model of DPO/IPO/KTO/GRPO is the policy with its adapter disabled (``reference``),
never a second copy of the weights. Every method here trains an adapter (LoRA, DoRA, rsLoRA, over an
NF4 base for QLoRA via ``model_setup.load_for_training``); full fine-tuning is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from gpu_worker import checkpoint as ckpt
from gpu_worker.contract import AdapterManifest, AdapterType, Artifact, CheckpointEvent, CompletedEvent, JobSpec, LogEvent, StoppedEvent
from gpu_worker.data import DataPosition, epoch_batches, sequential_batches
from gpu_worker.data_preference import Loaded
from gpu_worker.loading import load_tokenizer
from gpu_worker.recipes import RunContext
from gpu_worker.recipes import model_setup as ms
from gpu_worker.recipes.schedule import RunPlan, metrics_event, optimizer_step  # one run layout for every recipe
from gpu_worker.engine.compat import write_reference
from gpu_worker.storage import delete_prefix, put_dir


@dataclasses.dataclass
class MicroResult:
    loss: torch.Tensor  # sum of this micro-batch's example losses / examples in the whole step
    metrics: dict[str, float]  # means over this micro-batch's examples
    trained_tokens: int  # completion tokens the loss was computed on
    seen_tokens: int  # non-padding tokens processed (policy forward passes)


class Objective(Protocol):
    name: str  # the method, for logs
    uses_reference: bool

    def load(self, store, tokenizer, key: str, param: str) -> Loaded:
        """Read and tokenize a data file (the objective may keep ``tokenizer`` for later)."""

    def micro_step(self, model, examples: list, step_examples: int, device) -> MicroResult: ...

    def eval_loss(self, model, examples: list, device) -> float | None:
        """Sum of per-example losses (no gradient), or None when the objective has no eval loss."""


# --- components --------------------------------------------------------------------------------------


def token_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of ``batch["labels"]`` under ``model`` (``[B, T-1]``, zero where no label)
    and the label mask. logsumexp minus the gathered logit: no ``[B, T, V]`` log-softmax copy."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask, mask


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs ``[B]`` and completion token counts ``[B]``."""
    logps, mask = token_logps(model, batch)
    return logps.sum(dim=1), mask.sum(dim=1)


@contextlib.contextmanager
def reference(model):
    """The reference model: ``model`` with its adapter disabled, without gradient (and dropout off,
    though only the adapter had any)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


# --- the recipe --------------------------------------------------------------------------------------


def train(spec: JobSpec, ctx: RunContext, objective: Objective) -> CompletedEvent | StoppedEvent:
    """Setup, train, save: ``objective`` on ``spec``'s data."""
    # --- setup ---------------------------------------------------------------------------------------
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    if spec.adapter.type == AdapterType.full:
        # The reference model is the adapter switched off, and checkpoints hold adapters: a full
        # fine-tune would need a second copy of the weights and full-model checkpoints.
        raise ms.AdapterConfigError(f"{objective.name} trains an adapter (lora or dora), not full fine-tuning")
    ms.check_device_support(spec, ctx.device)  # NF4 without CUDA fails here, before any loading
    for option in _unsupported_options(spec):
        ctx.emit(LogEvent(level="warn", message=f"{option} is not supported by the {objective.name} recipe yet and is ignored"))
    tokenizer = load_tokenizer(spec.base_model, data_dir=ctx.data_dir)  # data before weights: fail fast
    hp = spec.hyperparameters
    train_data = objective.load(ctx.store, tokenizer, spec.training_file_key, "training_file")
    valid = objective.load(ctx.store, tokenizer, spec.validation_file_key, "validation_file") if spec.validation_file_key else None
    for what, data in (("training", train_data), ("validation", valid)):
        if data is not None:
            ctx.emit(LogEvent(message=f"Loaded {len(data.examples)} {what} examples ({objective.name})"))
            if data.truncated:
                ctx.emit(LogEvent(level="warn", message=f"{data.truncated} {what} examples were longer than max_seq_length={hp.max_seq_length} tokens and were truncated"))
    model = ms.load_for_training(spec, data_dir=ctx.data_dir, device=ctx.device)  # NF4 base if asked
    for message, level in ms.apply_memory_mode_and_kernels(model, spec.runtime):
        ctx.emit(LogEvent(level=level, message=message))
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(ms.trainable_parameter_groups(model, hp.weight_decay), lr=hp.learning_rate)
    plan = RunPlan.make(spec, len(train_data.examples))

    step, tokens, position, last_ckpt = 0, 0, DataPosition(), None
    if spec.resume_from_key:
        state, rng = ckpt.load_checkpoint(ctx.store, spec.resume_from_key, model=model, optimizer=optimizer)
        _check_resumable(spec, state, plan)
        step, tokens = state["step"], state["trained_tokens"]
        position = DataPosition.from_dict(state["data_position"])
        last_ckpt = spec.resume_from_key.rstrip("/")
        ckpt.restore_rng(rng)
        ctx.emit(LogEvent(message=f"Resumed from checkpoint at step {step} of {plan.total_steps}"))
    ctx.emit(LogEvent(message=f"Training {objective.name} for {plan.total_steps} steps on {len(train_data.examples)} examples ({device})"))

    def save(at_step: int, rng: dict[str, Any], train_loss: float | None, valid_loss: float | None) -> str:
        key = ckpt.checkpoint_key(spec.output_prefix, at_step)
        state = {
            "step": at_step,
            "trained_tokens": tokens,
            "data_position": position.to_dict(),
            "lr_schedule": {"kind": hp.lr_scheduler.value, "peak": hp.learning_rate, "warmup_steps": plan.warmup_steps, "total_steps": plan.total_steps},
            "plan": dataclasses.asdict(plan),
            "method": spec.method.value,
            "base_model": spec.base_model,
            "adapter": spec.adapter.model_dump(mode="json"),
            "job_id": spec.job_id,
        }
        ckpt.save_checkpoint(ctx.store, key, model=model, optimizer=optimizer, rng=rng, state=state, base_model=spec.base_model)
        ctx.emit(CheckpointEvent(step=at_step, key=key, train_loss=train_loss, valid_loss=valid_loss))
        return key

    def stopped(at_step: int, rng: dict[str, Any]) -> StoppedEvent:
        nonlocal last_ckpt
        if at_step and last_ckpt != ckpt.checkpoint_key(spec.output_prefix, at_step):
            last_ckpt = save(at_step, rng, train_loss, valid_loss)
        event = StoppedEvent(step=at_step, checkpoint_key=last_ckpt)
        ctx.emit(event)
        return event

    # --- train ---------------------------------------------------------------------------------------
    model.train()
    train_loss = valid_loss = None
    n_examples = len(train_data.examples)
    order = epoch_batches(n_examples, plan.batch_size, spec.seed, position.epoch)
    while step < plan.total_steps:
        if position.batch_index >= plan.batches_per_epoch:
            position = DataPosition(position.epoch + 1, 0)
            order = epoch_batches(n_examples, plan.batch_size, spec.seed, position.epoch)
        rng_at_step_start = ckpt.capture_rng()
        micro = [[train_data.examples[i] for i in b] for b in order[position.batch_index : position.batch_index + plan.accumulation]]
        started = time.perf_counter()
        result = _train_step(objective, model, micro, device, ctx.should_stop)
        if result is None:  # asked to stop mid-step: the step never happened
            optimizer.zero_grad(set_to_none=True)
            return stopped(step, rng_at_step_start)
        train_loss, metrics, step_tokens, seen_tokens = result
        grad_norm, lr = optimizer_step(optimizer, params, step=step, plan=plan, hp=hp)
        step += 1
        tokens += step_tokens
        position = DataPosition(position.epoch, position.batch_index + len(micro))
        elapsed = max(time.perf_counter() - started, 1e-9)
        valid_loss = None
        if valid is not None and (plan.is_eval_step(step) or step == plan.total_steps):
            valid_loss = evaluate(objective, model, valid, plan.batch_size, device)
        ctx.emit(LogEvent(message=f"{objective.name} step {step}: {json.dumps(metrics, sort_keys=True)}"))
        ctx.emit(metrics_event(
            step=step, plan=plan, position=position, train_loss=train_loss, lr=lr, tokens=tokens,
            tokens_per_second=seen_tokens / elapsed, seconds_per_step=elapsed, grad_norm=grad_norm,
            gpu_memory_gb=ms.cuda_peak_memory_gb(device), valid_loss=valid_loss,
        ))
        if step % spec.runtime.checkpoint_every_steps == 0 or step == plan.total_steps:
            last_ckpt = save(step, ckpt.capture_rng(), train_loss, valid_loss)
        if ctx.should_stop() and step < plan.total_steps:
            return stopped(step, ckpt.capture_rng())

    # --- save ----------------------------------------------------------------------------------------
    return _finish(spec, ctx, model, tokenizer, step, tokens)


def _unsupported_options(spec: JobSpec) -> list[str]:
    """Job options only the SFT recipe implements so far: said out loud, never silently dropped."""
    d, e = spec.data, spec.evaluation
    named = {
        "data.extra_training_files": bool(d.extra_training_files),
        "data.validation_split": d.validation_split > 0,
        "data.packing": d.packing,
        "evaluation.early_stopping_patience": e.early_stopping_patience is not None,
    }
    return [name for name, asked in named.items() if asked]


def _train_step(objective: Objective, model, micro_batches: list[list], device, should_stop):
    """Forward and backward over one optimizer step; returns (loss, metrics, trained tokens, seen
    tokens), or None if asked to stop before it finished."""
    n = sum(len(m) for m in micro_batches)
    loss, trained, seen, metrics = 0.0, 0, 0, {}
    for examples in micro_batches:
        if should_stop():
            return None
        out = objective.micro_step(model, examples, n, device)
        out.loss.backward()
        loss += out.loss.item()
        trained += out.trained_tokens
        seen += out.seen_tokens
        for name, value in out.metrics.items():  # example-weighted means over the step
            metrics[name] = metrics.get(name, 0.0) + value * len(examples) / n
    return loss, metrics, trained, seen


def evaluate(objective: Objective, model, data: Loaded, batch_size: int, device) -> float | None:
    """Mean per-example loss over a whole validation set (dropout off), or None."""
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for idx in sequential_batches(len(data.examples), batch_size):
                value = objective.eval_loss(model, [data.examples[i] for i in idx], device)
                if value is None:
                    return None
                total += value
    finally:
        model.train()
    return total / len(data.examples)


def _check_resumable(spec: JobSpec, state: dict[str, Any], plan: RunPlan) -> None:
    if state.get("base_model") != spec.base_model or state.get("adapter") != spec.adapter.model_dump(mode="json"):
        raise ckpt.CheckpointError(f"checkpoint {spec.resume_from_key!r} was made for another base model or adapter configuration")
    if state.get("method") != spec.method.value:
        raise ckpt.CheckpointError(f"checkpoint {spec.resume_from_key!r} was made by a {state.get('method')} run, not {spec.method.value}")
    if state.get("plan", {}).get("total_steps") != plan.total_steps:
        raise ckpt.CheckpointError(f"checkpoint {spec.resume_from_key!r} was made for another data set or hyperparameters")


def _finish(spec: JobSpec, ctx: RunContext, model, tokenizer, step: int, tokens: int) -> CompletedEvent:
    """The adapter (with the serving check's reference log-probs) and the exports the job asked for,
    exactly as the SFT recipe leaves them."""
    prefix = f"{spec.output_prefix.rstrip('/')}/adapter"
    delete_prefix(ctx.store, prefix)
    with tempfile.TemporaryDirectory(prefix="tuneforge-adapter-") as tmp:
        files = ckpt.save_adapter(model, Path(tmp), base_model=spec.base_model)
        files = [*files, write_reference(model, tokenizer, tmp).name]
        put_dir(ctx.store, tmp, prefix)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    artifacts = [Artifact(kind="adapter", key=prefix, filename="adapter", bytes=size, detail={"adapter": spec.adapter.type.value, "format": "safetensors"})]
    if spec.export.merged or spec.export.gguf:
        from gpu_worker.export import export_model  # gguf and llama.cpp only when asked

        with tempfile.TemporaryDirectory(prefix="tuneforge-export-") as workdir:
            artifacts += export_model(spec, ctx, model, tokenizer, Path(workdir))
    manifest = AdapterManifest(job_id=spec.job_id, base_model=spec.base_model, adapter=spec.adapter, key=prefix, files=tuple(files), trained_tokens=tokens)
    event = CompletedEvent(manifest=manifest, trained_tokens=tokens, steps=step, artifacts=tuple(artifacts))
    ctx.emit(event)
    return event
