"""The torch-free GGUF rule the API refuses ``export.gguf`` with agrees with what the exporter does:
every config it rules out, ``export.write_gguf`` refuses too, and the ones it lets through get past
that refusal."""

from __future__ import annotations

import re

import pytest

from gpu_worker.gguf_support import gguf_problem

LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _model(kind: str, **extra):
    import transformers

    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[kind](**LLAMA, **extra)
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM, "mistral": transformers.MistralForCausalLM}[kind]
    return model_class(config)


@pytest.mark.parametrize(("kind", "extra", "refused"), [
    ("llama", {}, None),
    ("llama", {"rope_scaling": LLAMA3}, None),
    ("qwen2", {}, "'qwen2'"),
    ("mistral", {}, "'mistral'"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"rope_scaling": YARN}, "'yarn'"),
])
def test_the_rule_agrees_with_write_gguf(tmp_path, kind, extra, refused):
    from gpu_worker.builtin import build_tokenizer
    from gpu_worker.contract import GGUFType
    from gpu_worker.export import ExportError, write_gguf

    model = _model(kind, **extra)
    problem = gguf_problem(model.config.to_dict())
    assert (problem is None) == (refused is None) and (refused is None or refused in problem)
    tokenizer = build_tokenizer(128)
    tokenizer.save_pretrained(tmp_path)
    if refused is None:
        write_gguf(model, tokenizer, tmp_path, tmp_path / "m.gguf", GGUFType.f16)  # may write: nothing refuses it
        assert (tmp_path / "m.gguf").stat().st_size > 0
    else:
        # the exporter refuses for the very reason the API gives (one rule, not two that agree by luck)
        with pytest.raises(ExportError, match=re.escape(problem)):
            write_gguf(model, tokenizer, tmp_path, tmp_path / "m.gguf", GGUFType.f16)


def test_what_the_api_knows_of_a_base_is_enough():
    # the estimator's catalog gives the architecture only: a Llama passes, anything else is refused
    assert gguf_problem({"model_type": "llama"}) is None
    assert "'gemma2'" in gguf_problem({"model_type": "gemma2"})
    assert "None" in gguf_problem({})
