"""``model_setup.apply_memory_mode_and_kernels``: where the kernels cannot train a model (an unsupported
architecture, a patcher that fails, no patching package) the model trains on the stock HF+PEFT path, and
the lines the recipes turn into the job's log events say so."""

from __future__ import annotations

import sys

import pytest
import torch

from gpu_worker.contract import LogEvent, MemoryMode, Runtime
from gpu_worker.recipes.model_setup import apply_memory_mode_and_kernels

pytest.importorskip("peft")

# Granite has Llama's module layout (model.layers, RMSNorm, silu MLP, q/k/v/o and gate/up/down), so the
# default LoRA targets attach, but scales the embeddings, residual branches, attention and logits: the
# patched forwards would compute another function, so it must stay stock (forced through the patches,
# ``_granite()``'s loss below is 4.872 against its stock 4.855).
_GRANITE = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=4.0)


def _gpt2(seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # no dropout: two models compared bit for bit
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, bos_token_id=1, eos_token_id=1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                              init_lora_weights=False))


def _granite(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from gpu_worker.contract import AdapterConfig
    from gpu_worker.recipes.model_setup import wrap_with_lora

    config = AutoConfig.for_model("granite", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                  max_position_embeddings=32, tie_word_embeddings=False, **_GRANITE)
    torch.manual_seed(seed)
    model = wrap_with_lora(AutoModelForCausalLM.from_config(config), AdapterConfig(rank=4, alpha=8.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: random, so every adapter gradient is non-zero
            torch.nn.init.normal_(p, std=0.02)
    return model


def _loss_and_grads(model):
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _instance_forwards(model) -> set[str]:
    return {name for name, module in model.named_modules() if "forward" in vars(module)}


@pytest.mark.parametrize("build,arch", [(_gpt2, "gpt2"), (_granite, "granite")])
@pytest.mark.parametrize("mode", [MemoryMode.off, MemoryMode.checkpointing])
def test_unsupported_architecture_trains_on_the_stock_path_and_says_so(build, arch, mode):
    model, stock = build(), build()
    forwards = _instance_forwards(model)
    lines = apply_memory_mode_and_kernels(model, Runtime(memory_mode=mode))
    assert lines == [(f"Training on the stock path: architecture {arch!r} is not supported by the kernel patches "
                      f"yet; stock HF path (memory mode {mode.value})", "info")]
    assert _instance_forwards(model) == forwards  # no module patched
    assert model.get_base_model().is_gradient_checkpointing == (mode != MemoryMode.off)
    if mode != MemoryMode.off:
        stock.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the very computation of the untouched model: bit for bit
    (loss, grads), (stock_loss, stock_grads) = _loss_and_grads(model), _loss_and_grads(stock)
    assert torch.equal(loss, stock_loss) and grads.keys() == stock_grads.keys()
    assert all(torch.equal(grads[n], stock_grads[n]) for n in grads)


def test_a_failing_patcher_leaves_the_stock_path_with_stock_checkpointing(monkeypatch):
    import gpu_worker.patching

    def broken(model, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_worker.patching, "patch_model", broken)
    model = _granite()
    lines = apply_memory_mode_and_kernels(model, Runtime(memory_mode=MemoryMode.checkpointing, fp8=True))
    assert lines == [
        ("Training kernels failed to apply (RuntimeError: boom); training on the stock PyTorch path", "warn"),
        ("fp8 needs the training kernels; this job trains in bf16", "warn"),
        ("Gradient checkpointing enabled (stock transformers)", "info")]
    assert model.get_base_model().is_gradient_checkpointing


def test_without_the_patching_package_offload_becomes_checkpointing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gpu_worker.patching", None)  # its import fails
    model = _gpt2()
    [(unavailable, level), *rest] = apply_memory_mode_and_kernels(model, Runtime(memory_mode=MemoryMode.offload))
    assert level == "warn" and unavailable.startswith("Training kernels unavailable (")
    assert unavailable.endswith("); training on the stock PyTorch path")
    assert rest == [("Activation offload needs the training kernels; using gradient checkpointing instead", "warn")]
    assert model.get_base_model().is_gradient_checkpointing


@pytest.fixture
def micro_granite_dir(tmp_path):
    """A 2-layer, 64-wide Granite with the built-in tokenizer, as a local model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gpu_worker.builtin import build_tokenizer

    tokenizer = build_tokenizer(2048)
    config = AutoConfig.for_model(
        "granite", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **_GRANITE)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "granite")
    tokenizer.save_pretrained(tmp_path / "granite")
    return tmp_path / "granite"


def test_sft_job_on_an_unsupported_architecture_says_so_in_its_events(micro_granite_dir, store, write_jsonl,
                                                                      sentiment_rows, make_spec, tmp_path):
    from gpu_worker.contract import CompletedEvent, MetricsEvent
    from gpu_worker.recipes import RunContext
    from gpu_worker.recipes.sft import run

    write_jsonl(store, "files/train.jsonl", sentiment_rows(8))
    spec = make_spec(str(micro_granite_dir), runtime={"use_kernels": True, "memory_mode": "checkpointing"},
                     hyperparameters={"batch_size": 2})
    events = []
    result = run(spec, RunContext(store=store, data_dir=tmp_path, emit=events.append, should_stop=lambda: False,
                                  device="cpu"))
    said = [e for e in events if isinstance(e, LogEvent) and e.message.startswith("Training on the stock path")]
    assert [(e.level, e.message) for e in said] == [(
        "info", "Training on the stock path: architecture 'granite' is not supported by the kernel patches yet; "
                "stock HF path (memory mode checkpointing)")]
    assert not any(isinstance(e, LogEvent) and e.message.startswith("Training kernels applied") for e in events)
    losses = [e.train_loss for e in events if isinstance(e, MetricsEvent)]
    assert isinstance(result, CompletedEvent) and len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
