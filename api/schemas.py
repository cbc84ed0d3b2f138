"""Request and response schemas, one per direction, mirroring OpenAI's wire format.

Public schemas are built field by field from the tables, so internal columns (lease tokens, storage
keys, key hashes) cannot leak: no public schema has them.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from gpu_worker.contract import (
    AdapterType,
    Attention,
    ChatTemplate,
    DataFormat,
    EvalOptions,
    ExportOptions,
    LRScheduler,
    MemoryMode,
    Quantization,
    Reward,
    TargetModule,
)
from gpu_worker.validation import LONE_SURROGATE, json_strings, lone_surrogate

# What every resource id (file-…, ftjob-…, ftevent-…, ftckpt-…) looks like. Anything else cannot exist,
# and must never reach the database as a query value (PostgreSQL rejects NUL bytes with an error).
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID = re.compile(ID_PATTERN)


def is_well_formed_id(value: str) -> bool:
    return bool(_ID.match(value))


def unix_seconds(value: datetime | None) -> int | None:
    """OpenAI's timestamps are integer Unix seconds. SQLite hands datetimes back without a zone;
    they were written in UTC, so they are read as UTC, never as the server's local time."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp())


def _unstorable(value) -> str | None:
    """Why a string in ``value`` (keys included) cannot be stored: a NUL character, which PostgreSQL's
    text refuses, or a lone UTF-16 surrogate (JSON's "\\ud800" without its pair), which no encoder takes."""
    for text in json_strings(value):
        if "\x00" in text:
            return "must not contain NUL characters (\\u0000)"
        if lone_surrogate(text):
            return f"must not contain {LONE_SURROGATE}"
    return None


class _Request(BaseModel):
    # An unknown argument is a client mistake worth a clear 400, not something to ignore silently. So is
    # NaN or Infinity, which are not JSON but Python's parser reads (every range check passes a NaN).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _storable(cls, value):
        # a 400 naming the field, not a failed insert
        if (why := _unstorable(value)) is not None:
            raise PydanticCustomError("string_unicode", why)
        return value


def _at_least(low: float, *, strict: bool = False, high: float | None = None, high_strict: bool = False):
    def check(value):
        if value == "auto" or value is None:
            return value
        if value < low or (strict and value == low):
            raise ValueError(f"must be {'greater than' if strict else 'at least'} {low}")
        if high is not None and (value > high or (high_strict and value == high)):
            raise ValueError(f"must be {'less than' if high_strict else 'at most'} {high}")
        return value

    return AfterValidator(check)


def _not_a_bool(kind: str, expected: str):
    def check(value):
        if isinstance(value, bool):
            raise PydanticCustomError(f"{kind}_type", f"Input should be {expected}, not a boolean")
        return value

    return BeforeValidator(check)


# JSON's true and false are not numbers, though pydantic's lax mode reads them as 1 and 0 (an
# ``n_epochs: true`` trained one epoch). Lax otherwise: "3" and 3.0 still read as 3, as before.
Int = Annotated[int, _not_a_bool("int", "a valid integer")]
Float = Annotated[float, _not_a_bool("float", "a valid number")]

# "auto" or a number; the range check runs after the union resolves, so errors name the field.
AutoEpochs = Annotated[Literal["auto"] | Int, _at_least(1, high=50)]
AutoBatchSize = Annotated[Literal["auto"] | Int, _at_least(1, high=256)]
AutoLrMultiplier = Annotated[Literal["auto"] | Float, _at_least(0, strict=True, high=10)]


class HyperparametersIn(_Request):
    n_epochs: AutoEpochs | None = None
    batch_size: AutoBatchSize | None = None
    learning_rate_multiplier: AutoLrMultiplier | None = None
    # Adapter extras (not in OpenAI's API: their adapter is not the tenant's to shape).
    lora_rank: Annotated[Int, _at_least(1, high=256)] | None = None
    lora_alpha: Annotated[Float, _at_least(0, strict=True, high=4096)] | None = None
    lora_dropout: Annotated[Float, _at_least(0, high=1, high_strict=True)] | None = None
    lora_target_modules: list[TargetModule] | None = Field(None, min_length=1)
    adapter_type: AdapterType | None = None
    use_rslora: bool | None = None
    quantization: Quantization | None = None
    # Optimisation extras.
    lr_scheduler: LRScheduler | None = None
    warmup_ratio: Annotated[Float, _at_least(0, high=1, high_strict=True)] | None = None
    weight_decay: Annotated[Float, _at_least(0, high=1)] | None = None
    max_grad_norm: Annotated[Float, _at_least(0, strict=True)] | None = None
    gradient_accumulation_steps: Annotated[Int, _at_least(1, high=1024)] | None = None
    max_seq_length: Annotated[Int, _at_least(16, high=131072)] | None = None
    # Objective extras: each method accepts only its own (checked in services.hyperparameters).
    beta: Annotated[Float, _at_least(0, strict=True)] | Literal["auto"] | None = None
    simpo_gamma: Annotated[Float, _at_least(0)] | None = None
    kto_desirable_weight: Annotated[Float, _at_least(0, strict=True)] | None = None
    kto_undesirable_weight: Annotated[Float, _at_least(0, strict=True)] | None = None
    num_generations: Annotated[Int, _at_least(2, high=64)] | None = None
    max_completion_length: Annotated[Int, _at_least(1, high=8192)] | None = None
    temperature: Annotated[Float, _at_least(0, strict=True)] | None = None


class MethodBodyIn(_Request):
    hyperparameters: HyperparametersIn | None = None
    rewards: list[Reward] | None = Field(None, min_length=1, max_length=16)  # grpo only


