"""Fixtures for the engine: a tiny Llama with a locally trained tokenizer (no model hub), LoRA adapters
made with PEFT (non-zero B so they change the output), the PEFT reference generation they are compared
with, and an engine serving over real HTTP on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

TINY = "tiny"  # the served name of the test base model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_worker.builtin import build_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(400)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # large, so greedy choices are far from ties
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_tiny(tiny_dir: Path):
    from gpu_worker.loading import load_base_model

    return load_base_model(str(tiny_dir), data_dir=tiny_dir.parent, device="cpu")


def make_adapter(tiny_dir: Path, out: Path, *, seed: int, targets=("q_proj", "v_proj"), rank: int = 4) -> Path:
    """A PEFT LoRA folder for the tiny model with random, non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_tiny(tiny_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.3)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dirs(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "attn": make_adapter(tiny_dir, root / "attn", seed=1, targets=("q_proj", "v_proj"), rank=4),
        "mlp": make_adapter(tiny_dir, root / "mlp", seed=2, targets=("gate_proj", "down_proj", "o_proj"), rank=8),
        "all": make_adapter(tiny_dir, root / "all", seed=3, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), rank=2),
    }


class Reference:
    """Greedy generation by the stock PEFT model, one prompt at a time: what the engine must reproduce."""

    def __init__(self, tiny_dir: Path):
        self.tiny_dir = tiny_dir
        self._models: dict[Path | None, object] = {}
        self.tokenizer = load_tiny(tiny_dir)[1]

    def model(self, adapter: Path | None):
        if adapter not in self._models:
            from peft import PeftModel

            model, _ = load_tiny(self.tiny_dir)
            self._models[adapter] = (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()
        return self._models[adapter]

    def generate(self, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = self.model(adapter).generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
        return out[0, len(prompt_ids) :].tolist()

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="session")
def reference(tiny_dir) -> Reference:
    return Reference(tiny_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveEngine:
    """An engine app served by uvicorn on a thread, on a loopback port."""

    def __init__(self, models):
        import uvicorn

        from gpu_worker.engine.server import build_app

        self.models = models
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(models), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveEngine":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("engine did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def engine_settings(tmp_path: Path, **overrides):
    from gpu_worker.engine.settings import EngineSettings

    return EngineSettings(models=[TINY], data_dir=tmp_path, storage_url=str(tmp_path / "objects"), **overrides)


def tiny_loader(tiny_dir: Path):
    def load(name: str, settings):
        assert name == TINY
        return load_tiny(tiny_dir)

    return load


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory):
    """One engine for a test module (adapter names are unique per test, so tests do not collide)."""
    from gpu_worker.engine.models import ServedModels

    settings = engine_settings(tmp_path_factory.mktemp("engine-data"), max_lora_rank=16)
    with LiveEngine(ServedModels(settings, loader=tiny_loader(tiny_dir))) as live:
        yield live
