"""Fixtures for the trainer's tests: the built-in model (built once per run), a micro Llama for fast
exact-arithmetic tests, an object store, chat files and job specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


_OTHER_AREAS = ("engine", "patching")  # sibling test packages with their own conftest


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Trainer tests run with one intra-op thread: on a shared 2-core machine two threads per process
    thrash (a tiny-model step measured 4.6x slower with 2 than with 1 under load). Results do not
    depend on it: every comparison is between runs made in the same setting."""
    if any(part in _OTHER_AREAS for part in request.node.path.relative_to(Path(__file__).parent).parts[:-1]):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def builtin_data_dir(tmp_path_factory) -> Path:
    """A data dir holding the built-in "tuneforge-tiny" model, built once for the whole run."""
    from gpu_worker.builtin import TINY, ensure_builtin

    data_dir = tmp_path_factory.mktemp("builtin-data")
    ensure_builtin(TINY, data_dir)
    return data_dir


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with the built-in tokenizer, as a local model folder: steps take
    milliseconds, so resume and determinism tests can run many of them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_worker.builtin import build_tokenizer

    out = tmp_path_factory.mktemp("micro-llama")
    tokenizer = build_tokenizer(2048)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.05,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def store(tmp_path):
    from gpu_worker.storage import LocalStore

    return LocalStore(tmp_path / "objects")


def _write_jsonl(store, key: str, rows: list) -> str:
    store.put_bytes(key, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode())
    return key


def _sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    from scheduler.demo_data import make_dataset

    train, _, _ = make_dataset(n, 0, 0, seed)
    return train


def _make_spec(base_model: str, **overrides):
    """A JobSpec for tests; ``hyperparameters``/``adapter``/``runtime`` overrides are dicts merged
    into small-and-fast defaults."""
    from gpu_worker.contract import AdapterConfig, Hyperparameters, JobSpec, Runtime

    hp = {"n_epochs": 1, "batch_size": 4, "learning_rate": 2e-3, "max_seq_length": 128} | overrides.pop("hyperparameters", {})
    adapter = {"rank": 8, "alpha": 16.0} | overrides.pop("adapter", {})
    runtime = {"checkpoint_every_steps": 1000, "use_kernels": False} | overrides.pop("runtime", {})
    fields = {
        "job_id": "ftjob-test",
        "org_id": "org-test",
        "base_model": base_model,
        "seed": 7,
        "training_file_key": "files/train.jsonl",
        "output_prefix": "jobs/ftjob-test",
        "hyperparameters": Hyperparameters(**hp),
        "adapter": AdapterConfig(**adapter),
        "runtime": Runtime(**runtime),
    } | overrides
    return JobSpec(**fields)


@pytest.fixture
def write_jsonl():
    """write_jsonl(store, key, rows) -> key; rows are dicts (JSON-encoded) or raw strings."""
    return _write_jsonl


@pytest.fixture
def sentiment_rows():
    """sentiment_rows(n, seed=0) -> the demo task's chat rows."""
    return _sentiment_rows


@pytest.fixture
def make_spec():
    """make_spec(base_model, **overrides) -> JobSpec with small, fast defaults."""
    return _make_spec
