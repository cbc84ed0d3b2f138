"""The contract between the control plane and the workers.

Everything that crosses a process boundary between them is one of these versioned, frozen pydantic
models: the job spec a worker is handed, the events it reports back (one JSON object per line on its
stdout), and the manifest of the adapter it produced. Pydantic and the standard library only: the API,
the scheduler and the serving gateway import this module without pulling in torch.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    # NaN and Infinity are not JSON: a spec holding one is stored with null in its place, which the worker
    # then cannot read. And every range check passes a NaN. So what a job asks for is finite.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class _Measured(_Frozen):
    # What a run measures may be NaN or Infinity (a diverged loss, an overflowed gradient norm): a fact
    # to report (the gate reads a NaN validation loss as a regression), never a reason to crash a run.
    model_config = ConfigDict(allow_inf_nan=True)


class Method(str, enum.Enum):
    """The training objective. ``supervised`` also covers continued pretraining (raw-text data)."""

    supervised = "supervised"
    dpo = "dpo"
    ipo = "ipo"
    orpo = "orpo"
    simpo = "simpo"
    kto = "kto"
    grpo = "grpo"


PREFERENCE_METHODS = frozenset({Method.dpo, Method.ipo, Method.orpo, Method.simpo})


class AdapterType(str, enum.Enum):
    lora = "lora"
    dora = "dora"  # weight-decomposed LoRA
    full = "full"  # full fine-tuning: every weight trains, the result is a full model


class Quantization(str, enum.Enum):
    none = "none"
    nf4 = "nf4"  # QLoRA: 4-bit NormalFloat base with double quantization, bf16 compute (bitsandbytes, GPU)


class DataFormat(str, enum.Enum):
    auto = "auto"  # detected per file from its first valid line
    chat = "chat"  # OpenAI {"messages": [...]}
    sharegpt = "sharegpt"  # {"conversations": [{"from", "value"}]}
    alpaca = "alpaca"  # {"instruction", "input", "output"}
    completion = "completion"  # {"prompt", "completion"}
    text = "text"  # {"text"}: continued pretraining, loss on every token
    preference = "preference"  # OpenAI DPO {"input", "preferred_output", "non_preferred_output"} or {"prompt", "chosen", "rejected"}
    kto = "kto"  # {"prompt", "completion", "label": bool}
    prompt = "prompt"  # prompts only (GRPO): {"prompt"} or {"messages"}, optional reference fields


class ChatTemplate(str, enum.Enum):
    auto = "auto"  # the tokenizer's own template, else chatml
    chatml = "chatml"
    llama3 = "llama-3"
    mistral = "mistral"
    gemma = "gemma"
    qwen = "qwen"
    phi3 = "phi-3"


class LRScheduler(str, enum.Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class GGUFType(str, enum.Enum):
    f16 = "f16"
    q8_0 = "q8_0"
    q4_k_m = "q4_k_m"


class RewardKind(str, enum.Enum):
    """The closed set of GRPO rewards a job may name: never user code."""

    exact_match = "exact_match"  # completion (stripped) == the row's reference field
    regex_match = "regex_match"  # the completion matches `pattern`
    json_schema = "json_schema"  # the completion parses as JSON valid against `schema`
    length_penalty = "length_penalty"  # -|len(tokens) - target_length| * scale


class DType(str, enum.Enum):
    auto = "auto"  # bf16 on a GPU that has it, else float32
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class MemoryMode(str, enum.Enum):
    off = "off"  # keep every activation: fastest
    checkpointing = "checkpointing"  # recompute layer activations in the backward pass
    offload = "offload"  # also move saved layer inputs to host memory


class Attention(str, enum.Enum):
    """Which kernels compute causal attention in a kernel-patched model (gpu_worker/patching/hopper_attention.py)."""

    auto = "auto"  # FlashAttention-4 where it is installed on a Hopper GPU for packed rows, and for batched rows at head
    # size 64 (faster than cuDNN there); else SDPA / torch's
    sdpa = "sdpa"  # SDPA (cuDNN) for batched rows, torch's variable-length kernel for packed ones
    fa4 = "fa4"  # FlashAttention-4 for both, where it is installed on a Hopper GPU (the job's events say if not)


class TargetModule(str, enum.Enum):
    """Projections a LoRA adapter may attach to (Llama naming; the loader maps other families)."""

    q_proj = "q_proj"
    k_proj = "k_proj"
    v_proj = "v_proj"
    o_proj = "o_proj"
    gate_proj = "gate_proj"
    up_proj = "up_proj"
    down_proj = "down_proj"


ALL_TARGET_MODULES: tuple[TargetModule, ...] = tuple(TargetModule)


class AdapterConfig(_Frozen):
    type: AdapterType = AdapterType.lora
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[TargetModule, ...] = ALL_TARGET_MODULES
    use_rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r) instead of alpha/r

    @field_validator("target_modules")
    @classmethod
    def _non_empty_unique(cls, v: tuple[TargetModule, ...]) -> tuple[TargetModule, ...]:
        if not v:
            raise ValueError("at least one target module is required")
        return tuple(dict.fromkeys(v))


class Hyperparameters(_Frozen):
    """Resolved hyperparameters: no "auto" survives past the control plane."""

    n_epochs: int = Field(ge=1, le=100)
    batch_size: int = Field(ge=1, le=1024)
    learning_rate: float = Field(gt=0, le=1.0)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_length: int = Field(512, ge=16, le=131072)
    lr_scheduler: LRScheduler = LRScheduler.linear


# GRPO sums the weighted rewards in float32 and normalises them by their group's standard deviation: with
# these bounds a reward stays below ~1e14 and its square below float32's 3.4e38 (a weight of 1e308 made the
# rewards infinite, the loss NaN, and the next sampling step crash)
REWARD_WEIGHT_MAX = 1e4
REWARD_SCALE_MAX = 1e4
REWARD_TARGET_LENGTH_MAX = 1_000_000


class Reward(_Frozen):
    kind: RewardKind
    weight: float = Field(1.0, ge=-REWARD_WEIGHT_MAX, le=REWARD_WEIGHT_MAX)
    reference_field: str = "answer"  # exact_match: the row field holding the expected answer
    pattern: str | None = Field(None, max_length=1000)  # regex_match
    json_schema: dict | None = None  # json_schema (named so to avoid pydantic's `schema`)
    target_length: int | None = Field(None, ge=1, le=REWARD_TARGET_LENGTH_MAX)  # length_penalty
    scale: float = Field(0.01, ge=0, le=REWARD_SCALE_MAX)  # length_penalty

    @field_validator("json_schema")
    @classmethod
    def _json_only(cls, v: dict | None) -> dict | None:
        # allow_inf_nan does not reach inside a plain dict; a NaN there would be stored as null.
        if v is not None:
            try:
                json.dumps(v, allow_nan=False)
            except ValueError:
                raise ValueError("NaN and Infinity are not JSON: the schema must not hold them") from None
            except (TypeError, RecursionError):
                raise ValueError("the schema must be plain JSON, nested less deeply") from None
        return v


class MethodParams(_Frozen):
    """Objective-specific knobs; each method reads only its own."""

    beta: float = Field(0.1, gt=0)  # dpo, ipo, orpo (lambda), simpo, kto, grpo (KL)
    simpo_gamma: float = Field(0.5, ge=0)  # SimPO target reward margin
    kto_desirable_weight: float = Field(1.0, gt=0)
    kto_undesirable_weight: float = Field(1.0, gt=0)
    grpo_num_generations: int = Field(4, ge=2, le=64)
    grpo_max_completion_length: int = Field(64, ge=1, le=8192)
    grpo_temperature: float = Field(1.0, gt=0)
    rewards: tuple[Reward, ...] = Field((), max_length=32)  # summed: a bound keeps the sum finite (REWARD_*)


class TrainingFile(_Frozen):
    key: str
    format: DataFormat = DataFormat.auto
    weight: float = Field(1.0, gt=0)  # mixing weight relative to the other training files


class DataOptions(_Frozen):
    """How training data is read. The primary files are JobSpec.training_file_key and
    validation_file_key; these options add to them."""

    format: DataFormat = DataFormat.auto  # of the primary training and validation files
    extra_training_files: tuple[TrainingFile, ...] = ()
    # Held out of the training data when there is no validation file. None (the default since schema 1
    # without a version bump; specs stored before say 0.0 and keep their meaning): automatic, 5% of the
    # training examples once there are at least 100, at most 1000 (gpu_worker/data/mixing.py); 0: none.
    validation_split: float | None = Field(None, ge=0, lt=0.5)
    chat_template: ChatTemplate = ChatTemplate.auto
    train_on_inputs: bool = False  # loss on prompt tokens too (supervised only: gpu_worker/spec_rules.py)
    packing: bool = False  # several examples per row, attention kept within each example
    dedupe: bool = True  # drop exact duplicate examples (near-duplicates are reported)


class EvalOptions(_Frozen):
    exact_match: bool = True  # chat/completion data: greedy answers vs the validation targets
    max_exact_match_examples: int = Field(100, ge=0)
    # evals without improvement before stopping; like fail_on_regression it needs validation data
    # (a validation file or a held-out split), else the job is refused (gpu_worker/spec_rules.py)
    early_stopping_patience: int | None = Field(None, ge=1)
    keep_best: bool = True  # the final adapter is the best checkpoint by validation loss
    gate: bool = True  # compare tuned vs base on the validation set before registering
    fail_on_regression: bool = False  # a tuned model worse than the base fails promotion


class ExportOptions(_Frozen):
    merged: bool = False  # a merged 16-bit model (QLoRA: dequantized base first)
    gguf: tuple[GGUFType, ...] = ()  # written from the merged model; an Ollama Modelfile beside them


class Integrations(_Frozen):
    tensorboard: bool = False
    mlflow_tracking_uri: str | None = None
    wandb_project: str | None = None  # from OpenAI's `integrations: [{"type": "wandb", ...}]`
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_tags: tuple[str, ...] = ()


class Distributed(_Frozen):
    """How the multi-GPU (DeepSpeed) worker spreads one job: the scheduler's plan, filled in by the
    worker agent (``scheduler/agent.py``). Absent on single-GPU jobs. Where the ranks meet (node
    rank, master address and port) is a property of the launch, not of the job: the launcher's
    environment carries it (``gpu_worker/distributed.py``).

    The job's hyperparameters keep their meaning: one optimizer step still trains on
    ``batch_size × gradient_accumulation_steps`` examples, which the ranks share; each rank runs
    forward passes of at most ``micro_batch_size`` examples."""

    gpus_per_node: int = Field(1, ge=1, le=16)
    nodes: int = Field(1, ge=1, le=64)
    zero_stage: Literal[2, 3] = 2  # 2: optimizer states and gradients sharded; 3: the weights too
    offload_optimizer: bool = False  # optimizer states (and its step) in host memory
    micro_batch_size: int | None = Field(None, ge=1)  # None: the step's examples split evenly, one pass per rank

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


class Runtime(_Frozen):
    """How to run, as opposed to what to learn."""

    use_kernels: bool = True
    memory_mode: MemoryMode = MemoryMode.off
    dtype: DType = DType.auto
    checkpoint_every_steps: int = Field(50, ge=1)
    eval_every_steps: int = Field(0, ge=0)  # 0: once per epoch and at the end
    # Added in schema 1 without a version bump: optional. The decoder layers as CUDA graphs once the batch
    # shape repeats (gpu_worker/patching/graphs.py); None: the patcher's rule (small models, memory mode off).
    cuda_graphs: bool | None = None
    # Added in schema 1 without a version bump: optional. The frozen projections' GEMMs in FP8 (e4m3) with
    # the training kernels on one GPU of compute capability 8.9+: faster, not exact bf16; the recipes
    # report each validation measurement in bf16 beside it (tuneforge_kernels/fp8.py).
    fp8: bool = False
    # Added in schema 1 without a version bump: optional. Which kernels compute causal attention.
    attention: Attention = Attention.auto
    # Added in schema 1 without a version bump: optional, and a spec without it means one GPU.
    distributed: Distributed | None = None


class JobSpec(_Frozen):
    """What a worker is asked to do. Storage keys are relative to the platform's object store."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str
    org_id: str
    base_model: str  # a built-in name, a Hugging Face id or a local path, as the catalog resolved it
    method: Method = Method.supervised
    adapter: AdapterConfig = AdapterConfig()
    quantization: Quantization = Quantization.none
    hyperparameters: Hyperparameters
    method_params: MethodParams = MethodParams()
    data: DataOptions = DataOptions()
    evaluation: EvalOptions = EvalOptions()
    export: ExportOptions = ExportOptions()
    integrations: Integrations = Integrations()
    seed: int = Field(ge=0, le=2**31 - 1)
    training_file_key: str
    validation_file_key: str | None = None
    output_prefix: str  # adapter, checkpoints and artifacts go under this key prefix
    resume_from_key: str | None = None  # a checkpoint prefix written by an earlier attempt
    runtime: Runtime = Runtime()


