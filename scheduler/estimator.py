"""How much GPU memory and time a job needs, before it runs.

Three parts, all torch-free (the API and scheduler import this):
- ``ModelFacts``: a base model's shape from its ``config.json`` (read with ``json``: the built-in
  models, a local folder, the Hugging Face cache, or a table of well-known hub configs for a control
  plane that has never downloaded them);
- ``estimate_memory``: peak allocated bytes per GPU for a layout (GPU count, ZeRO stage and offload,
  quantization, memory mode, micro-batch), as a sum of named parts: weights, trainable parameters with
  their gradients and AdamW states, activations per token for the memory mode, the logits/loss buffer,
  a reference model and a generation cache where the method needs them;
- ``estimate_throughput``: tokens/s from the measured table in ``bench/results/*.json`` (achieved model
  TFLOP/s per quantization and memory mode, scaled by the job model's FLOPs per token and the GPU
  class's peak), with stated conservative fallbacks where nothing was measured.

The activation constants were fitted to the kernel worker's measured peaks (bench/results,
2026-11-22, H100): see tests/scheduler/test_estimator.py for predicted vs measured. Throughput uses
the newest measurement of each configuration (the kernels get faster between benchmark runs).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from gpu_worker.contract import AdapterType, DType, JobSpec, Method, Quantization

# Must match gpu_worker.patching.SUPPORTED (a test reads that file; importing it would pull in torch).
KERNEL_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")

GB = 1e9
# NF4 with double quantization: 4 bits + an 8-bit absmax per 64 weights + an fp32 per 256 absmaxes.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
# Trainable fp32 parameter + its fp32 gradient + AdamW's two fp32 moments.
ADAM_TRAINABLE_BYTES = 16
# What a GPU gives a job: the rest is the CUDA context, cuBLAS/NCCL workspaces and fragmentation
# (the bench saw reserved ≈ allocated × 1.02–1.07).
USABLE_FRACTION = 0.90
# Saved activations per token per decoder layer, in elements of the compute dtype, fitted on measured
# peaks (bench/results, H100, 4 × 2048 tokens). Kernel worker at commit c00769b ("v3": fused LoRA
# Q/K/V/O and MLP, norms recomputed, chunked fused cross-entropy), memory mode off, 1B and 8B:
# 3.2h + 2.4i (earlier kernels saved more: v1 6h + 3i). Stock HF+PEFT, 1B: 12h + 5i plus
# materialised fp32 logits (see _logits_bytes). Re-fit when the kernels change what they save.
KERNEL_ACT = (3.2, 2.4)
STOCK_ACT = (12, 5)


class UnknownModel(LookupError):
    """No config.json could be found for a base model."""


@dataclass(frozen=True)
class ModelFacts:
    name: str
    architecture: str  # config.json "model_type"
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool

    @property
    def layer_linear_params(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        attn = h * self.num_heads * hd * 2 + h * self.num_kv_heads * hd * 2
        return self.num_layers * (attn + 3 * h * self.intermediate_size)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def params(self) -> int:
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.layer_linear_params + self.embedding_params + norms

    @property
    def matmul_params(self) -> int:
        """Parameters in a matmul per token (the lm_head is one even when tied): FLOPs ≈ 2 × this."""
        return self.layer_linear_params + self.vocab_size * self.hidden_size

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        h, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        return {
            "q_proj": (h, self.num_heads * hd), "k_proj": (h, self.num_kv_heads * hd),
            "v_proj": (h, self.num_kv_heads * hd), "o_proj": (self.num_heads * hd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }


def facts_from_config(name: str, config: dict) -> ModelFacts:
    cfg = config.get("text_config") or config  # multimodal wrappers keep the LM's config inside
    try:
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelFacts(
            name=name,
            architecture=str(config.get("model_type") or cfg.get("model_type") or "unknown"),
            hidden_size=h,
            num_layers=int(cfg["num_hidden_layers"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads),
            vocab_size=int(cfg["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise UnknownModel(f"config.json of {name!r} has no {e.args[0]!r}") from None


def _cfg(arch, h, layers, i, heads, kv, vocab, tie, head_dim=None) -> dict:
    return {"model_type": arch, "hidden_size": h, "num_hidden_layers": layers, "intermediate_size": i,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tie, **({"head_dim": head_dim} if head_dim else {})}


# The published config.json fields of common base models, so that a control plane with no hub access
# can plan them. Instruct variants share their base's shape ("-Instruct" is stripped before lookup).
KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-3.2-1B": _cfg("llama", 2048, 16, 8192, 32, 8, 128256, True),
    "meta-llama/Llama-3.2-3B": _cfg("llama", 3072, 28, 8192, 24, 8, 128256, True),
    "meta-llama/Llama-3.1-8B": _cfg("llama", 4096, 32, 14336, 32, 8, 128256, False),
    "meta-llama/Meta-Llama-3-8B": _cfg("llama", 4096, 32, 14336, 32, 8, 128256, False),
    "meta-llama/Llama-3.1-70B": _cfg("llama", 8192, 80, 28672, 64, 8, 128256, False),
    "mistralai/Mistral-7B-v0.3": _cfg("mistral", 4096, 32, 14336, 32, 8, 32768, False),
    "Qwen/Qwen2.5-0.5B": _cfg("qwen2", 896, 24, 4864, 14, 2, 151936, True),
    "Qwen/Qwen2.5-7B": _cfg("qwen2", 3584, 28, 18944, 28, 4, 152064, False),
    "Qwen/Qwen2.5-72B": _cfg("qwen2", 8192, 80, 29568, 64, 8, 152064, False),
    "Qwen/Qwen3-8B": _cfg("qwen3", 4096, 36, 12288, 32, 8, 151936, False, head_dim=128),
    "google/gemma-2-9b": _cfg("gemma2", 3584, 42, 14336, 16, 8, 256000, True, head_dim=256),
    "microsoft/Phi-3-mini-4k-instruct": _cfg("phi3", 3072, 32, 8192, 32, 32, 32064, False),
    "ibm-granite/granite-3.0-8b-base": _cfg("granite", 4096, 40, 12800, 32, 8, 49155, True),
}


# gpu_worker.builtin.BUILTIN_MODELS, repeated: that module imports torch lazily, which the control
# plane may not even lazily (a test checks the two agree).
BUILTIN_CONFIGS: dict[str, dict] = {"tuneforge-tiny": _cfg("llama", 256, 4, 688, 4, 4, 2048, False)}


def _hf_cache_config(repo_id: str) -> Path | None:
    home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    hits = sorted(glob.glob(str(home / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "*" / "config.json")))
    return Path(hits[-1]) if hits else None


def read_model_facts(base_model: str) -> ModelFacts:
    """A base model's facts, from the first source that has its config.json."""
    if base_model in BUILTIN_CONFIGS:
        return facts_from_config(base_model, BUILTIN_CONFIGS[base_model])
    local = Path(base_model) / "config.json"
    path = local if local.is_file() else _hf_cache_config(base_model)
    if path is not None:
        return facts_from_config(base_model, json.loads(path.read_text()))
    key = base_model.removesuffix("-Instruct")
    if key in KNOWN_CONFIGS:
        return facts_from_config(base_model, KNOWN_CONFIGS[key])
    raise UnknownModel(f"no config.json for {base_model!r} (not built in, not a local folder, not in the hub cache)")


