"""A folder of downloaded folders bounded by total bytes: least recently used deleted first, never one
kept by name or used within the grace period; deleted folders vanish whole."""

from __future__ import annotations

import os
import time

from gpu_worker import folder_cache


def _folder(cache, name: str, size: int, age_s: float):
    path = cache / name
    (path / "sub").mkdir(parents=True)
    (path / "a.bin").write_bytes(b"x" * (size - size // 2))
    (path / "sub" / "b.bin").write_bytes(b"y" * (size // 2))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_evicts_least_recently_used_until_within_the_bound(tmp_path):
    old, older, oldest = _folder(tmp_path, "old", 100, 100), _folder(tmp_path, "older", 100, 200), _folder(tmp_path, "oldest", 100, 300)
    (tmp_path / ".download-x").mkdir()  # a download in progress is not an entry
    assert sorted(p.name for p in folder_cache.entries(tmp_path)) == ["old", "older", "oldest"]
    assert folder_cache.folder_bytes(old) == 100

    deleted, left = folder_cache.evict(tmp_path, 150)
    assert deleted == [oldest, older] and left == 100
    assert old.is_dir() and not oldest.exists() and (tmp_path / ".download-x").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".evict-")]  # nothing half-deleted left
    assert folder_cache.evict(tmp_path, 100) == ([], 100)  # within the bound: nothing to do


def test_never_evicts_a_kept_folder_nor_one_used_within_the_grace_period(tmp_path):
    kept, fresh, stale = _folder(tmp_path, "kept", 100, 300), _folder(tmp_path, "fresh", 100, 1), _folder(tmp_path, "stale", 100, 200)
    deleted, left = folder_cache.evict(tmp_path, 0, keep={"kept"}, grace_s=60)
    assert deleted == [stale] and left == 200 and kept.is_dir() and fresh.is_dir()

    folder_cache.touch(kept)
    assert folder_cache.recently_used(kept, 60) and not folder_cache.recently_used(tmp_path / "gone", 60)
    assert folder_cache.evict(tmp_path, 0, grace_s=60) == ([], 200)


def test_remove_is_idempotent(tmp_path):
    path = _folder(tmp_path, "a", 10, 0)
    assert folder_cache.remove(path) is True and folder_cache.remove(path) is False
    assert list(tmp_path.iterdir()) == []
