#!/usr/bin/env python3
"""One-step LoRA/QLoRA training benchmark: our patched path ("ours") and the peers, side by side.

Adapted from the shared peer harness ../shared/bench/peers.py (same models, settings, FLOP model and
measurement loop, so the peers' numbers are produced exactly as there); what this copy adds: the "ours"
method (HF+PEFT model, then gpu_worker.patching.patch_model), "base" (the same from an older copy of
kernels/ and gpu_worker/patching/ under --base-root, for A/B of a kernel change in one call), ckpt
"offload", variable-length batches (--data packed|padded), the longest trainable single sequence
(mode "longest"), saving the random model for Unsloth on demand, and a JSON summary with device,
versions and git commit (``--summary``).

Measures tokens/s and peak GPU memory of a plain LoRA training loop
(forward with labels -> loss.backward() -> AdamW step) on models with RANDOM
weights built from a hand-written LlamaConfig (no hub access needed).

Methods
  hf       transformers + PEFT, attn_implementation="sdpa"
  liger    as hf, after liger_kernel.transformers.apply_liger_kernel_to_llama(
           rope, rms_norm, swiglu, fused_linear_cross_entropy) (patched before the model is built)
  unsloth  unsloth.FastLanguageModel.from_pretrained(<saved random model>) + get_peft_model
  ours     as hf, then gpu_worker.patching.patch_model(model, memory_mode=...) (ckpt on -> "checkpointing",
           offload -> "offload"; HF's own checkpointing is not enabled for it)
  base     as ours, with kernels/ and gpu_worker/ imported from --base-root (an older commit's copy)

Data (--data, or the 6th field of a suite config)
  fixed    batch x seq random tokens, every row full (the issue's table)
  packed   variable-length documents (lengths drawn from a fixed log-normal: median 400 tokens, sigma 1,
           clipped to [32, seq], 4 different draws of batch x seq tokens each) packed first-fit into rows
           of seq tokens, position ids restarting per document (transformers builds the document mask
           from them); a row's free tail is a filler document that is not trained on
  packed-rows  the same, in exactly batch rows (the documents that do not fit left out): one shape every
           step, as the worker's SFT packs (batch_size rows padded to max_seq_length)
  flat     the same documents as one row, nothing wasted (a flattening collator's batch): only for
           attention that takes documents rather than a (S x S) mask (ours: varlen_attention)
  padded   the same documents as rows of a (n_docs, longest) batch with an attention mask
  tokens/s counts real tokens only; MFU's attention term uses sum(n^2)/sum(n) as the sequence length.

Longest sequence (mode "longest"): one process, one model, then one warm-up and one timed step at each
length of --ladder (batch 1) until the first OOM; prints the longest length that trained
(--ladder-warmup 0: one cold step per length).
  (--quant nf4 turns hf into QLoRA: the 7 projection nn.Linear of the bf16 model are replaced in
   memory by bitsandbytes Linear4bit, nf4 + double quant, bf16 compute; for unsloth it passes
   load_in_4bit=True, which quantizes the saved bf16 checkpoint on load.)

Usage
  # one configuration, prints one line "RESULT {json}"
  python3 train_bench.py run --shape 1B --method hf --ckpt on --batch 4 --seq 2048
  # bf16 matmul ceiling
  python3 train_bench.py matmul
  # a list of configurations, each in its own process (OOM at batch>1 -> retried at batch 1)
  python3 train_bench.py suite --configs hf:1B:on,hf:1B:off --out results.jsonl --deadline-s 500
  # save a random model (+ minimal tokenizer) for loaders that need a path (unsloth)
  python3 train_bench.py save --shape 1B --path /tmp/rand-1B
  # the longest single sequence ours trains at 8B with checkpointing
  python3 train_bench.py longest --shape 8B --method ours --ckpt on --ladder 32768,65536,131072

Per-token FLOP model used for MFU (N = parameters of all matmuls of the base model: the 7
projections of every layer plus lm_head; embedding lookup excluded; LoRA adapters ignored):
  LoRA base weights are frozen, so there are no weight-gradient GEMMs:
    forward 2N, backward (input gradients only) 2N            -> 4N
  causal attention (SDPA/flash, is_causal) per token, L layers, hidden H, seq S:
    forward 2*L*H*S (QK^T + PV, halved for causality), backward 2x forward -> 6*L*H*S
  mfu = tokens/s * (4N + 6LHS) / measured_bf16_matmul_peak           (recompute NOT counted)
  hfu = tokens/s * (6N + 8LHS) / peak with checkpointing (recompute counted), = mfu without.
"""
import argparse
import collections
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]  # gpu_worker; kernels/ holds tuneforge_kernels

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SHAPES = {
    # Llama-3.2-1B-like
    "1B": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.1-8B-like
    "8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=False, rope_theta=500000.0),
}

PEAK_FILE_DEFAULT = "/tmp/bf16_peak_tflops.json"


# ----------------------------------------------------------------------------- FLOPs
def matmul_params(shape):
    s = SHAPES[shape]
    h, i, L, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * hd
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i
    return L * per_layer + h * v  # + lm_head (tied or not, the matmul is done)


def flops_per_token(shape, seq, ckpt):
    # seq: the attention length per token (for variable-length documents sum(n^2)/sum(n), may be fractional)
    s = SHAPES[shape]
    n = matmul_params(shape)
    attn_fwd = 2 * s["num_hidden_layers"] * s["hidden_size"] * seq  # causal
    model = 4 * n + 3 * attn_fwd
    hw = model + ((2 * n + attn_fwd) if ckpt else 0)
    return n, model, hw


# ----------------------------------------------------------------------------- helpers
def make_config(shape, attn="sdpa"):
    from transformers import LlamaConfig
    s = dict(SHAPES[shape])
    theta = s.pop("rope_theta")
    cfg = LlamaConfig(**s, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": theta},
                      bos_token_id=128000, eos_token_id=128001, pad_token_id=128004,
                      use_cache=False)
    cfg._attn_implementation = attn
    return cfg


