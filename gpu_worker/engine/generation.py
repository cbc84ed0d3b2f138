"""Continuous batching for one base model: a background thread that owns the model and decodes every
running request together, whatever adapter each one uses.

Requests (``Sequence``) are submitted from any thread and join the running batch between decode steps:
an iteration admits waiting requests (prefilled together in one forward pass), then feeds every
running row its last sampled token in one decode pass, samples each row's next token with that row's
own parameters and drops the rows that finished, or whose sampling failed (that request alone fails).
Rows of different adapters (and of the bare base model) share each forward pass: the model's
``lora.AdapterBank`` applies each row's own LoRA in batched ops (no loop over adapters); the cache
stays left-padded (``kvcache.KVBatch``) so rows of different lengths can share it.

Results go to each sequence's ``sink`` (called on the loop thread) as ``Delta`` values: new text, the
completion token count so far, and a finish reason or an error on the last one.

Adapters are attached and detached under the model lock, between steps. An unloaded adapter stops
accepting requests at once but stays attached until the requests already using it have finished.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
from typing import Callable

import torch
from transformers import DynamicCache

from gpu_worker.engine import adapters
from gpu_worker.engine.detokenizer import Detokenizer
from gpu_worker.engine.kvcache import KVBatch
from gpu_worker.engine.lora import AdapterBank
from gpu_worker.engine.sampling import SamplingParams, sample_rows

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str
    completion_tokens: int  # generated so far, a final end-of-sequence token included
    finish_reason: str | None = None  # "stop" or "length" on the last delta
    error: str | None = None  # set (on the last delta) when generation failed

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class AdapterGone(Exception):
    """The adapter a request named was unloaded before the request was queued."""


_ids = itertools.count()


class Sequence:
    """One request's generation state. Only the loop thread mutates it, except ``aborted``."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None, sink: Callable[[Delta], None], tokenizer):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.adapter = adapter  # internal adapter name, None for the base model
        self.sink = sink
        self.detokenizer = Detokenizer(tokenizer, prompt_ids, params.stop)
        self.generator = params.make_generator()
        self.output_ids: list[int] = []
        self.pending: int | None = None  # last sampled token, not yet in the cache
        self.aborted = False
        self.done = False  # finished, failed or dropped: its adapter reference is released


@dataclasses.dataclass
class BatchStats:
    forward_passes: int = 0
    max_rows: int = 0  # the most rows one forward pass carried
    mixed_passes: int = 0  # forward passes whose rows used more than one adapter (the base counts as one)


