"""Batched heterogeneous LoRA against its reference, the stock PEFT model: a mixed batch gives each row
the logits that row's adapter gives alone through PEFT, base rows are untouched, both compute paths
(gathered and segmented) agree, per-layer alpha/rank patterns and rsLoRA scale as PEFT scales them,
and detaching the last adapter leaves the exact original model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel

from gpu_worker.engine import adapters, lora
from gpu_worker.engine.errors import InvalidRequest
from gpu_worker.engine.lora import AdapterBank, LoRALinear
from tests.gpu_worker.engine.conftest import load_tiny, make_adapter

PROMPTS = ["The quick brown fox", "One, two", "Classify the sentiment of this review: the food was great", "Paris"]
# fp32 on both sides; the only difference is the order of float additions (scaling folded into B,
# zero-padded ranks, batched matmuls): measured max |Δ logit| ~1e-6 on the tiny model.
ATOL = 1e-4


def _batch(tokenizer, prompts):
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _logits(model, batch):
    ids, mask, positions = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def _peft_logits(tiny_dir, folder, batch):
    model, _ = load_tiny(tiny_dir)
    return _logits(PeftModel.from_pretrained(model, folder).eval(), batch)


def _bank(tiny_dir, folders: dict):
    model, tokenizer = load_tiny(tiny_dir)
    bank = AdapterBank(model.eval())
    for name, folder in folders.items():
        files = adapters.read_adapter(folder, max_rank=64)
        bank.attach(name, files.config, files.weights)
    return model, tokenizer, bank


@pytest.mark.parametrize("path", ["gathered", "segmented"])
def test_mixed_batch_matches_each_adapter_alone_through_peft(tiny_dir, adapter_dirs, monkeypatch, path):
    if path == "segmented":
        monkeypatch.setattr(lora, "_GATHER_LIMIT", 0)
    model, tokenizer, bank = _bank(tiny_dir, adapter_dirs)
    rows = ["attn", None, "mlp", "all", "mlp", None, "attn", "all"]
    batch = _batch(tokenizer, [PROMPTS[i % len(PROMPTS)] for i in range(len(rows))])
    base = _logits(model, batch)  # no rows set: the base model
    with bank.rows(rows):
        mixed = _logits(model, batch)
    for name, folder in adapter_dirs.items():
        expected = _peft_logits(tiny_dir, folder, batch)
        for i in (i for i, row in enumerate(rows) if row == name):
            mask = batch[1][i].bool()
            torch.testing.assert_close(mixed[i][mask], expected[i][mask], atol=ATOL, rtol=0)
            assert not torch.allclose(mixed[i][mask], base[i][mask], atol=1e-2)  # the adapter does something
    for i in (i for i, row in enumerate(rows) if row is None):
        assert torch.equal(mixed[i], base[i])  # base rows exactly as without any adapter


def test_gathered_and_segmented_agree_on_one_batch(tiny_dir, adapter_dirs, monkeypatch):
    model, tokenizer, bank = _bank(tiny_dir, adapter_dirs)
    rows = ["all", "attn", "mlp", None]
    batch = _batch(tokenizer, PROMPTS)
    with bank.rows(rows):
        gathered = _logits(model, batch)
        monkeypatch.setattr(lora, "_GATHER_LIMIT", 0)
        segmented = _logits(model, batch)
    torch.testing.assert_close(gathered, segmented, atol=ATOL, rtol=0)


def test_patterns_and_rslora_scale_as_peft(tiny_dir, tmp_path):
    folder = make_adapter(tiny_dir, tmp_path / "p", seed=5, targets=("q_proj", "v_proj", "down_proj"), rank=4)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(alpha_pattern={"v_proj": 3}, use_rslora=True)
    config_path.write_text(json.dumps(config))
    model, tokenizer, bank = _bank(tiny_dir, {"p": folder})
    batch = _batch(tokenizer, PROMPTS[:2])
    with bank.rows(["p", None]):
        ours = _logits(model, batch)
    expected = _peft_logits(tiny_dir, folder, batch)
    torch.testing.assert_close(ours[0][batch[1][0].bool()], expected[0][batch[1][0].bool()], atol=ATOL, rtol=0)


def test_a_freed_slot_serves_the_next_adapter(tiny_dir, adapter_dirs):
    model, tokenizer, bank = _bank(tiny_dir, {"a": adapter_dirs["mlp"], "b": adapter_dirs["attn"]})
    bank.detach("a")
    files = adapters.read_adapter(adapter_dirs["all"], max_rank=64)
    bank.attach("c", files.config, files.weights)  # takes "a"'s slot; mlp weights must be gone
    batch = _batch(tokenizer, PROMPTS[:2])
    with bank.rows(["c", "b"]):
        ours = _logits(model, batch)
    for i, folder in enumerate([adapter_dirs["all"], adapter_dirs["attn"]]):
        mask = batch[1][i].bool()
        torch.testing.assert_close(ours[i][mask], _peft_logits(tiny_dir, folder, batch)[i][mask], atol=ATOL, rtol=0)


def test_detaching_the_last_adapter_restores_the_exact_model(tiny_dir, adapter_dirs):
    model, tokenizer = load_tiny(tiny_dir)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    batch = _batch(tokenizer, PROMPTS[:1])
    before = _logits(model, batch)
    bank = AdapterBank(model)
    for name in ("a", "b"):
        files = adapters.read_adapter(adapter_dirs["attn" if name == "a" else "mlp"], max_rank=64)
        bank.attach(name, files.config, files.weights)
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    bank.detach("a")
    bank.detach("b")
    assert {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == linears
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(_logits(model, batch), before)


def test_a_refused_adapter_changes_nothing(tiny_dir, adapter_dirs, tmp_path):
    folder = shutil.copytree(adapter_dirs["attn"], tmp_path / "bad")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))  # the weights are rank 4
    model, _ = load_tiny(tiny_dir)
    bank = AdapterBank(model)
    files = adapters.read_adapter(folder, max_rank=64)
    with pytest.raises(InvalidRequest, match="do not match its configuration"):
        bank.attach("bad", files.config, files.weights)
    assert len(bank) == 0 and not any(isinstance(m, LoRALinear) for m in model.modules())
