"""Base model loading: built-in names, local folders, hub ids (offline here), chat templates."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpu_worker.builtin import CHATML_TEMPLATE, TINY, builtin_path
from gpu_worker.contract import DType
from gpu_worker.loading import ModelLoadError, load_base_model, load_tokenizer, pick_dtype, resolve_model_path


def test_builtin_name_resolves_to_its_folder(builtin_data_dir):
    assert resolve_model_path(TINY, builtin_data_dir) == str(builtin_path(TINY, builtin_data_dir))


def test_local_folder_and_builtin_load_the_same_weights(builtin_data_dir):
    by_name, tok = load_base_model(TINY, data_dir=builtin_data_dir, device="cpu")
    by_path, _ = load_base_model(str(builtin_path(TINY, builtin_data_dir)), data_dir="/nonexistent", device="cpu")
    assert by_name.dtype == torch.float32 and tok.chat_template
    for (name, a), (_, b) in zip(by_name.state_dict().items(), by_path.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such local folder") as err:
        load_base_model(str(tmp_path / "nope"), data_dir=tmp_path)
    assert str(tmp_path / "nope") in str(err.value)


def test_unknown_hub_id_fails_naming_the_model(tmp_path):
    # Real hub loading, offline: a subprocess so HF_HUB_OFFLINE applies from import time (no retries).
    code = (
        "from gpu_worker.loading import load_base_model, ModelLoadError\n"
        "try:\n    load_base_model('no-such-org/no-such-model', data_dir='.')\n"
        "except ModelLoadError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ERR could not load base model 'no-such-org/no-such-model'"), out.stderr[-2000:]


def test_tokenizer_without_chat_template_gets_chatml(builtin_data_dir, tmp_path):
    tok = load_tokenizer(TINY, data_dir=builtin_data_dir)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    reloaded = load_tokenizer(str(tmp_path), data_dir=tmp_path)
    assert reloaded.chat_template == CHATML_TEMPLATE


def test_auto_dtype_is_float32_on_cpu():
    assert pick_dtype(DType.auto, "cpu") == torch.float32
    assert pick_dtype(DType.bfloat16, "cpu") == torch.bfloat16
