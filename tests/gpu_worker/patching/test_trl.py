"""TRL's SFTTrainer trains a patched model exactly like the unpatched one: same per-step losses.

TRL (1.16) replaces the causal LM's forward with its own fused LM head and runs the backbone through
``model.base_model``: our instance patches on norms, attention and MLP must run inside it unchanged.
Skipped where trl is not installed (the CPU CI venv has no trl; the GPU run carries it)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.patching import patch_model
from tests.gpu_worker.patching.conftest import build_lora_model, tiny_config

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0", unk_token="t0")


def _train(patched: bool, device: str, tmp_path, dropout: float = 0.0):
    from trl import SFTConfig, SFTTrainer

    config = tiny_config("llama")
    model = build_lora_model(config, device, lora_dropout=dropout)
    if patched:
        assert patch_model(model).uses_kernels
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(2, 128, (12,), generator=g).tolist()} for _ in range(8)]
    args = SFTConfig(output_dir=str(tmp_path / ("p" if patched else "s")), max_steps=3,
                     per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
                     logging_steps=1, report_to="none", save_strategy="no", seed=0,
                     bf16=device == "cuda", use_cpu=device == "cpu", dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=_tokenizer(128))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("device,dropout", [("cpu", 0.0), ("cpu", 0.2), pytest.param(
    "cuda", 0.0, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_sft_trainer_losses_match_unpatched(device, dropout, tmp_path):
    # dropout: the patched model draws its adapters' masks itself, on the CPU PEFT's (tuneforge_kernels/dropout.py)
    stock = _train(False, device, tmp_path, dropout)
    ours = _train(True, device, tmp_path, dropout)
    assert len(stock) == len(ours) == 3
    tol = 1e-4 if device == "cpu" else 2e-2  # bf16 on GPU, see test_patch_llama
    for a, b in zip(stock, ours):
        assert abs(a - b) / abs(a) < tol, (stock, ours)
