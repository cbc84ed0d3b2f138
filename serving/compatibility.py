"""The gateway's half of an adapter's compatibility check: what can be decided from the files in object
storage without torch (any engine kind), before an engine is asked to load it and reproduce the
training side's log-probabilities (``gpu_worker.engine.compat``, ``POST /v1/tuneforge/check_adapter``).

Checked here: safetensors only (no pickle file anywhere under the prefix), a LoRA config, a rank within
the serving limit (vLLM's ``--max-lora-rank``: larger adapters would be refused by every replica),
target modules the engines support, and no vocabulary change (no embeddings or output head).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from gpu_worker.storage import ObjectNotFound, ObjectStore

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VOCABULARY_LAYERS = ("lm_head", "embed_tokens", "wte", "embed_out", "word_embeddings")
# A safetensors header is JSON of a few KB per hundred tensors; 100 MB means a corrupt length field.
_MAX_HEADER = 100 * 2**20


class Incompatible(Exception):
    def __init__(self, reason: str, code: str = "adapter_incompatible"):
        super().__init__(reason)
        self.reason = reason
        self.code = code


def check_files(store: ObjectStore, prefix: str, *, max_rank: int, supported_modules: list[str]) -> dict[str, Any]:
    """The static facts of the adapter under ``prefix`` ({"rank", "target_modules", "tensors"}), or
    ``Incompatible`` naming the first rule it breaks."""
    prefix = prefix.rstrip("/")
    keys = store.list(prefix + "/")
    if not keys:
        raise Incompatible(f"no adapter files under {prefix!r}", "adapter_missing")
    pickles = sorted(k.rsplit("/", 1)[-1] for k in keys if k.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise Incompatible(f"pickle files are not accepted, only safetensors: {', '.join(pickles)}", "unsafe_adapter_format")
    config = _config(store, f"{prefix}/{CONFIG_FILE}")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    for name in [*targets, *(config.get("modules_to_save") or [])]:
        if any(layer in str(name).split(".") for layer in VOCABULARY_LAYERS):
            raise Incompatible(f"the adapter trains {name!r}, a vocabulary layer: it cannot share a served base", "vocabulary_change")
    if config.get("modules_to_save"):
        raise Incompatible("adapters with modules_to_save (fully trained layers) cannot be served", "unsupported_modules")
    unsupported = sorted({t.rsplit(".", 1)[-1] for t in targets} - set(supported_modules))
    if unsupported:
        raise Incompatible(f"target modules {unsupported} are not served; supported: {sorted(supported_modules)}", "unsupported_modules")
    tensors = _header(store, f"{prefix}/{WEIGHTS_FILE}")
    rank = 0
    for name, info in tensors.items():
        parts = name.split(".")
        if any(layer in parts for layer in VOCABULARY_LAYERS):
            raise Incompatible(f"weight {name!r} changes a vocabulary layer", "vocabulary_change")
        shape = info.get("shape") if isinstance(info, dict) else None
        if "lora_A" in parts and shape and len(shape) == 2:
            rank = max(rank, shape[0])
        elif "lora_B" in parts and shape and len(shape) == 2:
            rank = max(rank, shape[1])
        else:
            raise Incompatible(f"weight {name!r} is not a LoRA matrix of a linear layer", "unsupported_modules")
    declared = max([int(config.get("r") or 0), *[int(v) for v in (config.get("rank_pattern") or {}).values()]])
    rank = max(rank, declared)
    if rank > max_rank:
        raise Incompatible(f"rank {rank} exceeds the serving limit of {max_rank}", "rank_too_large")
    return {"rank": rank, "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}), "tensors": len(tensors)}


def _config(store: ObjectStore, key: str) -> dict[str, Any]:
    try:
        config = json.loads(store.get_bytes(key))
    except ObjectNotFound:
        raise Incompatible(f"{CONFIG_FILE} is missing", "adapter_missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise Incompatible(f"{CONFIG_FILE} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise Incompatible(f"{CONFIG_FILE} does not describe a LoRA adapter (peft_type must be LORA)")
    if config.get("use_dora"):
        raise Incompatible("DoRA adapters cannot be served by the multi-LoRA engines", "unsupported_modules")
    return config


def _header(store: ObjectStore, key: str) -> dict[str, Any]:
    """The tensor table of a safetensors file, read from its header only."""
    try:
        with store.open(key) as f:
            head = f.read(8)
            if len(head) != 8:
                raise Incompatible(f"{WEIGHTS_FILE} is too short to be safetensors")
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                raise Incompatible(f"{WEIGHTS_FILE} is not a valid safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
    except ObjectNotFound:
        raise Incompatible(f"{WEIGHTS_FILE} is missing", "adapter_missing") from None
    except (ValueError, UnicodeDecodeError):
        raise Incompatible(f"{WEIGHTS_FILE} is not a valid safetensors file") from None
    if not isinstance(header, dict):
        raise Incompatible(f"{WEIGHTS_FILE} is not a valid safetensors file")
    header.pop("__metadata__", None)
    if not header:
        raise Incompatible(f"{WEIGHTS_FILE} holds no tensors")
    return header
