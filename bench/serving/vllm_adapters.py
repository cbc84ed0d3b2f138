"""vLLM tokens/s on an 8B-shaped model with 0 (base), 1 and 32 distinct LoRA adapters in the same load.

Runs on the H200 machine through ``bench/serving/vllm_device.sh`` (no network there: vLLM and its missing
requirements travel as a packed site folder, ``deploy/vllm/fetch_wheels.sh``). Everything
is generated on the device: a randomly initialised Llama-3-8B-shaped model (bf16 safetensors, ~16 GB
of disk) and ``--adapters`` random rank-``--rank`` LoRA adapters on q/k/v/o in PEFT's format. vLLM's
offline engine (``vllm.LLM``) runs without a tokenizer (prompts are random token ids, generation
ignores EOS), so every run generates exactly ``requests x tokens`` tokens.

    python bench/serving/vllm_adapters.py --workdir /tmp/vllm-bench --out $OUT/serving-vllm-adapters.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

# 8B shape (Llama 3 8B): what the issue asks the 1-vs-32 comparison on.
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(**SHAPE, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (16 GB), not fp32 and then cast
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)  # random init on the GPU: seconds, not minutes
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return folder


def make_adapters(model_dir: Path, out: Path, n: int, rank: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    head_dim = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    out_features = {"q_proj": SHAPE["hidden_size"], "k_proj": SHAPE["num_key_value_heads"] * head_dim,
                    "v_proj": SHAPE["num_key_value_heads"] * head_dim, "o_proj": SHAPE["hidden_size"]}
    folders = []
    for i in range(n):
        folder = out / f"a{i}"
        folders.append(folder)
        if (folder / "adapter_model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(i)
        weights = {}
        for layer in range(SHAPE["num_hidden_layers"]):
            for module in TARGETS:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                weights[f"{prefix}.lora_A.weight"] = (torch.randn(rank, SHAPE["hidden_size"], generator=gen) * 0.01).to(torch.bfloat16)
                weights[f"{prefix}.lora_B.weight"] = (torch.randn(out_features[module], rank, generator=gen) * 0.01).to(torch.bfloat16)
        save_file(weights, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(TARGETS),
            "base_model_name_or_path": str(model_dir), "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
        }))
    return folders


def run(llm, prompts, params, loras) -> dict:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"generated_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/vllm-bench")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs (starts in seconds; slower decode)")
    parser.add_argument("--prepare-only", action="store_true", help="write the model and adapters, then exit (a process of its own, so vLLM starts on a GPU nobody else holds)")
    args = parser.parse_args()
    if args.prepare_only:
        work = Path(args.workdir)
        make_adapters(make_model(work / "llama-8b-shaped"), work / "adapters", args.adapters, args.rank)
        return

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    work = Path(args.workdir)
    model_dir = make_model(work / "llama-8b-shaped")
    folders = make_adapters(model_dir, work / "adapters", args.adapters, args.rank)
    llm = LLM(
        model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=args.prompt_tokens + args.tokens + 16,
        enable_lora=True, max_lora_rank=args.rank, max_loras=args.adapters, max_cpu_loras=args.adapters,
        gpu_memory_utilization=0.85, seed=0, enforce_eager=args.enforce_eager,
    )
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 100000) for _ in range(args.prompt_tokens)]) for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    lora = [LoRARequest(f"a{i}", i + 1, str(folder)) for i, folder in enumerate(folders)]
    configs = {"0": None, "1": [lora[0]] * args.requests, str(args.adapters): [lora[i % args.adapters] for i in range(args.requests)]}
    run(llm, prompts[:8], params, [lora[i % args.adapters] for i in range(8)])  # warm-up: compile, load every adapter
    results: dict[str, list[dict]] = {k: [] for k in configs}
    for _ in range(args.rounds):  # interleaved, median kept
        for name, loras in configs.items():
            results[name].append(run(llm, prompts, params, loras))
    summary = {}
    for name, rounds in results.items():
        median = sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]
        summary[name] = {**median, "all_rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds]}
    for r in summary.values():
        r["relative_to_base"] = round(r["tokens_per_s"] / summary["0"]["tokens_per_s"], 3)
    import torch

    out = {
        "bench": "vllm_adapters", "vllm": vllm.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
        "model": "random Llama-3-8B-shaped, bf16", "requests": args.requests, "prompt_tokens": args.prompt_tokens,
        "new_tokens_per_request": args.tokens, "lora_rank": args.rank, "targets": list(TARGETS), "results": summary,
        "cpus": os.cpu_count(), "enforce_eager": args.enforce_eager, "rounds": args.rounds,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
