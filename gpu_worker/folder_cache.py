"""A local folder of downloaded folders (adapters fetched from object storage), bounded by their total
size: the least recently used are deleted first. The built-in engine's adapter cache
(``gpu_worker.engine.adapters``) and vLLM's resolver cache (``serving.vllm_plugin.index``) use it.

Recency is a folder's mtime, set when it is placed or used again (``touch``). A folder used within the
grace period is never evicted: a load or a check may still be reading it. A folder is deleted by first
renaming it out of the way, so a concurrent reader sees it whole or not at all. Torch-free (the gateway
imports it through the resolver's index).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

# A load or a check reads a folder within seconds of placing it (an adapter of a few hundred MB from local
# disk); a minute leaves room for a slow disk without keeping stale folders long.
GRACE_S = 60.0


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed meanwhile
                pass
    return total


def touch(path: Path) -> None:
    """Mark ``path`` as just used."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def entries(cache_dir: Path) -> list[Path]:
    """The cached folders (not the temporary ones being downloaded or deleted)."""
    try:
        return [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except FileNotFoundError:
        return []


def remove(path: Path) -> bool:
    """Delete a cached folder (renamed away first); False if it was already gone."""
    try:
        doomed = Path(tempfile.mkdtemp(prefix=".evict-", dir=path.parent))
        os.replace(path, doomed / path.name)
    except FileNotFoundError:
        shutil.rmtree(doomed, ignore_errors=True)
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def recently_used(path: Path, grace_s: float, now: float | None = None) -> bool:
    try:
        return (now if now is not None else time.time()) - path.stat().st_mtime < grace_s
    except FileNotFoundError:
        return False


def evict(cache_dir: Path, max_bytes: int, *, keep: Iterable[str] = (), grace_s: float = GRACE_S) -> tuple[list[Path], int]:
    """Delete the least recently used folders until their total is at most ``max_bytes``, never one named
    in ``keep`` nor one used within ``grace_s``. Returns (deleted folders, total bytes left)."""
    keep = set(keep)
    now = time.time()
    sized = []
    for path in entries(cache_dir):
        try:
            sized.append((path.stat().st_mtime, path, folder_bytes(path)))
        except FileNotFoundError:
            continue
    total = sum(size for _, _, size in sized)
    deleted = []
    for mtime, path, size in sorted(sized, key=lambda item: (item[0], item[1].name)):
        if total <= max_bytes:
            break
        if path.name in keep or now - mtime < grace_s:
            continue
        if remove(path):
            deleted.append(path)
        total -= size
    return deleted, total
