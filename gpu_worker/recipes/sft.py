"""Supervised fine-tuning (LoRA, rsLoRA, DoRA, QLoRA, full; chat, completion or raw text): setup, train, save.

Reads top to bottom. Setup checks the hardware can run the job (QLoRA needs CUDA), loads the
tokenizer and the data, then the base model wrapped as ``spec.adapter`` asks (``model_setup``),
applies the training kernels if asked (the stock path if they are unavailable, with a log line
saying why), opens the optional loggers (``integrations``) and, when resuming, loads the checkpoint.
The loop then runs optimizer steps until ``total_steps`` or early stopping:

- a step is ``gradient_accumulation_steps`` micro-batches of ``batch_size`` examples (the last step of
  an epoch may have fewer); its loss is the sum of token losses over the whole step divided by the
  number of trained tokens in it, so accumulation equals one big batch. Raw text (continued
  pretraining) is the same loop: its labels cover every token;
- AdamW (matrices decay, vectors do not), gradient clipping at ``max_grad_norm``, learning rate from
  ``lr_at`` (warmup then linear/cosine decay or constant), a pure function of the step, so the
  schedule's state is the step number;
- after every step a MetricsEvent (loss, lr, grad norm, tokens/s, GPU peak memory, ETA); at the eval
  points (every ``eval_every_steps``, or each epoch end when 0, and the last step) validation loss
  and exact match (``evaluation``); the best evaluation's weights are kept under
  ``{output_prefix}/best`` and ``early_stopping_patience`` evaluations without improvement end the
  run; a checkpoint every ``checkpoint_every_steps`` and at the end.

Save: the best weights are restored when ``keep_best``, the eval gate compares them with the base
model, the adapter (or the full model) is written under ``{output_prefix}/adapter`` (``/model`` for
full fine-tuning), exports are made (``export``), and CompletedEvent closes the run; a regression
with ``fail_on_regression`` raises ``EvalRegression`` instead, after saving.

Stopping (``should_stop``, polled before every micro-batch): a half-done step is abandoned, the state
of the last finished step is checkpointed, and a StoppedEvent returned. The random state saved with a
checkpoint is the one at its step boundary, so a resumed run replays exactly the uninterrupted one.
Full fine-tuning checkpoints hold the whole model (``model_setup.save_full_checkpoint``).
The run's position, checkpoints, stopping and artifacts are ``run_state``'s, shared with the preference loop.

Where the steps run is the engine's business (``train_engine``): one process on one device, or, when
the scheduler planned the job across GPUs (``spec.runtime.distributed``), one DeepSpeed rank of
several (``deepspeed_engine``), each running its share of every step. Every rank runs this same
loop; rank 0 alone reports events and writes to the object store, and it alone runs the save phase
on the trained model the engine hands it.
"""

from __future__ import annotations

import random
import time

import torch

from gpu_worker import checkpoint as ckpt
from gpu_worker import evaluation as ev
from gpu_worker.contract import AdapterType, CompletedEvent, JobSpec, LogEvent, StoppedEvent
from gpu_worker.data import Dataset, collate, load_sft_data, token_counts, tokenizer_view
from gpu_worker.loading import load_tokenizer
from gpu_worker.recipes import RunContext
from gpu_worker.recipes import model_setup as ms
from gpu_worker.recipes.run_state import RunState, not_evaluated
from gpu_worker.recipes.schedule import RunPlan, metrics_event
from gpu_worker.recipes.train_engine import make_engine, restore_best, save_best
from gpu_worker.spec_rules import check_spec, check_validation_data

