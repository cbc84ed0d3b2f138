"""The training loop shared by the preference and RL recipes (DPO/IPO/ORPO/SimPO, KTO, GRPO).

One loop, varied objectives (an ``Objective`` says how to read its data and what one micro-batch's
loss is); everything else is the SFT recipe's contract, kept identical so the control plane sees
one kind of trainer:

- a step is ``gradient_accumulation_steps`` micro-batches of ``batch_size`` examples; its loss is
  the sum of per-example losses over the whole step divided by the number of examples in it, so
  accumulation equals one big batch;
- AdamW (no decay on vectors), clipping at ``max_grad_norm``, the learning rate a pure function of
  the step (``schedule.lr_at``, the same schedules as SFT), so the schedule's state is the step number;
- the data: every training file (``extra_training_files`` mixed by weight), exact duplicates dropped,
  ``validation_split`` held out when there is no validation file (``data_preference.load_run_data``,
  the supervised rules); with ``data.packing`` each micro-batch's sequences are packed into rows of
  ``max_seq_length`` tokens with no attention across them (``collate_completions``);
- after every step a MetricsEvent, and a LogEvent ``"<method> step N: {json}"`` with the objective's
  own metrics (rewards/margins/accuracies, KL, mean reward...); at the eval points the validation
  set's mean loss (GRPO: the mean reward of greedy completions), which also picks the best step
  (kept under ``{output_prefix}/best``) and drives early stopping (``early_stopping_patience``);
  a checkpoint every ``checkpoint_every_steps`` and at the end (``gpu_worker.checkpoint``: adapter,
  optimizer, data position, RNG, best-so-far); metrics also go to TensorBoard/MLflow/W&B when asked;
- at the end the best step's adapter is kept (``keep_best``) and the evaluation gate compares the
  tuned model with its base (adapter disabled) on the validation set;
- ``should_stop`` polled before every micro-batch: a half-done step is abandoned, the last finished
  step is checkpointed and a StoppedEvent returned; the RNG saved is the one at the step boundary, so
  a resumed run (sampling included) replays the uninterrupted one.

The steps run on an engine (``train_engine``): one process, or one rank of a DeepSpeed ZeRO-2 job
when the scheduler planned several GPUs (each rank runs its share of the step's examples; the
objectives' losses are already normalised by the step's example count, so the shares add up).

The reference model of DPO/IPO/KTO/GRPO is the policy with its adapter disabled (``reference``),
never a second copy of the weights; so is the base model of the gate (``adapter_off``, re-entrant). Every method here trains an adapter (LoRA, DoRA, rsLoRA, over an
NF4 base for QLoRA via ``model_setup.load_for_training``); full fine-tuning is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from typing import Protocol

import torch

from gpu_worker import checkpoint as ckpt
from gpu_worker import evaluation as ev
from gpu_worker.contract import AdapterType, CompletedEvent, EvalReport, JobSpec, LogEvent, StoppedEvent
from gpu_worker.data import sequential_batches, tokenizer_view
from gpu_worker.data.dataset import split_rule
from gpu_worker.data_preference import Loaded, RunData, load_run_data
from gpu_worker.loading import load_tokenizer
from gpu_worker.recipes import RunContext
from gpu_worker.recipes import model_setup as ms
from gpu_worker.recipes.run_state import RunState, not_evaluated  # one run layout for every recipe
from gpu_worker.recipes.schedule import RunPlan, metrics_event
from gpu_worker.recipes.train_engine import make_engine, restore_best, save_best
from gpu_worker.spec_rules import check_spec, check_validation_data

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

    def validate(self, model, examples: list, device) -> tuple[float | None, float | None]:
        """Sums over ``examples`` (no gradient) of the per-example loss and of the reward of a greedy
        completion; each None when the objective has no such measure."""


@dataclasses.dataclass(frozen=True)
class Validation:
    """Means over the validation set."""

    loss: float | None
    reward: float | None

    @property
    def score(self) -> float:
        """Lower is better: what the best step and early stopping follow."""
        return self.loss if self.loss is not None else -self.reward


# --- components --------------------------------------------------------------------------------------


def token_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of ``batch["labels"]`` under ``model`` (``[N, T-1]`` for N sequences,
    zero where no label) and the label mask. logsumexp minus the gathered logit: no ``[B, T, V]``
    log-softmax copy. A packed batch (``collate_completions(pack_width=...)``) is unpacked to the
    same ``[N, T-1]`` layout an unpacked batch of the same sequences has."""
    if "unpack" in batch:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    if "unpack" in batch:
        index, inside = batch["unpack"].clamp(min=0), batch["unpack"] >= 0
        logps, mask = logps.reshape(-1)[index] * inside, mask.reshape(-1)[index] & inside
    return logps, mask


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs ``[B]`` and completion token counts ``[B]``."""
    logps, mask = token_logps(model, batch)
    return logps.sum(dim=1), mask.sum(dim=1)


@contextlib.contextmanager
def adapter_off(model):
    """``model`` with its adapter disabled. Re-entrant: PEFT's ``disable_adapter`` switches the
    adapter back on when it exits, which would undo an enclosing caller's (the gate measuring the
    base model through an objective that itself asks for the reference model)."""
    if getattr(model, "_tuneforge_adapter_off", False):
        yield model
        return
    model._tuneforge_adapter_off = True
    try:
        with model.disable_adapter():
            yield model
    finally:
        model._tuneforge_adapter_off = False


@contextlib.contextmanager
def reference(model):
    """The reference model: ``model`` with its adapter disabled, without gradient (and dropout off,
    though only the adapter had any)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapter_off(model):
            yield model
    finally:
        model.train(was_training)