# --- memory ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a job is laid out on hardware: what the planner varies."""

    gpu_count: int = 1
    zero_stage: int | None = None  # None: plain single-process training; 2 or 3: DeepSpeed ZeRO
    offload: bool = False  # optimizer states (and fp32 master weights) in host memory
    memory_mode: str = "off"
    micro_batch: int = 1


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes per GPU, by component

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def gb(self) -> float:
        return self.total / GB


def uses_kernels(spec: JobSpec, facts: ModelFacts, zero_stage: int | None = None) -> bool:
    """Whether the job trains through the Triton kernels: the single-GPU worker patches the supported
    architectures; the DeepSpeed worker is planned as the stock HF path (the conservative case)."""
    return spec.runtime.use_kernels and facts.architecture in KERNEL_ARCHITECTURES and zero_stage is None


def fp8_copies(spec: JobSpec, facts: ModelFacts, layout: Layout) -> bool:
    """Whether the worker keeps FP8 copies of the frozen projections (``runtime.fp8``): adapters on the
    single-GPU kernel path over bf16 (not 4-bit) weights, in memory mode off or checkpointing. The throughput estimate stays the bf16
    measurement's: planning with less overpromises less."""
    return (spec.runtime.fp8 and uses_kernels(spec, facts, layout.zero_stage) and layout.memory_mode != "offload"
            and spec.adapter.type != AdapterType.full and spec.quantization == Quantization.none)


