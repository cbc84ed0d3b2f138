"""What every recipe's loop carries from step to step, and how it starts, checkpoints, stops and finishes.

The SFT recipe (``sft.py``) and the preference/RL loop (``preference_loop.py``) differ in their data and
their loss; their runs are alike in everything this module holds, so a job of either kind resumes,
stops and leaves its artifacts the same way:

- ``RunState.begin``: a fresh run (any ``best`` snapshot of an earlier attempt deleted), or a resumed one
  (step, trained tokens, data position, best-so-far and the random state of its checkpoint);
- ``next_micro_batches``: the step's micro-batches, from the epoch's seeded order (``epoch_batches``) at
  the data position, a new epoch's order when one ends;
- ``save`` (a checkpoint of the last finished step, with its state), ``stop`` (the last finished step
  checkpointed if it is not yet, the loggers closed, a StoppedEvent);
- ``finish``: the adapter (or, for full fine-tuning, the model) under ``{output_prefix}/adapter``
  (``/model``), with the serving check's reference log-probs for an adapter (for QLoRA, computed on the
  unquantized base the engines serve: ``adapter_reference``), the exports the job asked
  for, the loggers' files, and the CompletedEvent; a gate regression with ``fail_on_regression`` raises
  ``EvalRegression`` after saving;
- ``not_evaluated``: the gate's report when there was no validation example to compare on.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from gpu_worker import checkpoint as ckpt
from gpu_worker import evaluation as ev
from gpu_worker.contract import (AdapterManifest, Artifact, CheckpointEvent, CompletedEvent, DType, EvalReport, JobSpec, LogEvent,
                                 Quantization, StoppedEvent)
from gpu_worker.data import DataPosition, epoch_batches
from gpu_worker.engine.compat import write_reference
from gpu_worker.integrations import Loggers
from gpu_worker.recipes import RunContext
from gpu_worker.recipes import model_setup as ms
from gpu_worker.recipes.schedule import RunPlan, check_resumable
from gpu_worker.recipes.train_engine import open_loggers, placement
from gpu_worker.storage import delete_prefix, put_dir

# What the engines load a base in, and the merged export writes (export.py): the QLoRA reference's base.
SERVING_DTYPE = DType.bfloat16


@dataclasses.dataclass
class RunState:
    spec: JobSpec
    ctx: RunContext
    engine: Any  # train_engine.TorchEngine or deepspeed_engine.DeepSpeedEngine
    plan: RunPlan
    tracker: ev.BestTracker
    loggers: Loggers
    workdir: Path  # the loggers' files and the exports' scratch space, removed at the end
    step: int = 0  # optimizer steps finished
    tokens: int = 0  # trained tokens so far
    position: DataPosition = dataclasses.field(default_factory=DataPosition)
    last_checkpoint: str | None = None
    _order: tuple[int, list] | None = None  # (epoch, its batches of example indices)

    @property
    def best_key(self) -> str:
        return f"{self.spec.output_prefix.rstrip('/')}/best"

    @classmethod
    def begin(cls, spec: JobSpec, ctx: RunContext, engine, plan: RunPlan, describe: Callable[[str], str]) -> RunState:
        """The run at its first step, or at its checkpoint's (``spec.resume_from_key``; its random state
        restored). ``describe(where)`` is the setup's "Training ..." line, ``where`` the device or ranks."""
        patience = spec.evaluation.early_stopping_patience
        step, tokens, position, tracker, last = 0, 0, DataPosition(), ev.BestTracker(patience), None
        if spec.resume_from_key:
            state, rng = engine.load_checkpoint(ctx.store, spec.resume_from_key)
            check_resumable(spec, state, plan)
            step, tokens = state["step"], state["trained_tokens"]
            position = DataPosition.from_dict(state["data_position"])
            tracker = ev.BestTracker.from_dict(state.get("best"), patience)
            last = spec.resume_from_key.rstrip("/")
            ckpt.restore_rng(rng)
            ctx.emit(LogEvent(message=f"Resumed from checkpoint at step {step} of {plan.total_steps}"))
        elif engine.is_main:
            delete_prefix(ctx.store, f"{spec.output_prefix.rstrip('/')}/best")  # a snapshot from an unrelated earlier attempt
        ctx.emit(LogEvent(message=describe(placement(engine, spec))))
        workdir = Path(tempfile.mkdtemp(prefix="tuneforge-job-"))
        loggers = open_loggers(spec, engine, ctx.emit, workdir)
        return cls(spec, ctx, engine, plan, tracker, loggers, workdir, step, tokens, position, last)

    @property
    def running(self) -> bool:
        return self.step < self.plan.total_steps

    def next_micro_batches(self, examples) -> list[list]:
        """The next step's micro-batches of ``examples`` (a new epoch when the data position is at the end
        of one)."""
        plan, spec = self.plan, self.spec
        if self.position.batch_index >= plan.batches_per_epoch:
            self.position = DataPosition(self.position.epoch + 1, 0)
        if self._order is None or self._order[0] != self.position.epoch:
            self._order = (self.position.epoch, epoch_batches(len(examples), plan.batch_size, spec.seed, self.position.epoch))
        at = self.position.batch_index
        return [[examples[i] for i in b] for b in self._order[1][at : at + plan.accumulation]]

    def advance(self, micro_batches: int, trained_tokens: int) -> None:
        """One optimizer step done over ``micro_batches`` of the epoch's batches."""
        self.step += 1
        self.tokens += trained_tokens
        self.position = DataPosition(self.position.epoch, self.position.batch_index + micro_batches)

    def checkpoint_due(self, early_stop: bool) -> bool:
        return self.step % self.spec.runtime.checkpoint_every_steps == 0 or self.step == self.plan.total_steps or early_stop

    def save(self, rng: dict[str, Any], train_loss: float | None, valid_loss: float | None) -> None:
        """A checkpoint of the step just finished (``rng``: the random state at its boundary)."""
        spec, plan, hp = self.spec, self.plan, self.spec.hyperparameters
        key = ckpt.checkpoint_key(spec.output_prefix, self.step)
        state = {
            "step": self.step,
            "trained_tokens": self.tokens,
            "data_position": self.position.to_dict(),
            "lr_schedule": {"kind": hp.lr_scheduler.value, "peak": hp.learning_rate, "warmup_steps": plan.warmup_steps, "total_steps": plan.total_steps},
            "plan": dataclasses.asdict(plan),
            "best": self.tracker.to_dict(),
            "method": spec.method.value,
            "base_model": spec.base_model,
            "adapter": spec.adapter.model_dump(mode="json"),
            "job_id": spec.job_id,
        }
        self.engine.save_checkpoint(self.ctx.store, key, rng=rng, state=state, base_model=spec.base_model)
        self.ctx.emit(CheckpointEvent(step=self.step, key=key, train_loss=train_loss, valid_loss=valid_loss))
        self.last_checkpoint = key

    def stop(self, rng: dict[str, Any], train_loss: float | None, valid_loss: float | None) -> StoppedEvent:
        """Asked to stop: the last finished step checkpointed (``rng`` at its boundary) unless it is already,
        what was logged so far uploaded (the resumed run logs on), and the StoppedEvent."""
        if self.step and self.last_checkpoint != ckpt.checkpoint_key(self.spec.output_prefix, self.step):
            self.save(rng, train_loss, valid_loss)
        self.loggers.close(self.ctx.store, self.spec.output_prefix)
        self.release()
        event = StoppedEvent(step=self.step, checkpoint_key=self.last_checkpoint)
        self.ctx.emit(event)
        return event

    def release(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def finish(self, model, tokenizer, report, best_step: int | None) -> CompletedEvent:
        """The trained adapter or model, the exports, the loggers' files and the CompletedEvent (module
        docstring)."""
        spec, store = self.spec, self.ctx.store
        full = not ms.is_peft(model)
        prefix = f"{spec.output_prefix.rstrip('/')}/{'model' if full else 'adapter'}"
        delete_prefix(store, prefix)
        with tempfile.TemporaryDirectory(prefix="tuneforge-adapter-") as tmp:
            files = ms.save_trained(model, Path(tmp), base_model=spec.base_model, tokenizer=tokenizer)
            if not full:  # what the serving registry's compatibility check compares the engine with
                files = [*files, adapter_reference(spec, self.ctx.data_dir, model, tokenizer, tmp).name]
            put_dir(store, tmp, prefix)
            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        artifacts = [Artifact(kind="merged" if full else "adapter", key=prefix, filename=prefix.rsplit("/", 1)[-1], bytes=size,
                              detail={"adapter": spec.adapter.type.value, "format": "safetensors"})]
        if spec.export.merged or spec.export.gguf:
            from gpu_worker.export import export_model  # gguf and llama.cpp only when asked

            artifacts += export_model(spec, self.ctx, model, tokenizer, self.workdir)
        artifacts += self.loggers.close(store, spec.output_prefix)
        self.release()
        if report is not None and report.passed is False and spec.evaluation.fail_on_regression:
            raise ev.EvalRegression(report, prefix)
        manifest = AdapterManifest(job_id=spec.job_id, base_model=spec.base_model, adapter=spec.adapter, key=prefix,
                                   files=tuple(files), trained_tokens=self.tokens)
        event = CompletedEvent(manifest=manifest, trained_tokens=self.tokens, steps=self.step, artifacts=tuple(artifacts),
                               eval_report=report, best_step=best_step)
        self.ctx.emit(event)
        return event


def adapter_reference(spec: JobSpec, data_dir, model, tokenizer, adapter_dir) -> Path:
    """The serving check's reference next to the adapter saved in ``adapter_dir``, from the model the
    engines will serve. A 16-bit job's trained ``model`` is that model. A QLoRA job's is not: engines
    serve the unquantized base at ``SERVING_DTYPE`` with the adapter, whose logits differ from the NF4
    model's by the quantization error (more than the check's tolerance on real models), so its
    reference comes from that base, loaded as the merged export loads it, with the saved adapter."""
    if spec.quantization != Quantization.nf4:
        return write_reference(model, tokenizer, adapter_dir)
    from gpu_worker.loading import load_model

    device = str(next(model.parameters()).device)
    return served_reference(lambda: load_model(spec.base_model, data_dir=data_dir, device=device, dtype=SERVING_DTYPE),
                            adapter_dir, tokenizer, dtype=SERVING_DTYPE, trained_as=spec.quantization.value)


def served_reference(load_base: Callable[[], Any], adapter_dir, tokenizer, *, dtype: DType, trained_as: str) -> Path:
    """``write_reference`` from ``load_base()`` (an unquantized base) with the PEFT adapter saved in
    ``adapter_dir`` attached; the file's metadata records ``dtype``, that the base was unquantized and
    how training quantized it (``trained_as``). The base is freed before returning (it sits beside
    the training model on the GPU, as the merged export's copy does)."""
    import gc

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    served = PeftModel.from_pretrained(load_base(), str(adapter_dir), is_trainable=False)
    try:
        path = write_reference(served, tokenizer, adapter_dir)
    finally:
        del served
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    metadata = {"base": "unquantized", "dtype": dtype.value, "training_quantization": trained_as}
    save_file(load_file(str(path)), str(path), metadata=metadata)
    return path


def not_evaluated(emit: Callable) -> EvalReport:
    """The gate's report without validation examples: "not evaluated" (``passed`` None), never "passed".
    (A job that asked to fail on a regression was refused before training: ``spec_rules``.)"""
    reason = "not evaluated: no validation examples, so the tuned model was not compared with its base"
    emit(LogEvent(level="warn", message=f"Eval gate {reason} (give a validation_file or a data.validation_split)"))
    return EvalReport(examples=0, passed=None, reason=reason)
