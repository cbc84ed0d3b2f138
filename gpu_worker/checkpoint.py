"""Training checkpoints in the object store: everything needed to continue a run exactly.

A checkpoint lives under ``{output_prefix}/checkpoints/step-{N:06d}/``:

    adapter_config.json, adapter_model.safetensors   the adapter, a standard PEFT folder
    optimizer.safetensors                            optimizer tensors (AdamW moments and step counts)
    rng.safetensors                                  torch CPU (and CUDA) generator states
    trainer_state.json                               step, data position, tokens, LR schedule state,
                                                     optimizer hyperparameters, Python RNG state
    COMPLETE                                         written last: a checkpoint without it is ignored

Nothing is pickled: tensors go through safetensors and the rest through JSON, so loading a checkpoint
someone tampered with can at worst fail, never run code. Because COMPLETE is written after every
other file, a worker killed mid-write leaves a folder that ``latest_checkpoint`` skips and
``load_checkpoint`` refuses; the CheckpointEvent is emitted only once ``save_checkpoint`` returned.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path
from typing import Any

from gpu_worker.storage import ObjectStore, delete_prefix, get_dir, put_dir

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_STEP_DIR = re.compile(r"step-(\d{6,})$")


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or does not belong to this job's model and adapter."""


def checkpoint_key(output_prefix: str, step: int) -> str:
    return f"{output_prefix.rstrip('/')}/checkpoints/step-{step:06d}"


def is_complete(store: ObjectStore, key: str) -> bool:
    return store.exists(f"{key.rstrip('/')}/{MARKER}")


def latest_checkpoint(store: ObjectStore, output_prefix: str) -> str | None:
    """The complete checkpoint with the highest step under ``output_prefix``, or None."""
    base = f"{output_prefix.rstrip('/')}/checkpoints/"
    steps = set()
    for key in store.list(base):
        folder, _, name = key[len(base) :].partition("/")
        if name == MARKER and (m := _STEP_DIR.match(folder)):
            steps.add(int(m.group(1)))
    return checkpoint_key(output_prefix, max(steps)) if steps else None


# --- RNG ---------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """A snapshot of every random generator the training loop draws from."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


# --- optimizer ---------------------------------------------------------------------------------------


def _optimizer_split(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-able tensors and JSON-able rest."""
    import torch

    tensors, scalars = {}, {}
    for pid, slots in state_dict["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = flat.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    state = dict(sorted(state.items()))  # safetensors returns keys sorted as strings ("10" < "2")
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- save / load -------------------------------------------------------------------------------------


def save_checkpoint(
    store: ObjectStore,
    key: str,
    *,
    model,
    optimizer,
    rng: dict[str, Any],
    state: dict[str, Any],
    base_model: str,
) -> list[str]:
    """Write a complete checkpoint to ``key`` (replacing anything there); returns the keys written.
    ``rng`` is a ``capture_rng()`` snapshot taken at the step boundary the checkpoint describes;
    ``state`` is JSON-able trainer state (step, data position, tokens, schedule...)."""
    import torch
    from safetensors.torch import save_file

    # A leftover from an attempt that died mid-write must not mix with this one; the marker goes first
    # so the folder is never complete-looking while mixed.
    if store.exists(f"{key}/{MARKER}"):
        store.delete(f"{key}/{MARKER}")
    delete_prefix(store, key)
    with tempfile.TemporaryDirectory(prefix="tuneforge-ckpt-") as tmp:
        out = Path(tmp)
        save_adapter(model, out, base_model=base_model)
        opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
        save_file(opt_tensors, out / "optimizer.safetensors")
        rng_tensors = {"torch": rng["torch"]}
        rng_tensors.update({f"cuda.{i}": s for i, s in enumerate(rng.get("cuda", []))})
        save_file({k: torch.as_tensor(v).contiguous() for k, v in rng_tensors.items()}, out / "rng.safetensors")
        full_state = {**state, "optimizer": opt_meta, "python_rng": _python_rng_to_json(rng["python"])}
        (out / STATE_FILE).write_text(json.dumps(full_state, indent=1, sort_keys=True))
        keys = put_dir(store, out, key)
    store.put_bytes(f"{key}/{MARKER}", b"ok\n")
    return keys + [f"{key}/{MARKER}"]


def save_adapter(model, folder: Path, *, base_model: str) -> list[str]:
    """Save a PEFT model's adapter to ``folder`` as exactly the standard PEFT pair (safetensors);
    the config names the platform's base model, not the worker's local path to it."""
    model.save_pretrained(folder, safe_serialization=True)
    for extra in Path(folder).iterdir():
        if extra.name not in ADAPTER_FILES:
            extra.unlink()  # peft's README.md model card: not part of the artifact
    config_path = Path(folder) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return sorted(ADAPTER_FILES)


def load_checkpoint(store: ObjectStore, key: str, *, model, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load adapter weights into ``model`` and state into ``optimizer``; returns ``(state, rng)``
    for the caller to restore once its setup is done (setup itself may draw random numbers)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    key = key.rstrip("/")
    if not is_complete(store, key):
        raise CheckpointError(f"checkpoint {key!r} is missing or incomplete (no {MARKER} marker)")
    with tempfile.TemporaryDirectory(prefix="tuneforge-ckpt-") as tmp:
        get_dir(store, key, tmp)
        out = Path(tmp)
        try:
            state = json.loads((out / STATE_FILE).read_text())
            adapter = load_file(out / "adapter_model.safetensors")
            opt_tensors = load_file(out / "optimizer.safetensors")
            rng_tensors = load_file(out / "rng.safetensors")
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {key!r} is unreadable: {err}") from err
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"checkpoint {key!r} does not fit this adapter: unexpected {result.unexpected_keys[:3]}")
    # Optimizer.load_state_dict moves each slot to its parameter's device and dtype itself.
    optimizer.load_state_dict(_optimizer_join(opt_tensors, state.pop("optimizer")))
    cuda = [rng_tensors[k] for k in sorted((k for k in rng_tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    rng = {"python": _python_rng_from_json(state.pop("python_rng")), "torch": rng_tensors["torch"].to(torch.uint8)}
    if cuda:
        rng["cuda"] = cuda
    return state, rng
