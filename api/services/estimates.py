"""Estimating a fine-tuning job before creating it: the same request body as job creation, resolved
into the same job spec, planned by the scheduler's router against the fleet, with trained tokens,
time, GPU-hours and price. Nothing is written. ``placement`` is also what job creation calls to
refuse a job that fits nowhere (400, param ``model``).

Tokens are counted with the trainer's tokenization where ``token_counts`` can (the base model's tokenizer
is on this machine and the files are small), otherwise from the files' size; ``tokens_source`` says
which."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.errors import InvalidRequest
from api.schemas import JobCreate
from api.services import job_inputs, jobs, token_counts
from api.settings import ApiSettings
from gpu_worker.contract import JobSpec, Method
from gpu_worker.storage import ObjectStore
from scheduler.estimator import UnknownModel
from scheduler.fleet import Fleet
from scheduler.models import File, new_id
from scheduler.routing import JobEstimate, Plan, estimate_job
from scheduler.tenancy import Principal

# Without the tokenizer, tokens are estimated from file size: about 4 bytes of English text per token,
# and the JSONL's keys and punctuation count as text here, so this usually overestimates tokens; a
# small-vocabulary tokenizer may need more (the built-in model's: 1.28 tokens per 4 bytes of chat JSONL).
BYTES_PER_TOKEN = 4


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


def estimate(session: Session, store: ObjectStore, settings: ApiSettings, principal: Principal, body: JobCreate, fleet: Fleet) -> EstimatePublic:
    job_inputs.check_base_model(session, settings, principal, body.model)
    training = job_inputs.training_input(session, principal, body.training_file, "training_file")
    validation = job_inputs.training_input(session, principal, body.validation_file, "validation_file") if body.validation_file else None
    # The same resolution as creation (purpose and format checks, auto hyperparameters), so the
    # estimate describes the job that creating it would run.
    spec, _ = jobs.build_spec(session, store, principal, body, new_id("ftjob-"), body.seed or 0, training, validation)
    extra = jobs.extra_files(session, principal, spec)
    job_inputs.check_spec_rules(spec, [training, *extra])
    jobs.placement(spec, fleet)
    counted = token_counts.count_in_request(store, settings, spec, [training, validation, *extra])
    tokens, source = (counted, "tokenizer") if counted is not None else (estimated_tokens(spec, [training, *extra]), "file_size")
    try:
        est: JobEstimate = estimate_job(spec, tokens, fleet)
    except UnknownModel as e:
        raise InvalidRequest(f"Cannot estimate {body.model!r}: {e}.", param="model", code="model_not_estimable") from None
    return EstimatePublic(
        model=body.model, plan=plan_public(est.plan), estimated_tokens=est.tokens, tokens_source=source,
        tokens_per_second=round(est.tokens_per_second, 1), estimated_seconds=math.ceil(est.seconds),
        gpu_hours=round(est.gpu_hours, 4), estimated_price=round(est.price, 4), throughput_source=est.throughput_source,
    )
