"""LoRA adapter folders: fetching them, deciding whether they may be served, attaching them to a model.

An adapter is a PEFT folder: ``adapter_config.json`` and ``adapter_model.safetensors``. ``lora_path`` is a
local folder or ``store:<key prefix>`` in the platform's object store, downloaded into
``<data_dir>/adapter-cache/`` first. The engine reads a downloaded folder only while loading or checking
it (the weights are then in memory, and every load downloads afresh), so the cache is bounded by total
bytes, least recently used first (``gpu_worker.folder_cache``), and an unloaded adapter's folder is
deleted (``discard``). Before anything touches the model the folder is checked: no pickle
weights anywhere (loading one can run code), a LoRA config naming a base model this engine serves, a rank
within the configured maximum, and weights that fit the base model's layers exactly. Only then are the
weights, read from safetensors by this module (PEFT's loader would fall back to pickle files), attached
to the model's adapter bank (``gpu_worker.engine.lora``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpu_worker import folder_cache
from gpu_worker.builtin import is_builtin
from gpu_worker.engine.errors import InvalidRequest
from gpu_worker.storage import ObjectNotFound, get_dir, open_store

STORE_SCHEME = "store:"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# "base_model.model.<module path>.lora_A.weight": the key PEFT's save_pretrained writes for a Linear layer.
WEIGHT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    """A checked adapter folder, its weights read into memory (CPU)."""

    path: Path
    config: dict
    base_model: str  # as the adapter names it: base_model_name_or_path
    rank: int  # the largest rank of any of its layers
    weights: dict[str, torch.Tensor]


def _cache_folder(lora_path: str, cache_dir: Path) -> Path:
    """Where a ``store:`` lora_path is downloaded (400 for a prefix that could leave ``cache_dir``)."""
    prefix = lora_path[len(STORE_SCHEME) :].strip("/")
    parts = PurePosixPath(prefix).parts
    if not prefix or ".." in parts or prefix.startswith("/"):
        raise InvalidRequest(f"invalid store prefix in lora_path {lora_path!r}", param="lora_path")
    # Named by a hash of the prefix (readable tail kept) so distinct prefixes never share a folder.
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:16]
    return cache_dir / f"{parts[-1]}-{digest}"


def materialise(lora_path: str, *, storage_url: str, cache_dir: Path, max_bytes: int) -> Path:
    """The local folder ``lora_path`` names, downloading ``store:`` prefixes into ``cache_dir``, whose
    least recently used folders are then deleted until it holds at most ``max_bytes`` (never this one,
    nor one another load or check placed within ``folder_cache.GRACE_S``)."""
    if not lora_path or not lora_path.strip():
        raise InvalidRequest("lora_path must not be empty", param="lora_path")
    if not lora_path.startswith(STORE_SCHEME):
        path = Path(lora_path).expanduser()
        if not path.is_dir():
            raise InvalidRequest(f"lora_path {lora_path!r} is not a folder on the engine's host", param="lora_path")
        return path.resolve()
    dest = _cache_folder(lora_path, cache_dir)
    prefix = lora_path[len(STORE_SCHEME) :].strip("/")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Downloaded afresh each load into a temporary folder, then renamed into place: a reader never
    # sees half an adapter, and a prefix rewritten in the store is never served stale.
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        try:
            get_dir(open_store(storage_url), prefix, tmp)
        except ObjectNotFound:
            raise InvalidRequest(f"no adapter files under store prefix {prefix!r}", param="lora_path") from None
        folder_cache.remove(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    folder_cache.touch(dest)
    folder_cache.evict(cache_dir, max_bytes, keep={dest.name})
    return dest


def discard(lora_path: str, cache_dir: Path, *, grace_s: float = folder_cache.GRACE_S) -> bool:
    """Delete the downloaded folder of a ``store:`` lora_path (its adapter was unloaded), unless a load or
    check placed it within ``grace_s`` (it may be reading it: the bound evicts it later). A local folder
    is the operator's and is left alone. True if a folder was deleted."""
    if not lora_path.startswith(STORE_SCHEME):
        return False
    try:
        folder = _cache_folder(lora_path, cache_dir)
    except InvalidRequest:
        return False  # never downloaded: nothing to delete
    return not folder_cache.recently_used(folder, grace_s) and folder_cache.remove(folder)


