"""Exports: merging keeps the adapter's outputs, GGUF tensors read back as the HF weights (with
llama.cpp's rotary layout), llama.cpp agrees with the HF model and tokenizes like it, the Modelfile
speaks the chat template's family, and a job's exports land as artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpu_worker import export as ex
from gpu_worker.contract import AdapterConfig, GGUFType

try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the worker image
    llama_cpp = None

needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    """A micro Llama with a LoRA adapter whose B matrices are non-zero (a fresh adapter is a no-op)."""
    from gpu_worker.loading import load_base_model
    from gpu_worker.recipes.model_setup import wrap_for_training

    def make(adapter: AdapterConfig):
        model, tok = load_base_model(str(micro_model_dir), data_dir=micro_model_dir, device="cpu")
        model = wrap_for_training(model, adapter)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        return model.eval(), tok

    return make


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_permute_puts_each_rotary_pair_side_by_side():
    """HF rotates row j with row j + d/2 of each head; llama.cpp rotates rows 2j and 2j+1."""
    n_head, d, cols = 3, 8, 5
    w = np.arange(n_head * d * cols, dtype=np.float32).reshape(n_head * d, cols)
    p = ex._permute(w, n_head)
    for h in range(n_head):
        for j in range(d // 2):
            assert (p[h * d + 2 * j] == w[h * d + j]).all() and (p[h * d + 2 * j + 1] == w[h * d + d // 2 + j]).all()
    # Grouped-query K: permuted per KV head.
    assert (ex._permute(w[:d], n_head, 1) == ex._permute(w[:d], 1)).all()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_model_computes_what_the_adapter_did(micro, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from gpu_worker.contract import JobSpec

    model, tok = micro(AdapterConfig(type=kind, rank=4, alpha=8.0))
    ids = tok("The quick brown fox jumps over the lazy dog")["input_ids"]
    before = _logits(model, ids)
    spec = JobSpec.model_validate({"job_id": "j", "org_id": "o", "base_model": "b", "seed": 0, "training_file_key": "t", "output_prefix": "p",
                                   "hyperparameters": {"n_epochs": 1, "batch_size": 1, "learning_rate": 1e-3}})
    merged = ex.merge_model(model, spec, tmp_path)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, ids), before, atol=1e-4)
    ex.save_merged(merged, tok, tmp_path / "m", base_model="b")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "m" / "model.safetensors").values()} == {torch.bfloat16}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    # bf16 weights: about 3 significant digits.
    assert torch.allclose(_logits(reloaded.float(), ids), before, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("qtype", [GGUFType.f16, GGUFType.q8_0])
def test_gguf_tensors_and_vocabulary_read_back(micro, qtype, tmp_path):
    import gguf

    model, tok = micro(AdapterConfig(rank=4, alpha=8.0))
    merged = model.merge_and_unload()
    ex.save_merged(merged, tok, tmp_path / "m", base_model="b")
    path = ex.write_gguf(merged, tok, tmp_path / "m", tmp_path / "x.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    cfg = merged.config
    assert len(tensors) == len(merged.state_dict())
    sd = merged.state_dict()
    for hf_name, name, permute in [("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight", (cfg.num_attention_heads, cfg.num_attention_heads)),
                                   ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", (cfg.num_attention_heads, cfg.num_key_value_heads)),
                                   ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", None),
                                   ("model.norm.weight", "output_norm.weight", None)]:
        want = sd[hf_name].float().numpy()
        if permute:
            want = ex._permute(want, *permute)
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want)
        elif qtype == GGUFType.f16:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and np.allclose(got, want, rtol=1e-3, atol=1e-6)
        else:  # Q8_0: 32-value blocks, one f16 scale each: half a step of max|block| / 127 from
            # rounding, plus the scale's own f16 rounding (2^-11 relative) times up to 127 steps.
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            top = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True)
            assert (np.abs(got - want).reshape(-1, 32) <= 0.5 * top / 127 + top * 2.0**-11 + 1e-7).all()
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    vocab = tok.get_vocab()
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == tok.eos_token_id


def test_greedy_agreement_counts_positions_along_the_reference_continuation():
    ref = lambda ids: [(x + 1) % 10 for x in ids]  # noqa: E731 - "predict next = this + 1"
    same = ex.greedy_agreement(ref, ref, [[1, 2], [5]], n_new=3)
    assert same == (1.0, 6)
    off = ex.greedy_agreement(ref, lambda ids: [(x + 1) % 10 if x != 3 else 0 for x in ids], [[1, 2]], n_new=3)
    assert off == (pytest.approx(2 / 3), 3)  # along 1 2 -> 3 4 5 the candidate misses 3 -> 4


def test_modelfile_uses_the_chat_template_family(micro):
    _, tok = micro(AdapterConfig(rank=4))
    text, family = ex.modelfile("model-q8_0.gguf", tok, ["model-q8_0.gguf", "model-f16.gguf"])
    assert family == "chatml" and "FROM ./model-q8_0.gguf" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text and 'PARAMETER stop "<|im_end|>"' in text
    tok.chat_template = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>{% endfor %}"
    assert ex.modelfile("x.gguf", tok, [])[1] == "llama-3" and "<|eot_id|>" in ex.modelfile("x.gguf", tok, [])[0]
    tok.chat_template = "{{ messages }}"
    text, family = ex.modelfile("x.gguf", tok, [])
    assert family is None and "TEMPLATE" not in text.replace("# The chat template", "")


def test_unsupported_architecture_is_refused_by_name(micro, tmp_path):
    model, tok = micro(AdapterConfig(rank=4))
    merged = model.merge_and_unload()
    merged.config.model_type = "gpt_neox"
    with pytest.raises(ex.ExportError, match="Llama architecture.*gpt_neox"):
        ex.write_gguf(merged, tok, tmp_path, tmp_path / "x.gguf", GGUFType.f16)


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(micro, tmp_path):
    model, tok = micro(AdapterConfig(rank=4))
    merged = model.merge_and_unload()
    ex.save_merged(merged, tok, tmp_path / "m", base_model="b")
    path = ex.write_gguf(merged, tok, tmp_path / "m", tmp_path / "x.gguf", GGUFType.f16)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    try:
        for text in ["The quick brown fox, 42 times!", "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n", "  spaced\n\nlines"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"], text
    finally:
        llm.close()


@needs_llama_cpp
def test_llama3_rope_scaling_survives_the_conversion(micro_model_dir, tmp_path, monkeypatch):
    """Llama 3.1-style RoPE scaling, with an original context so short that most frequencies are
    rescaled: without the rope_freqs tensor llama.cpp would compute different logits."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    config = LlamaConfig.from_pretrained(micro_model_dir)
    config.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LlamaForCausalLM(config).eval()
    ex.save_merged(model, tok, tmp_path / "m", base_model="b")
    path = ex.write_gguf(model, tok, tmp_path / "m", tmp_path / "x.gguf", GGUFType.f16)
    factors = ex._llama3_rope_factors(config.rope_parameters, 16, 10000.0)
    assert factors[0] == 1.0 and factors[-1] == 8.0  # the fastest frequency kept, the slowest divided
    prompts = [list(range(5, 45)), list(range(300, 330))]  # long enough for RoPE to matter
    with_factors = ex.verify_gguf(path, model, prompts, GGUFType.f16)
    # The negative control: the same file without rope_freqs disagrees with the HF model.
    monkeypatch.setattr(ex, "_llama3_rope_factors", lambda *a: None)
    without = ex.verify_gguf(ex.write_gguf(model, tok, tmp_path / "m", tmp_path / "plain.gguf", GGUFType.f16), model, prompts, GGUFType.f16)
    assert with_factors["verified"] and with_factors["agreement"] >= 0.95, with_factors
    assert without["agreement"] < with_factors["agreement"], without


