"""Exports of a trained model (``spec.export``): merged 16-bit safetensors, GGUF files, Ollama Modelfile.

- Merged: LoRA/DoRA folded into the base weights (``merge_and_unload``), saved in bfloat16 with the
  tokenizer as a standard transformers folder. QLoRA: the 4-bit base is dequantized first (the adapter
  learned against the dequantized weights, not the original 16-bit ones), then merged.
- GGUF (Llama-architecture models, plain or Llama-3.1 RoPE scaling, with a byte-level BPE tokenizer): ``f16`` and ``q8_0`` are written
  with the ``gguf`` package (``gguf.quants`` quantizes Q8_0; a tensor whose rows do not split into
  32-wide blocks stays f16, as llama.cpp's own converter does); ``q4_k_m`` needs k-quants, which
  gguf-py cannot produce, so it is made from the f16 file by llama.cpp's quantizer
  (``llama_cpp.llama_model_quantize`` from llama-cpp-python). Each file is then loaded with
  llama-cpp-python on CPU and its greedy next tokens are compared with the HF model's on a set of
  prompts (teacher-forced along the HF model's greedy continuation): the agreement rate is in the
  artifact's ``detail``, and a file is verified only when it reaches its type's floor
  (``AGREEMENT_FLOORS``); below it the file is still uploaded, marked unverified with a warning.
  Without llama-cpp-python, q4_k_m is skipped and the other files are reported unverified, each
  with a warning.
- Modelfile: ``FROM`` the smallest GGUF written, ``TEMPLATE`` translated from the chat template
  family (ChatML, Llama-3, Mistral, Gemma, Phi-3), ``PARAMETER stop`` for the end-of-turn tokens.

Everything is uploaded under ``{output_prefix}/artifacts/``. Export is the last thing that touches the
model: merging mutates it in place rather than holding a second copy of the weights.
"""

from __future__ import annotations

import json
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from gpu_worker.contract import Artifact, GGUFType, JobSpec, LogEvent, Quantization
from gpu_worker.gguf_support import gguf_problem
from gpu_worker.storage import put_dir

_GGUF_ORDER = (GGUFType.q4_k_m, GGUFType.q8_0, GGUFType.f16)  # smallest first: the Modelfile's FROM
_LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h enum llama_ftype
_VERIFY_NEW_TOKENS = 8
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


# The least greedy-token agreement with the HF model (40 positions: 5 prompts x 8 tokens) at which a
# GGUF file counts as verified. Measured on the built-in tiny model after training: f16 1.0, q8_0 1.0,
# q4_k_m 0.85 (tests/gpu_worker/test_export.py); a file of other weights agrees on 0 positions, and
# one missing Llama 3.1's RoPE factors (a subtle error) on 15 of 16 in the RoPE test. f16 holds the
# bf16 weights exactly and only the kernels' summation order differs: a near-tie may flip, 2 of 40
# allowed. q8_0 adds ~0.4% relative weight error (8-bit blocks of 32): 4 of 40. q4_k_m's 4-bit blocks
# move the logits visibly, and the tiny model's top logits are close (0.85 measured): 12 of 40
# allowed, still far above a file of the wrong weights.
AGREEMENT_FLOORS: dict[GGUFType, float] = {GGUFType.f16: 0.95, GGUFType.q8_0: 0.9, GGUFType.q4_k_m: 0.7}


class ExportError(RuntimeError):
    """This model cannot be exported in the requested format; the message says why."""