def run(spec: JobSpec, ctx: RunContext) -> CompletedEvent | StoppedEvent | None:
    """Train ``spec``; the final event (None on DeepSpeed ranks other than 0 once training is done)."""
    # --- setup ---------------------------------------------------------------------------------------
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    check_spec(spec)
    ms.check_device_support(spec, ctx.device)
    # Tokenizer and data before the weights: a bad file fails in seconds, not after a large download.
    tokenizer = load_tokenizer(spec.base_model, data_dir=ctx.data_dir)
    hp, evo = spec.hyperparameters, spec.evaluation
    data = load_sft_data(ctx.store, spec, tokenizer)
    train, valid = data.train, data.valid
    for event in data.stats.log_events():
        ctx.emit(event)
    read = sum(f.examples for f in data.stats.files) - data.stats.dedupe.removed
    check_validation_data(spec, len(valid.examples) if valid is not None else 0, read)
    # Exports (full model folder, merged model, GGUF, Modelfile) carry the template trained with.
    tokenizer.chat_template = tokenizer_view(tokenizer, spec.data.chat_template)[1]
    model = ms.load_for_training(spec, data_dir=ctx.data_dir, device=ctx.device)
    full = spec.adapter.type == AdapterType.full
    for message, level in ms.apply_memory_mode_and_kernels(model, spec.runtime):
        ctx.emit(LogEvent(message=message, level=level))
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    engine = make_engine(model, spec, full=full, store=ctx.store, data_dir=ctx.data_dir)
    model, device = engine.model, engine.device
    plan = RunPlan.make(spec, len(train.examples))
    pairs = []
    if valid is not None and evo.exact_match and _has_answers(spec, data.stats):
        pairs = ev.answer_pairs(valid.examples, evo.max_exact_match_examples)
    run_state = RunState.begin(spec, ctx, engine, plan, lambda where: (
        f"Training {plan.total_steps} steps on {len(train.examples)} examples ({where}, {spec.adapter.type.value})"))
    tracker = run_state.tracker

    # --- train ---------------------------------------------------------------------------------------
    model.train()
    train_loss = valid_loss = None
    fp8 = ms.fp8_active(model)  # FP8 GEMMs: every loss measurement is reported in bf16 beside it
    run_started, run_first_step = time.perf_counter(), run_state.step
    # packed rows, nearly full, padded to the packing width: one shape for every step (CUDA graphs)
    width = data.stats.max_seq_length if data.stats.packed_rows is not None else None
    while run_state.running:
        rng_at_step_start = ckpt.capture_rng()
        micro = run_state.next_micro_batches(train.examples)
        step = run_state.step
        if fp8 and valid is None and step == run_first_step:  # no validation set: FP8's loss once, on this run's first batch
            first = lambda: {"loss of this batch": ev.valid_loss(model, micro[0], batch_size=plan.batch_size, pad_id=pad_id, device=device)}  # noqa: E731
            ctx.emit(LogEvent(message=ms.fp8_against_bf16(first, f"before step {step + 1}, no validation set")))
        started = time.perf_counter()
        result = _train_step(engine, micro, pad_id, ctx.should_stop, width)
        if result is None:  # asked to stop mid-step: the step never happened
            engine.zero_grad()
            return run_state.stop(rng_at_step_start, train_loss, valid_loss)
        step_loss, step_tokens, seen_tokens = result
        grad_norm, lr = engine.step(step=step, plan=plan, hp=hp)
        run_state.advance(len(micro), step_tokens)
        step = run_state.step
        elapsed = max(time.perf_counter() - started, 1e-9)
        train_loss, valid_loss, exact = step_loss, None, None
        if valid is not None and plan.is_eval_step(step):
            # Every rank evaluates (ZeRO-3 needs them all in each forward); rank 0's numbers decide.
            measure = lambda: ev.valid_loss(model, valid.examples, batch_size=plan.batch_size, pad_id=pad_id, device=device)  # noqa: E731
            valid_loss = engine.same(measure())
            if fp8:
                ctx.emit(LogEvent(message=ms.fp8_against_bf16(lambda: {"validation loss": measure()}, f"step {step}", fp8={"validation loss": valid_loss})))
            exact = engine.same(ev.exact_match(model, pairs, pad_id=pad_id, eos_id=eos_id, device=device))
            if tracker.update(step, valid_loss) and evo.keep_best:
                save_best(ctx.store, engine, run_state.best_key, base_model=spec.base_model)
        per_step = (time.perf_counter() - run_started) / (step - run_first_step)
        metrics = metrics_event(
            step=step, plan=plan, position=run_state.position, train_loss=train_loss, lr=lr, tokens=run_state.tokens,
            tokens_per_second=seen_tokens / elapsed, seconds_per_step=per_step, grad_norm=grad_norm,
            gpu_memory_gb=ms.cuda_peak_memory_gb(device), valid_loss=valid_loss, exact_match=exact,
        )
        ctx.emit(metrics)
        run_state.loggers.log(step, metrics.model_dump(include={"train_loss", "learning_rate", "valid_loss", "grad_norm", "tokens_per_second", "gpu_memory_gb", "exact_match"}))
        early_stop = valid_loss is not None and tracker.exhausted and step < plan.total_steps
        if run_state.checkpoint_due(early_stop):
            run_state.save(ckpt.capture_rng(), train_loss, valid_loss)
        if early_stop:
            ctx.emit(LogEvent(message=f"Early stopping at step {step}: validation loss has not improved on {tracker.best_loss:.4f} (step {tracker.best_step}) for {tracker.bad_evals} evaluations"))
            break
        if engine.agree(ctx.should_stop()) and run_state.running:
            return run_state.stop(ckpt.capture_rng(), train_loss, valid_loss)

    # --- save ----------------------------------------------------------------------------------------
    graphs = ms.cuda_graph_summary(model)
    if graphs:
        ctx.emit(LogEvent(message=graphs))
    model = engine.final_model()
    if model is None:  # a DeepSpeed rank other than 0: rank 0 finishes alone
        run_state.release()
        return None
    best_step = restore_best(ctx.store, model, tracker, step=run_state.step, keep_best=evo.keep_best, key=run_state.best_key,
                             emit=ctx.emit, measure="validation loss")
    report = None
    if evo.gate:
        report = _gate(spec, ctx, model, valid, pairs, plan.batch_size, pad_id, eos_id, device)
    return run_state.finish(model, tokenizer, report, best_step)


