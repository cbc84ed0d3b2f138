"""The adapter index in object storage: one small JSON object per servable adapter version, written by
the gateway when the version passes its compatibility check and removed when it is deleted, read by the
vLLM resolver plugin to map a requested ``ft:`` name to the adapter's files. It lives in the store, not
in any engine, so a replica that restarts finds every adapter again without the registry's database.

Objects are named by a hash of the model name: names contain ``:`` and ``/`` that are not safe as keys.

The resolver's local cache (``fetch``) is bounded by total bytes (``TUNEFORGE_LORA_CACHE_MAX_BYTES``,
``gpu_worker.folder_cache``): after each download, folders of adapters withdrawn from the index (deleted,
or failed their check: the gateway unloads those from every replica) are deleted, then the least recently
fetched until the total fits. A folder this process handed to vLLM stays while its adapter is in the
index, bound or not: vLLM keeps the adapter's path for the life of the process and reloads it from there
whenever its CPU LRU (``--max-cpu-loras``) dropped it, and a folder gone under it would fail that load.
So the bound applies to folders earlier processes left (the cache outlives a replica restart) and to
withdrawn ones; size it above ``--max-cpu-loras`` times the largest adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from gpu_worker import folder_cache
from gpu_worker.storage import ObjectNotFound, ObjectStore, get_dir

log = logging.getLogger(__name__)

INDEX_PREFIX = "serving/lora-index"
FINE_TUNED_PREFIX = "ft:"
CACHE_MAX_BYTES_ENV = "TUNEFORGE_LORA_CACHE_MAX_BYTES"
# A rank-16 LoRA on every projection of an 8B Llama is ~84 MB in bf16 (41.9M parameters); vLLM's default
# --max-cpu-loras here is 4 x --max-loras = 128 of them, ~11 GB: 16 GiB holds those with room for rank 32.
DEFAULT_CACHE_MAX_BYTES = 16 * 2**30
# Folder names (``_folder_name``) this process handed to vLLM: it may reload any of them from disk.
_handed_out: set[str] = set()


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


def _folder_name(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:32]  # the first 32 of entry_key's 64 hex digits


def cache_max_bytes() -> int:
    """The resolver cache's bound: ``TUNEFORGE_LORA_CACHE_MAX_BYTES`` (vLLM's environment, set by
    ``serving.vllm_plugin.config.vllm_env``) or the default."""
    value = os.environ.get(CACHE_MAX_BYTES_ENV, "").strip()
    if not value:
        return DEFAULT_CACHE_MAX_BYTES
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise ValueError(f"{CACHE_MAX_BYTES_ENV} must be a whole number of bytes of at least 1, not {value!r}")
    return int(value)


def fetch(store: ObjectStore, entry: IndexEntry, cache_dir: str | os.PathLike, *, max_bytes: int | None = None) -> Path:
    """The adapter's folder on local disk (downloaded into ``cache_dir``, then renamed into place so a
    concurrent reader never sees half of it), handed to vLLM. Only the PEFT files are kept. A download
    prunes the cache (module docstring) to ``max_bytes`` (default: ``cache_max_bytes()``)."""
    limit = cache_max_bytes() if max_bytes is None else max_bytes
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / _folder_name(entry.name)
    if (dest / "adapter_config.json").is_file():
        folder_cache.touch(dest)
        _handed_out.add(dest.name)
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
    folder_cache.touch(dest)
    _handed_out.add(dest.name)
    try:
        prune(store, cache, limit)
    except Exception as err:  # housekeeping: a store that cannot list now must not fail the adapter's resolve
        log.warning("tuneforge resolver: could not prune the cache %s: %r", cache, err)
    return dest


def prune(store: ObjectStore, cache_dir: str | os.PathLike, max_bytes: int) -> list[Path]:
    """Delete the cached folders of adapters no longer in the index, then the least recently fetched
    ones this process did not hand to vLLM, until the total is within ``max_bytes`` (module docstring).
    Folders fetched within ``folder_cache.GRACE_S`` are kept: a resolve may be reading one. Returns what
    was deleted."""
    cache = Path(cache_dir)
    live = {key.rsplit("/", 1)[-1][:32] for key in store.list(INDEX_PREFIX + "/")}
    deleted = []
    for path in folder_cache.entries(cache):
        if path.name not in live and not folder_cache.recently_used(path, folder_cache.GRACE_S) and folder_cache.remove(path):
            _handed_out.discard(path.name)
            deleted.append(path)
    evicted, left = folder_cache.evict(cache, max_bytes, keep=_handed_out)
    if left > max_bytes:
        log.warning("tuneforge resolver cache holds %d bytes, over its bound of %d: the rest are adapters vLLM may reload", left, max_bytes)
    return deleted + evicted