# --- the recipe --------------------------------------------------------------------------------------


def train(spec: JobSpec, ctx: RunContext, objective: Objective) -> CompletedEvent | StoppedEvent | None:
    """Setup, train, save: ``objective`` on ``spec``'s data; the final event (None on DeepSpeed
    ranks other than 0 once training is done)."""
    # --- setup ---------------------------------------------------------------------------------------
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    if spec.adapter.type == AdapterType.full:
        # The reference model is the adapter switched off, and checkpoints hold adapters: a full
        # fine-tune would need a second copy of the weights and full-model checkpoints.
        raise ms.AdapterConfigError(f"{objective.name} trains an adapter (lora or dora), not full fine-tuning")
    check_spec(spec)  # train_on_inputs, or options needing validation data a job cannot have
    ms.check_device_support(spec, ctx.device)  # NF4 without CUDA fails here, before any loading
    tokenizer = load_tokenizer(spec.base_model, data_dir=ctx.data_dir)  # data before weights: fail fast
    hp, evo = spec.hyperparameters, spec.evaluation
    data = load_run_data(spec, lambda key, param: objective.load(ctx.store, tokenizer, key, param))
    for event in _data_events(objective.name, data, hp.max_seq_length, spec.data.packing, spec.data.validation_split):
        ctx.emit(event)
    train_examples, valid = data.train, data.valid
    check_validation_data(spec, len(valid or ()), sum(n for _, n in data.files) - data.duplicates)
    # Exports (merged model, GGUF, Modelfile) and the adapter's tokenizer carry the template trained with.
    tokenizer.chat_template = tokenizer_view(tokenizer, spec.data.chat_template)[1]
    model = ms.load_for_training(spec, data_dir=ctx.data_dir, device=ctx.device)  # NF4 base if asked
    for message, level in ms.apply_memory_mode_and_kernels(model, spec.runtime):
        ctx.emit(LogEvent(level=level, message=message))
    engine = make_engine(model, spec, full=False, store=ctx.store, data_dir=ctx.data_dir)  # one process, or a DeepSpeed rank
    model, device = engine.model, engine.device
    plan = RunPlan.make(spec, len(train_examples))
    run_state = RunState.begin(spec, ctx, engine, plan, lambda where: (
        f"Training {objective.name} for {plan.total_steps} steps on {len(train_examples)} examples ({where})"))
    tracker = run_state.tracker

    # --- train ---------------------------------------------------------------------------------------
    model.train()
    train_loss = valid_loss = None
    fp8 = ms.fp8_active(model)  # FP8 GEMMs: every validation measurement is reported in bf16 beside it
    run_first_step = run_state.step
    while run_state.running:
        rng_at_step_start = ckpt.capture_rng()
        micro = run_state.next_micro_batches(train_examples)
        step = run_state.step
        if fp8 and valid is None and step == run_first_step:  # no validation set: FP8's measures once, on this run's first batch
            first = lambda: _named(evaluate(objective, model, tuple(micro[0]), plan.batch_size, device), "this batch")  # noqa: E731
            ctx.emit(LogEvent(message=ms.fp8_against_bf16(first, f"before step {step + 1}, no validation set")))
        started = time.perf_counter()
        result = _train_step(objective, engine, micro, ctx.should_stop)
        if result is None:  # asked to stop mid-step: the step never happened
            engine.zero_grad()
            return run_state.stop(rng_at_step_start, train_loss, valid_loss)
        train_loss, metrics, step_tokens, seen_tokens = result
        grad_norm, lr = engine.step(step=step, plan=plan, hp=hp)
        run_state.advance(len(micro), step_tokens)
        step = run_state.step
        elapsed = max(time.perf_counter() - started, 1e-9)
        valid_loss = checked = None
        if valid is not None and plan.is_eval_step(step):
            # Every rank evaluates (as the SFT loop does); rank 0's numbers decide.
            checked = engine.same(evaluate(objective, model, valid, plan.batch_size, device))
            valid_loss = checked.loss
            if fp8:
                again = lambda: _named(evaluate(objective, model, valid, plan.batch_size, device), "validation")  # noqa: E731
                ctx.emit(LogEvent(message=ms.fp8_against_bf16(again, f"step {step}", fp8=_named(checked, "validation"))))
            if checked.reward is not None:
                metrics["valid_reward"] = checked.reward
            if tracker.update(step, checked.score) and evo.keep_best:
                save_best(ctx.store, engine, run_state.best_key, base_model=spec.base_model)
        ctx.emit(LogEvent(message=f"{objective.name} step {step}: {json.dumps(metrics, sort_keys=True)}"))
        event = metrics_event(
            step=step, plan=plan, position=run_state.position, train_loss=train_loss, lr=lr, tokens=run_state.tokens,
            tokens_per_second=seen_tokens / elapsed, seconds_per_step=elapsed, grad_norm=grad_norm,
            gpu_memory_gb=ms.cuda_peak_memory_gb(device), valid_loss=valid_loss,
        )
        ctx.emit(event)
        logged = event.model_dump(include={"train_loss", "learning_rate", "valid_loss", "grad_norm", "tokens_per_second", "gpu_memory_gb"})
        run_state.loggers.log(step, logged | {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        early_stop = checked is not None and tracker.exhausted and step < plan.total_steps
        if run_state.checkpoint_due(early_stop):
            run_state.save(ckpt.capture_rng(), train_loss, valid_loss)
        if early_stop:
            ctx.emit(LogEvent(message=f"Early stopping at step {step}: the validation score has not improved on {tracker.best_loss:.4f} (step {tracker.best_step}) for {tracker.bad_evals} evaluations"))
            break
        if engine.agree(ctx.should_stop()) and run_state.running:
            return run_state.stop(ckpt.capture_rng(), train_loss, valid_loss)

    # --- save ----------------------------------------------------------------------------------------
    model = engine.final_model()
    if model is None:  # a DeepSpeed rank other than 0: rank 0 finishes alone
        run_state.release()
        return None
    best_step = restore_best(ctx.store, model, tracker, step=run_state.step, keep_best=evo.keep_best, key=run_state.best_key,
                             emit=ctx.emit, measure="validation score")
    report = _gate(ctx, objective, model, valid, plan.batch_size, device) if evo.gate else None
    return run_state.finish(model, tokenizer, report, best_step)


def _data_events(name: str, data: RunData, max_seq_length: int, packing: bool, split: float | None) -> list[LogEvent]:
    events = [LogEvent(message=f"Loaded {n} examples from {param} ({name})") for param, n in data.files]
    if data.duplicates:
        events.append(LogEvent(level="warn", message=f"Removed {data.duplicates} exact duplicate examples"))
    if data.held_out:
        events.append(LogEvent(message=f"Held out {data.held_out} examples for validation ({split_rule(split)})"))
    if len(data.files) > 1:
        events.append(LogEvent(message=f"Mixed {len(data.train)} training examples per epoch from {len(data.files)} files"))
    if packing:
        events.append(LogEvent(message=f"Packing each micro-batch's sequences into rows of {max_seq_length} tokens"))
    for what, cut in (("training", data.truncated), ("validation", data.valid_truncated)):
        if cut:
            events.append(LogEvent(level="warn", message=f"{cut} {what} examples were longer than max_seq_length={max_seq_length} tokens and were truncated"))
    return events


def _train_step(objective: Objective, engine, micro_batches: list[list], should_stop):
    """Forward and backward over this process's share of one optimizer step (``engine.shard``);
    returns the whole step's (loss, metrics, trained tokens, seen tokens), or None if asked to stop
    before it finished (all ranks agree on stopping before each pass)."""
    n = sum(len(m) for m in micro_batches)
    passes = engine.shard(micro_batches)
    loss, trained, seen, sums = 0.0, 0.0, 0.0, {}
    for i, (examples, weight) in enumerate(passes):
        if engine.agree(should_stop()):
            return None
        out = objective.micro_step(engine.model, examples, n, engine.device)  # loss already over the step's n examples
        engine.backward(out.loss * weight, last=i == len(passes) - 1)
        loss += out.loss.item() * weight
        trained += out.trained_tokens * weight
        seen += out.seen_tokens * weight
        for name, value in out.metrics.items():  # example-weighted means over the step
            sums[name] = sums.get(name, 0.0) + value * len(examples) * weight
    metrics = {name: engine.total(value) / n for name, value in sorted(sums.items())}
    return engine.total(loss), metrics, int(engine.total(trained)), int(engine.total(seen))


def _named(v: Validation, of: str) -> dict[str, float | None]:
    return {f"{of} loss": v.loss, f"{of} mean reward": v.reward}


def evaluate(objective: Objective, model, examples: tuple, batch_size: int, device) -> Validation:
    """Mean loss and mean reward over a whole validation set (dropout off)."""
    was_training = model.training
    model.eval()
    loss = reward = 0.0
    try:
        with torch.no_grad():
            for idx in sequential_batches(len(examples), batch_size):
                batch_loss, batch_reward = objective.validate(model, [examples[i] for i in idx], device)
                loss = None if batch_loss is None else loss + batch_loss
                reward = None if batch_reward is None else reward + batch_reward
    finally:
        model.train(was_training)
    n = len(examples)
    return Validation(None if loss is None else loss / n, None if reward is None else reward / n)


def _gate(ctx: RunContext, objective: Objective, model, valid: tuple | None, batch_size: int, device) -> EvalReport:
    """The tuned model against its base (the adapter disabled) on the validation set."""
    if valid is None:
        return not_evaluated(ctx.emit)
    tuned = evaluate(objective, model, valid, batch_size, device)
    with adapter_off(model):
        base = evaluate(objective, model, valid, batch_size, device)
    report = ev.gate_report(ev.Measurement(base.loss, None, base.reward), ev.Measurement(tuned.loss, None, tuned.reward), examples=len(valid))
    said = [f"{what} base {b:.4f} -> tuned {t:.4f}" for what, b, t in (("validation loss", base.loss, tuned.loss), ("mean reward", base.reward, tuned.reward)) if t is not None]
    ctx.emit(LogEvent(level="info" if report.passed else "warn", message=f"Eval gate ({objective.name}): " + ", ".join(said)))
    return report