@needs_llama_cpp
def test_a_gguf_that_disagrees_with_the_model_is_not_verified(micro, tmp_path):
    """A file written from other weights (a conversion gone wrong) loads fine but agrees with the
    trained model on few greedy tokens: below every type's floor, so unverified, with the reason."""
    model, tok = micro(AdapterConfig(rank=4, alpha=8.0))
    merged = model.merge_and_unload()
    ex.save_merged(merged, tok, tmp_path / "m", base_model="b")
    path = ex.write_gguf(merged, tok, tmp_path / "m", tmp_path / "x.gguf", GGUFType.f16)
    prompts = ex.verification_prompts(tok)
    assert ex.verify_gguf(path, merged, prompts, GGUFType.f16)["verified"]  # the right model: verified
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        for p in merged.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean() * 2.0)  # other weights, same shapes
    for qtype in GGUFType:
        detail = ex.verify_gguf(path, merged, prompts, qtype)
        assert not detail["verified"] and detail["agreement"] < ex.AGREEMENT_FLOORS[qtype] and detail["floor"] == ex.AGREEMENT_FLOORS[qtype], detail
        assert detail["reason"].startswith("its greedy next tokens agree with the trained model's on")


@needs_llama_cpp
def test_job_exports_merged_gguf_and_modelfile(builtin_data_dir, store, write_jsonl, sentiment_rows, make_spec):
    """The built-in model trained on the demo task, exported in every format: artifacts under the
    job's prefix with their sizes, each GGUF verified against the HF model."""
    from gpu_worker.builtin import TINY
    from gpu_worker.contract import CompletedEvent
    from gpu_worker.recipes import RunContext
    from gpu_worker.recipes.sft import run

    write_jsonl(store, "files/train.jsonl", sentiment_rows(32))
    spec = make_spec(TINY, hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate": 3e-3},
                     export={"merged": True, "gguf": ["f16", "q8_0", "q4_k_m"]})
    events = []
    result = run(spec, RunContext(store=store, data_dir=builtin_data_dir, emit=events.append, device="cpu"))
    assert isinstance(result, CompletedEvent), events[-3:]
    arts = {a.filename: a for a in result.artifacts}
    assert set(arts) == {"adapter", "merged", "model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf", "Modelfile"}
    for name in ("model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf", "Modelfile"):
        a = arts[name]
        assert a.key == f"jobs/ftjob-test/artifacts/{name}" and a.bytes == store.size(a.key)
    assert store.exists("jobs/ftjob-test/artifacts/merged/model.safetensors")
    detail = {q: arts[f"model-{q}.gguf"].detail for q in ("f16", "q8_0", "q4_k_m")}
    assert all(d["verified"] and d["positions"] == 40 for d in detail.values()), detail
    # each file reaches its type's floor (measured 1.0, 1.0 and 0.85), and the floors are the documented ones
    assert ex.AGREEMENT_FLOORS == {GGUFType.f16: 0.95, GGUFType.q8_0: 0.9, GGUFType.q4_k_m: 0.7}
    assert all(detail[q.value]["agreement"] >= floor == detail[q.value]["floor"] for q, floor in ex.AGREEMENT_FLOORS.items()), detail
    assert not [e for e in events if getattr(e, "level", None) == "warn" and "GGUF" in e.message]
    assert arts["model-q4_k_m.gguf"].bytes < arts["model-q8_0.gguf"].bytes < arts["model-f16.gguf"].bytes
    modelfile = store.get_bytes("jobs/ftjob-test/artifacts/Modelfile").decode()
    assert "FROM ./model-q4_k_m.gguf" in modelfile and arts["Modelfile"].detail["template"] == "chatml"
    print(json.dumps(detail))