# --- events: one JSON object per line on the trainer's stdout --------------------------------------


class _Event(_Measured):
    schema_version: Literal[1] = SCHEMA_VERSION


class LogEvent(_Event):
    type: Literal["log"] = "log"
    level: Literal["info", "warn", "error"] = "info"
    message: str


class MetricsEvent(_Event):
    type: Literal["metrics"] = "metrics"
    step: int
    total_steps: int
    epoch: float
    # None once through JSON when the loss was NaN or infinite (a diverged step): JSON has no such numbers,
    # so the line carries null, and the step's other measurements still arrive
    train_loss: float | None
    learning_rate: float
    tokens: int  # trained (loss-bearing) tokens so far
    valid_loss: float | None = None
    tokens_per_second: float | None = None
    grad_norm: float | None = None
    gpu_memory_gb: float | None = None  # peak allocated since the last event
    eta_seconds: float | None = None
    exact_match: float | None = None  # on the validation set, when evaluated


class CheckpointEvent(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    key: str  # checkpoint prefix in the object store (adapter + optimizer + data position + RNG)
    train_loss: float | None = None
    valid_loss: float | None = None


class AdapterManifest(_Frozen):
    """What a finished adapter is: enough for the registry to serve it without opening it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str
    base_model: str
    adapter: AdapterConfig
    key: str  # PEFT folder prefix: adapter_config.json + adapter_model.safetensors
    files: tuple[str, ...]
    trained_tokens: int


class Artifact(_Frozen):
    """A file the job produced that users can download (merged model, GGUF, Modelfile, report)."""

    kind: Literal["adapter", "merged", "gguf", "modelfile", "report"]
    key: str  # object key (a folder prefix for "adapter" and "merged")
    filename: str
    bytes: int | None = None
    detail: dict = Field(default_factory=dict)  # e.g. {"quantization": "q4_k_m", "agreement": 0.97}


class EvalReport(_Measured):
    """The evaluation gate: base vs tuned on the validation set."""

    base_valid_loss: float | None = None
    tuned_valid_loss: float | None = None
    base_exact_match: float | None = None
    tuned_exact_match: float | None = None
    base_reward: float | None = None  # GRPO: mean reward of greedy completions on the validation prompts
    tuned_reward: float | None = None
    examples: int = 0
    # None: not evaluated (no validation example to compare on; ``reason`` says why), never "passed".
    # Optional since schema 1 without a version bump: reports before it always held a bool.
    passed: bool | None = True
    reason: str | None = None


class CompletedEvent(_Event):
    type: Literal["completed"] = "completed"
    manifest: AdapterManifest
    trained_tokens: int
    steps: int
    artifacts: tuple[Artifact, ...] = ()
    eval_report: EvalReport | None = None
    best_step: int | None = None


class FailedEvent(_Event):
    type: Literal["failed"] = "failed"
    code: str  # e.g. "invalid_training_file", "model_load_failed", "out_of_memory", "internal_error"
    message: str
    param: str | None = None


class StoppedEvent(_Event):
    """The trainer was asked to stop (cancel or preemption) and saved what it had."""

    type: Literal["stopped"] = "stopped"
    step: int
    checkpoint_key: str | None = None


JobEvent = Annotated[
    Union[LogEvent, MetricsEvent, CheckpointEvent, CompletedEvent, FailedEvent, StoppedEvent],
    Field(discriminator="type"),
]
_EVENT_ADAPTER: TypeAdapter[JobEvent] = TypeAdapter(JobEvent)


def parse_event(line: str | bytes) -> JobEvent:
    """Parse one line of trainer output; raises pydantic.ValidationError on anything else."""
    return _EVENT_ADAPTER.validate_json(line)


def dump_event(event: JobEvent) -> str:
    return event.model_dump_json()


# Which data formats each method trains on (the API refuses other pairings at job creation).
METHOD_FORMATS: dict[Method, frozenset[DataFormat]] = {
    Method.supervised: frozenset({DataFormat.chat, DataFormat.sharegpt, DataFormat.alpaca, DataFormat.completion, DataFormat.text}),
    **{m: frozenset({DataFormat.preference}) for m in PREFERENCE_METHODS},
    Method.kto: frozenset({DataFormat.kto}),
    Method.grpo: frozenset({DataFormat.prompt, DataFormat.chat}),
}
