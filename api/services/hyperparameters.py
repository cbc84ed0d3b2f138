"""Resolving a job request's hyperparameters: every "auto" becomes a number here, so no "auto"
ever reaches the scheduler or a worker.

The "auto" rules follow OpenAI's published behaviour, clamped to what a LoRA run on this platform
needs: 3 epochs, more for tiny datasets and fewer for huge ones; small batches; the learning rate is a
multiplier of the LoRA base rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from api.errors import InvalidRequest
from api.schemas import HyperparametersIn, JobCreate
from gpu_worker.contract import ALL_TARGET_MODULES, AdapterConfig, Hyperparameters, TargetModule

# LoRA adapters train well around 1e-4..3e-4 with AdamW (the LoRA and QLoRA papers use 2e-4); OpenAI's
# multiplier scales this base rate.
BASE_LORA_LEARNING_RATE = 2e-4
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


@dataclass(frozen=True)
class Resolved:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: tuple[TargetModule, ...]

    def public(self) -> dict:
        """The OpenAI-shaped hyperparameters object (with the LoRA extras)."""
        return {
            "n_epochs": self.n_epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.learning_rate_multiplier,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_target_modules": [m.value for m in self.lora_target_modules],
        }

    def method(self) -> dict:
        return {"type": "supervised", "supervised": {"hyperparameters": self.public()}}

    def contract(self) -> tuple[AdapterConfig, Hyperparameters]:
        adapter = AdapterConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=self.lora_target_modules)
        hp = Hyperparameters(
            n_epochs=self.n_epochs,
            batch_size=self.batch_size,
            learning_rate=BASE_LORA_LEARNING_RATE * self.learning_rate_multiplier,
        )
        return adapter, hp


def requested(body: JobCreate) -> HyperparametersIn:
    """The hyperparameters the request gave, from ``method`` or the legacy top-level field."""
    from_method = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if from_method is not None and body.hyperparameters is not None:
        raise InvalidRequest(
            "Give hyperparameters either in method.supervised.hyperparameters or at the top level, not both.",
            param="hyperparameters",
            code="invalid_value",
        )
    return from_method or body.hyperparameters or HyperparametersIn()


def resolve(hp: HyperparametersIn, examples: int) -> Resolved:
    """Fill every unset or "auto" value. Ranges were checked by the request schema."""
    rank = hp.lora_rank or DEFAULT_LORA_RANK
    modules = tuple(dict.fromkeys(hp.lora_target_modules)) if hp.lora_target_modules else ALL_TARGET_MODULES
    return Resolved(
        n_epochs=auto_n_epochs(examples) if hp.n_epochs in (None, "auto") else hp.n_epochs,
        batch_size=auto_batch_size(examples) if hp.batch_size in (None, "auto") else hp.batch_size,
        learning_rate_multiplier=1.0 if hp.learning_rate_multiplier in (None, "auto") else float(hp.learning_rate_multiplier),
        lora_rank=rank,
        lora_alpha=float(hp.lora_alpha) if hp.lora_alpha is not None else 2.0 * rank,
        lora_dropout=hp.lora_dropout if hp.lora_dropout is not None else 0.0,
        lora_target_modules=modules,
    )