def _train_step(engine, micro_batches, pad_id: int, should_stop, width: int | None = None) -> tuple[float, int, int] | None:
    """Forward and backward over this process's share of one optimizer step (``engine.shard``);
    returns (mean token loss, trained tokens, non-padding tokens) of the whole step, or None if
    asked to stop before it finished (all ranks agree on stopping before each pass)."""
    # Tokens that carry a loss after the causal shift (the first position of a row never does),
    # counted over the whole step on every rank: no communication needed.
    n_trained = sum(int((collate(m, pad_id)["labels"][:, 1:] != -100).sum()) for m in micro_batches)
    n_seen = sum(token_counts(m)[1] for m in micro_batches)
    passes = engine.shard(micro_batches)
    total = 0.0
    for i, (examples, weight) in enumerate(passes):
        if engine.agree(should_stop()):
            return None
        last = i == len(passes) - 1
        batch = {k: v.to(engine.device) for k, v in collate(examples, pad_id, width=width).items()}  # packed rows are recognised by collate
        # num_items_in_batch makes the model's loss sum(token losses) / n_trained over the whole
        # step, so passes of unequal token counts (on any rank) add up to the loss of one big batch.
        loss = engine.forward(batch, n_trained, last=last) * weight
        engine.backward(loss, last=last)
        total += loss.item()
    return engine.total(total), n_trained, n_seen






def _gate(spec: JobSpec, ctx: RunContext, model, valid: Dataset | None, pairs, batch_size: int, pad_id, eos_id, device):
    """The tuned model against its base on the validation set (adapter disabled; for full
    fine-tuning, the base weights loaded again)."""
    if valid is None:
        return not_evaluated(ctx.emit)
    kw = dict(batch_size=batch_size, pad_id=pad_id, eos_id=eos_id, device=device)
    tuned = ev.measure(model, valid.examples, pairs, **kw)
    if ms.is_peft(model):
        with model.disable_adapter():
            base = ev.measure(model, valid.examples, pairs, **kw)
    else:
        from gpu_worker.loading import load_model

        base_model = load_model(spec.base_model, data_dir=ctx.data_dir, device=str(device), dtype=spec.runtime.dtype)
        base = ev.measure(base_model, valid.examples, pairs, **kw)
        del base_model
    report = ev.gate_report(base, tuned, examples=len(valid.examples))
    ctx.emit(LogEvent(level="info" if report.passed else "warn", message=f"Eval gate: validation loss base {base.valid_loss:.4f} -> tuned {tuned.valid_loss:.4f}"
                      + (f", exact match {base.exact_match:.3f} -> {tuned.exact_match:.3f}" if tuned.exact_match is not None else "")))
    return report


_ANSWER_FORMATS = frozenset({"chat", "sharegpt", "alpaca", "completion"})


def _has_answers(spec: JobSpec, stats) -> bool:
    """Exact match needs validation examples that end in an answer to a prompt the model does not
    train on: chat-like or completion data, without ``train_on_inputs`` (raw text has no answer)."""
    files = (stats.validation,) if stats.validation is not None else stats.files
    return not spec.data.train_on_inputs and all(f.format in _ANSWER_FORMATS for f in files)