def read_adapter(path: Path, *, max_rank: int) -> AdapterFiles:
    """Check the folder on its own (format, safety, rank) and read its weights. 400 on any problem."""
    pickles = sorted(p.name for p in path.rglob("*") if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise InvalidRequest(
            f"adapter folder contains pickle files ({', '.join(pickles)}): only safetensors adapters are accepted",
            param="lora_path",
            code="unsafe_adapter_format",
        )
    config = read_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise InvalidRequest(f"adapter folder has no {WEIGHTS_FILE}", param="lora_path")
    try:
        weights = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise InvalidRequest(f"{WEIGHTS_FILE} is not a valid safetensors file: {err}", param="lora_path") from None
    if not weights:
        raise InvalidRequest(f"{WEIGHTS_FILE} holds no tensors", param="lora_path")
    rank = 0
    for key, tensor in weights.items():
        match = WEIGHT_KEY.match(key)
        if match is None or tensor.dim() != 2:
            raise InvalidRequest(f"unsupported adapter weight {key!r}: only LoRA on linear layers is served", param="lora_path")
        rank = max(rank, tensor.shape[0] if match["ab"] == "A" else tensor.shape[1])
    if rank > max_rank:
        raise InvalidRequest(f"adapter rank {rank} exceeds this engine's maximum LoRA rank {max_rank}", param="lora_path")
    return AdapterFiles(path=path, config=config, base_model=config["base_model_name_or_path"], rank=rank, weights=weights)


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise InvalidRequest(f"adapter folder has no {CONFIG_FILE}", param="lora_path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"{CONFIG_FILE} is not valid JSON: {err}", param="lora_path") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidRequest(f"{CONFIG_FILE} does not describe a LoRA adapter (peft_type must be LORA)", param="lora_path")
    if config.get("use_dora"):
        raise InvalidRequest("DoRA adapters are not supported", param="lora_path")
    if config.get("modules_to_save"):
        raise InvalidRequest("adapters with modules_to_save (full trained layers) are not supported", param="lora_path")
    if not isinstance(config.get("base_model_name_or_path"), str) or not config["base_model_name_or_path"]:
        raise InvalidRequest(f"{CONFIG_FILE} does not name its base model (base_model_name_or_path)", param="lora_path")
    return config


def weight_module(key: str) -> str:
    """The module path a checked weight key targets ("model.layers.0.self_attn.q_proj")."""
    return WEIGHT_KEY.match(key)["module"]


def names_base(declared: str, served_name: str, served_path: str | None) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names this served base model: the same name, the
    same local folder, or a built-in model's folder under another data dir (trainers record the path)."""
    if declared == served_name:
        return True
    if served_path and Path(declared).expanduser().resolve() == Path(served_path).resolve():
        return True
    return is_builtin(served_name) and PurePosixPath(declared).name == served_name


def check_fits(adapter: AdapterFiles, model: torch.nn.Module) -> None:
    """Every weight targets an existing linear layer of ``model`` with matching shapes (400 otherwise)."""
    modules = dict(model.named_modules())
    for key, tensor in adapter.weights.items():
        match = WEIGHT_KEY.match(key)
        module = modules.get(match["module"])
        layer = getattr(module, "base_layer", module)  # already wrapped by another adapter
        if not isinstance(layer, torch.nn.Linear):
            raise InvalidRequest(f"adapter weight {key!r} targets no linear layer of the base model", param="lora_path")
        want = (tensor.shape[0], layer.in_features) if match["ab"] == "A" else (layer.out_features, tensor.shape[1])
        if tuple(tensor.shape) != want:
            raise InvalidRequest(
                f"adapter weight {key!r} has shape {tuple(tensor.shape)}, the base model needs {want}", param="lora_path"
            )
