"""The fleet: which GPU classes the platform can run jobs on, and how many of each a node holds.

The description is JSON in ``TUNEFORGE_FLEET`` (or a file named by ``TUNEFORGE_FLEET_FILE``), e.g.::

    {"classes": [
      {"name": "h100", "memory_gb": 80, "gpus_per_node": 8, "nodes": 2, "bf16_tflops": 767,
       "price_per_gpu_hour": 2.5, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
      {"name": "l4", "memory_gb": 24, "gpus_per_node": 1, "nodes": 4, "bf16_tflops": 121}
    ]}

Each class has one queue per worker kind (``tuneforge.single-gpu.h100``, ``tuneforge.multi-gpu.h100``):
a worker consumes only the queue of the hardware it runs on. Without a description the fleet is the
embedded one: a single local accelerator (or the CPU) on the historical ``tuneforge.single-gpu`` queue,
so a laptop install behaves as before. Pydantic and the standard library only: the API imports this.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

WorkerKind = Literal["single-gpu", "multi-gpu"]
WORKER_KINDS: tuple[str, ...] = ("single-gpu", "multi-gpu")
LEGACY_SINGLE_GPU_QUEUE = "tuneforge.single-gpu"


class FleetError(ValueError):
    """The fleet description is malformed; the message names the field."""


class Toleration(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class GpuClass(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")  # goes into queue and k8s label names
    memory_gb: float = Field(gt=0)  # per GPU, as the vendor states it (80 for an H100 80GB)
    gpus_per_node: int = Field(1, ge=1, le=16)
    nodes: int = Field(1, ge=1)
    # Dense bf16 peak; scales the measured H100 throughput to this class (see estimator.throughput).
    bf16_tflops: float = Field(767.0, gt=0)
    price_per_gpu_hour: float = Field(0.0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    # Explicit queue names per worker kind; default "tuneforge.<kind>.<name>".
    queues: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_kinds(self):
        unknown = set(self.queues) - set(WORKER_KINDS)
        if unknown:
            raise ValueError(f"queues: unknown worker kind(s) {sorted(unknown)}; use {list(WORKER_KINDS)}")
        return self

    def queue(self, kind: str) -> str:
        return self.queues.get(kind) or f"tuneforge.{kind}.{self.name}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.memory_gb:g} GB)"


class Fleet(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    classes: tuple[GpuClass, ...] = Field(min_length=1)
    # One local agent takes every job as it comes: no capacity accounting (see gpu_capacity).
    embedded: bool = False

    @model_validator(mode="after")
    def _unique_names(self):
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"classes: duplicate GPU class names in {names}")
        return self

    def by_memory(self) -> tuple[GpuClass, ...]:
        """Smallest GPUs first (then fewest per node): the planner uses the least hardware that fits."""
        return tuple(sorted(self.classes, key=lambda c: (c.memory_gb, c.gpus_per_node, c.name)))

    def get(self, name: str) -> GpuClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(name)

    def queues(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.queue(k) for c in self.classes for k in WORKER_KINDS))

    def gpu_capacity(self) -> dict[str, int] | None:
        """GPUs per class across all nodes; None for the embedded fleet (its agent decides)."""
        if self.embedded:
            return None
        return {c.name: c.nodes * c.gpus_per_node for c in self.classes}

    def describe(self) -> str:
        """'1×24 GB (l4), 8×80 GB (h100)': the most GPUs of each class one job may use (one node)."""
        return ", ".join(f"{c.gpus_per_node}×{c.memory_gb:g} GB ({c.name})" for c in self.by_memory())


# The embedded fleet: one local device and one agent that takes every job, so both worker kinds share
# the historical queue. 80 GB so that the built-in and small hub models route as they always have; a
# real deployment describes its hardware.
EMBEDDED_FLEET = Fleet(
    classes=(GpuClass(name="local", memory_gb=80, gpus_per_node=1,
                      queues={"single-gpu": LEGACY_SINGLE_GPU_QUEUE, "multi-gpu": LEGACY_SINGLE_GPU_QUEUE}),),
    embedded=True,
)


def parse_fleet(raw: str | dict) -> Fleet:
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
        return Fleet.model_validate(data)
    except json.JSONDecodeError as e:
        raise FleetError(f"TUNEFORGE_FLEET is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise FleetError(f"TUNEFORGE_FLEET: {where}: {first['msg']}") from e


def load_fleet(environ: dict[str, str] | None = None) -> Fleet:
    env = os.environ if environ is None else environ
    if env.get("TUNEFORGE_FLEET"):
        return parse_fleet(env["TUNEFORGE_FLEET"])
    if env.get("TUNEFORGE_FLEET_FILE"):
        return parse_fleet(Path(env["TUNEFORGE_FLEET_FILE"]).read_text())
    return EMBEDDED_FLEET


@functools.lru_cache
def get_fleet() -> Fleet:
    return load_fleet()