@needs_llama_cpp
def test_verification_loads_without_weight_repacking():
    """The AMX repacking that crashes llama.cpp's decode on some hosts is off while a GGUF loads for
    verification, and only then."""
    from gpu_worker.export import _without_weight_repacking

    with _without_weight_repacking():
        assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is False
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True


@needs_llama_cpp
def test_an_export_below_its_floor_is_uploaded_unverified_with_a_warning(micro, store, make_spec, tmp_path, monkeypatch):
    from gpu_worker.contract import LogEvent
    from gpu_worker.recipes import RunContext

    model, tok = micro(AdapterConfig(rank=4, alpha=8.0))
    spec = make_spec("b", export={"gguf": ["f16"]})
    monkeypatch.setitem(ex.AGREEMENT_FLOORS, GGUFType.f16, 1.01)  # a floor no file can reach
    events = []
    arts = ex.export_model(spec, RunContext(store=store, data_dir=tmp_path, emit=events.append, device="cpu"), model, tok, tmp_path / "work")
    gguf_art = next(a for a in arts if a.kind == "gguf")
    assert gguf_art.detail["verified"] is False and gguf_art.detail["floor"] == 1.01 and store.exists(gguf_art.key)
    warnings = [e.message for e in events if isinstance(e, LogEvent) and e.level == "warn"]
    assert len(warnings) == 1 and warnings[0].startswith("GGUF f16 written but not verified: its greedy next tokens agree"), warnings
