"""QLoRA on a CUDA GPU: an NF4 double-quantized base with bf16 compute learns the demo task, and the
merged export (dequantized base + adapter) computes what the quantized model with its adapter did."""

from __future__ import annotations

import pytest

from gpu_worker.contract import CompletedEvent, MetricsEvent
from gpu_worker.recipes import RunContext
from gpu_worker.recipes.sft import run

pytestmark = pytest.mark.gpu
pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes) on the GPU worker")


def test_nf4_base_is_double_quantized_with_bf16_compute(builtin_data_dir, make_spec):
    import bitsandbytes as bnb
    import torch

    from gpu_worker.builtin import TINY
    from gpu_worker.recipes.model_setup import load_for_training

    spec = make_spec(TINY, quantization="nf4")
    model = load_for_training(spec, data_dir=builtin_data_dir, device="cuda")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * 4  # every projection of the 4 layers (lm_head stays 16-bit)
    for m in quantized:
        state = m.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # nested: the double quantization
        assert m.compute_dtype == torch.bfloat16
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_qlora_learns_and_its_merged_export_matches(builtin_data_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from gpu_worker import export as ex
    from gpu_worker.builtin import TINY
    from gpu_worker.recipes.model_setup import load_for_training, load_trained

    write_jsonl(store, "files/train.jsonl", sentiment_rows(64))
    spec = make_spec(TINY, quantization="nf4", hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate": 3e-3},
                     export={"merged": True})
    events = []
    result = run(spec, RunContext(store=store, data_dir=builtin_data_dir, emit=events.append, device="cuda"))
    assert isinstance(result, CompletedEvent), events[-3:]
    losses = [e.train_loss for e in events if isinstance(e, MetricsEvent)]
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:3]) / 3, losses
    assert all(e.gpu_memory_gb and e.gpu_memory_gb > 0 for e in events if isinstance(e, MetricsEvent))
    merged_art = next(a for a in result.artifacts if a.kind == "merged" and a.filename == "merged")
    assert merged_art.detail["dequantized_base"] is True

    # The quantized model with the trained adapter, against the exported merged model.
    from gpu_worker.storage import get_dir

    qmodel = load_for_training(spec, data_dir=builtin_data_dir, device="cuda")
    get_dir(store, result.manifest.key, tmp_path / "adapter")
    load_trained(qmodel, tmp_path / "adapter")
    get_dir(store, merged_art.key, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).to("cuda").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12]], device="cuda")
    with torch.no_grad():
        want = qmodel.eval()(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    # Both compute in bf16 from the same dequantized weights; the merge adds one bf16 rounding.
    assert torch.allclose(got, want, atol=0.1, rtol=0.05), (got - want).abs().max()
    with torch.no_grad():
        agreement, _ = ex.greedy_agreement(lambda s: qmodel(input_ids=torch.tensor([s], device="cuda")).logits[0].argmax(-1).tolist(),
                                           lambda s: merged(input_ids=torch.tensor([s], device="cuda")).logits[0].argmax(-1).tolist(),
                                           [[5, 17, 42]], n_new=4)
    assert agreement >= 0.75


def test_qlora_reference_is_the_bf16_base_with_the_adapter(builtin_data_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    """What the serving check compares engines with: the unquantized bf16 base they serve plus the
    adapter, not the NF4 training model (whose logits differ by the quantization error)."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open

    from gpu_worker.builtin import TINY
    from gpu_worker.contract import DType
    from gpu_worker.engine.compat import REFERENCE_FILE, log_probs, read_reference
    from gpu_worker.loading import load_model
    from gpu_worker.storage import get_dir

    write_jsonl(store, "files/train.jsonl", sentiment_rows(32))
    spec = make_spec(TINY, quantization="nf4", hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate": 3e-3})
    result = run(spec, RunContext(store=store, data_dir=builtin_data_dir, emit=lambda e: None, device="cuda"))
    assert isinstance(result, CompletedEvent)
    get_dir(store, result.manifest.key, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / REFERENCE_FILE), "pt") as f:
        assert f.metadata() == {"base": "unquantized", "dtype": "bfloat16", "training_quantization": "nf4"}
    reference = read_reference(tmp_path / "adapter")

    served = PeftModel.from_pretrained(load_model(TINY, data_dir=builtin_data_dir, device="cuda", dtype=DType.bfloat16),
                                       str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        for ids, top_ids, top_lp in reference:
            got = log_probs(served, ids).gather(-1, top_ids)
            # the same model on the same GPU: equal up to kernel nondeterminism, far inside the check's 0.1
            assert torch.allclose(got, top_lp, atol=1e-3), (got - top_lp).abs().max()
