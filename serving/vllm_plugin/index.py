"""The adapter index in object storage: one small JSON object per servable adapter version, written by
the gateway when the version passes its compatibility check and removed when it is deleted, read by the
vLLM resolver plugin to map a requested ``ft:`` name to the adapter's files. It lives in the store, not
in any engine, so a replica that restarts finds every adapter again without the registry's database.

Objects are named by a hash of the model name: names contain ``:`` and ``/`` that are not safe as keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from gpu_worker.storage import ObjectNotFound, ObjectStore, get_dir

INDEX_PREFIX = "serving/lora-index"
FINE_TUNED_PREFIX = "ft:"


@dataclass(frozen=True)
class IndexEntry:
    name: str  # the version's model name, vLLM's lora_name
    base_model: str
    key: str  # PEFT folder prefix in the store


def entry_key(name: str) -> str:
    return f"{INDEX_PREFIX}/{hashlib.sha256(name.encode()).hexdigest()}.json"


def publish(store: ObjectStore, entry: IndexEntry) -> None:
    store.put_bytes(entry_key(entry.name), json.dumps(asdict(entry)).encode())


def withdraw(store: ObjectStore, name: str) -> None:
    try:
        store.delete(entry_key(name))
    except ObjectNotFound:
        pass


def lookup(store: ObjectStore, name: str) -> IndexEntry | None:
    if not name.startswith(FINE_TUNED_PREFIX):
        return None
    try:
        data = json.loads(store.get_bytes(entry_key(name)))
    except ObjectNotFound:
        return None
    entry = IndexEntry(**data)
    return entry if entry.name == name else None  # a hash collision is not this adapter


def fetch(store: ObjectStore, entry: IndexEntry, cache_dir: str | os.PathLike) -> Path:
    """The adapter's folder on local disk (downloaded into ``cache_dir``, then renamed into place so a
    concurrent reader never sees half of it). Only the PEFT files are kept."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / hashlib.sha256(entry.name.encode()).hexdigest()[:32]
    if (dest / "adapter_config.json").is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        get_dir(store, entry.key, tmp)
        pickles = [p.name for p in tmp.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        if pickles:
            raise ValueError(f"adapter {entry.name} contains pickle files {pickles}; only safetensors are served")
        if not (tmp / "adapter_config.json").is_file():
            raise ValueError(f"adapter {entry.name} has no adapter_config.json under {entry.key!r}")
        try:
            os.replace(tmp, dest)
        except OSError:  # another request put it there first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
