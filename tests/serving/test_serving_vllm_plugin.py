"""The vLLM side without vLLM (not installed here; tests/serving/test_vllm_gpu.py runs it inside a real
vLLM on a GPU): the engine arguments derived from the platform's rank limit, the adapter index the
gateway publishes, the resolver's lookup and download from object storage, and the reading and
comparison of the training-side reference log-probabilities with vLLM's prompt_logprobs."""

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
    env = config.vllm_env("s3://bucket", "llama")
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_PLUGINS"] == "tuneforge_lora_resolver"
    assert (env["TUNEFORGE_STORAGE_URL"], env["TUNEFORGE_BASE_MODEL"]) == ("s3://bucket", "llama")


def test_resolver_accepts_the_served_base_name(tmp_path):
    """vLLM asks with its --model (a local path in most deployments); the index names the platform's base."""
    store = LocalStore(tmp_path / "objects")
    _put(store, "jobs/1/adapter")
    index.publish(store, index.IndexEntry(name=NAME, base_model="tuneforge-tiny", key="jobs/1/adapter"))
    served = TuneforgeResolver(str(tmp_path / "objects"), str(tmp_path / "cache"), served_base="tuneforge-tiny")
    assert asyncio.run(served.find("/models/tiny", NAME))[0] == NAME
    other = TuneforgeResolver(str(tmp_path / "objects"), str(tmp_path / "cache"), served_base="other")
    assert asyncio.run(other.find("/models/tiny", NAME)) is None


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


@pytest.fixture
def fresh_process(monkeypatch):
    """A resolver process that has handed vLLM nothing yet."""
    monkeypatch.setattr(index, "_handed_out", set())


def _age(folder, seconds: float = 600) -> None:
    import os
    import time

    then = time.time() - seconds
    os.utime(folder, (then, then))


def test_resolver_cache_evicts_what_vllm_cannot_reload_least_recently_fetched_first(tmp_path, fresh_process):
    """Folders an earlier vLLM process left are evicted oldest first to fit the bound; a folder this process
    handed to vLLM stays (vLLM reloads it from there when its CPU LRU dropped it), over the bound or not."""
    from gpu_worker import folder_cache

    store, cache = LocalStore(tmp_path / "objects"), tmp_path / "cache"
    names = [f"ft:tuneforge-tiny:acme:s{i}:ftjob-{i}" for i in range(4)]
    for i, name in enumerate(names):
        _put(store, f"jobs/{i}/adapter", extra={"pad.safetensors": bytes(1000)})
        index.publish(store, index.IndexEntry(name=name, base_model="tuneforge-tiny", key=f"jobs/{i}/adapter"))
    earlier = [index.fetch(store, index.IndexEntry(name=n, base_model="tuneforge-tiny", key=f"jobs/{i}/adapter"), cache, max_bytes=1 << 30)
               for i, n in enumerate(names[:3])]
    for folder, age in zip(earlier, (900, 600, 300)):
        _age(folder, age)
    index._handed_out.clear()  # a restarted replica: the folders are on disk, vLLM knows none of them
    size = folder_cache.folder_bytes(earlier[0])

    mine = index.fetch(store, index.IndexEntry(name=names[3], base_model="tuneforge-tiny", key="jobs/3/adapter"), cache, max_bytes=2 * size)
    assert {p.name for p in folder_cache.entries(cache)} == {earlier[2].name, mine.name}  # the two oldest went
    # Fetched again, from the cache (vLLM resolves it in this process): from now on kept, as mine is, even
    # when a later download finds the cache over its bound and both long unused.
    again = index.fetch(store, index.IndexEntry(name=names[2], base_model="tuneforge-tiny", key="jobs/2/adapter"), cache, max_bytes=1)
    assert again == earlier[2]
    _age(again)
    _age(mine)
    index.fetch(store, index.IndexEntry(name=names[0], base_model="tuneforge-tiny", key="jobs/0/adapter"), cache, max_bytes=1)
    assert {p.name for p in folder_cache.entries(cache)} == {earlier[2].name, mine.name, earlier[0].name}


def test_resolver_cache_deletes_withdrawn_adapters_at_the_next_download(tmp_path, fresh_process, monkeypatch):
    """A deleted adapter (withdrawn from the index; the gateway unloads it from every replica) leaves the
    cache at the next download, unless fetched within the grace period; through the resolver, with the
    bound from vLLM's environment."""
    store, cache = LocalStore(tmp_path / "objects"), tmp_path / "cache"
    other = "ft:tuneforge-tiny:acme:other:ftjob-2"
    for name, key in ((NAME, "jobs/1/adapter"), (other, "jobs/2/adapter")):
        _put(store, key)
        index.publish(store, index.IndexEntry(name=name, base_model="tuneforge-tiny", key=key))
    monkeypatch.setenv(index.CACHE_MAX_BYTES_ENV, str(1 << 30))
    resolver = TuneforgeResolver(str(tmp_path / "objects"), str(cache))
    deleted = Path(asyncio.run(resolver.find("tuneforge-tiny", NAME))[2])
    index.withdraw(store, NAME)
    asyncio.run(resolver.find("tuneforge-tiny", other))
    assert deleted.is_dir()  # fetched a moment ago: a resolve may still be reading it
    _age(deleted)
    index.publish(store, index.IndexEntry(name="ft:tuneforge-tiny:acme:third:ftjob-3", base_model="tuneforge-tiny", key="jobs/2/adapter"))
    asyncio.run(resolver.find("tuneforge-tiny", "ft:tuneforge-tiny:acme:third:ftjob-3"))
    assert not deleted.exists() and NAME not in {p.name for p in cache.iterdir()}


