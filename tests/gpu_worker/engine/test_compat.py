"""The registration check: the training side's reference log-probabilities are reproduced by the engine
for the same adapter, a different adapter is caught, vocabulary changes are refused, and nothing stays
loaded afterwards."""

from __future__ import annotations

import shutil

import httpx
import pytest
from safetensors.torch import load_file, save_file

from gpu_worker.engine import compat
from gpu_worker.engine.errors import InvalidRequest
from gpu_worker.engine.models import ServedModels
from tests.gpu_worker.engine.conftest import engine_settings, load_tiny, make_adapter, tiny_loader


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    models = ServedModels(engine_settings(tmp_path_factory.mktemp("compat")), loader=tiny_loader(tiny_dir))
    models.start()
    yield models
    models.stop()


def _with_reference(tiny_dir, folder):
    """Write the reference as the trainer would: from the stock PEFT model of that folder."""
    from peft import PeftModel

    model, tokenizer = load_tiny(tiny_dir)
    compat.write_reference(PeftModel.from_pretrained(model, folder), tokenizer, folder)
    return folder


def test_reference_reproduced(served, tiny_dir, adapter_dirs, tmp_path):
    folder = _with_reference(tiny_dir, shutil.copytree(adapter_dirs["attn"], tmp_path / "a"))
    report = served.check_adapter(str(folder))
    assert report["logits"]["status"] == "match"
    assert report["logits"]["prompts"] == len(compat.REFERENCE_PROMPTS)
    assert report["logits"]["max_abs_diff"] < 1e-4  # fp32 on both sides
    assert report["logits"]["top1_agreement"] == 1.0
    assert report["rank"] == 4 and report["target_modules"] == ["q_proj", "v_proj"]
    assert served.adapters == {}  # nothing stays loaded
    assert len(served.bases["tiny"].runner.lora) == 0  # detached: the bare base again


def test_other_adapter_weights_mismatch(served, tiny_dir, adapter_dirs, tmp_path):
    folder = _with_reference(tiny_dir, shutil.copytree(adapter_dirs["attn"], tmp_path / "a"))
    # Same shapes, other weights (another training run): the reference must not match.
    other = make_adapter(tiny_dir, tmp_path / "other", seed=99, targets=("q_proj", "v_proj"), rank=4)
    shutil.copy(other / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    report = served.check_adapter(str(folder))
    assert report["logits"]["status"] == "mismatch"
    assert report["logits"]["max_abs_diff"] > compat.DEFAULT_ATOL


def test_no_reference_is_reported_not_invented(served, adapter_dirs):
    report = served.check_adapter(str(adapter_dirs["mlp"]))
    assert report["logits"] == {"status": "no_reference", "prompts": 0, "max_abs_diff": None, "top1_agreement": None}


def test_lm_head_lora_is_a_vocabulary_change(served, tiny_dir, tmp_path):
    folder = make_adapter(tiny_dir, tmp_path / "head", seed=5, targets=("q_proj", "lm_head"), rank=2)
    with pytest.raises(InvalidRequest, match="vocabulary") as err:
        served.check_adapter(str(folder))
    assert err.value.code == "vocabulary_change"
    assert served.adapters == {}


def test_reference_outside_vocabulary(served, tiny_dir, adapter_dirs, tmp_path):
    folder = _with_reference(tiny_dir, shutil.copytree(adapter_dirs["attn"], tmp_path / "a"))
    tensors = load_file(str(folder / compat.REFERENCE_FILE))
    tensors["top_ids_0"] = tensors["top_ids_0"] + 10**6
    save_file(tensors, str(folder / compat.REFERENCE_FILE))
    with pytest.raises(InvalidRequest, match="outside the base vocabulary"):
        served.check_adapter(str(folder))


def test_check_route(engine, tiny_dir, adapter_dirs, tmp_path):
    folder = _with_reference(tiny_dir, shutil.copytree(adapter_dirs["all"], tmp_path / "a"))
    answer = httpx.post(engine.url + "/v1/tuneforge/check_adapter", json={"lora_path": str(folder)}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["logits"]["status"] == "match"
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    answer = httpx.post(engine.url + "/v1/tuneforge/check_adapter", json={"lora_path": str(folder)}, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "unsafe_adapter_format"
