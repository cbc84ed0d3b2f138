"""TRL's trainers train a patched model exactly like the unpatched one: SFTTrainer's and DPOTrainer's
per-step losses (and DPO's reward margins) are the stock model's.

What of ours runs under TRL (1.16, read from its source): each trainer calls ``add_fused_lm_head`` on the
causal LM (the PEFT model's base), which replaces the instance's ``forward``, our patched one included, by
TRL's. Called with ``fused_lm_head=True`` (SFTTrainer's default loss, every DPO policy and reference
forward), that runs the backbone alone (``model.base_model``: the decoder layers, where our norms, RoPE,
attention and MLP patches sit) and scores the labels with TRL's own chunked LM-head kernel
(``trl/kernels/chunked_logprob.py``). Our causal-LM forward stays as the "original" one, called only
without ``fused_lm_head``: generation, and SFT's ``compute_loss_func`` and label-smoothing paths, which
drop the labels to get logits, so ours returns them through the stock head. So under TRL our fused
linear cross-entropy is never called, and neither is the rest of that forward: a packed batch gets the
mask transformers builds, not our variable-length attention.

TRL's configs default to gradient checkpointing (the layers' recompute runs our patches again) and to
``bf16=True``, which on the CPU is bf16 autocast: the configs here ask for float32 there, where the
two models agree to float32 reassociation.
Skipped where trl is not installed (it is in the ``test`` extra)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.patching import decoder, patch_model
from tests.gpu_worker.patching.conftest import build_lora_model, tiny_config

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core CI box: a second thread only thrashes
    yield
    torch.set_num_threads(threads)


def _tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0", unk_token="t0")


def _counting(monkeypatch, *names) -> dict[str, int]:
    """Calls of ``decoder``'s ops ``names`` from here on."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        op = getattr(decoder, name)

        def counted(*a, _op=op, _name=name, **kw):
            calls[_name] += 1
            return _op(*a, **kw)

        monkeypatch.setattr(decoder, name, counted)
    return calls


def _sft(patched: bool, device: str, tmp_path, dropout: float = 0.0, impl: str | None = None):
    from trl import SFTConfig, SFTTrainer

    config = tiny_config("llama")
    model = build_lora_model(config, device, lora_dropout=dropout)
    if patched:
        assert patch_model(model, impl=impl).uses_kernels
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


@pytest.mark.parametrize("device,dropout,impl", [
    ("cpu", 0.0, None), ("cpu", 0.2, None),
    ("cpu", 0.0, "triton"),  # the Triton kernels through the interpreter (~5 s), recompute included
    pytest.param("cuda", 0.0, None, marks=[pytest.mark.gpu, needs_cuda])])
def test_sft_trainer_losses_match_unpatched(device, dropout, impl, tmp_path):
    # dropout: the patched model draws its adapters' masks itself, on the CPU PEFT's (tuneforge_kernels/dropout.py)
    stock = _sft(False, device, tmp_path, dropout)
    ours = _sft(True, device, tmp_path, dropout, impl)
    assert len(stock) == len(ours) == 3
    tol = 1e-4 if device == "cpu" else 2e-2  # bf16 on GPU, see test_patch_llama
    for a, b in zip(stock, ours):
        assert abs(a - b) / abs(a) < tol, (stock, ours)


def test_sft_trainer_scores_through_its_own_head_not_our_fused_loss(tmp_path, monkeypatch):
    """The module docstring's account, counted: TRL's loss never reaches our fused cross-entropy while our
    layers train (every micro-batch runs each layer's MLP twice: forward and checkpointing's recompute);
    a call without ``fused_lm_head`` still gets our causal-LM forward and its fused loss."""
    calls = _counting(monkeypatch, "fused_linear_cross_entropy", "lora_mlp")
    assert len(_sft(True, "cpu", tmp_path)) == 3
    layers, micro_batches = tiny_config("llama").num_hidden_layers, 3 * 2
    assert calls == {"fused_linear_cross_entropy": 0, "lora_mlp": 2 * layers * micro_batches}


def test_trl_keeps_our_forward_for_calls_without_its_fused_head(monkeypatch):
    from trl.trainer.utils import add_fused_lm_head

    model = build_lora_model(tiny_config("llama"))
    patch_model(model)
    add_fused_lm_head(model.get_base_model())  # what each TRL trainer does at init
    calls = _counting(monkeypatch, "fused_linear_cross_entropy")
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = model(input_ids=x, labels=x)
    assert calls["fused_linear_cross_entropy"] == 1 and ours.logits is None
    trls = model(input_ids=x, labels=x, fused_lm_head=True)
    assert calls["fused_linear_cross_entropy"] == 1 and trls.log_probs is not None
    assert abs(trls.loss.item() - ours.loss.item()) < 1e-4 * ours.loss.item()  # the same loss, two heads


def _preferences(n: int) -> list[dict]:
    """Prompts counting upwards; chosen goes on counting, rejected is random: a preference to learn."""
    g, rows = torch.Generator().manual_seed(0), []
    for _ in range(n):
        s = int(torch.randint(2, 100, (1,), generator=g))
        bad = torch.randint(2, 128, (3,), generator=g).tolist()
        rows.append({"prompt": " ".join(f"t{s + i}" for i in range(4)) + " ",
                     "chosen": " ".join(f"t{s + 4 + i}" for i in range(3)),
                     "rejected": " ".join(f"t{b}" for b in bad)})
    return rows


def _dpo(patched: bool, tmp_path) -> list[dict]:
    from trl import DPOConfig, DPOTrainer

    model = build_lora_model(tiny_config("llama"))
    if patched:
        assert patch_model(model).uses_kernels
    # one batch of 4 pairs, seen every step: its margin must grow step after step
    args = DPOConfig(output_dir=str(tmp_path / ("p" if patched else "s")), max_steps=8,
                     per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant",
                     logging_steps=1, report_to="none", save_strategy="no", seed=0, bf16=False, use_cpu=True,
                     dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_preferences(4)),
                         processing_class=_tokenizer(128))
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_dpo_trainer_matches_unpatched_and_learns_the_preference(tmp_path, monkeypatch):
    """TRL's reference for a PEFT model is a frozen copy of the adapter ("ref", added after our patching)
    switched in for each reference forward: the patched nodes read the active adapter at every call
    (lora.py), so the two models' losses agree although policy and reference differ from step 1 on.
    Step 0's loss is log 2 (policy = reference), and the reward margin grows on the batch it trains on."""
    stock = _dpo(False, tmp_path)
    calls = _counting(monkeypatch, "fused_linear_cross_entropy", "lora_mlp")
    ours = _dpo(True, tmp_path)
    assert calls["fused_linear_cross_entropy"] == 0 and calls["lora_mlp"] > 0
    assert len(stock) == len(ours) == 8
    # float32: measured equal to every printed digit; 1e-4 as in the SFT test
    for a, b in zip(stock, ours):
        for key in ("loss", "rewards/margins"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(abs(a[key]), 1e-2), (key, stock, ours)
    losses, margins = [h["loss"] for h in ours], [h["rewards/margins"] for h in ours]
    assert losses[0] == pytest.approx(0.6931472, abs=1e-6) and margins[0] == 0.0
    assert all(b > a for a, b in zip(margins[1:], margins[2:])), margins  # step 1 on: rising
    assert margins[-1] > 0.2 and losses[-1] < 0.6 and ours[-1]["rewards/accuracies"] == 1.0
