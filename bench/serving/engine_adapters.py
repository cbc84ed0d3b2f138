"""Built-in engine throughput with 0 (base only), 1, 8 and 32 distinct LoRA adapters in the same load.

The built-in tiny model (``tuneforge-tiny``) served by ``ServedModels`` in-process (no HTTP: this measures
the engine's batching, not the network). Each run submits the same ``--requests`` concurrent greedy
requests of ``--tokens`` new tokens; request i uses adapter i mod N (N = 0: the base). The adapters are
rank-16 LoRA on q/k/v/o with random non-zero weights. Reported: generated tokens/s, the ratio to the
base, and the engine's batch statistics (rows per forward, forwards mixing adapters).

    python bench/serving/engine_adapters.py --out bench/results/serving-engine-adapters.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def _adapters(model_dir: Path, out: Path, n: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    from gpu_worker.loading import load_base_model

    folders = []
    for i in range(n):
        model, _ = load_base_model(str(model_dir), data_dir=model_dir.parent, device="cpu")
        torch.manual_seed(i)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.02)
        peft_model.save_pretrained(out / f"a{i}")
        folders.append(out / f"a{i}")
    return folders


async def _run(models, names: list[str | None], prompt_ids: list[int], tokens: int) -> tuple[int, float]:
    from gpu_worker.engine.sampling import SamplingParams

    async def one(name):
        target = models.resolve(name or models_base(models))
        stream = models.submit(target, prompt_ids, SamplingParams(max_tokens=tokens, temperature=0.0))
        count = 0
        async for delta in stream:
            count = delta.completion_tokens
            if delta.final:
                break
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(n) for n in names))
    return sum(counts), time.perf_counter() - start


def models_base(models) -> str:
    return next(iter(models.bases))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from gpu_worker.builtin import ensure_builtin
    from gpu_worker.engine.models import ServedModels
    from gpu_worker.engine.settings import EngineSettings

    tmp = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    model_dir = ensure_builtin("tuneforge-tiny", tmp)
    folders = _adapters(model_dir, tmp / "adapters", 32, args.rank)
    settings = EngineSettings(models=["tuneforge-tiny"], data_dir=tmp, device="cpu", max_loras=32, max_lora_rank=64, max_batch_size=args.requests)
    models = ServedModels(settings)
    models.start()
    try:
        for i, folder in enumerate(folders):
            models.load_adapter(f"a{i}", str(folder))
        tokenizer = models.bases[models_base(models)].runner.tokenizer
        prompt_ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 2)["input_ids"]
        asyncio.run(_run(models, [None] * 4, prompt_ids, 4))  # warm-up
        # The machine is shared: configurations are interleaved over rounds and the median round kept,
        # so a burst of someone else's load does not land on one configuration only.
        runs: dict[int, list[dict]] = {0: [], 1: [], 8: [], 32: []}
        stats = models.bases[models_base(models)].runner.stats
        for _ in range(args.rounds):
            for n in runs:
                names = [None if n == 0 else f"a{i % n}" for i in range(args.requests)]
                before = (stats.forward_passes, stats.mixed_passes)
                generated, seconds = asyncio.run(_run(models, names, prompt_ids, args.tokens))
                runs[n].append({
                    "adapters": n,
                    "generated_tokens": generated,
                    "seconds": round(seconds, 3),
                    "tokens_per_s": round(generated / seconds, 1),
                    "forward_passes": stats.forward_passes - before[0],
                    "mixed_adapter_passes": stats.mixed_passes - before[1],
                })
        results = {}
        for n, rounds in runs.items():
            median = sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]
            results[str(n)] = {**median, "all_rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds]}
        base = results["0"]["tokens_per_s"]
        for r in results.values():
            r["relative_to_base"] = round(r["tokens_per_s"] / base, 3)
    finally:
        models.stop()
    out = {
        "bench": "engine_adapters",
        "model": "tuneforge-tiny (built-in)",
        "requests": args.requests,
        "new_tokens_per_request": args.tokens,
        "lora_rank": args.rank,
        "results": results,
        "goal": "32 adapters >= 0.7x base",
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "loadavg_after": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version()},
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
