"""The vLLM engine configuration a Tuneforge replica runs with, derived from the platform's limits:
``--enable-lora``, ``--max-lora-rank`` (the smallest rank vLLM accepts that holds the serving limit),
``--max-loras`` (adapters batched together on the GPU) and ``--max-cpu-loras`` (the LRU of adapters kept
in host memory), and the environment that enables runtime loading and the resolver plugin.

``python -m serving.vllm_plugin.config`` prints the arguments and environment for a deployment script.
"""

from __future__ import annotations

import json
import sys

from serving.vllm_plugin.index import CACHE_MAX_BYTES_ENV, DEFAULT_CACHE_MAX_BYTES

# The ranks vLLM's LoRA kernels are compiled for (vllm.config.lora: max_lora_rank must be one of them).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(serving_limit: int) -> int:
    for rank in VLLM_LORA_RANKS:
        if rank >= serving_limit:
            return rank
    raise ValueError(f"serving rank limit {serving_limit} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


def vllm_args(model: str, *, max_lora_rank: int, max_loras: int = 32, max_cpu_loras: int | None = None, served_name: str | None = None) -> list[str]:
    if max_loras < 1:
        raise ValueError("max_loras must be at least 1")
    cpu = max_cpu_loras if max_cpu_loras is not None else 4 * max_loras
    if cpu < max_loras:
        raise ValueError("max_cpu_loras must be at least max_loras (vLLM refuses otherwise)")
    args = ["--model", model, "--enable-lora", f"--max-lora-rank={vllm_max_lora_rank(max_lora_rank)}", f"--max-loras={max_loras}", f"--max-cpu-loras={cpu}"]
    if served_name:
        args += ["--served-model-name", served_name]
    return args


def vllm_env(storage_url: str, base_model: str, cache_dir: str = "/var/cache/tuneforge-loras", cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES) -> dict[str, str]:
    if cache_max_bytes < 1:
        raise ValueError("cache_max_bytes must be at least 1")
    return {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # /v1/load_lora_adapter and the resolver
        "VLLM_PLUGINS": "tuneforge_lora_resolver",
        "TUNEFORGE_STORAGE_URL": storage_url,
        "TUNEFORGE_LORA_CACHE_DIR": cache_dir,
        CACHE_MAX_BYTES_ENV: str(cache_max_bytes),  # the resolver cache's bound (serving.vllm_plugin.index)
        "TUNEFORGE_BASE_MODEL": base_model,  # the index names adapters' bases by the platform's name
    }


if __name__ == "__main__":  # pragma: no cover - a thin CLI over the functions above
    from serving.settings import get_serving_settings

    settings = get_serving_settings()
    model = sys.argv[1] if len(sys.argv) > 1 else settings.base_models[0]
    print(json.dumps({"args": vllm_args(model, max_lora_rank=settings.max_lora_rank, served_name=model), "env": vllm_env(settings.storage_url, model)}, indent=2))
