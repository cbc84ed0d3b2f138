"""The built-in model: deterministic bytes, built once, safe under concurrent creation."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_worker.builtin import BUILTIN_MODELS, TINY, UnknownBuiltinModel, builtin_path, ensure_builtin


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_name_matches_the_control_planes_builtin():
    from scheduler.settings import BUILTIN_BASE_MODEL

    assert BUILTIN_BASE_MODEL == TINY and TINY in BUILTIN_MODELS


@pytest.mark.slow
def test_creation_is_deterministic_to_the_byte(builtin_data_dir, tmp_path):
    again = ensure_builtin(TINY, tmp_path)
    first = _digest(builtin_path(TINY, builtin_data_dir))
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(first)
    assert _digest(again) == first


def test_second_call_reuses_the_folder(builtin_data_dir):
    folder = builtin_path(TINY, builtin_data_dir)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert ensure_builtin(TINY, builtin_data_dir) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_unknown_name_is_refused(tmp_path):
    with pytest.raises(UnknownBuiltinModel):
        ensure_builtin("tuneforge-huge", tmp_path)
    assert not (tmp_path / "models" / "tuneforge-huge").exists()


def test_an_interrupted_build_is_replaced(builtin_data_dir, tmp_path):
    # A folder without the completion marker (a crash mid-build) must not be mistaken for a model.
    broken = builtin_path(TINY, tmp_path)
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    folder = ensure_builtin(TINY, tmp_path)
    assert _digest(folder) == _digest(builtin_path(TINY, builtin_data_dir))


@pytest.mark.slow
def test_concurrent_creation_yields_one_complete_model(builtin_data_dir, tmp_path):
    code = "import sys; from gpu_worker.builtin import ensure_builtin; print('PATH', ensure_builtin(sys.argv[1], sys.argv[2]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, TINY, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    # libraries may print on stdout too (DeepSpeed's import-time accelerator notice, via accelerate)
    outs = [next(line[5:] for line in p.communicate(timeout=120)[0].splitlines() if line.startswith("PATH ")) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(builtin_path(TINY, tmp_path))
    assert _digest(Path(outs[0])) == _digest(builtin_path(TINY, builtin_data_dir))
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name != TINY and not p.name.endswith(".lock")]
    assert leftovers == []


def test_tokenizer_speaks_chatml_and_stops_at_end_of_turn(builtin_data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_path(TINY, builtin_data_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    assert tok.decode(tok("The food was great.")["input_ids"]) == "The food was great."
