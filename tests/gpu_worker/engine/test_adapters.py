"""Adapter folders: what is refused (and why), ``store:`` materialisation, and attach/detach leaving the
model exactly as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_worker.engine import adapters
from gpu_worker.engine.errors import InvalidRequest, ModelNotFound
from gpu_worker.engine.models import ServedModels
from gpu_worker.storage import LocalStore, put_dir
from tests.gpu_worker.engine.conftest import TINY, engine_settings, load_tiny, tiny_loader


@pytest.fixture
def copy_of(tmp_path, adapter_dirs):
    def copy(key: str):
        dest = tmp_path / f"copy-{key}"
        shutil.copytree(adapter_dirs[key], dest)
        return dest

    return copy


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def refused(folder, match: str, *, max_rank: int = 64, model=None):
    with pytest.raises(InvalidRequest, match=match) as err:
        files = adapters.read_adapter(folder, max_rank=max_rank)
        if model is not None:
            adapters.check_fits(files, model)
    assert err.value.status_code == 400
    return err.value


def test_pickle_files_are_refused_even_next_to_safetensors(copy_of):
    folder = copy_of("attn")
    torch.save({}, folder / "adapter_model.bin")
    err = refused(folder, "only safetensors")
    assert err.code == "unsafe_adapter_format"


def test_pickle_only_adapter_is_refused(copy_of):
    folder = copy_of("attn")
    weights = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(weights, folder / "adapter_model.bin")
    refused(folder, "only safetensors")


def test_rank_above_the_maximum_is_refused(adapter_dirs):
    refused(adapter_dirs["mlp"], "rank 8 exceeds", max_rank=4)
    assert adapters.read_adapter(adapter_dirs["mlp"], max_rank=8).rank == 8


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(peft_type="IA3"), "LoRA"),
        (dict(use_dora=True), "DoRA"),
        (dict(base_model_name_or_path=None), "does not name its base model"),
    ],
)
def test_unsupported_configs_are_refused(copy_of, changes, match):
    folder = copy_of("attn")
    _edit_config(folder, **changes)
    refused(folder, match)


def test_missing_or_corrupt_files_are_refused(copy_of):
    folder = copy_of("attn")
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    refused(folder, "not a valid safetensors")
    (folder / "adapter_config.json").write_text("{not json")
    refused(folder, "not valid JSON")
    (folder / "adapter_config.json").unlink()
    refused(folder, "no adapter_config.json")


def test_weights_must_fit_the_base_model(copy_of, tiny_dir):
    model, _ = load_tiny(tiny_dir)
    folder = copy_of("attn")
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    wrong = dict(weights)
    wrong[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
    save_file(wrong, folder / "adapter_model.safetensors")
    refused(folder, "has shape", model=model)
    renamed = {k.replace("layers.0.", "layers.7."): v for k, v in weights.items()}
    save_file(renamed, folder / "adapter_model.safetensors")
    refused(folder, "targets no linear layer", model=model)


def test_base_model_must_be_one_this_engine_serves(copy_of, tiny_dir, tmp_path):
    folder = copy_of("attn")
    _edit_config(folder, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    models = ServedModels(engine_settings(tmp_path), loader=tiny_loader(tiny_dir))
    with pytest.raises(InvalidRequest, match="trained on base model 'meta-llama/Llama-3.1-8B'") as err:
        models.load_adapter("x", str(folder))
    assert err.value.code == "base_model_mismatch"
    assert models.adapters == {}


def test_base_name_matching():
    assert adapters.names_base("tiny", "tiny", "/models/tiny-llama")
    assert adapters.names_base("/models/tiny-llama", "tiny", "/models/tiny-llama")
    assert not adapters.names_base("/models/other", "tiny", "/models/tiny-llama")
    # A built-in model's adapter records its folder, which differs from one data dir to another.
    assert adapters.names_base("/elsewhere/models/tuneforge-tiny", "tuneforge-tiny", "/data/models/tuneforge-tiny")
    assert not adapters.names_base("/elsewhere/models/tiny", "tiny", "/models/tiny-llama")


def test_store_prefix_is_materialised_into_the_adapter_cache(tiny_dir, adapter_dirs, tmp_path):
    settings = engine_settings(tmp_path)
    store = LocalStore(settings.storage_url)
    put_dir(store, adapter_dirs["attn"], "jobs/ftjob-1/adapter")
    models = ServedModels(settings, loader=tiny_loader(tiny_dir))
    entry = models.load_adapter("ft:tiny:acme::1", "store:jobs/ftjob-1/adapter")
    assert entry.base == TINY
    cached = [p for p in settings.adapter_cache_dir.iterdir()]
    assert len(cached) == 1 and (cached[0] / "adapter_model.safetensors").read_bytes() == (
        adapter_dirs["attn"] / "adapter_model.safetensors"
    ).read_bytes()
    for bad in ["store:", "store:../etc", "store:jobs/none"]:
        with pytest.raises(InvalidRequest):
            models.load_adapter("other", bad)


def test_loading_beyond_max_loras_evicts_the_least_recently_used(tiny_dir, adapter_dirs, tmp_path):
    models = ServedModels(engine_settings(tmp_path, max_loras=2), loader=tiny_loader(tiny_dir))
    models.load_adapter("a", str(adapter_dirs["attn"]))
    models.load_adapter("b", str(adapter_dirs["mlp"]))
    models.resolve("a")  # "a" was used more recently than "b"
    models.load_adapter("c", str(adapter_dirs["all"]))
    assert set(models.adapters) == {"a", "c"}
    with pytest.raises(ModelNotFound):
        models.resolve("b")


def test_an_adapter_that_does_not_fit_evicts_nothing(tiny_dir, adapter_dirs, copy_of, tmp_path):
    models = ServedModels(engine_settings(tmp_path, max_loras=1), loader=tiny_loader(tiny_dir))
    models.load_adapter("a", str(adapter_dirs["attn"]))
    folder = copy_of("mlp")
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({k.replace("layers.0.", "layers.9."): v for k, v in weights.items()}, folder / "adapter_model.safetensors")
    with pytest.raises(InvalidRequest, match="targets no linear layer"):
        models.load_adapter("b", str(folder))
    assert set(models.adapters) == {"a"}