class ModelRunner:
    def __init__(self, name: str, model, tokenizer, *, max_batch_size: int, max_prefill_tokens: int):
        self.name = name
        self.model = model.eval()
        self.lora = AdapterBank(self.model)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model, tokenizer)
        self.stats = BatchStats()
        self.model_lock = threading.Lock()  # held for each step and for attaching/detaching adapters
        self._cv = threading.Condition()  # guards everything below it
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._attached: set[str] = set()  # adapters accepting requests
        self._retiring: set[str] = set()  # unloaded, detached once no request uses them
        self._in_use: collections.Counter[str] = collections.Counter()
        self._stopping = False
        # Loop-thread state.
        self._running: list[Sequence] = []
        self._kv: KVBatch | None = None
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)

    # --- called from other threads ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            if seq.adapter is not None:
                if seq.adapter not in self._attached:
                    raise AdapterGone(seq.adapter)
                self._in_use[seq.adapter] += 1
            self._waiting.append(seq)
            self._cv.notify()

    def abort(self, seq: Sequence) -> None:
        seq.aborted = True  # the loop drops it before its next step

    def check_adapter(self, files: adapters.AdapterFiles) -> None:
        """Raise ``InvalidRequest`` unless ``files`` fits this model's layers."""
        with self.model_lock:
            adapters.check_fits(files, self.model)

    def attach_adapter(self, name: str, files: adapters.AdapterFiles) -> None:
        with self.model_lock:
            adapters.check_fits(files, self.model)
            self.lora.attach(name, files.config, files.weights)
        with self._cv:
            self._attached.add(name)

    def score_with(self, name: str, files: adapters.AdapterFiles, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Attach ``files`` as ``name`` exactly as for serving, score ``prompts`` (one [len, vocab]
        log-probability tensor each) and detach it again; no request can use it meanwhile."""
        from gpu_worker.engine import compat

        with self.model_lock:
            adapters.check_fits(files, self.model)
            compat.check_vocabulary(files, self.model)
            self.lora.attach(name, files.config, files.weights)
            try:
                with self.lora.rows([name]):
                    return [compat.log_probs(self.model, ids) for ids in prompts]
            finally:
                self.lora.detach(name)

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]], adapter: str | None) -> torch.Tensor:
        """[len(prompts), hidden] fp32: each prompt's last hidden state after the final norm, L2-normalised
        (vLLM's default pooling when it serves a decoder for embeddings), with ``adapter``'s LoRA.
        Runs between decode steps, under the model lock."""
        with self.model_lock:
            with self._cv:
                if adapter is not None and adapter not in self._attached:
                    raise AdapterGone(adapter)
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            with self.lora.rows([adapter] * len(prompts)):
                hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            return torch.nn.functional.normalize(hidden[:, -1].float(), dim=-1).cpu()

    def retire_adapter(self, name: str) -> None:
        with self._cv:
            self._attached.discard(name)
            self._retiring.add(name)
            self._cv.notify()

    # --- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._running or self._detachable()):
                    self._cv.wait()
                if self._stopping:
                    break
                new = self._admit()
            with self.model_lock:
                try:
                    self._step(new)
                except Exception as err:  # a bug or OOM: fail this batch's requests, keep serving others
                    log.exception("generation step failed on %s", self.name)
                    self._fail(self._running + new, f"generation failed: {err}")
                    self._running, self._kv = [], None
                self._detach_retired()
        with self._cv:
            leftover = self._running + list(self._waiting)
        self._fail(leftover, "the engine is shutting down")

    def _admit(self) -> list[Sequence]:
        """Take waiting requests while the batch has room and the prefill budget lasts (under ``_cv``)."""
        new: list[Sequence] = []
        tokens = 0
        while self._waiting and len(self._running) + len(new) < self.max_batch_size:
            seq = self._waiting[0]
            if new and tokens + len(seq.prompt_ids) > self.max_prefill_tokens:
                break
            self._waiting.popleft()
            if seq.aborted:
                self._release(seq)
                continue
            new.append(seq)
            tokens += len(seq.prompt_ids)
        return new

    def _step(self, new: list[Sequence]) -> None:
        keep = [i for i, seq in enumerate(self._running) if not seq.aborted]
        if len(keep) < len(self._running):
            for seq in self._running:
                if seq.aborted:
                    self._release(seq)
            self._running = [self._running[i] for i in keep]
            self._kv = self._kv.select(keep)
        for seq in new:
            if seq.aborted:
                self._release(seq)
        if new:
            self._prefill([s for s in new if not s.aborted])
        if self._running:
            self._decode()

    @torch.inference_mode()
    def _prefill(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.tensor([[self.pad_id] * (width - len(s.prompt_ids)) + s.prompt_ids for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs], device=self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self._forward(seqs, ids, mask, positions, DynamicCache(), logits_to_keep=1)
        kv = KVBatch.from_cache(out.past_key_values, mask)
        alive = self._accept_all(seqs, out.logits[:, -1])
        survivors = kv.select(alive)
        if survivors is not None:
            self._kv = survivors if self._kv is None else self._kv.concat(survivors)
            self._running.extend(seqs[i] for i in alive)

    @torch.inference_mode()
    def _decode(self) -> None:
        kv = self._kv
        ids = torch.tensor([[seq.pending] for seq in self._running], device=self.device)
        out = self._forward(self._running, ids, kv.step_mask(), kv.next_positions(), kv.to_cache())
        kv = kv.after_step(out.past_key_values)
        alive = self._accept_all(self._running, out.logits[:, -1])
        self._running = [self._running[i] for i in alive]
        self._kv = kv.select(alive)

    def _forward(self, seqs: list[Sequence], ids, mask, positions, cache, **kwargs):
        names = [seq.adapter for seq in seqs]
        self.stats.forward_passes += 1
        self.stats.max_rows = max(self.stats.max_rows, len(seqs))
        self.stats.mixed_passes += len(set(names)) > 1
        with self.lora.rows(names):
            return self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, **kwargs
            )

    def _accept_all(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Sample each row's next token from ``logits`` ([rows, vocab]); the indices of rows still running.
        A row whose sampling failed is failed alone and leaves the batch like a finished row: its
        cache row is dropped by the caller's ``select``, and the other rows' tokens do not depend on it."""
        tokens = sample_rows(logits, seqs)
        alive = []
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if isinstance(token, Exception):
                log.error("sampling failed for request %s on %s", seq.id, self.name, exc_info=token)
                self._fail([seq], f"generation failed: {token}")
            elif not self._accept(seq, token):
                alive.append(i)
        return alive

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Record and report ``seq``'s next token; True if it finished."""
        seq.output_ids.append(token)
        count = len(seq.output_ids)
        reason = None
        if token in self.eos_ids:
            text, reason = seq.detokenizer.finish(), "stop"
        else:
            text = seq.detokenizer.push(token)
            if seq.detokenizer.stopped:
                reason = "stop"
            elif count >= seq.params.max_tokens:
                text, reason = text + seq.detokenizer.finish(), "length"
        seq.pending = None if reason else token
        seq.sink(Delta(text, count, reason))
        if reason:
            self._release(seq)
        return reason is not None

    def _release(self, seq: Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.adapter is not None:
            with self._cv:
                self._in_use[seq.adapter] -= 1

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            if not seq.done:
                self._release(seq)
                seq.sink(Delta("", len(seq.output_ids), error=message))

    def _detachable(self) -> list[str]:
        """Unloaded adapters that no request uses any more (under ``_cv``)."""
        return [name for name in self._retiring if self._in_use[name] <= 0]

    def _detach_retired(self) -> None:
        """Detach unloaded adapters no request uses any more (under the model lock)."""
        with self._cv:
            done = self._detachable()
            self._retiring.difference_update(done)
            for name in done:
                self._in_use.pop(name, None)
        for name in done:
            try:
                self.lora.detach(name)
            except Exception:  # keep serving: an adapter left attached costs memory, not correctness
                log.exception("could not detach adapter %s from %s", name, self.name)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
