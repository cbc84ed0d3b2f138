"""One rank of a multi-GPU job: the DeepSpeed engine the SFT loop runs on (``train_engine.make_engine``).

ZeRO-2 (adapters: frozen weights replicated, the adapter's gradients and AdamW states sharded) or
ZeRO-3 (full fine-tuning: weights sharded too), optionally with the optimizer in host memory, as
``spec.runtime.distributed`` says. The process group is already up (``gpu_worker.distributed``).

What stays exactly as on one GPU:
- the optimizer is AdamW with the same parameter groups (matrices decay, vectors do not): torch's
  own on the GPU, DeepSpeed's CPU AdamW when offloaded; the learning rate is set before each step
  from the same schedule; DeepSpeed clips at ``max_grad_norm`` with torch's formula;
- the loss: ``train_engine.split_step`` deals the step's examples out to the ranks, each pass's loss is
  its token losses over the *step's* trained tokens, times the world size because DeepSpeed averages
  gradients over ranks: the sum over ranks is the one-GPU step's gradient;
- the mixed precision: adapters train in float32 over the (bf16) frozen base, as on one GPU, so
  DeepSpeed runs in fp32 mode and casts nothing; full fine-tuning of a bf16 model uses DeepSpeed's
  bf16 mode (bf16 weights, fp32 master copies and moments in the sharded optimizer);
- checkpoints: gathered into the single-GPU layout (``gpu_worker.checkpoint``): the adapter or model
  folder, ``optimizer.safetensors`` with each parameter's full AdamW moments under its one-GPU
  parameter id, rank 0's RNG in ``rng.safetensors`` and the other ranks' in ``trainer_state.json``.
  Only rank 0 writes. A checkpoint therefore resumes on any GPU count and on the single-GPU worker,
  and the single-GPU worker's resume here. The price: rank 0 holds one full copy of the trainable
  weights and moments in host memory while saving (12 bytes a trainable parameter; nothing for
  adapters, ~100 GB for a full 8B model). Weights load into the model before ZeRO shards it, and the
  fp32 master copy is made from them: exact for adapters and fp32; a bf16 full fine-tune resumes
  from its bf16 weights (as the single-GPU worker, which keeps no fp32 copy at all).
"""

from __future__ import annotations

import base64
import math
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from gpu_worker import checkpoint as ckpt
from gpu_worker.contract import JobSpec
from gpu_worker.recipes import model_setup as ms
from gpu_worker.recipes.train_engine import split_step
from gpu_worker.recipes.schedule import lr_at

_MOMENTS = ("exp_avg", "exp_avg_sq")


