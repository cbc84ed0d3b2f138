"""The serving check's reference logits come from the model the engines serve: for a 16-bit job the
trained model itself (unchanged behaviour), for a QLoRA job the unquantized base at the serving dtype
with the saved adapter, not the NF4 training model, whose logits differ by the quantization error."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gpu_worker.checkpoint import save_adapter
from gpu_worker.contract import AdapterConfig, DType
from gpu_worker.engine.compat import REFERENCE_FILE, write_reference
from gpu_worker.loading import load_base_model, load_model
from gpu_worker.recipes.model_setup import wrap_for_training
from gpu_worker.recipes.run_state import SERVING_DTYPE, adapter_reference, served_reference

pytest.importorskip("peft")


def _trained(micro_model_dir, *, perturb_base: bool = False):
    """The micro Llama with a non-zero adapter; ``perturb_base`` moves its frozen projections, as NF4's
    rounding does, so that the training model no longer computes what base + adapter computes."""
    model, tok = load_base_model(str(micro_model_dir), data_dir=micro_model_dir, device="cpu", dtype=DType.float32)
    model = wrap_for_training(model, AdapterConfig(rank=4, alpha=8.0))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            elif perturb_base and name.endswith("base_layer.weight"):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), tok


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _same(a, b, atol):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if k.startswith(("ids_", "top_ids_")) else torch.allclose(a[k], b[k], atol=atol)
                                        for k in a)


def test_served_reference_is_the_base_with_the_saved_adapter(micro_model_dir, tmp_path):
    model, tok = _trained(micro_model_dir)
    (tmp_path / "direct").mkdir()
    trained = load_file(write_reference(model, tok, tmp_path / "direct"))
    save_adapter(model, tmp_path / "adapter", base_model="micro")
    loader = lambda: load_model(str(micro_model_dir), data_dir=micro_model_dir, device="cpu", dtype=DType.float32)  # noqa: E731
    path = served_reference(loader, tmp_path / "adapter", tok, dtype=DType.float32, trained_as="nf4")
    assert path == tmp_path / "adapter" / REFERENCE_FILE
    # same weights, same precision: the reload computes the training model's log-probs
    assert _same(load_file(path), trained, atol=1e-5)
    assert _metadata(path) == {"base": "unquantized", "dtype": "float32", "training_quantization": "nf4"}


def test_a_qlora_jobs_reference_comes_from_the_unquantized_base_not_the_training_model(micro_model_dir, make_spec, tmp_path):
    model, tok = _trained(micro_model_dir, perturb_base=True)  # stands in for the NF4 model (no CUDA here)
    spec = make_spec(str(micro_model_dir), quantization="nf4")
    save_adapter(model, tmp_path, base_model=spec.base_model)
    path = adapter_reference(spec, micro_model_dir, model, tok, tmp_path)
    got = load_file(path)
    assert _metadata(path) == {"base": "unquantized", "dtype": SERVING_DTYPE.value, "training_quantization": "nf4"}

    from peft import PeftModel

    served = PeftModel.from_pretrained(load_model(str(micro_model_dir), data_dir=micro_model_dir, device="cpu", dtype=SERVING_DTYPE), str(tmp_path))
    (tmp_path / "served").mkdir()
    (tmp_path / "training").mkdir()
    assert _same(got, load_file(write_reference(served, tok, tmp_path / "served")), atol=0.0)
    assert not _same(got, load_file(write_reference(model, tok, tmp_path / "training")), atol=0.1)


def test_a_16_bit_jobs_reference_is_still_the_trained_model(micro_model_dir, make_spec, tmp_path):
    model, tok = _trained(micro_model_dir, perturb_base=True)  # the trained model is what is served
    spec = make_spec(str(micro_model_dir))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = adapter_reference(spec, micro_model_dir, model, tok, tmp_path / "a")
    assert (tmp_path / "a" / REFERENCE_FILE).read_bytes() == write_reference(model, tok, tmp_path / "b").read_bytes()
    assert not _metadata(path)
