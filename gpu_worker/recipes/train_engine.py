"""How a recipe's loop runs its steps on the hardware: one process on one device (``TorchEngine``),
or one rank of a DeepSpeed job (``gpu_worker.recipes.deepspeed_engine.DeepSpeedEngine``).

The loop (``sft.py``) decides *what* a step trains on, in which order, when to evaluate and when to
checkpoint; the engine decides *where*: which of the step's examples this process runs
(``shard``), how a loss becomes gradients (``backward``), the optimizer step, how ranks agree
(``agree``, ``total``, ``same``), and how trained weights and checkpoints are written and read
back. Both engines write the same checkpoint layout (``gpu_worker.checkpoint``), so a job can resume
on another GPU count, or on the other worker kind.

A step's loss is normalised by the trained tokens of the *whole* step, on every rank: each rank's
share is ``sum(its token losses) / n_trained_of_the_step``, and the ranks' shares add up to the
one-process loss exactly, whatever the split (``shard``).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from gpu_worker import checkpoint as ckpt
from gpu_worker.recipes import model_setup as ms
from gpu_worker.recipes.schedule import optimizer_step
from gpu_worker.storage import delete_prefix, get_dir, put_dir


def split_step(micro_batches: Sequence[Sequence[Any]], rank: int, world_size: int, micro_batch_size: int | None) -> list[tuple[list[Any], float]]:
    """This rank's forward passes for one optimizer step: ``(examples, weight)`` pairs.

    The step's examples (the micro-batches in order, flattened) are dealt out round-robin, so the
    ranks' shares differ by at most one example; each share is cut into passes of at most
    ``micro_batch_size`` (None: one pass per rank). Every rank runs the same number of passes,
    because ZeRO's collectives need all ranks in every forward and backward: a rank short of
    examples repeats one with weight 0 (its loss counts nothing, its pass keeps the others company).
    """
    examples = [e for m in micro_batches for e in m]
    mine = examples[rank::world_size]
    per_rank = math.ceil(len(examples) / world_size)
    size = micro_batch_size or max(per_rank, 1)
    chunks = [mine[i * size : (i + 1) * size] for i in range(max(math.ceil(per_rank / size), 1))]
    return [(chunk, 1.0) if chunk else ([examples[0]], 0.0) for chunk in chunks]


def make_engine(model, spec, *, full: bool, store=None, data_dir=None):
    """The engine ``spec`` runs on: DeepSpeed when the scheduler planned it across GPUs
    (``spec.runtime.distributed``), plain PyTorch otherwise. ``store`` lets a DeepSpeed engine read
    the checkpoint it resumes from before it shards the model; ``data_dir`` lets it load the base
    model again, whole, for the save phase after ZeRO-3 sharded it."""
    if spec.runtime.distributed is None:
        return TorchEngine(model, spec.hyperparameters, full=full)
    from gpu_worker.recipes.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, spec, full=full, store=store, data_dir=data_dir)


class TorchEngine:
    """One process on one device: plain PyTorch AdamW, the single-GPU worker's engine."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, model, hp, *, full: bool):
        self.model = model
        self.full = full
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(ms.trainable_parameter_groups(model, hp.weight_decay), lr=hp.learning_rate)

    # --- a step ---------------------------------------------------------------------------------
    def shard(self, micro_batches):
        return [(list(m), 1.0) for m in micro_batches]

    def forward(self, batch: dict, n_trained: int, *, last: bool = True):
        return self.model(**batch, num_items_in_batch=n_trained).loss

    def backward(self, loss, *, last: bool) -> None:
        loss.backward()

    def step(self, *, step: int, plan, hp) -> tuple[float, float]:
        return optimizer_step(self.optimizer, self.params, step=step, plan=plan, hp=hp)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- agreement between ranks (one rank: nothing to agree on) ------------------------------
    def agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any (a stop request seen by one rank stops all)."""
        return flag

    def total(self, value: float) -> float:
        return value

    def same(self, value):
        """Rank 0's value on every rank (evaluation results decide early stopping everywhere)."""
        return value

    # --- weights and checkpoints ----------------------------------------------------------------
    def save_weights(self, folder: Path, *, base_model: str, tokenizer=None) -> list[str]:
        return ms.save_trained(self.model, folder, base_model=base_model, tokenizer=tokenizer)

    def load_weights(self, folder: Path) -> None:
        ms.load_trained(self.model, folder)

    def save_checkpoint(self, store, key: str, *, rng: dict, state: dict, base_model: str) -> None:
        save = ms.save_full_checkpoint if self.full else ckpt.save_checkpoint
        save(store, key, model=self.model, optimizer=self.optimizer, rng=rng, state=state, base_model=base_model)

    def load_checkpoint(self, store, key: str) -> tuple[dict, dict]:
        load = ms.load_full_checkpoint if self.full else ckpt.load_checkpoint
        return load(store, key, model=self.model, optimizer=self.optimizer)

    def final_model(self):
        """The trained model for the save phase (gate, artifact, exports); None on ranks that take
        no part in it."""
        return self.model

    def close(self) -> None:
        pass


# --- the best step's weights (keep_best), shared by every recipe ---------------------------------------


def save_best(store, engine, key: str, *, base_model: str) -> None:
    """Snapshot the trained weights under ``key`` (every rank takes part; rank 0 writes)."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-best-") as tmp:
        engine.save_weights(Path(tmp), base_model=base_model)
        if engine.is_main:
            delete_prefix(store, key)
            put_dir(store, tmp, key)


def load_best(store, model, key: str) -> None:
    """Put the snapshot under ``key`` back into ``model`` (the save phase: rank 0's plain model)."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-best-") as tmp:
        get_dir(store, key, tmp)
        ms.load_trained(model, Path(tmp))


def restore_best(store, model, tracker, *, step: int, keep_best: bool, key: str, emit, measure: str) -> int | None:
    """The save phase: with ``keep_best``, the best evaluated step (its snapshot under ``key`` put back
    into ``model`` when it is not the last step, and said in a log line); None when nothing was kept."""
    from gpu_worker.contract import LogEvent

    if not keep_best or tracker.best_step is None:
        return None
    if tracker.best_step != step:
        load_best(store, model, key)
        emit(LogEvent(message=f"Keeping the best checkpoint: step {tracker.best_step} ({measure} {tracker.best_loss:.4f})"))
    return tracker.best_step


def placement(engine, spec) -> str:
    """Where the run trains, for the setup log line: the device, or the DeepSpeed ranks."""
    d = spec.runtime.distributed
    return f"{engine.device}" if d is None else f"{engine.world_size} rank(s), DeepSpeed ZeRO-{d.zero_stage}"


def open_loggers(spec, engine, emit, workdir: Path):
    """TensorBoard/MLflow/W&B as the job asks, on rank 0 only (the other ranks log nothing)."""
    from gpu_worker.integrations import Loggers

    return Loggers.open(spec if engine.is_main else spec.model_copy(update={"integrations": type(spec.integrations)()}), emit, workdir)