MethodType = Literal["supervised", "dpo", "ipo", "orpo", "simpo", "kto", "grpo"]


class MethodIn(_Request):
    type: MethodType
    supervised: MethodBodyIn | None = None
    dpo: MethodBodyIn | None = None
    ipo: MethodBodyIn | None = None
    orpo: MethodBodyIn | None = None
    simpo: MethodBodyIn | None = None
    kto: MethodBodyIn | None = None
    grpo: MethodBodyIn | None = None

    def body(self) -> MethodBodyIn | None:
        return getattr(self, self.type)


class TrainingFileIn(_Request):
    file: str = Field(pattern=ID_PATTERN)
    weight: Annotated[Float, _at_least(0, strict=True, high=1000)] = 1.0
    format: DataFormat = DataFormat.auto


class DataIn(_Request):
    """How the training data is read (Tuneforge extension, sent with the SDK's ``extra_body``)."""

    format: DataFormat | None = None
    chat_template: ChatTemplate | None = None
    train_on_inputs: bool | None = None
    packing: bool | None = None
    validation_split: Annotated[Float, _at_least(0, high=0.5, high_strict=True)] | None = None
    dedupe: bool | None = None
    extra_training_files: list[TrainingFileIn] | None = Field(None, max_length=16)


class RuntimeIn(_Request):
    use_kernels: bool | None = None
    memory_mode: MemoryMode | None = None
    cuda_graphs: bool | None = None
    fp8: bool | None = None
    attention: Attention | None = None
    checkpoint_every_steps: Annotated[Int, _at_least(1)] | None = None


class WandbIn(_Request):
    project: str = Field(min_length=1, max_length=128)
    entity: str | None = Field(None, max_length=128)
    name: str | None = Field(None, max_length=128)
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, max_length=64)  # W&B's tag limits


class MlflowIn(_Request):
    tracking_uri: str = Field(min_length=1, max_length=1000)


class IntegrationIn(_Request):
    type: Literal["wandb", "tensorboard", "mlflow"]
    wandb: WandbIn | None = None
    mlflow: MlflowIn | None = None


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    # OpenAI's rules for ``metadata``: at most 16 pairs, keys up to 64 characters, values up to 512
    if value is None:
        return None
    if len(value) > METADATA_MAX_PAIRS:
        raise ValueError(f"at most {METADATA_MAX_PAIRS} key-value pairs")
    for key, item in value.items():
        if not 0 < len(key) <= 64:
            raise ValueError(f"key {key[:70]!r} must have 1 to 64 characters")
        if len(item) > 512:
            raise ValueError(f"the value of {key!r} has more than 512 characters")
    return value


METADATA_MAX_PAIRS = 16
Metadata = Annotated[dict[str, str] | None, AfterValidator(_check_metadata)]


class JobCreate(_Request):
    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(pattern=ID_PATTERN)
    validation_file: str | None = Field(None, pattern=ID_PATTERN)
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    seed: Int | None = Field(None, ge=0, le=2**31 - 1)
    method: MethodIn | None = None
    hyperparameters: HyperparametersIn | None = None  # legacy top-level form
    integrations: list[IntegrationIn] | None = Field(None, max_length=8)
    metadata: Metadata = None
    # Tuneforge extensions.
    data: DataIn | None = None
    evaluation: EvalOptions | None = None
    export: ExportOptions | None = None
    runtime: RuntimeIn | None = None


# --- files ---------------------------------------------------------------------------------------


class DuplicateLinePublic(BaseModel):
    line: int  # 1-based, as an editor counts
    first_line: int  # the earlier line it repeats
    exact: bool  # False: the same text up to case, punctuation and whitespace


class FileDuplicates(BaseModel):
    """Tuneforge: the upload's duplicate report. Exact duplicates are dropped when a job trains
    (``data.dedupe``); near-duplicates are only reported."""

    exact: int  # lines identical (as JSON) to an earlier one
    near: int  # lines whose normalised text equals an earlier one's (exact ones excluded)
    lines: list[DuplicateLinePublic]  # the first 20 of both kinds, in file order


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None
    duplicates: FileDuplicates | None = None  # Tuneforge; None where no report was kept (job results, older files)


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- uploads (a file in parts) -------------------------------------------------------------------


class ExpiresAfterIn(_Request):
    anchor: str  # "created_at"; checked with the seconds (services.files.expires_after), as for files.create
    seconds: Int


class UploadCreate(_Request):
    bytes: Int = Field(ge=1)
    filename: str = Field(min_length=1, max_length=255)
    # type/subtype, parameters after a ";" (RFC 6838's characters), printable ASCII
    mime_type: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][\w!#$&^.+-]*/[\w!#$&^.+-]+( *;[ -~]*)?$")
    purpose: str = Field(min_length=1, max_length=40)
    expires_after: ExpiresAfterIn | None = None


class UploadComplete(_Request):
    part_ids: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(min_length=1, max_length=10_000)
    md5: str | None = Field(None, pattern=r"^[0-9a-fA-F]{32}$")


class UploadObject(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: FileObject | None = None


class UploadPartObject(BaseModel):
    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str


# --- fine-tuning jobs ----------------------------------------------------------------------------


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    estimated_tokens: int | None = None  # Tuneforge: trained tokens expected (all epochs), before training
    error: JobError | None
    seed: int
    suffix: str | None
    estimated_finish: int | None
    integrations: list[Any] = []
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool


class JobEventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


class JobEventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventPublic]
    has_more: bool


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class CheckpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
    first_id: str | None
    last_id: str | None
    has_more: bool
