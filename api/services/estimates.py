"""Estimating a fine-tuning job before creating it: the same request body as job creation, resolved
into the same job spec, planned by the scheduler's router against the fleet, with trained tokens,
time, GPU-hours and price. Nothing is written. ``placement`` is also what job creation calls to
refuse a job that fits nowhere (400, param ``model``).

Tokens are counted with the trainer's tokenization (``gpu_worker.tokencount``, no torch) when the base
model's tokenizer is on this machine and the files are small enough to count inside the request;
otherwise they come from the files' size. ``tokens_source`` says which."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import InvalidRequest
from api.schemas import JobCreate
from api.services import jobs
from api.settings import ApiSettings
from gpu_worker.contract import JobSpec, Method
from gpu_worker.storage import ObjectStore
from gpu_worker.tokencount import TokenCountError, count_job_files, job_tokens, local_tokenizer_dir, unusable_file
from scheduler.estimator import UnknownModel
from scheduler.fleet import Fleet
from scheduler.models import File, new_id
from scheduler.routing import JobEstimate, Plan, estimate_job
from scheduler.tenancy import Principal

# Without the tokenizer, tokens are estimated from file size: about 4 bytes of English text per token,
# and the JSONL's keys and punctuation count as text here, so this usually overestimates tokens; a
# small-vocabulary tokenizer may need more (the built-in model's: 1.28 tokens per 4 bytes of chat JSONL).
BYTES_PER_TOKEN = 4
# The most file bytes counted with the tokenizer inside the request: counting ran at 1.2 MB/s on a
# loaded 2-core machine (20,000 chat examples, 11 MB, 9.0 s), so 8 MiB answers within ~7 s; larger
# jobs are estimated from their size, and the scheduler counts them before they are queued.
COUNT_MAX_BYTES = 8 << 20


class PlanPublic(BaseModel):
    worker_kind: str
    gpu_class: str | None
    gpu_count: int
    zero_stage: int | None
    cpu_offload: bool
    quantization: str
    memory_mode: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    uses_kernels: bool
    predicted_memory_gb: float | None
    memory_breakdown_gb: dict[str, float]
    reasons: list[str]


class EstimatePublic(BaseModel):
    object: str = "fine_tuning.job.estimate"
    model: str
    plan: PlanPublic
    estimated_tokens: int  # tokens processed, all epochs
    tokens_source: Literal["tokenizer", "file_size"]  # counted with the model's tokenizer, or from file bytes
    tokens_per_second: float
    estimated_seconds: int
    gpu_hours: float
    estimated_price: float  # in the currency of the fleet's price_per_gpu_hour
    throughput_source: str


def plan_public(plan: Plan) -> PlanPublic:
    return PlanPublic(
        worker_kind=plan.worker_kind, gpu_class=plan.gpu_class, gpu_count=plan.gpu_count, zero_stage=plan.zero_stage,
        cpu_offload=plan.offload, quantization=plan.quantization, memory_mode=plan.memory_mode,
        micro_batch_size=plan.micro_batch_size, gradient_accumulation_steps=plan.gradient_accumulation_steps,
        uses_kernels=plan.uses_kernels, predicted_memory_gb=plan.memory_gb, memory_breakdown_gb=dict(plan.memory_parts_gb),
        reasons=list(plan.reasons),
    )


def estimated_tokens(spec: JobSpec, files: list[File]) -> int:
    """Tokens the job processes over all epochs (what its time depends on): file bytes /
    BYTES_PER_TOKEN, at most max_seq_length per example; GRPO processes each prompt with each of its
    generations, up to max_completion_length tokens each."""
    per_epoch = 0
    for f in files:
        cap = f.examples * spec.hyperparameters.max_seq_length if f.examples else math.inf
        tokens = int(min(math.ceil(f.bytes / BYTES_PER_TOKEN), cap))
        if spec.method == Method.grpo:
            p = spec.method_params
            tokens = p.grpo_num_generations * (tokens + f.examples * p.grpo_max_completion_length)
        per_epoch += tokens
    return per_epoch * spec.hyperparameters.n_epochs


def _file_param(param: str) -> str:
    """The request field naming a file that tokencount names by its job field."""
    return f"data.{param}.file" if param.startswith("extra_training_files[") else param


def counted_tokens(store: ObjectStore, spec: JobSpec, tokenizer_dir) -> int:
    """Tokens the job processes over all epochs, counted with the trainer's tokenization; a file the
    worker would refuse (a bad line, no usable example) is a 400 naming it."""
    try:
        counts = count_job_files(store, spec, tokenizer_dir, validation=True)
    except TokenCountError as err:
        raise InvalidRequest(f"Invalid file: {err}.", param=_file_param(err.param), code="invalid_file") from None
    if unusable := unusable_file(spec, counts):
        param, message = unusable
        raise InvalidRequest(f"Invalid file: {param}: {message}.", param=_file_param(param), code="invalid_file")
    return job_tokens(spec, counts, trained=False)


def estimate(session: Session, store: ObjectStore, settings: ApiSettings, principal: Principal, body: JobCreate, fleet: Fleet) -> EstimatePublic:
    if body.model not in settings.base_models:
        raise InvalidRequest(
            f"Model {body.model!r} is not available for fine-tuning. Available: {', '.join(settings.base_models)}.",
            param="model", code="model_not_available",
        )
    training = jobs.training_input(session, principal, body.training_file, "training_file")
    validation = jobs.training_input(session, principal, body.validation_file, "validation_file") if body.validation_file else None
    # The same resolution as creation (purpose and format checks, auto hyperparameters), so the
    # estimate describes the job that creating it would run.
    spec, _ = jobs.build_spec(session, store, principal, body, new_id("ftjob-"), body.seed or 0, training, validation)
    extra_keys = {t.key for t in spec.data.extra_training_files}
    extra = list(session.scalars(select(File).where(File.org_id == principal.org_id, File.storage_key.in_(extra_keys)))) if extra_keys else []
    jobs.placement(spec, fleet)
    tokenizer_dir = local_tokenizer_dir(body.model, settings.data_dir)
    if tokenizer_dir is not None and sum(f.bytes for f in (training, validation, *extra) if f is not None) <= COUNT_MAX_BYTES:
        tokens, source = counted_tokens(store, spec, tokenizer_dir), "tokenizer"
    else:
        tokens, source = estimated_tokens(spec, [training, *extra]), "file_size"
    try:
        est: JobEstimate = estimate_job(spec, tokens, fleet)
    except UnknownModel as e:
        raise InvalidRequest(f"Cannot estimate {body.model!r}: {e}.", param="model", code="model_not_estimable") from None
    return EstimatePublic(
        model=body.model, plan=plan_public(est.plan), estimated_tokens=est.tokens, tokens_source=source,
        tokens_per_second=round(est.tokens_per_second, 1), estimated_seconds=math.ceil(est.seconds),
        gpu_hours=round(est.gpu_hours, 4), estimated_price=round(est.price, 4), throughput_source=est.throughput_source,
    )