@pytest.mark.parametrize("value", ["0", "-5", "1e9", "12GB", "١٢"])
def test_the_cache_bound_from_the_environment_must_be_whole_bytes(monkeypatch, value):
    monkeypatch.setenv(index.CACHE_MAX_BYTES_ENV, value)
    with pytest.raises(ValueError, match=index.CACHE_MAX_BYTES_ENV):
        index.cache_max_bytes()
    monkeypatch.setenv(index.CACHE_MAX_BYTES_ENV, "123")
    assert index.cache_max_bytes() == 123
    monkeypatch.delenv(index.CACHE_MAX_BYTES_ENV)
    assert index.cache_max_bytes() == index.DEFAULT_CACHE_MAX_BYTES
    assert config.vllm_env("s3://b", "llama", cache_max_bytes=5)[index.CACHE_MAX_BYTES_ENV] == "5"
    with pytest.raises(ValueError):
        config.vllm_env("s3://b", "llama", cache_max_bytes=0)


def test_int_ids_are_stable_and_distinct():
    assert lora_int_id(NAME) == lora_int_id(NAME)
    assert len({lora_int_id(f"ft:b:o:s:{i}") for i in range(1000)}) == 1000


def test_gateway_never_imports_vllm():
    import subprocess

    code = "import sys, serving.app, serving.vllm_plugin.config, serving.vllm_plugin.index; assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _reference_bytes(tmp_path, prompts):
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for i, (ids, top_ids, top_lp) in enumerate(prompts):
        tensors[f"ids_{i}"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"top_ids_{i}"] = torch.tensor(top_ids, dtype=torch.int64)
        tensors[f"top_logprobs_{i}"] = torch.tensor(top_lp, dtype=torch.float32)
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    return (tmp_path / "ref.safetensors").read_bytes()


def _vllm_answer(rows):
    return {"choices": [{"prompt_logprobs": [None] + [{str(t): {"logprob": lp, "rank": r + 1} for r, (t, lp) in enumerate(row)} for row in rows]}]}


def test_reference_read_without_torch_equals_safetensors(tmp_path):
    from serving.vllm_plugin import check

    prompts = [([5, 6, 7], [[1, 2], [3, 4], [5, 6]], [[-0.5, -1.5], [-0.25, -2.0], [-0.1, -3.0]]), ([9], [[7, 8]], [[-0.7, -0.9]])]
    [a, b] = check.parse_reference(_reference_bytes(tmp_path, prompts))
    assert a.ids == [5, 6, 7] and a.top_ids.tolist() == prompts[0][1] and a.top_logprobs.ravel().tolist() == pytest.approx(sum(prompts[0][2], []))
    assert b.ids == [9] and b.top_ids.shape == (1, 2)
    # the scoring request: the ids plus one token, so that the last reference row is scored too
    assert check.scoring_request("ft:x", a, 2) == {"model": "ft:x", "prompt": [5, 6, 7, 5], "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 2}
    for bad in (b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", _reference_bytes(tmp_path, [])):
        with pytest.raises(check.BadReference):
            check.parse_reference(bad)


def test_compare_with_vllm_prompt_logprobs(tmp_path):
    from serving.vllm_plugin import check

    [ref] = check.parse_reference(_reference_bytes(tmp_path, [([5, 6], [[1, 2, 3], [4, 5, 6]], [[-0.5, -1.5, -2.0], [-0.25, -2.0, -4.0]])]))
    exact = _vllm_answer([[(1, -0.5), (2, -1.5)], [(4, -0.25), (5, -2.0), (9, -5.0)]])
    report = check.compare([ref], [exact])
    assert (report["status"], report["max_abs_diff"], report["top1_agreement"], report["compared_logprobs"]) == ("match", 0.0, 1.0, 4)
    # vLLM ranks first what the reference has second: top-1 disagrees and the value is far off
    swapped = _vllm_answer([[(2, -0.45), (1, -0.55)], [(4, -0.25)]])
    report = check.compare([ref], [swapped])
    assert report["status"] == "mismatch" and report["top1_agreement"] == 0.5 and report["max_abs_diff"] == pytest.approx(1.05)
    moved = _vllm_answer([[(1, -0.5)], [(4, -0.45)]])
    assert check.compare([ref], [moved], atol=0.1)["status"] == "mismatch"
    # The adapter's fault (a verdict) vs an answer the engine got wrong (no verdict: the check is retried).
    with pytest.raises(check.BadReference, match="share none"):
        check.compare([ref], [_vllm_answer([[(99, -0.5)], [(98, -0.1)]])])
    for unusable, match in ((_vllm_answer([[(1, -0.5)]]), "positions"), (_vllm_answer([[(1, -0.5)], []]), "no log-probabilities"),
                            ({"choices": []}, "prompt_logprobs")):
        with pytest.raises(check.UnusableAnswer, match=match):
            check.compare([ref], [unusable])
        assert not issubclass(check.UnusableAnswer, check.BadReference)
