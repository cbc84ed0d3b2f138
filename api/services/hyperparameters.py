"""Resolving a job request's hyperparameters: every "auto" becomes a number here, so no "auto"
ever reaches the scheduler or a worker.

The "auto" rules follow OpenAI's published behaviour, clamped to what a LoRA run on this platform
needs: 3 epochs, more for tiny datasets and fewer for huge ones; small batches; the learning rate is a
multiplier of the LoRA base rate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from api.errors import InvalidRequest
from api.schemas import HyperparametersIn, JobCreate, MethodBodyIn
from gpu_worker.contract import (
    ALL_TARGET_MODULES,
    AdapterConfig,
    AdapterType,
    Hyperparameters,
    Method,
    MethodParams,
    Quantization,
    Reward,
    RewardKind,
)
from gpu_worker.recipes.rewards import json_schema_problem

DEFAULT_N_EPOCHS = 3
# OpenAI aims for between 100 and 25,000 examples seen in total when n_epochs is "auto".
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 10
MAX_AUTO_BATCH_SIZE = 8
DEFAULT_LORA_RANK = 8


def auto_n_epochs(examples: int) -> int:
    n = DEFAULT_N_EPOCHS
    if examples * n < MIN_TARGET_EXAMPLES:
        n = math.ceil(MIN_TARGET_EXAMPLES / max(examples, 1))
    elif examples * n > MAX_TARGET_EXAMPLES:
        n = MAX_TARGET_EXAMPLES // examples
    return min(MAX_AUTO_EPOCHS, max(1, n))


def auto_batch_size(examples: int) -> int:
    """About 0.2% of the dataset (OpenAI's rule), as a power of two in [1, MAX_AUTO_BATCH_SIZE]:
    tiny datasets need every optimizer step they can get."""
    target = max(1, int(examples * 0.002))
    return min(MAX_AUTO_BATCH_SIZE, 1 << (target.bit_length() - 1))


# Base learning rates before OpenAI's multiplier. Adapters: 2e-4 for SFT (the LoRA and QLoRA papers);
# preference objectives move the policy away from a reference and want ~4x less (TRL's DPO/KTO
# examples use 5e-5 with LoRA); GRPO's sampled updates are noisier still. Full fine-tuning moves every
# weight: ten times less again.
BASE_LEARNING_RATES = {Method.supervised: 2e-4, Method.grpo: 2e-5, **{m: 5e-5 for m in (Method.dpo, Method.ipo, Method.orpo, Method.simpo, Method.kto)}}
FULL_FINE_TUNING_LR_FACTOR = 0.1

# Objective knobs each method accepts; any other is a 400 naming it.
_METHOD_KNOBS: dict[Method, frozenset[str]] = {
    Method.supervised: frozenset(),
    Method.dpo: frozenset({"beta"}),
    Method.ipo: frozenset({"beta"}),
    Method.orpo: frozenset({"beta"}),
    Method.simpo: frozenset({"beta", "simpo_gamma"}),
    Method.kto: frozenset({"beta", "kto_desirable_weight", "kto_undesirable_weight"}),
    Method.grpo: frozenset({"beta", "num_generations", "max_completion_length", "temperature"}),
}
_ALL_KNOBS = frozenset().union(*_METHOD_KNOBS.values())
# Request names that differ from the contract's MethodParams field names.
_KNOB_FIELDS = {"num_generations": "grpo_num_generations", "max_completion_length": "grpo_max_completion_length", "temperature": "grpo_temperature"}
_TRAINING_KNOBS = ("lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "gradient_accumulation_steps", "max_seq_length")


@dataclass(frozen=True)
class Resolved:
    method: Method
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    adapter: AdapterConfig
    quantization: Quantization
    hyperparameters: Hyperparameters
    method_params: MethodParams

    def public(self) -> dict:
        """The OpenAI-shaped hyperparameters object, with every extra resolved."""
        hp, a, mp = self.hyperparameters, self.adapter, self.method_params
        out = {
            "n_epochs": self.n_epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.learning_rate_multiplier,
            "adapter_type": a.type.value,
            "quantization": self.quantization.value,
            **{k: getattr(hp, k).value if k == "lr_scheduler" else getattr(hp, k) for k in _TRAINING_KNOBS},
        }
        if a.type != AdapterType.full:
            out |= {"lora_rank": a.rank, "lora_alpha": a.alpha, "lora_dropout": a.dropout, "lora_target_modules": [m.value for m in a.target_modules], "use_rslora": a.use_rslora}
        for knob in sorted(_METHOD_KNOBS[self.method]):
            out[knob] = getattr(mp, _KNOB_FIELDS.get(knob, knob))
        return out

    def method_object(self) -> dict:
        body: dict = {"hyperparameters": self.public()}
        if self.method == Method.grpo:
            body["rewards"] = [r.model_dump(mode="json", exclude_none=True) for r in self.method_params.rewards]
        return {"type": self.method.value, self.method.value: body}


def requested(body: JobCreate) -> tuple[Method, HyperparametersIn, MethodBodyIn | None]:
    """The method and hyperparameters the request gave, from ``method`` or the legacy top-level field."""
    method = Method(body.method.type) if body.method else Method.supervised
    method_body = body.method.body() if body.method else None
    from_method = method_body.hyperparameters if method_body else None
    if from_method is not None and body.hyperparameters is not None:
        raise InvalidRequest(
            f"Give hyperparameters either in method.{method.value}.hyperparameters or at the top level, not both.",
            param="hyperparameters",
            code="invalid_value",
        )
    return method, from_method or body.hyperparameters or HyperparametersIn(), method_body


def _method_params(method: Method, hp: HyperparametersIn, method_body: MethodBodyIn | None) -> MethodParams:
    where = f"method.{method.value}"
    for knob in sorted(_ALL_KNOBS - _METHOD_KNOBS[method]):
        if getattr(hp, knob) is not None:
            raise InvalidRequest(f"{knob!r} does not apply to method {method.value!r}.", param=f"{where}.hyperparameters.{knob}", code="invalid_value")
    rewards = tuple(method_body.rewards or ()) if method_body else ()
    if method == Method.grpo:
        if not rewards:
            raise InvalidRequest("grpo needs at least one reward (exact_match, regex_match, json_schema, length_penalty).", param=f"{where}.rewards", code="missing_required_parameter")
        for i, reward in enumerate(rewards):
            problem = reward_problem(reward)
            if problem:
                raise InvalidRequest(problem, param=f"{where}.rewards[{i}]", code="invalid_value")
    elif rewards:
        raise InvalidRequest("rewards apply only to method 'grpo'.", param=f"{where}.rewards", code="invalid_value")
    values = {_KNOB_FIELDS.get(k, k): getattr(hp, k) for k in _METHOD_KNOBS[method] if getattr(hp, k) not in (None, "auto")}
    return MethodParams(**values, rewards=rewards)


def reward_problem(reward: Reward) -> str | None:
    """Why a reward cannot run, or None. Checked here so a bad one never reaches a GPU."""
    if reward.kind == RewardKind.regex_match:
        if not reward.pattern:
            return "regex_match needs 'pattern'"
        try:
            re.compile(reward.pattern)
        except re.error as err:
            return f"regex_match 'pattern' is not a valid regular expression: {err}"
    if reward.kind == RewardKind.json_schema:
        if reward.json_schema is None:
            return "json_schema needs 'json_schema'"
        return json_schema_problem(reward.json_schema)
    if reward.kind == RewardKind.length_penalty and reward.target_length is None:
        return "length_penalty needs 'target_length'"
    return None


def resolve(method: Method, hp: HyperparametersIn, method_body: MethodBodyIn | None, examples: int) -> Resolved:
    """Fill every unset or "auto" value. Ranges were checked by the request schema."""
    adapter_type = hp.adapter_type or AdapterType.lora
    quantization = hp.quantization or Quantization.none
    if quantization != Quantization.none and adapter_type == AdapterType.full:
        raise InvalidRequest("Quantized (QLoRA) training needs an adapter; full fine-tuning cannot use it.", param="quantization", code="invalid_value")
    if adapter_type == AdapterType.full and method != Method.supervised:
        # the preference loop's reference model is the adapter switched off (gpu_worker/recipes/preference_loop.py):
        # refused here, not after the job queued and a worker started
        raise InvalidRequest(f"Method '{method.value}' trains an adapter (lora or dora); full fine-tuning is for supervised jobs.",
                             param="adapter_type", code="invalid_value")
    rank = hp.lora_rank or DEFAULT_LORA_RANK
    modules = tuple(dict.fromkeys(hp.lora_target_modules)) if hp.lora_target_modules else ALL_TARGET_MODULES
    adapter = AdapterConfig(
        type=adapter_type,
        rank=rank,
        alpha=float(hp.lora_alpha) if hp.lora_alpha is not None else 2.0 * rank,
        dropout=hp.lora_dropout if hp.lora_dropout is not None else 0.0,
        target_modules=modules,
        use_rslora=bool(hp.use_rslora),
    )
    n_epochs = auto_n_epochs(examples) if hp.n_epochs in (None, "auto") else hp.n_epochs
    batch_size = auto_batch_size(examples) if hp.batch_size in (None, "auto") else hp.batch_size
    multiplier = 1.0 if hp.learning_rate_multiplier in (None, "auto") else float(hp.learning_rate_multiplier)
    base_lr = BASE_LEARNING_RATES[method] * (FULL_FINE_TUNING_LR_FACTOR if adapter_type == AdapterType.full else 1.0)
    learning_rate = base_lr * multiplier
    # The schema only asks for a positive multiplier; a tiny one (1e-320) times the base rate rounds to 0.0.
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        from_method = method_body is not None and method_body.hyperparameters is not None
        where = f"method.{method.value}.hyperparameters" if from_method else "hyperparameters"
        raise InvalidRequest(
            f"learning_rate_multiplier {multiplier!r} is too small: the resolved learning rate ({base_lr!r} x {multiplier!r}) is not a positive number.",
            param=f"{where}.learning_rate_multiplier",
            code="invalid_value",
        )
    training = {k: getattr(hp, k) for k in _TRAINING_KNOBS if getattr(hp, k) is not None}
    return Resolved(
        method=method,
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate_multiplier=multiplier,
        adapter=adapter,
        quantization=quantization,
        hyperparameters=Hyperparameters(n_epochs=n_epochs, batch_size=batch_size, learning_rate=learning_rate, **training),
        method_params=_method_params(method, hp, method_body),
    )
