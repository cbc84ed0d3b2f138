"""Batched heterogeneous LoRA: one forward pass in which every row uses its own adapter (or none).

The punica/S-LoRA scheme, in plain torch. Each adapter gets a slot; each targeted linear layer of the
base model is wrapped in a ``LoRALinear`` that keeps every loaded adapter's weights for that layer
stacked by slot (``a``: [slots, rank, in], ``b``: [slots, out, rank], the adapter's scaling folded
into ``b``; slot 0 and adapters that do not target the layer are zeros, ranks below the layer's
widest are zero-padded). Before a forward pass the caller says which slot each row uses
(``AdapterBank.rows``); every wrapped layer then adds ``scale * B_row(A_row(x_row))`` per row in a
fixed number of tensor ops, whatever the number of distinct adapters:

- gathered (BGMV): the rows' A and B are gathered by slot and applied with two batched matmuls. Cost
  grows with rows x rank x (in + out) copied weights, nothing per adapter: best for decode batches on
  small and mid-sized layers, and on GPU.
- segmented (SGMV): rows are grouped by slot once per forward pass and each group runs two plain
  matmuls. Cost grows with the number of distinct adapters; each adapter's weights are read once.
  Used on CPU when the gathered copy would be large (8B-sized layers: see ``_GATHER_LIMIT``).

Outputs equal PEFT's (``B(A(x)) * scaling`` added to the base layer's output) up to float rounding;
``tests/gpu_worker/engine/test_lora.py`` compares logits. Detaching the last adapter puts the original
linear layers back, so the base model is exactly what it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Iterator

import torch
from torch import nn

from gpu_worker.engine.adapters import WEIGHT_KEY
from gpu_worker.engine.errors import InvalidRequest

# The gathered path copies rows x rank x (in + out) weight elements per layer and forward pass. On
# the 2-core CPU dev machine (1 torch thread, fp32) at 64 decode rows, rank 16: hidden 256 gathered
# 0.13 ms vs 1.1 ms segmented over 32 adapters; hidden 4096 gathered 30 ms vs 2 ms segmented. The
# crossover is near 2^22 elements (16 MB fp32): above it, segmenting wins on CPU.
_GATHER_LIMIT = 1 << 22
BASE_SLOT = 0


@dataclasses.dataclass(frozen=True)
class RowSlots:
    """Which slot each row of the current forward pass uses, with the groupings the layers share."""

    slots: torch.Tensor  # [rows] int64
    unique: tuple[int, ...]  # distinct slots in the batch, ascending
    order: torch.Tensor  # [rows] row indices sorted by slot (stable)
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end) over ``order``, base slot left out

    @classmethod
    def of(cls, slots: list[int], device: torch.device) -> "RowSlots":
        order = sorted(range(len(slots)), key=slots.__getitem__)
        segments, start = [], 0
        for i in range(1, len(order) + 1):
            if i == len(order) or slots[order[i]] != slots[order[start]]:
                if slots[order[start]] != BASE_SLOT:
                    segments.append((slots[order[start]], start, i))
                start = i
        return cls(
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            unique=tuple(sorted(set(slots))),
            order=torch.tensor(order, dtype=torch.long, device=device),
            segments=tuple(segments),
        )


class LoRALinear(nn.Module):
    """A base ``nn.Linear`` plus every loaded adapter's LoRA for it, applied per row."""

    def __init__(self, base_layer: nn.Linear, bank: "AdapterBank"):
        super().__init__()
        self.base_layer = base_layer
        self._bank = bank
        weight = base_layer.weight
        self.a = torch.zeros(1, 0, base_layer.in_features, dtype=weight.dtype, device=weight.device)  # [slots, rank, in]
        self.b = torch.zeros(1, base_layer.out_features, 0, dtype=weight.dtype, device=weight.device)  # [slots, out, rank]
        self.present: set[int] = set()  # slots with weights in this layer

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def reserve(self, slots: int, rank: int = 0) -> None:
        """Grow the stacks (zero-filled) to at least ``slots`` slots and ``rank`` ranks."""
        rank = max(self.rank, rank)
        slots = max(self.a.shape[0], slots)
        if rank > self.rank or slots > self.a.shape[0]:
            grown_a = self.a.new_zeros(slots, rank, self.a.shape[2])
            grown_b = self.b.new_zeros(slots, self.b.shape[1], rank)
            grown_a[: self.a.shape[0], : self.rank] = self.a
            grown_b[: self.b.shape[0], :, : self.rank] = self.b
            self.a, self.b = grown_a, grown_b

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Store one adapter's A [rank, in] and scaled B [out, rank] in ``slot``."""
        self.reserve(slot + 1, a.shape[0])
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, : a.shape[0]] = a.to(self.a)
        self.b[slot, :, : b.shape[1]] = b.to(self.b)
        self.present.add(slot)

    def clear(self, slot: int) -> None:
        if slot in self.present:
            self.a[slot].zero_()
            self.b[slot].zero_()
            self.present.discard(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        rows = self._bank.current
        if rows is None or not self.present.intersection(rows.unique):
            return out
        if x.dim() != 3 or x.shape[0] != rows.slots.shape[0]:
            raise RuntimeError(f"LoRA rows were set for {rows.slots.shape[0]} rows, the layer got input {tuple(x.shape)}")
        if len(rows.unique) == 1:  # one adapter for the whole batch: plain matmuls
            slot = rows.unique[0]
            return out + (x @ self.a[slot].transpose(0, 1)) @ self.b[slot].transpose(0, 1)
        if x.is_cuda or x.shape[0] * self.rank * (self.a.shape[2] + self.b.shape[1]) <= _GATHER_LIMIT:
            return out + self._gathered(x, rows)
        return out + self._segmented(x, rows)

    def _gathered(self, x: torch.Tensor, rows: RowSlots) -> torch.Tensor:
        a = self.a.index_select(0, rows.slots)  # [rows, rank, in]
        b = self.b.index_select(0, rows.slots)  # [rows, out, rank]
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))

    def _segmented(self, x: torch.Tensor, rows: RowSlots) -> torch.Tensor:
        delta = x.new_zeros(*x.shape[:-1], self.b.shape[1])
        for slot, start, end in rows.segments:
            if slot not in self.present:
                continue
            index = rows.order[start:end]
            part = x.index_select(0, index)
            delta.index_copy_(0, index, (part @ self.a[slot].transpose(0, 1)) @ self.b[slot].transpose(0, 1))
        return delta


