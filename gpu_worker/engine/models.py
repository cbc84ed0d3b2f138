"""The models an engine serves: its base models, each with its generation loop, and the LoRA adapters
loaded onto them at run time. A request's ``model`` is resolved here to a base model and, for an
adapter name, the adapter's internal name in the model's adapter bank (unique per load, so unloading
``x`` and loading another ``x`` while requests for the first are still finishing never mixes them up).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from typing import AsyncIterator, Callable

from gpu_worker.engine import adapters
from gpu_worker.engine.errors import AdapterNotFound, InvalidRequest, ModelNotFound
from gpu_worker.engine.generation import AdapterGone, Delta, ModelRunner, Sequence
from gpu_worker.engine.protocol import ModelCard, now
from gpu_worker.engine.sampling import SamplingParams
from gpu_worker.engine.settings import EngineSettings

log = logging.getLogger(__name__)

# (name, settings) -> (model, tokenizer); gpu_worker.loading.load_base_model in production.
Loader = Callable[[str, EngineSettings], tuple]


@dataclasses.dataclass
class BaseModelEntry:
    name: str
    path: str | None  # the folder its weights came from (adapters name it as their base)
    runner: ModelRunner
    max_model_len: int
    created: int


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    name: str
    base: str
    internal: str
    lora_path: str
    rank: int
    created: int


@dataclasses.dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolved to."""

    name: str
    base: BaseModelEntry
    adapter: str | None  # internal adapter name


def default_loader(name: str, settings: EngineSettings) -> tuple:
    from gpu_worker.loading import load_base_model

    return load_base_model(name, data_dir=settings.data_dir, device=settings.device, dtype=settings.dtype)