def trainable_params(spec: JobSpec, facts: ModelFacts) -> int:
    if spec.adapter.type == AdapterType.full:
        return facts.params
    shapes = facts.target_shapes()
    per_layer = sum(spec.adapter.rank * (i + o) + (o if spec.adapter.type == AdapterType.dora else 0)
                    for i, o in (shapes[t.value] for t in spec.adapter.target_modules))
    return per_layer * facts.num_layers


def sequences_per_example(spec: JobSpec) -> int:
    """Sequences one example becomes in a forward pass: chosen + rejected, KTO's KL pair, GRPO's group."""
    if spec.method in (Method.dpo, Method.ipo, Method.orpo, Method.simpo, Method.kto):
        return 2
    if spec.method == Method.grpo:
        return spec.method_params.grpo_num_generations
    return 1


def _needs_reference(spec: JobSpec) -> bool:
    return spec.method in (Method.dpo, Method.ipo, Method.kto, Method.grpo)


def _compute_bytes(spec: JobSpec) -> int:
    return 4 if spec.runtime.dtype == DType.float32 else 2


def _activation_bytes(spec, facts, layout, tokens, kernels) -> float:
    a, b = KERNEL_ACT if kernels else STOCK_ACT
    e = _compute_bytes(spec)
    per_layer = (a * facts.hidden_size + b * facts.intermediate_size) * e * tokens
    layer_input = facts.hidden_size * e * tokens
    if layout.memory_mode == "off":
        return per_layer * facts.num_layers
    if layout.memory_mode == "checkpointing":  # every layer's input kept, one layer recomputed at a time
        return layer_input * facts.num_layers + per_layer
    return 2 * layer_input + per_layer  # offload: layer inputs in host memory, two in flight


def _logits_bytes(spec, facts, tokens, kernels) -> float:
    if kernels:  # chunked fused linear + cross-entropy: logits about the size of the hidden states
        return 3 * facts.hidden_size * 4 * tokens
    # bf16 logits, their fp32 upcast, the fp32 softmax gradient and the bf16 gradient
    return facts.vocab_size * (2 + 4 + 4 + 2) * tokens


def estimate_memory(spec: JobSpec, facts: ModelFacts, layout: Layout) -> MemoryEstimate:
    n = layout.gpu_count
    e = _compute_bytes(spec)
    kernels = uses_kernels(spec, facts, layout.zero_stage)
    full = spec.adapter.type == AdapterType.full
    other = facts.params - facts.layer_linear_params
    if spec.quantization == Quantization.nf4:
        weights = facts.layer_linear_params * NF4_BYTES_PER_PARAM + other * 2
        # one layer's largest weight dequantized to bf16 for the matmul
        weights += max(i * o for i, o in facts.target_shapes().values()) * 2
    elif fp8_copies(spec, facts, layout):
        # the projections' bf16 weights wait in pinned host memory (estimate_host_memory), their e4m3 copies
        # (below) compute
        weights = (facts.params - facts.layer_linear_params) * e
    else:
        weights = facts.params * e
    if _input_embedding_on_host(spec, facts, layout):  # kept in bf16 there (estimate_host_memory)
        weights -= facts.vocab_size * facts.hidden_size * e
    parts: dict[str, float] = {}
    if full:
        # DeepSpeed mixed precision: bf16 weights and gradients, fp32 master weights + AdamW moments.
        states = facts.params * (4 + 8)
        grads = facts.params * e
        shard_w = n if layout.zero_stage == 3 else 1
        shard_g = n if (layout.zero_stage or 0) >= 2 else 1
        parts["weights"] = weights / shard_w
        parts["gradients"] = grads / shard_g
        parts["optimizer"] = 0.0 if layout.offload else states / (n if layout.zero_stage else 1)
        if _needs_reference(spec):
            parts["reference_model"] = facts.params * e / shard_w
    else:
        parts["weights"] = weights / (n if layout.zero_stage == 3 else 1)
        shard = n if layout.zero_stage else 1
        parts["adapter_and_optimizer"] = trainable_params(spec, facts) * ADAM_TRAINABLE_BYTES / shard
    seq = spec.hyperparameters.max_seq_length
    if spec.method == Method.grpo:
        seq += spec.method_params.grpo_max_completion_length
        cache_tokens = layout.micro_batch * sequences_per_example(spec) * seq
        parts["generation_cache"] = 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * e * cache_tokens
    if fp8_copies(spec, facts, layout):
        # the e4m3 copy of every frozen projection, one byte a parameter (tuneforge_kernels/fp8.py); the row
        # scales are 4 bytes per output row
        parts["fp8_weight_copies"] = float(facts.layer_linear_params)
    tokens = layout.micro_batch * sequences_per_example(spec) * seq
    # full fine-tuning trains its projections on their stock forwards (the fused LoRA nodes take frozen
    # weights only): stock activations, the fused loss's logits
    parts["activations"] = _activation_bytes(spec, facts, layout, tokens, kernels and not full)
    parts["logits"] = _logits_bytes(spec, facts, tokens, kernels)
    return MemoryEstimate(parts)


