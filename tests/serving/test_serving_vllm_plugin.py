"""The vLLM side without vLLM (not installed here; nothing below ran inside a real vLLM): the engine
arguments derived from the platform's rank limit, the adapter index the gateway publishes, and the
resolver's lookup and download from object storage."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from gpu_worker.storage import LocalStore
from serving.vllm_plugin import config, index

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "vllm"))
from tuneforge_lora_resolver import TuneforgeResolver, lora_int_id  # noqa: E402

NAME = "ft:tuneforge-tiny:acme:demo:ftjob-1"


def _put(store, prefix: str, extra: dict | None = None) -> None:
    store.put_bytes(f"{prefix}/adapter_config.json", json.dumps({"peft_type": "LORA", "r": 8}).encode())
    store.put_bytes(f"{prefix}/adapter_model.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    for name, data in (extra or {}).items():
        store.put_bytes(f"{prefix}/{name}", data)


@pytest.mark.parametrize("limit, rank", [(1, 1), (8, 8), (9, 16), (64, 64), (256, 256), (300, 320)])
def test_max_lora_rank_is_the_smallest_vllm_rank_holding_the_limit(limit, rank):
    assert config.vllm_max_lora_rank(limit) == rank


def test_vllm_args_and_env():
    args = config.vllm_args("meta-llama/Llama-3.1-8B", max_lora_rank=64, max_loras=32, served_name="llama")
    assert args == ["--model", "meta-llama/Llama-3.1-8B", "--enable-lora", "--max-lora-rank=64", "--max-loras=32", "--max-cpu-loras=128", "--served-model-name", "llama"]
    with pytest.raises(ValueError, match="max_cpu_loras"):
        config.vllm_args("m", max_lora_rank=8, max_loras=8, max_cpu_loras=4)
    with pytest.raises(ValueError, match="exceeds"):
        config.vllm_max_lora_rank(1024)
    assert config.vllm_env("s3://bucket")["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_resolver_finds_published_adapters_only(tmp_path):
    store = LocalStore(tmp_path / "objects")
    _put(store, "jobs/1/adapter")
    resolver = TuneforgeResolver(str(tmp_path / "objects"), str(tmp_path / "cache"))
    find = lambda base, name: asyncio.run(resolver.find(base, name))  # noqa: E731
    assert find("tuneforge-tiny", NAME) is None  # not published: not servable

    index.publish(store, index.IndexEntry(name=NAME, base_model="tuneforge-tiny", key="jobs/1/adapter"))
    name, int_id, path = find("tuneforge-tiny", NAME)
    assert name == NAME and int_id == lora_int_id(NAME) > 0
    assert json.loads((tmp_path / "cache").joinpath(path, "adapter_config.json").read_text())["r"] == 8
    assert find("other-base", NAME) is None  # another base model's replica must not take it
    assert find("tuneforge-tiny", "not-ft") is None

    index.withdraw(store, NAME)
    index.withdraw(store, NAME)  # idempotent
    assert find("tuneforge-tiny", NAME) is None


def test_resolver_refuses_pickles(tmp_path):
    store = LocalStore(tmp_path / "objects")
    _put(store, "jobs/2/adapter", extra={"adapter_model.bin": b"x"})
    index.publish(store, index.IndexEntry(name=NAME, base_model="b", key="jobs/2/adapter"))
    resolver = TuneforgeResolver(str(tmp_path / "objects"), str(tmp_path / "cache"))
    assert asyncio.run(resolver.find("b", NAME)) is None
    assert not any((tmp_path / "cache").iterdir())  # nothing half-downloaded left behind


def test_int_ids_are_stable_and_distinct():
    assert lora_int_id(NAME) == lora_int_id(NAME)
    assert len({lora_int_id(f"ft:b:o:s:{i}") for i in range(1000)}) == 1000


def test_gateway_never_imports_vllm():
    import subprocess

    code = "import sys, serving.app, serving.vllm_plugin.config, serving.vllm_plugin.index; assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
