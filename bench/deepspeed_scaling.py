"""The multi-GPU (DeepSpeed) worker against the single-GPU worker: tokens/s on 1, 2, 4... GPUs and
the loss curve of each run against the single-GPU run of the same job.

Every run is the real trainer (``python -m gpu_worker.train``, a JobSpec on stdin, JobEvents read
from stdout), as the worker agent runs it; the DeepSpeed runs carry ``runtime.distributed`` and so
go through torchrun, one rank per GPU. The job is the same in every run: same data, seed and
global batch (``batch_size × gradient_accumulation_steps`` examples a step, shared by the ranks).

    python3 bench/deepspeed_scaling.py --gpus 1,2,4 --out $OUT/deepspeed_scaling.json

Cases (``--cases``): ``lora`` (ZeRO-2, the adapter over a bf16 base) and ``full`` (ZeRO-3, full
fine-tuning in bf16 with fp32 master weights), ``full-offload`` (ZeRO-3 with the optimizer in host
memory: DeepSpeed's CPU Adam, built with ninja on first use). The reference for each case is the
single-GPU worker (plain PyTorch, stock HF path: the DeepSpeed worker does not use the Triton
kernels). The model is a random-weight Llama built here (no downloads), ~0.45B parameters by
default; data is synthetic text (loss on every token), ``--seq`` tokens an example.

On the device (nothing can be fetched there): DeepSpeed travels as a wheel with hjson, pydantic as
the wheels in ``.whl`` (both folders git-ignored, carried)::

    .venv/bin/pip wheel --no-deps deepspeed -w .whl-ds      # a py3-none-any wheel, ~7 s
    .venv/bin/pip download --no-deps --only-binary=:all: -d .whl-ds hjson==3.1.0
    # run(kind="nvidia-h200-x4", carry=[".whl", ".whl-ds"], command=...):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl .whl-ds/*.whl && export PYTHONPATH=/tmp/site || exit
    export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 GIT_COMMIT=<sha>
    python3 bench/deepspeed_scaling.py --gpus 1,2,4 --cases lora,full,full-offload --out $OUT/deepspeed_scaling.json
    python3 -m pytest -q -p no:cacheprovider --confcutdir=tests/gpu_worker tests/gpu_worker/test_distributed_gpu.py

Results: per run, the step losses, tokens/s (median over the steps after ``--warmup``), peak GPU
memory; per case, scaling efficiency ``tokens/s(n) / (n × tokens/s(1 rank))`` and the largest
relative loss difference against the single-GPU run; device, versions and the git commit
(``GIT_COMMIT`` or ``git rev-parse``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # kernels/ holds tuneforge_kernels

CASES = {
    "lora": {"adapter": "lora", "zero_stage": 2, "offload": False},
    "full": {"adapter": "full", "zero_stage": 3, "offload": False},
    "full-offload": {"adapter": "full", "zero_stage": 3, "offload": True},
}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "deepspeed", "transformers", "peft", "safetensors"):
        try:
            out[name] = md.version(name)
        except Exception:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_count"] = torch.cuda.device_count()
    return out


def commit() -> str | None:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None


def build_model(folder: Path, hidden: int, layers: int, intermediate: int) -> None:
    """A random-weight Llama (bf16) with the built-in tokenizer, saved as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_worker.builtin import build_tokenizer

    if (folder / "config.json").exists():
        return
    tokenizer = build_tokenizer(2048)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(hidden // 512, 1), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_data(store_root: Path, examples: int, words: int) -> str:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)] + ["the", "a", "of", "and", "to", "in"]
    lines = [json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) for _ in range(examples)]
    key = "files/bench.jsonl"
    (store_root / "files").mkdir(parents=True, exist_ok=True)
    (store_root / key).write_text("\n".join(lines) + "\n")
    return key


def make_spec(args, case: str, ranks: int, model_dir: Path, key: str):
    from gpu_worker.contract import (AdapterConfig, DataFormat, DataOptions, Distributed, EvalOptions, Hyperparameters, JobSpec,
                                     Runtime)

    c = CASES[case]
    placement = None
    if ranks:
        placement = Distributed(gpus_per_node=ranks, zero_stage=c["zero_stage"], offload_optimizer=c["offload"], micro_batch_size=args.micro)
    return JobSpec(
        job_id=f"bench-{case}-{ranks}", org_id="bench", base_model=str(model_dir), seed=1, training_file_key=key,
        output_prefix=f"bench/{case}-{ranks}", data=DataOptions(format=DataFormat.text, dedupe=False),
        hyperparameters=Hyperparameters(n_epochs=1, batch_size=args.micro, gradient_accumulation_steps=args.batch // args.micro,
                                        learning_rate=1e-4 if c["adapter"] == "lora" else 1e-5, max_seq_length=args.seq),
        adapter=AdapterConfig(type=c["adapter"], rank=16, alpha=32.0),
        evaluation=EvalOptions(gate=False, keep_best=False, exact_match=False),
        runtime=Runtime(use_kernels=False, dtype="bfloat16", checkpoint_every_steps=10_000, distributed=placement),
    )


