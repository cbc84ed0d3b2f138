"""Training recipes: one module per method, each reading top to bottom (setup, train, save).

``RECIPES`` maps a job's method to its recipe's ``run(spec, ctx)``; components the recipes share live
next to them (``model_setup``) or in ``gpu_worker`` (data, loading, checkpoint).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from gpu_worker.contract import JobEvent, Method
from gpu_worker.storage import ObjectStore


@dataclasses.dataclass
class RunContext:
    """What a recipe needs from its host process (``gpu_worker.train``, or a test)."""

    store: ObjectStore
    data_dir: Path
    emit: Callable[[JobEvent], None]
    should_stop: Callable[[], bool] = lambda: False  # polled before every micro-batch
    device: str | None = None  # None: CUDA if available, else CPU


def recipe_for(method: Method) -> Callable:
    """The ``run(spec, ctx)`` function for ``method`` (imported lazily: recipes import torch)."""
    if method == Method.supervised:
        from gpu_worker.recipes.sft import run

        return run
    if method in (Method.dpo, Method.ipo, Method.orpo, Method.simpo):
        from gpu_worker.recipes.preference import run

        return run
    if method == Method.kto:
        from gpu_worker.recipes.kto import run

        return run
    if method == Method.grpo:
        from gpu_worker.recipes.grpo import run

        return run
    raise ValueError(f"no recipe for method {method!r}")
