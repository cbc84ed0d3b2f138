"""The contract between the control plane and the workers.

Everything that crosses a process boundary between them is one of these versioned, frozen pydantic
models: the job spec a worker is handed, the events it reports back (one JSON object per line on its
stdout), and the manifest of the adapter it produced. Pydantic and the standard library only: the API,
the scheduler and the serving gateway import this module without pulling in torch.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Method(str, enum.Enum):
    supervised = "supervised"


class AdapterType(str, enum.Enum):
    lora = "lora"


class DType(str, enum.Enum):
    auto = "auto"  # bf16 on a GPU that has it, else float32
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class MemoryMode(str, enum.Enum):
    off = "off"  # keep every activation: fastest
    checkpointing = "checkpointing"  # recompute layer activations in the backward pass
    offload = "offload"  # also move saved layer inputs to host memory


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


class Runtime(_Frozen):
    """How to run, as opposed to what to learn."""

    use_kernels: bool = True
    memory_mode: MemoryMode = MemoryMode.off
    dtype: DType = DType.auto
    checkpoint_every_steps: int = Field(50, ge=1)
    eval_every_steps: int = Field(0, ge=0)  # 0: once per epoch and at the end


class JobSpec(_Frozen):
    """What a worker is asked to do. Storage keys are relative to the platform's object store."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str
    org_id: str
    base_model: str  # a built-in name, a Hugging Face id or a local path, as the catalog resolved it
    method: Method = Method.supervised
    adapter: AdapterConfig = AdapterConfig()
    hyperparameters: Hyperparameters
    seed: int = Field(ge=0, le=2**31 - 1)
    training_file_key: str
    validation_file_key: str | None = None
    output_prefix: str  # adapter, checkpoints and artifacts go under this key prefix
    resume_from_key: str | None = None  # a checkpoint prefix written by an earlier attempt
    runtime: Runtime = Runtime()


# --- events: one JSON object per line on the trainer's stdout --------------------------------------


class _Event(_Frozen):
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
    train_loss: float
    learning_rate: float
    tokens: int  # trained (loss-bearing) tokens so far
    valid_loss: float | None = None
    tokens_per_second: float | None = None
    grad_norm: float | None = None


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


class CompletedEvent(_Event):
    type: Literal["completed"] = "completed"
    manifest: AdapterManifest
    trained_tokens: int
    steps: int


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