def export_model(spec: JobSpec, ctx, model, tokenizer, workdir: Path) -> list[Artifact]:
    """Make every export ``spec.export`` asks for; a format that fails is skipped with a warning (the
    trained adapter is already saved: an export problem must not lose the job)."""
    prefix = f"{spec.output_prefix.rstrip('/')}/artifacts"
    out = Path(workdir) / "export"
    merged_dir = out / "merged"
    artifacts: list[Artifact] = []
    try:
        merged = merge_model(model, spec, ctx.data_dir)
        save_merged(merged, tokenizer, merged_dir, base_model=spec.base_model)
    except Exception as err:
        ctx.emit(LogEvent(level="warn", message=f"Merged export failed ({type(err).__name__}: {err}); no merged model or GGUF"))
        return []
    if spec.export.merged:
        put_dir(ctx.store, merged_dir, f"{prefix}/merged")
        artifacts.append(Artifact(kind="merged", key=f"{prefix}/merged", filename="merged", bytes=_folder_bytes(merged_dir),
                                  detail={"dtype": "bfloat16", "format": "safetensors", "dequantized_base": spec.quantization == Quantization.nf4}))
    prompts = verification_prompts(tokenizer)
    written: dict[GGUFType, Path] = {}
    for qtype in [t for t in reversed(_GGUF_ORDER) if t in spec.export.gguf]:
        path = out / f"model-{qtype.value}.gguf"
        try:
            if qtype == GGUFType.q4_k_m:
                f16 = written.get(GGUFType.f16) or write_gguf(merged, tokenizer, merged_dir, out / "model-f16-tmp.gguf", GGUFType.f16)
                quantize_k(f16, path)
            else:
                write_gguf(merged, tokenizer, merged_dir, path, qtype)
        except Exception as err:
            ctx.emit(LogEvent(level="warn", message=f"GGUF {qtype.value} export skipped: {type(err).__name__}: {err}".splitlines()[0]))
            continue
        written[qtype] = path
        detail = {"quantization": qtype.value, **verify_gguf(path, merged, prompts, qtype)}
        if not detail["verified"]:
            ctx.emit(LogEvent(level="warn", message=f"GGUF {qtype.value} written but not verified: {detail['reason']}"))
        key = f"{prefix}/{path.name}"
        ctx.store.put_file(key, path)
        artifacts.append(Artifact(kind="gguf", key=key, filename=path.name, bytes=path.stat().st_size, detail=detail))
    if written:
        chosen = next(t for t in _GGUF_ORDER if t in written)
        text, family = modelfile(written[chosen].name, tokenizer, [p.name for p in written.values()])
        key = f"{prefix}/Modelfile"
        ctx.store.put_bytes(key, text.encode())
        artifacts.append(Artifact(kind="modelfile", key=key, filename="Modelfile", bytes=len(text.encode()), detail={"from": written[chosen].name, "template": family}))
    return artifacts


# --- merging -----------------------------------------------------------------------------------------


def merge_model(model, spec: JobSpec, data_dir):
    """The model with its adapter folded into the weights (a full fine-tune is returned as is)."""
    from gpu_worker.recipes.model_setup import is_peft

    if not is_peft(model):
        return model
    from gpu_worker.patching.lora import contiguous_weights

    if spec.quantization == Quantization.nf4:
        model = _dequantized_copy(model, spec, data_dir)
    merged = model.merge_and_unload()
    contiguous_weights(merged)  # a patched model's padded MLP weights (see save_pretrained's needs there)
    return merged


def _dequantized_copy(qmodel, spec: JobSpec, data_dir):
    """A 16-bit PEFT model whose base weights are the 4-bit base dequantized, with the same adapter."""
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from gpu_worker.contract import DType
    from gpu_worker.loading import load_model

    device = next(qmodel.parameters()).device
    base = load_model(spec.base_model, data_dir=data_dir, device=str(device), dtype=DType.bfloat16)
    plain = dict(base.named_modules())
    for name, module in qmodel.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            target = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain[target].weight.data.copy_(w.to(torch.bfloat16))
    config = qmodel.peft_config["default"]
    copy = get_peft_model(base, config)
    set_peft_model_state_dict(copy, get_peft_model_state_dict(qmodel))
    return copy


def save_merged(model, tokenizer, folder: Path, *, base_model: str) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "tuneforge_base_model.json").write_text(json.dumps({"base_model": base_model}))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- GGUF --------------------------------------------------------------------------------------------