def _pinned(nbytes: int) -> int:
    """What torch's pinned host allocator takes for ``nbytes``: a block rounded up to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def estimate_host_memory(spec: JobSpec, facts: ModelFacts, layout: Layout) -> float:
    """Pinned host memory the memory mode holds, in bytes per GPU (besides the process's own, and
    besides DeepSpeed's offloaded optimizer, which the Kubernetes Job sizes by its doubled allowance).

    The ``offload`` mode (gpu_worker/patching/memory.py) keeps every layer's input in host memory and,
    on the kernel path, the layer's q/k/v and O projection outputs too, for the recompute; on one GPU it
    also moves a frozen, untied input embedding there. ~8 GiB for an 8B model at 8,192 tokens per micro-batch,
    growing with the tokens. The copies are made of row blocks that fill torch's power-of-two pinned blocks
    (less than a row more each), so they are counted at their size. An upper bound: the worker keeps them
    within all of its host memory but 32 GiB (``memory.host_budget``), stashing fewer projections or, past
    that, keeping layer inputs on the GPU; the Kubernetes Job asks for 64 GiB a GPU on top of this
    estimate (scheduler/kube.py), so in its container the budget covers it.

    FP8 mode (``fp8_copies``) keeps the projections' bf16 weights there (gpu_worker/patching/lora.py,
    ``keep_fp8_sources_on_host``): 2 bytes a parameter, each weight a pinned block."""
    if fp8_copies(spec, facts, layout):
        e = _compute_bytes(spec)
        return float(sum(_pinned(i * o * e) for i, o in facts.target_shapes().values()) * facts.num_layers)
    if layout.memory_mode != "offload":
        return 0.0
    seq = spec.hyperparameters.max_seq_length
    if spec.method == Method.grpo:
        seq += spec.method_params.grpo_max_completion_length
    tokens = layout.micro_batch * sequences_per_example(spec) * seq
    e = _compute_bytes(spec)
    per_layer = [facts.hidden_size]  # the layer input
    if uses_kernels(spec, facts, layout.zero_stage):  # + q, k, v and the O projection's output
        q, kv = facts.num_heads * facts.head_dim, facts.num_kv_heads * facts.head_dim
        per_layer += [q, kv, kv, facts.hidden_size]
    stash = sum(per_layer) * e * tokens * facts.num_layers
    embedding = _pinned(facts.vocab_size * facts.hidden_size * e) if _input_embedding_on_host(spec, facts, layout) else 0
    return float(stash + embedding)


def _input_embedding_on_host(spec: JobSpec, facts: ModelFacts, layout: Layout) -> bool:
    """``offload`` moves a frozen, untied input embedding to pinned host memory; the single-GPU worker
    only: a DeepSpeed rank keeps the table on its device (gpu_worker/patching/memory.py)."""
    return (layout.memory_mode == "offload" and not facts.tie_embeddings and spec.adapter.type != AdapterType.full
            and layout.zero_stage is None)


def fits(estimate: MemoryEstimate, memory_gb: float) -> bool:
    return estimate.total <= memory_gb * GB * USABLE_FRACTION


# --- time ------------------------------------------------------------------------------------------

BENCH_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
# Conservative model-FLOPs utilisation where nothing was measured (the kernel worker measured 0.40–0.59
# on an H100; the stock HF path 0.3–0.4): planning with less overpromises less.
FALLBACK_MFU = 0.25
# Data-parallel efficiency per extra GPU until the DeepSpeed benchmark measures it.
ASSUMED_SCALING = {2: 0.90, 3: 0.80}  # by ZeRO stage
OFFLOAD_SLOWDOWN = 0.5


@dataclass(frozen=True)
class Measured:
    matmul_params: int
    quant: str
    memory_mode: str
    kernels: bool
    achieved_tflops: float
    peak_tflops: float
    tokens_per_s: float
    peak_gb: float
    source: str
    date: str = ""  # of the benchmark run: the newest measurement of a configuration wins


_CKPT = {"off": "off", "on": "checkpointing", "offload": "offload"}


def load_measurements(folder: Path | str | None = None) -> tuple[Measured, ...]:
    """The kernel worker's ("ours") and stock ("hf") training rows of every bench result file."""
    folder = Path(folder or os.environ.get("TUNEFORGE_BENCH_RESULTS") or BENCH_RESULTS)
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        results = data.get("results", []) if isinstance(data, dict) else []
        for r in results if isinstance(results, list) else []:
            # other benchmarks (serving) share the folder: only training-step rows count
            if not isinstance(r, dict) or r.get("kind") != "train" or r.get("error") or not r.get("tokens_per_s"):
                continue
            if r.get("method") not in ("ours", "hf") or r.get("ckpt") not in _CKPT:
                continue
            # variable-length rows (packed, flat, padded) count only real tokens of drawn documents:
            # not the full rows of max_seq_length that the FLOP model scales from
            if r.get("data", "fixed") != "fixed":
                continue
            # the opt-in FP8 mode and adapter dropout are rows of their own (faster, slower): the plan
            # scales the bf16, dropout-0 ones (see fp8_copies)
            if r.get("fp8") or "fp8_loss_vs_bf16" in r or r.get("lora_dropout"):
                continue
            # a row needs its GPU's measured matmul rate to scale to another GPU (a suite run without the
            # `matmul` measurement has none); a row that lacks it or holds a malformed value is skipped:
            # one file must not break every estimate
            try:
                rows.append(Measured(
                    matmul_params=int(r["n_matmul_params"]), quant=r.get("quant", "none"),
                    memory_mode=_CKPT[r["ckpt"]], kernels=r["method"] == "ours",
                    achieved_tflops=float(r["achieved_model_tflops"]), peak_tflops=float(r["peak_tflops"]),
                    tokens_per_s=float(r["tokens_per_s"]), peak_gb=float(r["peak_gb"]),
                    source=f"{path.name}:{r.get('spec')}", date=str(data.get("date", "")),
                ))
            except (KeyError, TypeError, ValueError):
                continue
    return tuple(rows)