@dataclasses.dataclass(frozen=True)
class _Loaded:
    slot: int
    modules: tuple[str, ...]


class AdapterBank:
    """The adapters attached to one base model, by name. Not thread-safe: the caller serialises
    ``attach``/``detach`` with forward passes (the engine's model lock)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.current: RowSlots | None = None
        self._adapters: dict[str, _Loaded] = {}
        self._layers: dict[str, LoRALinear] = {}  # module path -> its wrapper

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def attach(self, name: str, config: dict, weights: dict[str, torch.Tensor]) -> None:
        """Attach a checked adapter (``adapters.read_adapter``: weight keys ``<module>.lora_A/B.weight``
        of linear layers, shapes that fit). On failure nothing changes."""
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already attached")
        pairs = _pairs(config, weights)
        modules = dict(self.model.named_modules())
        for path in pairs:
            layer = modules.get(path)
            if not isinstance(layer, (nn.Linear, LoRALinear)):
                raise InvalidRequest(f"adapter targets {path!r}, which is not a linear layer of the base model", param="lora_path")
        used = {loaded.slot for loaded in self._adapters.values()}
        slot = next(i for i in range(1, len(used) + 2) if i not in used)
        for path, (a, b) in pairs.items():
            self._layer(path, modules).put(slot, a, b)
        slots = max(used | {slot}) + 1
        for layer in self._layers.values():  # every layer can be indexed by every slot in use
            layer.reserve(slots)
        self._adapters[name] = _Loaded(slot, tuple(pairs))

    def detach(self, name: str) -> None:
        loaded = self._adapters.pop(name)
        for path in loaded.modules:
            self._layers[path].clear(loaded.slot)
        if not self._adapters:  # the bare base model again, exactly
            for path, layer in self._layers.items():
                _set_module(self.model, path, layer.base_layer)
            self._layers.clear()

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """During the block, row i of every forward pass uses adapter ``names[i]`` (None: the base)."""
        slots = [BASE_SLOT if n is None else self._adapters[n].slot for n in names]
        device = next(self.model.parameters()).device
        self.current = RowSlots.of(slots, device) if any(slots) else None
        try:
            yield
        finally:
            self.current = None

    def _layer(self, path: str, modules: dict[str, nn.Module]) -> LoRALinear:
        layer = self._layers.get(path)
        if layer is None:
            layer = self._layers[path] = LoRALinear(modules[path], self)
            _set_module(self.model, path, layer)
        return layer


def _pairs(config: dict, weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A [rank, in], B [out, rank] times the layer's scaling), as PEFT computes it."""
    if config.get("fan_in_fan_out"):
        raise InvalidRequest("adapters with fan_in_fan_out (Conv1D layers) are not supported", param="lora_path")
    if config.get("lora_bias"):
        raise InvalidRequest("adapters with a LoRA bias are not supported", param="lora_path")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = WEIGHT_KEY.match(key)
        if match is None:
            raise InvalidRequest(f"unsupported adapter weight {key!r}", param="lora_path")
        halves.setdefault(match["module"], {})[match["ab"]] = tensor
    pairs = {}
    for path, half in halves.items():
        if set(half) != {"A", "B"} or half["A"].shape[0] != half["B"].shape[1]:
            raise InvalidRequest(f"adapter weights for {path!r} are not a matching lora_A/lora_B pair", param="lora_path")
        rank = half["A"].shape[0]
        # PEFT scales by the configured rank and alpha (per-layer patterns first), not the weights'.
        configured = _per_layer(config, "rank_pattern", "r", 8, path)
        alpha = _per_layer(config, "alpha_pattern", "lora_alpha", 8, path)
        if configured != rank:
            raise InvalidRequest(
                f"adapter weights do not match its configuration: {path!r} has rank {rank}, the config says {configured}",
                param="lora_path",
            )
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise InvalidRequest(f"invalid LoRA configuration: lora_alpha {alpha!r} for {path!r}", param="lora_path")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs[path] = (half["A"], half["B"] * scaling)
    return pairs


def _per_layer(config: dict, patterns_key: str, key: str, default, path: str):
    """A per-layer setting: the first pattern naming ``path`` (PEFT's ``get_pattern_key``: a suffix on a
    module boundary), else the adapter-wide value."""
    patterns = config.get(patterns_key) or {}
    match = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", path)), None)
    return patterns[match] if match is not None else config.get(key, default)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