def _permute(w, n_head: int, n_head_kv: int | None = None):
    """HF stores Q/K rows for rotate-half RoPE; GGUF's llama expects them interleaved per head pair
    (the same permutation as llama.cpp's convert_hf_to_gguf.LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_pre(folder: Path) -> str:
    """llama.cpp's pre-tokenizer name for the tokenizer in ``folder`` (byte-level BPE only)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    if (data.get("model") or {}).get("type") != "BPE":
        raise ExportError("only byte-level BPE tokenizers can be exported to GGUF here")
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    patterns = [(p.get("pattern") or {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if _LLAMA3_SPLIT in patterns:
        return "llama-bpe"
    raise ExportError(f"pre-tokenizer {pre.get('type')!r} has no known llama.cpp equivalent")


def _vocab(tokenizer, n_vocab: int):
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:  # embedding rows padded beyond the tokenizer (e.g. to a multiple of 64)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(model, tokenizer, hf_folder: Path, path: Path, qtype: GGUFType) -> Path:
    """Write ``model`` (a Llama-architecture causal LM) as a GGUF file of type f16 or q8_0."""
    import gguf
    import numpy as np
    import torch

    cfg = model.config
    # to_dict() writes the class's model_type; the instance's is the one that says what the weights are
    if (problem := gguf_problem({**cfg.to_dict(), "model_type": cfg.model_type})) is not None:
        raise ExportError(problem)
    if qtype not in (GGUFType.f16, GGUFType.q8_0):
        raise ExportError(f"{qtype.value} is made by llama.cpp's quantizer, not written directly")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope_factors = _llama3_rope_factors(rope, head_dim, float(rope_theta))

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(Path(str(getattr(cfg, "_name_or_path", "") or "model")).name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == GGUFType.f16 else gguf.LlamaFileType.MOSTLY_Q8_0)
    if qtype == GGUFType.q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types = _vocab(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_tokenizer_pre(hf_folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(hf_folder, load_merges=True, n_vocab=cfg.vocab_size).add_to_gguf(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    state = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_head, n_kv)
        _add_tensor(writer, name, np.ascontiguousarray(data), qtype)
    if rope_factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama3_rope_factors(rope: dict, head_dim: int, theta: float):
    """None for plain RoPE; for Llama 3.1-style scaling, the per-frequency divisors llama.cpp reads
    from a ``rope_freqs`` tensor (transformers' ``_compute_llama3_parameters``: high frequencies
    kept, low ones divided by ``factor``, a smooth blend between). Other kinds were refused by
    ``gguf_problem`` before this is called."""
    import numpy as np

    if rope.get("rope_type", rope.get("type", "default")) != "llama3":
        return None
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _add_tensor(writer, name: str, data, qtype: GGUFType) -> None:
    import gguf
    import numpy as np

    if data.ndim == 1:  # norms: llama.cpp keeps them in float32
        writer.add_tensor(name, data.astype(np.float32))
        return
    if qtype == GGUFType.q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return
    writer.add_tensor(name, data.astype(np.float16))


def quantize_k(f16_path: Path, out_path: Path) -> Path:
    """Q4_K_M from an f16 GGUF with llama.cpp's quantizer (its mixed per-tensor recipe: Q6_K for
    half of the attention V and FFN down projections, Q4_K elsewhere, fallbacks for odd shapes)."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ExportError("q4_k_m needs llama-cpp-python (llama.cpp's k-quant quantizer)") from err
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = _cpu_threads()
    rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(), params)
    if rc != 0 or not out_path.exists():
        raise ExportError(f"llama.cpp's quantizer failed (code {rc})")
    return out_path


def _cpu_threads() -> int:
    """llama.cpp's threads: the trainer's CPU policy (``TUNEFORGE_TORCH_THREADS``, else one core
    fewer than the machine: the worker agent shares it)."""
    wanted = os.environ.get("TUNEFORGE_TORCH_THREADS", "")
    return int(wanted) if wanted.isdigit() and int(wanted) > 0 else max(1, (os.cpu_count() or 2) - 1)


# --- verification ------------------------------------------------------------------------------------


def verification_prompts(tokenizer) -> list[list[int]]:
    """Token ids of a fixed set of chat prompts (rendered with the model's own chat template)."""
    questions = ["What is the capital of France?", "Classify the sentiment of this review: the food was great.",
                 "Please summarize the following text in one sentence.", "One, two, three, four,", "The weather today is"]
    prompts = []
    for q in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        prompts.append(list(ids))
    return prompts


def greedy_agreement(reference_fn, candidate_fn, prompts: list[list[int]], n_new: int = _VERIFY_NEW_TOKENS) -> tuple[float, int]:
    """Agreement of two models' greedy next tokens. ``reference_fn(ids)`` and ``candidate_fn(ids)``
    return each position's argmax next token for a token list; along the reference's greedy
    continuation of each prompt, count the positions where the candidate predicts the same token."""
    hits = total = 0
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(n_new):
            seq.append(reference_fn(seq)[-1])
        ref = reference_fn(seq[:-1])[len(prompt) - 1 :]
        cand = candidate_fn(seq[:-1])[len(prompt) - 1 :]
        hits += sum(int(a == b) for a, b in zip(ref, cand))
        total += len(ref)
    return hits / max(total, 1), total


def _hf_argmax(model):
    import torch

    def fn(ids: list[int]) -> list[int]:
        with torch.no_grad():
            x = torch.tensor([ids], device=next(model.parameters()).device)
            return model(input_ids=x).logits[0].float().argmax(-1).tolist()

    return fn


_DEFAULT_PARAMS_LOCK = threading.Lock()


@contextmanager
def _without_weight_repacking():
    """Models loaded inside get ``use_extra_bufts = False``: llama.cpp does not repack their weights
    into its CPU "extra" buffers. On hosts with AMX (Sapphire Rapids and later) a native build
    repacks into AMX buffers, and ``ggml_backend_amx_mul_mat`` segfaults on the first decode of
    these small models (seen on the CI machine; ggml-org/llama.cpp#20824, closed unfixed); a
    verification pass does not need the speed. ``Llama()`` has no switch for it: it starts from
    ``llama_model_default_params()``, which is replaced here while the model loads."""
    import llama_cpp.llama_cpp as lib

    stock = lib.llama_model_default_params
    if "use_extra_bufts" not in {name for name, _ in lib.llama_model_params._fields_}:
        yield  # a release from before extra buffer types: nothing to turn off
        return

    def params():
        p = stock()
        p.use_extra_bufts = False
        return p

    with _DEFAULT_PARAMS_LOCK:
        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = stock


def verify_gguf(path: Path, model, prompts: list[list[int]], qtype: GGUFType) -> dict:
    """Load ``path`` with llama-cpp-python on CPU and measure its greedy agreement with ``model``;
    verified when the agreement reaches ``AGREEMENT_FLOORS[qtype]``."""
    try:
        import llama_cpp
    except ImportError:
        return {"verified": False, "reason": "llama-cpp-python is not installed on this worker"}
    import numpy as np

    width = max(len(p) for p in prompts) + _VERIFY_NEW_TOKENS + 1
    with _without_weight_repacking():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, width), n_threads=_cpu_threads(), n_gpu_layers=0, logits_all=True, verbose=False)
    try:
        def gguf_argmax(ids: list[int]) -> list[int]:
            llm.reset()
            llm.eval(ids)
            return np.asarray(llm.scores[: len(ids)]).argmax(-1).tolist()

        was_training = model.training
        model.eval()
        try:
            rate, positions = greedy_agreement(_hf_argmax(model), gguf_argmax, prompts)
        finally:
            model.train(was_training)
    finally:
        llm.close()
    floor = AGREEMENT_FLOORS[GGUFType(qtype)]
    detail = {"verified": rate >= floor, "agreement": rate, "floor": floor, "positions": positions, "prompts": len(prompts),
              "checked_with": f"llama-cpp-python {llama_cpp.__version__}"}
    if not detail["verified"]:
        detail["reason"] = f"its greedy next tokens agree with the trained model's on {rate:.2f} of {positions} positions, below the {floor:.2f} a {GGUFType(qtype).value} file must reach"
    return detail


# --- Ollama ------------------------------------------------------------------------------------------

_TEMPLATES = {  # Ollama (Go text/template) equivalents of the chat template families the platform knows
    "chatml": ("<|im_start|>", '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n', ["<|im_end|>", "<|im_start|>"]),
    "llama-3": ("<|start_header_id|>", "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n", ["<|eot_id|>", "<|start_header_id|>"]),
    "gemma": ("<start_of_turn>", '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n', ["<end_of_turn>"]),
    "phi-3": ("<|assistant|>", "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n", ["<|end|>", "<|user|>"]),
    "mistral": ("[INST]", '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}', ["[INST]", "</s>"]),
}


def modelfile(gguf_name: str, tokenizer, alternatives: list[str]) -> tuple[str, str | None]:
    """An Ollama Modelfile for ``gguf_name``; returns the text and the template family used."""
    template = getattr(tokenizer, "chat_template", None) or ""
    family = next((name for name, (marker, _, _) in _TEMPLATES.items() if marker in template), None)
    lines = [f"# Made by Tuneforge. Other GGUF files of this model: {', '.join(sorted(alternatives))}", f"FROM ./{gguf_name}"]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if family:
        _, go_template, family_stops = _TEMPLATES[family]
        lines.append(f'TEMPLATE """{go_template}"""')
        stops += family_stops
    else:
        lines.append("# The chat template is not one of the known families; Ollama reads the one embedded in the GGUF.")
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n", family