def flops_per_token(spec: JobSpec, facts: ModelFacts) -> float:
    """Model FLOPs per trained token (the bench's accounting: LoRA skips weight gradients)."""
    n = facts.matmul_params
    seq = spec.hyperparameters.max_seq_length
    attn = 2 * facts.num_layers * facts.hidden_size * seq
    train = (6 if spec.adapter.type == AdapterType.full else 4) * n + 3 * attn
    if _needs_reference(spec):
        train += 2 * n + attn  # the reference model's forward pass
    if spec.method == Method.grpo:
        # sampling G completions is decode-bound: count it as ten forward passes per completion token
        train += 10 * (2 * n + attn)
    return float(train)


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    source: str


def estimate_throughput(spec: JobSpec, facts: ModelFacts, memory_mode: str, peak_tflops: float, gpu_count: int,
                        zero_stage: int | None, offload: bool, measurements: tuple[Measured, ...]) -> Throughput:
    kernels = uses_kernels(spec, facts, zero_stage)
    quant = spec.quantization.value
    candidates = [m for m in measurements if m.quant == quant and m.memory_mode == memory_mode and m.kernels == kernels]
    if candidates:
        gap = min(abs(m.matmul_params - facts.matmul_params) for m in candidates)
        best = max((m for m in candidates if abs(m.matmul_params - facts.matmul_params) == gap), key=lambda m: m.date)
        achieved = best.achieved_tflops * peak_tflops / best.peak_tflops
        source = f"measured {best.source}, scaled to this model and GPU"
    else:
        achieved = FALLBACK_MFU * peak_tflops
        source = f"no measurement for {quant}/{memory_mode}/{'kernels' if kernels else 'stock'}: assumed MFU {FALLBACK_MFU}"
    per_gpu = achieved * 1e12 / flops_per_token(spec, facts)
    if zero_stage is None:
        return Throughput(per_gpu, source)
    eff = ASSUMED_SCALING[zero_stage] * (OFFLOAD_SLOWDOWN if offload else 1.0)
    return Throughput(per_gpu * gpu_count * eff, source + f"; ×{gpu_count} GPUs at assumed efficiency {eff:g}")