class ServedModels:
    def __init__(self, settings: EngineSettings, loader: Loader = default_loader):
        self.settings = settings
        self.bases: dict[str, BaseModelEntry] = {}
        for name in dict.fromkeys(settings.models):
            model, tokenizer = loader(name, settings)
            # The model's own context limit, lowered by --max-model-len; 2048 for a model without one.
            limit = getattr(model.config, "max_position_embeddings", None) or 2048
            if settings.max_model_len:
                limit = min(limit, settings.max_model_len)
            runner = ModelRunner(
                name,
                model,
                tokenizer,
                max_batch_size=settings.max_batch_size,
                max_prefill_tokens=settings.max_prefill_tokens,
            )
            path = getattr(model, "name_or_path", None) or None
            self.bases[name] = BaseModelEntry(name, path, runner, int(limit), now())
        self.adapters: dict[str, AdapterEntry] = {}
        self._lock = threading.Lock()  # serialises adapter loads and unloads
        self._internal_ids = itertools.count(1)
        self._last_used: dict[str, float] = {}  # adapter name -> monotonic time of its last request

    def start(self) -> None:
        for base in self.bases.values():
            base.runner.start()

    def stop(self) -> None:
        for base in self.bases.values():
            base.runner.stop()

    @property
    def healthy(self) -> bool:
        return all(base.runner.alive for base in self.bases.values())

    def cards(self) -> list[ModelCard]:
        cards = [ModelCard(id=b.name, created=b.created, root=b.path or b.name, max_model_len=b.max_model_len) for b in self.bases.values()]
        cards += [ModelCard(id=a.name, created=a.created, root=a.lora_path, parent=a.base) for a in list(self.adapters.values())]
        return cards

    def resolve(self, name: str) -> Target:
        if name in self.bases:
            return Target(name, self.bases[name], None)
        adapter = self.adapters.get(name)
        if adapter is None:
            raise ModelNotFound(name)
        self._last_used[name] = time.monotonic()
        return Target(name, self.bases[adapter.base], adapter.internal)

    # --- adapters (blocking: call from a worker thread) -----------------------------------------------

    def load_adapter(self, lora_name: str, lora_path: str) -> AdapterEntry:
        if not lora_name or not lora_name.strip():
            raise InvalidRequest("lora_name must not be empty", param="lora_name")
        if lora_name in self.bases:
            raise InvalidRequest(f"'{lora_name}' is the name of a base model", param="lora_name")
        with self._lock:
            if lora_name in self.adapters:
                raise InvalidRequest(f"The lora adapter '{lora_name}' has already been loaded.", param="lora_name")
            folder = self._materialise(lora_path)
            files = adapters.read_adapter(folder, max_rank=self.settings.max_lora_rank)
            base = self._base_for(files)
            base.runner.check_adapter(files)  # before evicting anything for it
            self._make_room(base)
            internal = f"lora-{next(self._internal_ids)}"
            base.runner.attach_adapter(internal, files)
            entry = AdapterEntry(lora_name, base.name, internal, lora_path, files.rank, now())
            self.adapters[lora_name] = entry
            self._last_used[lora_name] = time.monotonic()
        log.info("loaded adapter %s (%s) on %s from %s", lora_name, internal, base.name, lora_path)
        return entry

    def check_adapter(self, lora_path: str, atol: float | None = None) -> dict:
        """The compatibility report of the adapter at ``lora_path`` (400 when it cannot be served):
        the static checks of a load, no vocabulary change, and the training side's reference
        log-probabilities reproduced on this engine. Nothing stays loaded."""
        from gpu_worker.engine import compat

        folder = self._materialise(lora_path)
        compat.check_declared_vocabulary(folder)
        files = adapters.read_adapter(folder, max_rank=self.settings.max_lora_rank)
        base = self._base_for(files)
        reference = compat.read_reference(folder)
        prompts = [ids for ids, _, _ in reference] if reference else []
        internal = f"check-{next(self._internal_ids)}"
        scored = base.runner.score_with(internal, files, prompts)
        report = compat.compare(reference, scored, atol=compat.DEFAULT_ATOL if atol is None else atol)
        return {
            "base_model": base.name,
            "rank": files.rank,
            "target_modules": sorted({adapters.weight_module(k).rsplit(".", 1)[-1] for k in files.weights}),
            "logits": report.as_dict(),
        }

    def _materialise(self, lora_path: str):
        settings = self.settings
        return adapters.materialise(lora_path, storage_url=settings.storage_url, cache_dir=settings.adapter_cache_dir, max_bytes=settings.adapter_cache_max_bytes)

    def _base_for(self, files: adapters.AdapterFiles) -> BaseModelEntry:
        for base in self.bases.values():
            if adapters.names_base(files.base_model, base.name, base.path):
                return base
        raise InvalidRequest(
            f"adapter was trained on base model {files.base_model!r}; this engine serves {sorted(self.bases)}",
            param="lora_path",
            code="base_model_mismatch",
        )

    def _make_room(self, base: BaseModelEntry) -> None:
        """At ``max_loras`` adapters on ``base``, evict the least recently used one (under ``_lock``), as
        vLLM's LoRA cache does: a later request for it gets 404 and the gateway loads it again."""
        on_base = [name for name, a in self.adapters.items() if a.base == base.name]
        if len(on_base) >= self.settings.max_loras:
            victim = min(on_base, key=lambda name: self._last_used.get(name, 0.0))
            self._unload(victim)
            log.info("evicted adapter %s from %s to make room (max_loras=%d)", victim, base.name, self.settings.max_loras)

    def unload_adapter(self, lora_name: str) -> None:
        with self._lock:
            self._unload(lora_name)
        log.info("unloaded adapter %s", lora_name)

    def _unload(self, lora_name: str) -> None:
        entry = self.adapters.pop(lora_name, None)
        if entry is None:
            raise AdapterNotFound(lora_name)
        self._last_used.pop(lora_name, None)
        # Requests already using it finish first; new ones get 404 from now on.
        self.bases[entry.base].runner.retire_adapter(entry.internal)
        adapters.discard(entry.lora_path, self.settings.adapter_cache_dir)  # no longer needed: the engine read it at load

    # --- generation ----------------------------------------------------------------------------------

    def submit(self, target: Target, prompt_ids: list[int], params: SamplingParams) -> "DeltaStream":
        """Queue one request; its results arrive through the returned stream (call from the event loop)."""
        runner = target.base.runner
        stream = DeltaStream(runner)
        seq = Sequence(prompt_ids, params, target.adapter, stream.sink, runner.tokenizer)
        try:
            runner.submit(seq)
        except AdapterGone:  # unloaded between resolve() and now
            raise ModelNotFound(target.name) from None
        stream.seq = seq
        return stream


class DeltaStream:
    """The ``Delta``s of one request, delivered from the loop thread to the event loop. Iterate until
    the final one; ``close()`` aborts the request if it is still running (a client that went away)."""

    def __init__(self, runner: ModelRunner):
        self._runner = runner
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._finished = False
        self.seq: Sequence | None = None

    def sink(self, delta: Delta) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        if self._finished:
            raise StopAsyncIteration
        delta = await self._queue.get()
        self._finished = delta.final
        return delta

    def close(self) -> None:
        if not self._finished and self.seq is not None:
            self._runner.abort(self.seq)