def build_random_model(shape, attn="sdpa"):
    import torch
    from transformers import LlamaForCausalLM
    cfg = make_config(shape, attn)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    model.config.use_cache = False
    return model


def versions():
    out = {}
    import importlib.metadata as md
    for name in ["torch", "triton", "transformers", "peft", "accelerate", "liger_kernel",
                 "bitsandbytes", "unsloth", "unsloth_zoo", "trl"]:
        try:
            out[name] = md.version(name)
        except Exception:
            out[name] = None
    try:
        import torch
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
    except Exception:
        pass
    return out


def save_random(shape, path):
    """Random bf16 model + a Llama-3-shaped WordLevel tokenizer, for path-based loaders."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    t0 = time.time()
    torch.manual_seed(0)
    model = build_random_model(shape)
    t1 = time.time()
    model.save_pretrained(path, max_shard_size="5GB")
    t2 = time.time()
    vocab = {f"t{i}": i for i in range(128000)}
    specials = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                128004: "<|finetune_right_pad_id|>", 128009: "<|eot_id|>"}
    for i in range(128000, 128256):
        vocab[specials.get(i, f"<|reserved_special_token_{i - 128000}|>")] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>",
                                   unk_token="t0", model_max_length=131072)
    fast.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    print(json.dumps({"save": shape, "path": path, "build_s": round(t1 - t0, 1),
                      "save_s": round(t2 - t1, 1), "tok_s": round(time.time() - t2, 1)}), flush=True)


def bench_matmul(n=8192, reps=20, out=PEAK_FILE_DEFAULT):
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.matmul(a, b, out=c)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    ts.sort()
    med = ts[len(ts) // 2]
    tf = 2 * n ** 3 / med / 1e12
    rec = {"kind": "matmul_bf16", "n": n, "reps": reps, "median_s": med, "tflops": tf,
           "min_s": ts[0], "max_s": ts[-1], **versions()}
    with open(out, "w") as f:
        json.dump(rec, f)
    print("RESULT " + json.dumps(rec), flush=True)


# ----------------------------------------------------------------------------- data
def varlen_lengths(step_tokens, max_len, seed):
    """Document lengths filling exactly ``step_tokens``: log-normal (median 400, sigma 1), clipped to
    [32, max_len]; the last document is cut to fit."""
    import torch
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < step_tokens:
        n = int(torch.empty(1).log_normal_(math.log(400.0), 1.0, generator=g).item())
        lens.append(min(max(32, min(max_len, n)), step_tokens - sum(lens)))
    return lens


def _pack(docs, row_len, device, max_rows=None):
    """First-fit-decreasing packing of documents into rows of ``row_len`` tokens, position ids restarting
    per document (transformers derives the document mask from them), labels -100 at document starts;
    a row's free tail is one filler document with labels -100. Rows of ``row_len`` rather than one row
    of everything: SDPA with a document mask computes every (row_len x row_len) block, masked or not.
    ``max_rows``: at most that many rows, the documents that do not fit left out. Returns the batch and
    the lengths of the documents in it."""
    import torch
    rows = []  # lists of documents
    for d in sorted(docs, key=len, reverse=True):
        row = next((r for r in rows if sum(len(x) for x in r) + len(d) <= row_len), None)
        if row is not None:
            row.append(d)
        elif max_rows is None or len(rows) < max_rows:
            rows.append([d])
    ids = torch.zeros(len(rows), row_len, dtype=torch.long, device=device)
    pos = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        col = 0
        for d in row:  # trained on, except the first token (not predicted from the previous document)
            k = len(d)
            ids[i, col:col + k], labels[i, col + 1:col + k] = d, d[1:]
            pos[i, col:col + k] = torch.arange(k, device=device)
            col += k
        pos[i, col:] = torch.arange(row_len - col, device=device)  # the filler: its own document
    return dict(input_ids=ids, position_ids=pos, labels=labels), [len(d) for row in rows for d in row]


def make_batches(args, vocab, n=4, device="cuda"):
    """``n`` steps' model inputs (dicts of kwargs), their real token count per step and the attention
    length per token for the FLOP model."""
    import torch
    g = torch.Generator(device=device).manual_seed(1)
    if args.data == "fixed":
        xs = [torch.randint(0, vocab, (args.batch, args.seq), device=device, generator=g) for _ in range(n)]
        return [dict(input_ids=x, labels=x) for x in xs], args.batch * args.seq, float(args.seq)
    batches, sq, tot = [], 0, 0
    for i in range(n):
        lens = varlen_lengths(args.batch * args.seq, args.seq, seed=100 + i)
        docs = [torch.randint(0, vocab, (k,), device=device, generator=g) for k in lens]
        if args.data == "padded":
            ids = torch.zeros(len(lens), max(lens), dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for r, d in enumerate(docs):
                ids[r, :len(d)], mask[r, :len(d)] = d, 1
            batches.append(dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
        else:
            row_len = sum(lens) if args.data == "flat" else args.seq
            batch, lens = _pack(docs, row_len, device, max_rows=args.batch if args.data == "packed-rows" else None)
            batches.append(batch)
        sq, tot = sq + sum(k * k for k in lens), tot + sum(lens)
    return batches, tot // n, sq / tot


# ----------------------------------------------------------------------------- model setup
def setup_hf(args):
    import torch
    from peft import LoraConfig, get_peft_model
    if args.method == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=True)
    model = build_random_model(args.shape, "sdpa")
    if getattr(args, "model_dtype", "bf16") == "fp32":  # the same random weights, widened: a float32 reference
        model = model.float()
    quant_note = None
    if args.quant == "nf4":
        quant_note = quantize_nf4_inplace(model)
    if args.ckpt == "on" and args.method not in ("ours", "base"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=getattr(args, "lora_dropout", 0.0),
                      bias="none", target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    if args.method in ("ours", "base"):
        if args.method == "base":  # the older copy must win over the repo root on sys.path
            base = os.path.abspath(args.base_root)  # kernels/ holds tuneforge_kernels from 1c0711b on
            sys.path[:0] = [base, os.path.join(base, "kernels")]
            # run_one imported gpu_worker (the allocator's settings) from the tree: its patching would be the
            # tree's too, over the base's kernels
            for name in [m for m in sys.modules if m == "gpu_worker" or m.startswith("gpu_worker.")]:
                del sys.modules[name]
        from gpu_worker.patching import patch_model
        if getattr(args, "philox_rounds", 0):  # an experiment: adapter dropout's masks from fewer Philox rounds
            _philox_rounds(args.philox_rounds)
        if getattr(args, "join", "auto") == "off":  # an experiment: separate q/k/v and gate/up weights
            sys.modules["gpu_worker.patching"].JOIN_MAX_HIDDEN = 0
        pad = getattr(args, "pad", "auto")
        if pad != "auto":  # an experiment: the padded MLP and Q/K/V at any size, or never, or the MLP only
            patching = sys.modules["gpu_worker.patching"]
            patching.PAD_MAX_HIDDEN = 0 if pad == "off" else 1 << 30
            patching.PAD_QKV_MAX_HIDDEN = 1 << 30 if pad == "on" else 0
        one_gemm = getattr(args, "padded_one_gemm", "auto")
        if one_gemm != "auto":  # an experiment: lora_linear holds its own binding of the name
            import tuneforge_kernels.lora_linear as lin
            import tuneforge_kernels.lora_mlp as mlp
            lin.PADDED_ONE_GEMM_MAX_HIDDEN = mlp.PADDED_ONE_GEMM_MAX_HIDDEN = 1 << 30 if one_gemm == "on" else 0
        pad_align = getattr(args, "pad_align", None)
        if pad_align is not None:  # an experiment: the padded layouts' spare columns rounded to another multiple
            import tuneforge_kernels.lora_mlp as mlp
            mlp.PAD_ALIGN = pad_align
        if getattr(args, "gated_gemm", "auto") == "off":  # an A/B: lora_glu's passes instead of the epilogues
            os.environ["TUNEFORGE_GATED_GEMM"] = "0"
        if getattr(args, "mlp_dx", "carries") == "first":  # an A/B: the padded MLP's K-augmented input gradient
            import tuneforge_kernels.lora_mlp as mlp
            mlp.DX_CARRIES_PRODUCTS = False
        args.patch_module = sys.modules["gpu_worker.patching"].__file__
        # an A/B: the decoder layers' CUDA graphs always / never instead of the patcher's rule
        graphs = {"auto": {}, "on": {"cuda_graphs": True}, "off": {"cuda_graphs": False}}[getattr(args, "graphs", "auto")]
        if getattr(args, "attention", "auto") != "auto":  # an A/B: SDPA only, or FlashAttention-4 for all causal
            graphs["attention"] = args.attention  # attention (the patcher's default: FA4 for packed rows, where it is)
        if getattr(args, "fp8", False):  # the opt-in FP8 GEMMs for the frozen projections (not exact bf16)
            graphs["fp8"] = True
            if getattr(args, "fp8_fast_accum", False):  # an experiment: cuBLASLt's fast accumulation in forward
                import tuneforge_kernels.fp8 as fp8
                fp8.FAST_ACCUM_FORWARD = True
        report = patch_model(model, memory_mode={"off": "off", "on": "checkpointing",
                                                 "offload": "offload"}[args.ckpt], **graphs)
        args.patch_report = {"patched": list(report.patched), "reason": report.reason, "notes": list(report.notes),
                             "memory_mode": report.memory_mode, "counts": dict(getattr(report, "counts", {}))}
        for kind, tile in getattr(args, "glu_tile", None) or ():  # an experiment: other tiles for lora_glu's kernels
            glu = sys.modules["tuneforge_kernels.lora_glu"]
            for name in GLU_TILE_KINDS[kind]:
                if not hasattr(glu, name):  # a renamed tile would otherwise be set in vain
                    raise SystemExit(f"--glu-tile: tuneforge_kernels.lora_glu has no {name}")
                setattr(glu, name, tile)
                args.patch_report.setdefault("glu_tile", {})[name] = list(tile)
        if one_gemm != "auto":
            args.patch_report["padded_one_gemm"] = one_gemm
        if pad_align is not None:
            args.patch_report["pad_align"] = pad_align
        if getattr(args, "mlp_dx", "carries") != "carries":
            args.patch_report["mlp_dx"] = args.mlp_dx
        if getattr(args, "philox_rounds", 0):
            args.patch_report["philox_rounds"] = args.philox_rounds
        if getattr(args, "keep_norm_output", "none") == "mlp":  # an experiment: the MLP saves its input
            _keep_mlp_input(sys.modules["tuneforge_kernels.lora_mlp"])
            args.patch_report["keep_norm_output"] = "mlp"
        if getattr(args, "ce_rows", 0):  # an experiment: a fixed CE chunk instead of the kernel's rule
            sys.modules["tuneforge_kernels.cross_entropy"]._chunk_rows = lambda *_: args.ce_rows
            args.patch_report["ce_rows"] = args.ce_rows
    model.train()
    return model, quant_note


def fp8_loss_vs_bf16(model, ac, batch):
    """The first batch's loss (no gradient) with the FP8 GEMMs and in bf16 (gpu_worker.patching.fp8_disabled),
    and how many projections took FP8: what the worker reports for a job in FP8."""
    import torch
    from gpu_worker.patching import fp8_disabled

    with torch.no_grad(), ac:
        fp8 = float(model(**batch).loss)
        with fp8_disabled():
            bf16 = float(model(**batch).loss)
    return {"fp8": fp8, "bf16": bf16, "relative": (fp8 - bf16) / abs(bf16),
            "fp8_weights": sum(hasattr(m, "_tf_fp8") for m in model.modules())}


def quantize_nf4_inplace(model):
    """Replace each of the 7 projection nn.Linear (bf16) with bnb Linear4bit nf4, double quant."""
    import torch
    import bitsandbytes as bnb
    n = 0
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if cname in TARGETS and isinstance(child, torch.nn.Linear):
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                        compute_dtype=torch.bfloat16, compress_statistics=True,
                                        quant_type="nf4", device="meta")
                w = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                      compress_statistics=True, module=new)
                new.weight = w.to("cuda")  # quantizes here
                setattr(mod, cname, new)
                del child, w
                n += 1
    torch.cuda.empty_cache()
    return f"in-memory: {n} nn.Linear -> bnb.nn.Linear4bit(nf4, compress_statistics=True, compute bf16)"


def setup_unsloth(args):
    import unsloth  # noqa: F401  (must come before transformers/peft)
    from unsloth import FastLanguageModel
    import torch
    model, tok = FastLanguageModel.from_pretrained(
        args.model_path, max_seq_length=args.seq, dtype=torch.bfloat16,
        load_in_4bit=(args.quant == "nf4"))
    gc = {"on": True, "off": False, "unsloth": "unsloth"}[args.ckpt]
    model = FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=args.alpha, lora_dropout=getattr(args, "lora_dropout", 0.0), bias="none",
        target_modules=TARGETS, use_gradient_checkpointing=gc, random_state=3407,
        max_seq_length=args.seq)
    if hasattr(FastLanguageModel, "for_training"):
        FastLanguageModel.for_training(model)
    model.train()
    return model, ("unsloth load_in_4bit=True (bnb nf4 on load)" if args.quant == "nf4" else None)


def add_extra_copies(model, copies: int, tokens: int) -> dict:
    """An experiment (session 13's question: is the 8B step an energy budget at the power cap?):
    ``copies`` memory-bound passes after each decoder layer's forward, each a copy of a (tokens x
    intermediate) bf16 tensor, the size of the MLP's activation. Returns their standalone time a step: if
    the step grows by all of it, the power cap acts per kernel; by a fraction, the step is an energy budget
    and memory-bound work costs less than its time. Session 14 measured 88-91% at 8B on the H200
    (bench/NOTES.md)."""
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.model.layers
    src = torch.randn(tokens, base.config.intermediate_size, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)

    def passes(*_):
        for _ in range(copies):
            dst.copy_(src)

    for _ in range(3):
        passes()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(len(layers)):
        passes()
    end.record()
    end.synchronize()
    for layer in layers:
        layer.register_forward_hook(passes)  # hooks keep a layer off its CUDA graph: an 8B (eager) experiment
    return {"per_layer": copies, "bytes_each": 2 * src.numel() * src.element_size(),
            "standalone_ms_per_step": start.elapsed_time(end)}


# ----------------------------------------------------------------------------- one run
def run_one(args):
    rec = {"kind": "train", "shape": args.shape, "method": args.method, "ckpt": args.ckpt,
           "quant": args.quant, "batch": args.batch, "seq": args.seq, "rank": args.rank,
           "lora_dropout": getattr(args, "lora_dropout", 0.0), "fp8": bool(getattr(args, "fp8", False)),
           "alpha": args.alpha, "autocast": args.autocast, "model_dtype": args.model_dtype,
           "warmup": args.warmup, "steps": args.steps, "data": args.data}
    if args.method == "base":
        rec["base_commit"] = os.environ.get("BASE_COMMIT")
    if args.method in ("ours", "base"):  # the training worker's allocator settings (gpu_worker/train.py)
        from gpu_worker.allocator import configure_cuda_allocator
        configure_cuda_allocator()
    t_start = time.time()
    try:
        if args.method == "unsloth":
            model, qnote = setup_unsloth(args)  # imports unsloth first
        import torch
        torch.manual_seed(0)
        if args.method in ("hf", "liger", "ours", "base"):
            model, qnote = setup_hf(args)
            if getattr(args, "patch_report", None):
                rec["patch_report"] = args.patch_report
                rec["patch_module"] = args.patch_module
        rec["quant_method"] = qnote
        rec.update(versions())
        try:  # which implementation actually ended up in the model
            base = model.get_base_model()
            layer = base.model.layers[0]
            rec["impl"] = {
                "causal_lm_forward": type(base).forward.__module__ + "." + type(base).forward.__qualname__,
                "layer_forward": type(layer).forward.__module__,
                "norm": type(layer.input_layernorm).__module__ + "." + type(layer.input_layernorm).__name__,
                "mlp": type(layer.mlp).__module__ + "." + type(layer.mlp).__name__,
                "q_proj": type(layer.self_attn.q_proj).__module__ + "." + type(layer.self_attn.q_proj).__name__,
                "q_proj_base": type(getattr(layer.self_attn.q_proj, "base_layer", layer.self_attn.q_proj)).__name__,
                "attn_impl": getattr(base.config, "_attn_implementation", None),
                "grad_ckpt": getattr(base, "is_gradient_checkpointing", None),
            }
        except Exception as e:  # noqa: BLE001
            rec["impl"] = f"n/a: {e}"
        rec["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        params = [p for p in model.parameters() if p.requires_grad]
        rec["trainable_params"] = sum(p.numel() for p in params)
        rec["trainable_dtypes"] = sorted({str(p.dtype) for p in params})
        rec["setup_s"] = round(time.time() - t_start, 1)
        try:
            opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
            rec["optimizer"] = "torch AdamW fused"
        except Exception as e:  # noqa: BLE001
            opt = torch.optim.AdamW(params, lr=2e-4)
            rec["optimizer"] = f"torch AdamW (fused failed: {e})"
        ac = (torch.autocast("cuda", dtype=torch.bfloat16) if args.autocast == "bf16"
              else torch.autocast("cuda", enabled=False))
        if args.mode == "longest":
            longest(args, model, opt, ac, rec)
            raise _Done
        vocab = SHAPES[args.shape]["vocab_size"]
        batches, step_tokens, attn_seq = make_batches(args, vocab)
        rec["tokens_per_step"], rec["attn_seq"] = step_tokens, attn_seq
        rec["rows_per_step"] = [int(b["input_ids"].shape[0]) for b in batches]
        rec["padded_tokens_per_step"] = [int(b["input_ids"].numel()) for b in batches]

        if getattr(args, "extra_copies", 0):
            rec["extra_copies"] = add_extra_copies(model, args.extra_copies, batches[0]["input_ids"].numel())

        if getattr(args, "fp8", False):
            rec["fp8_loss_vs_bf16"] = fp8_loss_vs_bf16(model, ac, batches[0])

        def step(i):
            with ac:
                out = model(**batches[i % len(batches)])
            loss = out.loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        losses = []
        for i in range(args.warmup):
            losses.append(step(i))
        torch.cuda.synchronize()
        rec["peak_gb_load_and_warmup"] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
        # events between steps give each step's device time without a host sync in the loop: a host-side
        # stall shows as one long step (the 1B A/B of 2026-12-03 v5 differed by 7.4% with no way to tell)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        gc_runs = []  # (generation, ms) of each collection during the timed steps

        def on_gc(phase, info, started=[]):  # noqa: B006 - the start time between the two calls
            if phase == "start":
                started[:] = [time.perf_counter()]
            elif started:
                gc_runs.append((info["generation"], round((time.perf_counter() - started[0]) * 1e3, 2)))

        gc.callbacks.append(on_gc)
        prof = None
        if args.cprofile:  # where the host's time goes (a launch-bound step: tiny batches)
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
        syncs = _SyncLog() if getattr(args, "sync_debug", False) else contextlib.nullcontext()
        t0 = time.perf_counter()
        rec["timed_start_unix"] = round(time.time(), 3)  # to line the steps up with nvidia-smi's samples
        with syncs:
            marks[0].record()
            for i in range(args.steps):
                losses.append(step(args.warmup + i))
                marks[i + 1].record()
        torch.cuda.synchronize()
        el = time.perf_counter() - t0
        if isinstance(syncs, _SyncLog):
            rec["host_syncs"] = syncs.summary()
        gc.callbacks.remove(on_gc)
        rec["gc_collections"] = gc_runs
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.cprofile)
        rec["step_ms"] = [round(marks[i].elapsed_time(marks[i + 1]), 2) for i in range(args.steps)]
        graphs = getattr(layer, "_tf_graphs", None) if isinstance(rec.get("impl"), dict) else None
        if graphs is not None:  # the decoder layers' CUDA graphs (gpu_worker/patching/graphs.py)
            rec["cuda_graphs"] = graphs.status
            # replays allocate nothing: their activations live in the graphs' private pool, which the
            # allocated-memory peak does not count; the peak below is the reserved peak instead (pool and
            # cache: an upper bound of what the step uses)
            pool = sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                       if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))
            rec["graph_pool_gb"] = pool / 1e9
            rec["peak_gb_allocated"] = torch.cuda.max_memory_allocated() / 1e9
        rec["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        rec["peak_gb"] = rec["peak_reserved_gb"] if "graph_pool_gb" in rec else torch.cuda.max_memory_allocated() / 1e9
        rec["peak_gb_incl_warmup"] = max(rec["peak_gb"], rec["peak_gb_load_and_warmup"])
        tokens = step_tokens * args.steps
        rec["elapsed_s"] = el
        rec["step_s"] = el / args.steps
        rec["tokens_per_s"] = tokens / el
        rec["tokens_per_s_median_step"] = step_tokens / (sorted(rec["step_ms"])[args.steps // 2] / 1e3)
        lv = [float(l) for l in losses]
        rec["loss_first"], rec["loss_last"] = lv[0], lv[-1]
        rec["loss_finite"] = all(math.isfinite(v) for v in lv)
        n, model_f, hw_f = flops_per_token(args.shape, attn_seq, args.ckpt != "off")
        rec["n_matmul_params"] = n
        rec["model_flops_per_token"] = model_f
        rec["hw_flops_per_token"] = hw_f
        peak = None
        if os.path.exists(args.peak_file):
            peak = json.load(open(args.peak_file))["tflops"]
        if peak:
            rec["peak_tflops"] = peak
            rec["achieved_model_tflops"] = rec["tokens_per_s"] * model_f / 1e12
            rec["mfu"] = rec["achieved_model_tflops"] / peak
            rec["hfu"] = rec["tokens_per_s"] * hw_f / 1e12 / peak
        lora_mod = sys.modules.get("gpu_worker.patching.lora")
        if args.quant == "nf4" and lora_mod is not None and hasattr(lora_mod, "_NF4_CHECKED"):
            # which dequantisation the patched model used, per weight kind (the fastest bit-equal
            # tuneforge_kernels.nf4 variant, else False: bitsandbytes), and each variant's time there
            rec["nf4_kernel_used"] = {str(k[:3]): v for k, v in lora_mod._NF4_CHECKED.items()}
            rec["nf4_variant_ms"] = {str(k[:3]): v for k, v in getattr(lora_mod, "_NF4_OUTCOMES", {}).items()}
        rec["error"] = None
    except _Done:
        pass
    except Exception as e:  # noqa: BLE001
        import torch
        is_oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        rec["error"] = ("OOM: " if is_oom else f"{type(e).__name__}: ") + str(e)[:600]
        rec["traceback"] = traceback.format_exc()[-3000:]
        try:
            rec["peak_gb_at_error"] = torch.cuda.max_memory_allocated() / 1e9
        except Exception:  # noqa: BLE001
            pass
        if "gpu" not in rec:
            rec.update(versions())
    rec["wall_s"] = round(time.time() - t_start, 1)
    print("RESULT " + json.dumps(rec), flush=True)


class _Done(Exception):
    """``longest`` finished and filled the record."""


def longest(args, model, opt, ac, rec):
    """One warm-up and one timed step (batch 1) at each length of the ladder until the first OOM."""
    import torch
    vocab = SHAPES[args.shape]["vocab_size"]
    rec["ladder"] = []
    for seq in [int(v) for v in args.ladder.split(",")]:
        x = torch.randint(0, vocab, (1, seq), device="cuda")
        entry = {"seq": seq}
        try:
            torch.cuda.reset_peak_memory_stats()
            for _ in range(1 + args.ladder_warmup):  # the warm-up step (if any), then the timed one
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with ac:
                    loss = model(input_ids=x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            entry.update(step_s=dt, warm=bool(args.ladder_warmup), tokens_per_s=seq / dt,
                         peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                         loss=float(loss))
            rec["longest_seq"] = seq
        except torch.OutOfMemoryError as e:
            entry["error"] = "OOM: " + str(e)[:200]
        finally:
            loss = None
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        rec["ladder"].append(entry)
        print("LADDER " + json.dumps(entry), flush=True)
        if "error" in entry:
            break
    rec.update(versions())
    rec["error"] = None


class _SyncLog:
    """The host syncs inside the block (torch.cuda.set_sync_debug_mode's warnings), counted by where our code or
    a library called the synchronizing op: the frames outside torch, innermost first."""

    def __init__(self):
        self.where = collections.Counter()

    def __enter__(self):
        import torch

        self._filters = warnings.catch_warnings()  # restores the filters and showwarning on exit
        self._filters.__enter__()
        self._show, warnings.showwarning = warnings.showwarning, self._record
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename][-3:]
        self.where[" <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames))] += 1

    def __exit__(self, *exc):
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self._filters.__exit__(*exc)
        return False

    def summary(self):
        return {"count": sum(self.where.values()), "where": dict(self.where.most_common(10))}


# ----------------------------------------------------------------------------- suite driver
def parse_spec(spec):
    # method:shape:ckpt[:quant[:batch[:data[:fp8[:dropout[:graphs[:attention]]]]]]]
    p = spec.split(":")
    d = {"method": p[0], "shape": p[1], "ckpt": p[2], "quant": "none", "batch": None, "data": "fixed"}
    if len(p) > 3 and p[3]:
        d["quant"] = p[3]
    if len(p) > 4 and p[4]:
        d["batch"] = int(p[4])
    if len(p) > 5 and p[5]:
        d["data"] = p[5]
    if len(p) > 6 and p[6]:  # ours only: the opt-in FP8 mode (e.g. ours:8B:off:::fixed:fp8)
        if p[6] != "fp8" or p[0] not in ("ours", "base"):
            raise SystemExit(f"config {spec!r}: the 7th field can only be 'fp8', for ours")
        d["fp8"] = True
    if len(p) > 7 and p[7]:  # every system: the adapters' dropout (e.g. unsloth:1B:off:::fixed::0.05)
        try:
            d["lora_dropout"] = float(p[7])
        except ValueError:
            raise SystemExit(f"config {spec!r}: the 8th field is the adapters' dropout, a number") from None
        if not 0 <= d["lora_dropout"] < 1:
            raise SystemExit(f"config {spec!r}: the adapters' dropout must be in [0, 1)")
    if len(p) > 8 and p[8]:  # ours only: CUDA graphs by the patcher's rule, always or never (run --graphs)
        if p[8] not in ("auto", "on", "off") or p[0] not in ("ours", "base"):
            raise SystemExit(f"config {spec!r}: the 9th field is ours' CUDA graphs: auto, on or off")
        d["graphs"] = p[8]
    if len(p) > 9 and p[9]:  # ours only: causal attention through SDPA or FlashAttention-4 (run --attention)
        if p[9] not in ("auto", "sdpa", "fa4") or p[0] not in ("ours", "base"):
            raise SystemExit(f"config {spec!r}: the 10th field is ours' attention: auto, sdpa or fa4")
        d["attention"] = p[9]
    return d


def expected_wall_s(d):
    """Wall time of one suite run, at least the longest seen in results/*.json (wall_s): the H200 call of
    2026-12-03 (ours 8B 25-33 s, 1B 19-20 s), the H100 calls of 2026-12-05 to 12-07 for Unsloth (it
    compiles each layer first: 8B 47-86 s with or without checkpointing, QLoRA 59-68 s; 1B 34-60 s, 55-99 s
    with adapter dropout). Session 38's suite skipped Unsloth's QLoRA row at 111 s left on the older 113 s
    guess, and the row then took 63."""
    if d["method"] == "unsloth":
        return {"8B": 90, "1B": 65}[d["shape"]] + (35 if d.get("lora_dropout") else 0)
    # adapter dropout: its kernels compile on a fresh machine (2026-12-05: ours 1B 61 s against 26 at 0)
    dropout = 35 if d.get("lora_dropout") else 0
    fa4 = 15 if d.get("attention") == "fa4" else 0  # its CuTe kernels compile in each process (H100: +9 to +15 s)
    return {"8B": 31, "1B": 23}[d["shape"]] + (6 if d["quant"] == "nf4" else 0) + dropout + fa4


def suite(args):
    t_end = time.time() + args.deadline_s
    here = os.path.abspath(__file__)
    results = []
    for spec in [s for s in args.configs.split(",") if s]:
        d = parse_spec(spec)
        batches = [d["batch"]] if d["batch"] else [args.batch, 1] if args.batch > 1 else [1]
        for bi, b in enumerate(batches):
            left = t_end - time.time()
            if left < expected_wall_s(d):  # a run cut off by the deadline is device time thrown away
                rec = {"kind": "train", **d, "batch": b,
                       "error": f"skipped: expected {expected_wall_s(d)} s, {left:.0f} s left"}
                print("RESULT " + json.dumps(rec), flush=True)
                results.append(rec)
                break
            cmd = [sys.executable, here, "run", "--shape", d["shape"], "--method", d["method"],
                   "--ckpt", d["ckpt"], "--quant", d["quant"], "--batch", str(b),
                   "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--autocast", args.autocast, "--peak-file", args.peak_file, "--data", d["data"],
                   "--base-root", args.base_root] + (["--fp8"] if d.get("fp8") else []) + (
                   ["--lora-dropout", str(d["lora_dropout"])] if d.get("lora_dropout") else []) + (
                   ["--graphs", d["graphs"]] if d.get("graphs") else []) + (
                   ["--attention", d["attention"]] if d.get("attention") else [])
            if d["method"] == "unsloth":
                path = os.path.join(args.model_root, f"rand-{d['shape']}")
                if not os.path.exists(os.path.join(path, "config.json")):
                    subprocess.run([sys.executable, here, "save", "--shape", d["shape"], "--path", path])
                cmd += ["--model-path", path]
            print(f"### {spec} batch={b} (time left {left:.0f}s)", flush=True)
            t0 = time.time()
            rec = None
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(left, args.per_run_s))
                lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                if lines:
                    rec = json.loads(lines[-1][7:])
                else:
                    rec = {"kind": "train", **d, "batch": b,
                           "error": f"no result, rc={p.returncode}: " + (p.stderr or "")[-1500:]}
                if args.log_dir:
                    with open(os.path.join(args.log_dir, "children.log"), "a") as f:
                        f.write(f"\n##### {spec} batch={b} rc={p.returncode}\n")
                        f.write(p.stdout[-20000:])
                        f.write("\n--- stderr ---\n" + p.stderr[-20000:])
            except subprocess.TimeoutExpired as e:
                rec = {"kind": "train", **d, "batch": b,
                       "error": f"timeout after {time.time() - t0:.0f}s",
                       "stderr_tail": (e.stderr or b"")[-1500:].decode("utf8", "replace")
                       if isinstance(e.stderr, bytes) else str(e.stderr)[-1500:]}
            rec.setdefault("spec", spec)
            results.append(rec)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            short = {k: rec.get(k) for k in ("method", "shape", "ckpt", "quant", "batch", "data",
                                              "lora_dropout", "tokens_per_s", "peak_gb", "mfu", "error")}
            print("SUMMARY " + json.dumps(short), flush=True)
            err = rec.get("error") or ""
            if not err.startswith("OOM"):
                break  # only OOM triggers the batch-1 retry
    print("\n%-8s %-3s %-7s %-4s %3s %-6s %10s %8s %6s %6s  %s" % (
        "method", "sh", "ckpt", "q", "B", "data", "tok/s", "peakGB", "MFU", "HFU", "error"))
    for r in results:
        print("%-8s %-3s %-7s %-4s %3s %-6s %10s %8s %6s %6s  %s" % (
            r.get("method"), r.get("shape"), r.get("ckpt"), r.get("quant"), r.get("batch"), r.get("data"),
            f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-",
            f"{r['peak_gb']:.2f}" if r.get("peak_gb") else "-",
            f"{r['mfu']:.3f}" if r.get("mfu") else "-",
            f"{r['hfu']:.3f}" if r.get("hfu") else "-",
            (r.get("error") or "")[:90]))
    if args.summary:
        write_summary(args, results)


def write_summary(args, results):
    peak = None
    if os.path.exists(args.peak_file):
        peak = json.load(open(args.peak_file))
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "git_commit": os.environ.get("GIT_COMMIT"),
               "versions": versions(), "bf16_matmul": peak, "seq": args.seq, "batch": args.batch,
               "warmup": args.warmup, "steps": args.steps, "configs": args.configs,
               "base_commit": os.environ.get("BASE_COMMIT"), "results": results}
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=1)


def _philox_rounds(rounds):
    """Adapter dropout's ``philox`` masks from ``rounds`` Philox4x32 rounds (dropout.py: 7, 10 before session
    32) in its kernels and in ``philox_keep``; before any of them compiles (the constexpr global is read at
    compile time)."""
    import triton.language as tl

    import tuneforge_kernels.dropout as dropout
    dropout._ROUNDS, dropout._ROUNDS_TL = rounds, tl.constexpr(rounds)
    # a cache of its own: a kernel compiled with the other count must not be reused
    os.environ["TRITON_CACHE_DIR"] = os.path.join(os.path.expanduser("~"), ".triton", f"cache-philox{rounds}")


def _keep_mlp_input(lora_mlp):
    """The LoRA MLP saves its input (the post-attention norm's output) for backward instead of recomputing it
    from the norm's input (rms_norm.NormRecipe): one norm pass a layer less in backward for (tokens x hidden)
    more memory a layer. lora_linear imported its own reference: Q/K/V keep recomputing theirs."""
    def x_for_saving(ctx, x, x2):
        ctx.recipe = None
        return (x2,)
    lora_mlp._x_for_saving = x_for_saving


# --glu-tile's kinds: the lora_glu tiles each sets (the launches with rank-r terms, and the padded MLP's without)
GLU_TILE_KINDS = {"terms": ("FWD_TILE", "BWD_TILE"), "fwd": ("FWD_TILE",), "bwd": ("BWD_TILE",),
                  "plain": ("PLAIN_FWD_TILE", "PLAIN_BWD_TILE"), "plain_fwd": ("PLAIN_FWD_TILE",),
                  "plain_bwd": ("PLAIN_BWD_TILE",)}


def _tile_arg(text: str) -> tuple[str, tuple[int, int, int]]:
    kind, _, spec = text.rpartition("=")
    kind = kind or "terms"
    try:
        rows, cols, warps = (int(v) for v in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--glu-tile wants [KIND=]rows,cols,warps (e.g. bwd=32,128,8), got {text!r}") from None
    if kind not in GLU_TILE_KINDS:
        raise argparse.ArgumentTypeError(f"--glu-tile: no kind {kind!r} (one of {', '.join(GLU_TILE_KINDS)})")
    return kind, (rows, cols, warps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["run", "suite", "matmul", "save", "flops", "longest"])
    ap.add_argument("--shape", choices=list(SHAPES), default="1B")
    ap.add_argument("--method", choices=["hf", "liger", "unsloth", "ours", "base"], default="hf")
    ap.add_argument("--ckpt", choices=["on", "off", "unsloth", "offload"], default="on")
    ap.add_argument("--quant", choices=["none", "nf4"], default="none")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--fp8", action="store_true",
                    help="ours: the frozen projections' GEMMs in FP8 (e4m3; the opt-in mode, not exact bf16); "
                         "records the first batch's loss in FP8 and in bf16")
    ap.add_argument("--fp8-fast-accum", action="store_true",
                    help="with --fp8: the forward GEMMs with cuBLASLt's fast accumulation (an A/B)")
    ap.add_argument("--lora-dropout", type=float, default=0.0,
                    help="the adapters' dropout (the issue's table: 0); above 0 our fused nodes compute the masks "
                         "from seeds, without padded weights")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--autocast", choices=["bf16", "none"], default="bf16")
    ap.add_argument("--model-dtype", choices=["bf16", "fp32"], default="bf16",
                    help="fp32: the bf16 random model widened (with --method hf --autocast none: the loss "
                         "curve bf16 runs approximate)")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--model-root", default="/tmp")
    ap.add_argument("--path", default=None)
    ap.add_argument("--peak-file", default=PEAK_FILE_DEFAULT)
    ap.add_argument("--configs", default="")
    ap.add_argument("--out", default="results.jsonl")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--deadline-s", type=float, default=540)
    ap.add_argument("--per-run-s", type=float, default=300)
    ap.add_argument("--summary", default=None, help="write a JSON summary (device, versions, commit) here")
    ap.add_argument("--join", choices=["auto", "off"], default="auto",
                    help="ours: join q/k/v and gate/up base weights by the patcher's rule, or never (an A/B)")
    ap.add_argument("--pad", choices=["auto", "on", "off", "mlp"], default="auto",
                    help="ours: the padded MLP and Q/K/V weights by the patcher's rules, both always, never, "
                         "or the MLP's only at any size (an A/B)")
    ap.add_argument("--padded-one-gemm", choices=["auto", "on", "off"], default="auto",
                    help="ours: the padded layouts' forward as one GEMM for gate+up and for q/k/v up to the "
                         "kernels' PADDED_ONE_GEMM_MAX_HIDDEN, always, or one GEMM per projection (an A/B)")
    ap.add_argument("--pad-align", type=int, default=None,
                    help="ours: the padded layouts' spare columns rounded up to this multiple instead of "
                         "tuneforge_kernels.lora_mlp.PAD_ALIGN (1: exactly the ranks; an A/B)")
    ap.add_argument("--gated-gemm", choices=["auto", "off"], default="auto",
                    help="ours: the padded MLP's SwiGLU in QuACK's GEMM epilogues where they run "
                         "(tuneforge_kernels.gated_gemm), or lora_glu's passes (an A/B)")
    ap.add_argument("--mlp-dx", choices=["carries", "first"], default="carries",
                    help="ours: the padded MLP's input-gradient GEMM gives the rank-r products s dgu B too, or "
                         "they are computed first and the GEMM carries their term (tuneforge_kernels.lora_mlp."
                         "DX_CARRIES_PRODUCTS; an A/B)")
    ap.add_argument("--glu-tile", action="append", default=None, type=_tile_arg,
                    help="ours: [KIND=]rows,cols,warps for lora_glu's launches instead of the module's tiles, "
                         "repeatable (an A/B); KIND: " + ", ".join(GLU_TILE_KINDS) + " (default terms: "
                         "FWD_TILE and BWD_TILE)")
    ap.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                    help="ours: replay the decoder layers as CUDA graphs by the patcher's rule, always or never")
    ap.add_argument("--attention", choices=["auto", "sdpa", "fa4"], default="auto",
                    help="ours: the patcher's rule (FlashAttention-4 for packed rows where it is installed), SDPA and "
                         "torch's variable-length kernel only, or FlashAttention-4's Hopper kernels for all causal "
                         "attention (bench/fa4_wheels.sh)")
    ap.add_argument("--cprofile", default=None, help="write cProfile stats of the timed steps here")
    ap.add_argument("--sync-debug", action="store_true",
                    help="record the host syncs of the timed steps (torch.cuda.set_sync_debug_mode): how many, "
                         "and where (the record's host_syncs)")
    ap.add_argument("--philox-rounds", type=int, default=0,
                    help="ours: Philox4x32 rounds for adapter dropout's masks instead of dropout.py's 7 (an A/B)")
    ap.add_argument("--keep-norm-output", choices=["none", "mlp"], default="none",
                    help="ours: the LoRA MLP saves its input instead of recomputing the norm in backward (an A/B)")
    ap.add_argument("--ce-rows", type=int, default=0,
                    help="ours/base: rows per fused-CE chunk instead of the kernel's rule (an experiment)")
    ap.add_argument("--data", choices=["fixed", "packed", "packed-rows", "flat", "padded"], default="fixed")
    ap.add_argument("--extra-copies", type=int, default=0,
                    help="an experiment: this many copies of an MLP-activation-sized tensor after each decoder "
                         "layer's forward (add_extra_copies)")
    ap.add_argument("--base-root", default=".bench-base",
                    help="method base: folder holding an older kernels/ and gpu_worker/ (git archive)")
    ap.add_argument("--ladder", default="16384,32768,65536,98304,131072",
                    help="mode longest: sequence lengths to try, ascending")
    ap.add_argument("--ladder-warmup", type=int, choices=[0, 1], default=1,
                    help="mode longest: 0 = one step per length, timed cold (whether it fits is all it "
                         "says: a 128K-token 8B step takes ~30 s)")
    args = ap.parse_args()
    if args.pad_align is not None and args.pad_align < 1:
        ap.error(f"--pad-align: a multiple of at least 1, got {args.pad_align}")
    if args.mode == "longest":
        args.batch, args.seq = 1, max(int(v) for v in args.ladder.split(","))  # Unsloth's max_seq_length
        run_one(args)
    elif args.mode == "run":
        run_one(args)
    elif args.mode == "suite":
        suite(args)
    elif args.mode == "matmul":
        bench_matmul(out=args.peak_file)
    elif args.mode == "save":
        save_random(args.shape, args.path)
    elif args.mode == "flops":
        for sh in SHAPES:
            for ck in (False, True):
                print(sh, ck, flops_per_token(sh, args.seq, ck))


if __name__ == "__main__":
    main()
