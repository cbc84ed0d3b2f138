"""The built-in engine's adapter cache: ``store:`` folders downloaded for a load or a check are bounded
by total bytes (least recently used deleted first, never the one just placed nor one another load may
still be reading), and an unloaded adapter's folder is deleted (an explicit unload or an eviction from
the adapter slots); local folders are never touched."""

from __future__ import annotations

import os
import time

from gpu_worker import folder_cache
from gpu_worker.engine import adapters
from gpu_worker.engine.models import ServedModels
from gpu_worker.storage import LocalStore, put_dir
from tests.gpu_worker.engine.conftest import engine_settings, tiny_loader


def _age(folder, seconds: float = 600) -> None:
    then = time.time() - seconds
    os.utime(folder, (then, then))


def _cached(settings) -> set[str]:
    return {p.name for p in folder_cache.entries(settings.adapter_cache_dir)}


def _store_adapters(settings, adapter_dirs) -> dict[str, str]:
    store = LocalStore(settings.storage_url)
    paths = {}
    for key in ("attn", "mlp", "all"):
        put_dir(store, adapter_dirs[key], f"jobs/{key}/adapter")
        paths[key] = f"store:jobs/{key}/adapter"
    return paths


def test_materialise_keeps_the_cache_within_its_bound_least_recently_used_first(adapter_dirs, tmp_path):
    settings = engine_settings(tmp_path)
    paths = _store_adapters(settings, adapter_dirs)
    cache, url = settings.adapter_cache_dir, settings.storage_url
    big = 1 << 40
    attn = adapters.materialise(paths["attn"], storage_url=url, cache_dir=cache, max_bytes=big)
    mlp = adapters.materialise(paths["mlp"], storage_url=url, cache_dir=cache, max_bytes=big)
    _age(attn, 900)
    _age(mlp, 600)
    bound = folder_cache.folder_bytes(mlp) + folder_cache.folder_bytes(adapter_dirs["all"])

    everything = adapters.materialise(paths["all"], storage_url=url, cache_dir=cache, max_bytes=bound)
    assert _cached(settings) == {mlp.name, everything.name}  # the least recently used went first
    adapters.materialise(paths["mlp"], storage_url=url, cache_dir=cache, max_bytes=1)  # fresh, read again
    # Over the bound, but the other folder was placed within the grace period: a load may be reading it.
    assert _cached(settings) == {mlp.name, everything.name}


def test_unloading_deletes_the_adapters_folder(tiny_dir, adapter_dirs, tmp_path):
    settings = engine_settings(tmp_path, max_loras=2)
    paths = _store_adapters(settings, adapter_dirs)
    models = ServedModels(settings, loader=tiny_loader(tiny_dir))
    for name in ("a", "b"):
        models.load_adapter(name, paths["attn" if name == "a" else "mlp"])
    folders = {p.name: p for p in folder_cache.entries(settings.adapter_cache_dir)}
    assert len(folders) == 2
    for folder in folders.values():
        _age(folder)

    models.unload_adapter("a")
    left = _cached(settings)
    assert len(left) == 1 and models.resolve("b").adapter  # b still serves (its weights are in memory)
    models.load_adapter("c", paths["all"])
    models.resolve("c")
    _age(next(p for p in folder_cache.entries(settings.adapter_cache_dir) if p.name not in left))
    models.load_adapter("d", str(adapter_dirs["attn"]))  # a local folder: evicts b from the slots
    assert set(models.adapters) == {"c", "d"} and len(_cached(settings)) == 1  # b's folder went with it
    assert adapter_dirs["attn"].is_dir()
    models.unload_adapter("d")  # a local folder is the operator's: left alone
    assert (adapter_dirs["attn"] / "adapter_config.json").is_file()


def test_discard_spares_a_folder_in_use_and_knows_no_path_outside_the_cache(adapter_dirs, tmp_path):
    settings = engine_settings(tmp_path)
    paths = _store_adapters(settings, adapter_dirs)
    folder = adapters.materialise(paths["attn"], storage_url=settings.storage_url, cache_dir=settings.adapter_cache_dir, max_bytes=1 << 40)
    assert adapters.discard(paths["attn"], settings.adapter_cache_dir) is False and folder.is_dir()  # just placed
    assert adapters.discard(paths["attn"], settings.adapter_cache_dir, grace_s=0) is True and not folder.exists()
    assert adapters.discard("store:../../etc", settings.adapter_cache_dir) is False
    assert adapters.discard(str(adapter_dirs["attn"]), settings.adapter_cache_dir, grace_s=0) is False


def test_the_bound_is_an_engine_setting(tiny_dir, adapter_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_ENGINE_ADAPTER_CACHE_MAX_BYTES", "1")
    settings = engine_settings(tmp_path)
    assert settings.adapter_cache_max_bytes == 1
    paths = _store_adapters(settings, adapter_dirs)
    models = ServedModels(settings, loader=tiny_loader(tiny_dir))
    models.load_adapter("a", paths["attn"])
    _age(next(iter(folder_cache.entries(settings.adapter_cache_dir))))
    models.check_adapter(paths["mlp"])  # a check downloads too, and the bound applies
    assert len(_cached(settings)) == 1