def run_trainer(spec, store_root: Path, data_dir: Path, log_path: Path, timeout: float) -> dict:
    from gpu_worker.contract import CompletedEvent, FailedEvent, MetricsEvent, parse_event

    env = dict(os.environ, TUNEFORGE_STORAGE_URL=str(store_root), TUNEFORGE_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gpu_worker.train"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT)
        proc.stdin.write((spec.model_dump_json() + "\n").encode())
        proc.stdin.flush()
        metrics, result = [], None
        for line in proc.stdout:
            event = parse_event(line)
            if isinstance(event, MetricsEvent):
                metrics.append(event)
            elif isinstance(event, (CompletedEvent, FailedEvent)):
                result = event
        code = proc.wait(timeout)
        proc.stdin.close()
    return {"code": code, "wall_s": round(time.perf_counter() - started, 1), "metrics": metrics,
            "result": result.type if result is not None else None,
            "failure": result.message if result is not None and result.type == "failed" else None}


def summarise(run: dict, warmup: int) -> dict:
    m = run.pop("metrics")
    tps = [e.tokens_per_second for e in m[warmup:] if e.tokens_per_second]
    mem = [e.gpu_memory_gb for e in m if e.gpu_memory_gb is not None]
    return {**run, "steps": len(m), "losses": [round(e.train_loss, 6) for e in m],
            "tokens_per_s": round(statistics.median(tps), 1) if tps else None, "peak_gpu_memory_gb": round(max(mem), 2) if mem else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1", help="comma-separated rank counts for the DeepSpeed runs (each <= the GPUs present)")
    ap.add_argument("--cases", default="lora,full", help=f"of {','.join(CASES)}")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="examples an optimizer step (global, the same for every run)")
    ap.add_argument("--micro", type=int, default=4, help="examples a forward pass on one GPU")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ds-bench"))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model_dir, store_root, data_dir = args.work / "model", args.work / "objects", args.work / "data"
    build_model(model_dir, args.hidden, args.layers, args.intermediate)
    # Enough examples for --steps steps; words ≈ tokens + a few, so every example fills --seq.
    key = write_data(store_root, args.steps * args.batch, args.seq)
    # On a machine without CUDA the ranks are CPU processes (a smoke test of the script, not a measurement).
    gpus = [int(n) for n in args.gpus.split(",") if n and (not torch.cuda.is_available() or int(n) <= torch.cuda.device_count())]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "git_commit": commit(), "versions": versions(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "cases": {}}
    references: dict[str, dict] = {}  # the single-GPU worker's run, per adapter type (offload changes nothing there)
    for case in args.cases.split(","):
        runs = {}
        for ranks in [0, *gpus]:  # 0: the single-GPU worker
            name = "single-gpu-worker" if ranks == 0 else f"deepspeed-{ranks}"
            if ranks == 0 and CASES[case]["adapter"] in references:
                runs[name] = references[CASES[case]["adapter"]]
                continue
            spec = make_spec(args, case, ranks, model_dir, key)
            runs[name] = summarise(run_trainer(spec, store_root, data_dir, args.out.parent / f"{case}-{name}.log", args.timeout), args.warmup)
            print(case, name, {k: v for k, v in runs[name].items() if k != "losses"}, flush=True)
        references.setdefault(CASES[case]["adapter"], runs["single-gpu-worker"])
        ref = runs["single-gpu-worker"]
        one = runs.get("deepspeed-1", {}).get("tokens_per_s")
        for ranks in gpus:
            r = runs[f"deepspeed-{ranks}"]
            if r["losses"] and ref["losses"] and len(r["losses"]) == len(ref["losses"]):
                r["max_rel_loss_diff_vs_single_gpu"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
            if one and r["tokens_per_s"]:
                r["scaling_efficiency"] = round(r["tokens_per_s"] / (ranks * one), 3)
        report["cases"][case] = runs
        args.out.write_text(json.dumps(report, indent=1))  # after each case: a timeout keeps what ran
    print(json.dumps({c: {n: {k: r.get(k) for k in ("tokens_per_s", "max_rel_loss_diff_vs_single_gpu", "scaling_efficiency", "peak_gpu_memory_gb", "wall_s", "result")}
                          for n, r in runs.items()} for c, runs in report["cases"].items()}, indent=1))


if __name__ == "__main__":
    main()