def deepspeed_config(spec: JobSpec, *, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed configuration of ``spec``'s placement. Batch sizes are DeepSpeed's bookkeeping
    only (the loop marks each step's last pass itself): a full step's passes on each rank."""
    d, hp = spec.runtime.distributed, spec.hyperparameters
    micro = d.micro_batch_size or hp.batch_size
    passes = max(math.ceil(math.ceil(hp.batch_size * hp.gradient_accumulation_steps / world_size) / micro), 1)
    zero: dict = {"stage": d.zero_stage, "contiguous_gradients": True}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": passes,
        "train_batch_size": micro * passes * world_size,
        "gradient_clipping": hp.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the loop reports metrics itself
        "wall_clock_breakdown": False,
    }


class _Captured:
    """Stands in for an optimizer while a checkpoint is read: keeps the state it is given."""

    state_dict_value: dict | None = None

    def load_state_dict(self, sd: dict) -> None:
        self.state_dict_value = sd


class _Gathered:
    """Stands in for an optimizer while a checkpoint is written: returns the gathered state."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


def _ordered_trainable(model, weight_decay: float) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters in the order of ``ms.trainable_parameter_groups`` (decayed matrices,
    then vectors): the single-GPU optimizer's parameter ids."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = ms.trainable_parameter_groups(model, weight_decay)
    order = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
    return sorted(named, key=lambda np: order[id(np[1])])


def _rng_to_json(rng: dict) -> dict:
    b64 = lambda t: base64.b64encode(bytes(t.to(torch.uint8).tolist())).decode()  # noqa: E731
    return {"python": ckpt._python_rng_to_json(rng["python"]), "torch": b64(rng["torch"]), "cuda": [b64(s) for s in rng.get("cuda", [])]}


def _rng_from_json(data: dict) -> dict:
    tensor = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()  # noqa: E731
    rng = {"python": ckpt._python_rng_from_json(data["python"]), "torch": tensor(data["torch"])}
    if data.get("cuda"):
        rng["cuda"] = [tensor(s) for s in data["cuda"]]
    return rng


class DeepSpeedEngine:
    def __init__(self, model, spec: JobSpec, *, full: bool, store=None, data_dir=None):
        import deepspeed

        if not dist.is_initialized():
            raise RuntimeError("the DeepSpeed engine needs the process group (run under gpu_worker.distributed)")
        d, hp = spec.runtime.distributed, spec.hyperparameters
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.full, self.stage = full, d.zero_stage
        self._spec, self._data_dir = spec, data_dir
        self.micro = d.micro_batch_size or hp.batch_size
        self._order = _ordered_trainable(model, hp.weight_decay)  # before ZeRO-3 empties the tensors
        self._shapes = [p.shape for _, p in self._order]
        self._dtype = next(model.parameters()).dtype
        self._resumed: tuple[dict, dict, dict] | None = None
        if spec.resume_from_key:
            self._resumed = self._read_checkpoint(store, spec.resume_from_key, model)
        groups = ms.trainable_parameter_groups(model, hp.weight_decay)
        # The one-GPU optimizer's param_groups, for checkpoints the single-GPU worker can resume.
        self._group_meta = torch.optim.AdamW(groups, lr=hp.learning_rate).state_dict()["param_groups"]
        if d.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=hp.learning_rate, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate)
        bf16 = full and any(p.dtype == torch.bfloat16 for _, p in self._order)
        config = deepspeed_config(spec, world_size=self.world_size, bf16=bf16)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
        self.model = self.ds.module
        self.device = self.ds.device
        self._comm_device = torch.device(self.device) if torch.cuda.is_available() else torch.device("cpu")
        self._last = False

    # --- a step ---------------------------------------------------------------------------------
    def shard(self, micro_batches):
        return split_step(micro_batches, self.rank, self.world_size, self.micro)

    def forward(self, batch: dict, n_trained: int, *, last: bool = True):
        self.ds.set_gradient_accumulation_boundary(last)
        return self.ds(**batch, num_items_in_batch=n_trained).loss

    def backward(self, loss, *, last: bool) -> None:
        # DeepSpeed divides the summed gradients by the world size; the shares already add up.
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self, *, step: int, plan, hp) -> tuple[float, float]:
        lr = lr_at(step + 1, peak=hp.learning_rate, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps, kind=hp.lr_scheduler)
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return (float(norm) if norm is not None else float("nan")), lr

    def zero_grad(self) -> None:
        # A step abandoned on a stop request: the run checkpoints the last finished step and ends, so
        # the half-accumulated gradients in ZeRO's buffers are never used.
        pass

    # --- agreement between ranks ------------------------------------------------------------
    def agree(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def total(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item())

    def same(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0)  # between this job's own ranks only
        return box[0]

    # --- weights ------------------------------------------------------------------------------
    def _gathered(self):
        """A context in which every rank's module holds its full weights (ZeRO-3), else nothing."""
        import contextlib

        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def save_weights(self, folder: Path, *, base_model: str, tokenizer=None) -> list[str]:
        files = []
        with self._gathered():
            if self.is_main:
                files = ms.save_trained(self.model, folder, base_model=base_model, tokenizer=tokenizer)
        dist.barrier()
        return files

    def final_model(self):
        """Rank 0: a plain model with the trained weights, for the save phase (eval gate, artifact,
        exports), which it runs alone. Other ranks: None (they are done)."""
        if self.stage != 3:
            return self.model if self.is_main else None
        from gpu_worker.loading import load_model

        with tempfile.TemporaryDirectory(prefix="tuneforge-final-") as tmp:
            folder = Path(tmp) / "weights"
            self.save_weights(folder, base_model=self._spec.base_model)
            if not self.is_main:
                return None
            if self.full:
                return load_model(str(folder), data_dir=folder.parent, device=str(self.device), dtype=_dtype_name(self._dtype))
            # An adapter over sharded frozen weights: the base again, whole, with the trained adapter.
            model = ms.load_for_training(self._spec, data_dir=self._data_dir, device=str(self.device))
            ms.load_trained(model, folder)
            return model

    # --- checkpoints --------------------------------------------------------------------------
    def _gather_optimizer(self) -> dict:
        """The sharded AdamW state as the single-GPU ``optimizer.state_dict()`` (on rank 0)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        step = self._step_count()
        state = {}
        for pid, ((_, p), shape) in enumerate(zip(self._order, self._shapes)):
            moments = {k: safe_get_full_optimizer_state(p, k) for k in _MOMENTS}  # collective
            if self.is_main:
                state[pid] = {"step": torch.tensor(float(step)), **{k: v.detach().float().reshape(shape).cpu() for k, v in moments.items()}}
        groups, pid = [], 0
        for meta in self._group_meta:
            n = len(meta["params"])
            groups.append({**meta, "params": list(range(pid, pid + n))})
            pid += n
        return {"state": state, "param_groups": groups}

    def _base_optimizer(self):
        return self.ds.optimizer.optimizer  # the AdamW inside ZeRO's optimizer, over flat fp32 shards

    def _flat_shards(self) -> list:
        """This rank's flat fp32 shards, the tensors the base AdamW keys its state by (ZeRO-3 puts
        them in the AdamW's param_groups only while it steps)."""
        z = self.ds.optimizer
        shards = getattr(z, "fp32_partitioned_groups_flat", None) or getattr(z, "single_partition_of_fp32_groups", None)
        return list(shards) if shards else [p for g in self._base_optimizer().param_groups for p in g["params"]]

    def _step_count(self) -> int:
        for st in self._base_optimizer().state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def save_checkpoint(self, store, key: str, *, rng: dict, state: dict, base_model: str) -> None:
        rngs = [None] * self.world_size
        dist.all_gather_object(rngs, _rng_to_json(rng))
        optimizer = _Gathered(self._gather_optimizer())
        state = {**state, "world_size": self.world_size, "rank_rng": rngs[1:]}
        with self._gathered():
            if self.is_main:
                save = ms.save_full_checkpoint if self.full else ckpt.save_checkpoint
                save(store, key, model=self.model, optimizer=optimizer, rng=rng, state=state, base_model=base_model)
        dist.barrier()  # nobody goes on (or reports the checkpoint) before it is complete

    def _read_checkpoint(self, store, key: str, model) -> tuple[dict, dict, dict]:
        """Every rank reads the checkpoint and loads its weights into the still-unsharded model."""
        captured = _Captured()
        load = ms.load_full_checkpoint if self.full else ckpt.load_checkpoint
        state, rng = load(store, key, model=model, optimizer=captured)
        ranks = state.get("rank_rng") or []
        if self.rank > 0 and self.rank - 1 < len(ranks):
            rng = _rng_from_json(ranks[self.rank - 1])
        return state, rng, captured.state_dict_value

    def load_checkpoint(self, store, key: str) -> tuple[dict, dict]:
        """The weights went in before sharding (``__init__``); the AdamW moments go into ZeRO's
        shards now, through DeepSpeed's full-parameter accessors."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if self._resumed is None:
            raise ckpt.CheckpointError(f"checkpoint {key!r} was not read at setup (spec.resume_from_key unset)")
        state, rng, sd = self._resumed
        steps = [float(s["step"]) for s in sd["state"].values() if "step" in s]
        step = steps[0] if steps else 0.0
        base = self._base_optimizer()
        for flat in self._flat_shards():
            slot = base.state[flat]
            for k in _MOMENTS:
                slot.setdefault(k, torch.zeros_like(flat))
            slot["step"] = torch.tensor(step) if isinstance(base, torch.optim.AdamW) else int(step)  # DeepSpeedCPUAdam counts in an int
        if hasattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link their views lazily
            self.ds.optimizer._hp_optimizer_states_linked = False
            self.ds.optimizer._lazy_init_hp_params_optimizer_state()
        for pid, (_, p) in enumerate(self._order):
            slots = sd["state"].get(pid)
            if slots is None:
                raise ckpt.CheckpointError(f"checkpoint {key!r} has no optimizer state for parameter {pid}")
            for k in _MOMENTS:
                safe_set_full_optimizer_state(p, slots[k].to(self.device, torch.float32), k)
        self._resumed = None
        return state, rng

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _dtype_name(dtype) -> "str":
    from gpu_worker.contract import DType

    return {torch.bfloat16: DType.bfloat16, torch.float16: DType.float16, torch.float32: DType.float32}.get(dtype, DType.auto)

