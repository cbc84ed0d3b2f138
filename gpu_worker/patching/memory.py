"""Memory modes for training: ``off`` (keep every activation), ``checkpointing`` (HF's non-reentrant
activation checkpointing per decoder layer) and ``offload`` (checkpointing whose only saved tensor, each
layer's input, lives in pinned host memory between forward and backward).

``offload`` keeps GPU memory flat in depth: per layer, one (tokens x hidden) bf16 input lives on the
host instead of the device (64 MB per layer at 8B and 8192 tokens: 2.1 GB over 32 layers). The copies
run on a side stream so that they overlap the layers' compute: in forward, layer i's input goes to the
host while layer i computes; in backward, the backward of layer i starts the copy of layer i-1's input
back to the device, which then overlaps layer i's recompute and backward. At most two layer inputs are
on the device at a time (the one in use and the prefetched one). During the recompute ``recomputing()``
is true: the patched MLP then skips its down projection, whose output nothing reads (decoder.py). As in
torch's checkpointing, the recompute starts from the random state its forward started from, so dropout
draws the same masks, and it leaves the training's random stream where it was.

The forward of a layer may also ``stash()`` tensors it computed (decoder.py: the q/k/v and O projections'
outputs, 160 MB per layer at 8B): they travel to the host and back with the layer input, and the recompute
takes them (``unstash``) instead of recomputing them. Worth it where the host link carries them within
the layer's forward: at ~50 GB/s each way (H200, bench/NOTES.md v7) 224 MB take ~4.5 ms of a ~5.5 ms
8B layer forward, and save ~1 ms of GEMMs per layer in the recompute. The stash grows with the tokens
per step (~2.5 GB per 8B layer at 131,072 tokens), so it is bounded: a layer stashes only while the
pinned host memory the model's offload holds stays within ``STASH_HOST_FRACTION`` of the host's memory
(the machine's, or the container's limit if lower); the layers over it recompute their projections.

``offload`` also moves a frozen, untied input embedding table to pinned host memory (1.05 GB at Llama-3
8B): the parameter stays a CUDA tensor whose storage is that host memory (unified addressing), and the
batch's rows are gathered from it over the host link (``tuneforge_kernels.embedding``; 64 MB per 8192-token
step).
Every reader of the parameter (generation, merge, saving) still sees the same values on a CUDA tensor. Not in a
multi-GPU (DeepSpeed) run: its collectives expect device memory.

Stream rules (the caching allocators reuse freed memory in stream order):
- forward: the side stream waits for the compute stream (the input is written there), and the input is
  marked as used by the side stream (``record_stream``), so its memory is not reused before the copy ends;
- backward: the device buffer is allocated on the compute stream, the side stream waits for the compute
  stream before writing it and the compute stream waits for the copy's event before reading it; the
  pinned host buffer is released to PyTorch's host allocator, which records the copy's stream itself.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from pathlib import Path
from types import MethodType

import torch
from torch import nn

MEMORY_MODES = ("off", "checkpointing", "offload")
# the share of host memory that an ``offload`` model's pinned copies may reach before its layers stop
# stashing their projections (the layer inputs themselves always go to the host)
STASH_HOST_FRACTION = 0.5
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory_bytes() -> int:
    """This process's host memory: the machine's RAM, or its container's limit (cgroup v2 or v1) if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            total = min(total, int(text))
    return total

_recompute = threading.local()  # autograd runs backward in its own thread per device
_forward = threading.local()    # the forward of an ``offload`` layer: the copy that takes stashed tensors


def recomputing() -> bool:
    """True while an ``offload``-mode layer is recomputed for its backward: the layer's output is then
    discarded (only its graph is used), which lets the MLP skip work (``tuneforge_kernels.lora_mlp``)."""
    return getattr(_recompute, "depth", 0) > 0


def stashing() -> bool:
    """True in the forward of an ``offload``-mode layer within the host-memory budget: ``stash()`` then keeps
    a tensor for its recompute."""
    copy = getattr(_forward, "copy", None)
    return copy is not None and copy.may_stash


def stash(t: torch.Tensor, tag) -> None:
    """Keep ``t`` (in host memory, like the layer input) for this layer's recompute, which gets it back
    from ``unstash(tag)``, in the same order. ``t`` must not be modified in place afterwards."""
    _forward.copy.add(t, tag)


def replaying() -> bool:
    """True in the recompute of a layer whose forward stashed tensors (``unstash`` returns them)."""
    copy = getattr(_recompute, "copy", None)
    return copy is not None and bool(copy.extras)


def unstash(tag) -> torch.Tensor:
    """The next tensor this layer's forward stashed, on the device; ``tag`` must be the one it was stashed
    with (a recompute that took another path than its forward fails here instead of using wrong values)."""
    return _recompute.copy.pop(tag)


class _HostCopy:
    """One layer's input held in host memory, and any tensors its forward stashed (``stash``), with their
    way back to the device (CPU tensors: plain clones, so the same bookkeeping runs in CPU tests)."""

    def __init__(self, hidden: torch.Tensor, stream, previous: _HostCopy | None):
        self.device = hidden.device
        self.stream = stream
        # the copy made just before this one (the layer below): prefetched when this one is fetched; a
        # weak reference, so a forward whose graph is dropped without backward frees its host buffers
        self.previous = weakref.ref(previous) if previous is not None else None
        self.loaded = None       # event: the device buffers are filled (CUDA)
        self.on_device = None    # the prefetched device tensors
        self.host = []           # host tensors: the layer input, then the stashed ones; None once fetched
        self.tags = []
        self.extras = []         # after fetch: the stashed tensors on the device, in stash order
        # the device tensors themselves, while this is the newest copy: the top layer's backward comes
        # right after its forward, so it uses them instead of waiting for a copy back (~4 ms at 8B)
        self.kept = []
        self.may_stash = True    # set per layer by _OffloadState.admit
        self.add(hidden, "input")

    def host_bytes(self) -> int:
        """Host memory the copies hold: pinned blocks as torch's host allocator rounds them (a power of two)."""
        if self.host is None:
            return 0
        return sum(1 << (h.nbytes - 1).bit_length() if h.is_pinned() and h.nbytes else h.nbytes for h in self.host)

    def add(self, t: torch.Tensor, tag) -> None:
        if not t.is_cuda:
            self.host.append(t.detach().clone())
        else:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t.detach(), non_blocking=True)
            t.record_stream(self.stream)
            self.host.append(host)
            self.kept.append(t.detach())
        self.tags.append(tag)

    def prefetch(self) -> None:
        """Start the copies back to the device (no-op if started or already consumed)."""
        if self.on_device is not None or self.host is None:
            return
        if not self.device.type == "cuda":
            self.on_device = list(self.host)
            return
        if self.kept:  # still the newest copy: nothing to bring back
            self.on_device, self.kept = self.kept, []
            return
        bufs = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in self.host]  # compute stream's pool
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for buf, h in zip(bufs, self.host):
                buf.copy_(h, non_blocking=True)
            self.loaded = torch.cuda.Event()
            self.loaded.record(self.stream)
        self.on_device = bufs

    def fetch(self) -> torch.Tensor:
        """The layer input on the device, usable on the compute stream (the stashed tensors wait in
        ``extras``); prefetches the layer below. Once."""
        self.prefetch()
        if self.loaded is not None:
            torch.cuda.current_stream(self.device).wait_event(self.loaded)
        hidden, *self.extras = self.on_device
        self.tags = self.tags[1:]
        self.on_device = self.host = self.loaded = None
        previous = self.previous() if self.previous is not None else None
        self.previous = None
        if previous is not None:
            previous.prefetch()
        return hidden

    def pop(self, tag) -> torch.Tensor:
        if not self.extras or self.tags[0] != tag:
            raise RuntimeError(f"offload recompute asked for {tag!r}, its forward stashed "
                               f"{self.tags[:1] or 'nothing more'}: the layer took another path")
        self.tags = self.tags[1:]
        return self.extras.pop(0)


class _OffloadState:
    """Per model: the side stream, the most recent host copy (the next copy's ``previous``) and the host
    memory budget of the stashes."""

    def __init__(self):
        self.stream = None
        self.last = None  # weakref to the newest _HostCopy
        self.live = weakref.WeakSet()  # copies whose host buffers may still be held
        self.host_budget = None  # bytes; STASH_HOST_FRACTION of host_memory_bytes(), set on first use
        # the largest stash a layer has made: what the next one will add (0 until one has: the first
        # layer's stash can pass the budget by its own size)
        self.stash_bytes = 0
        self.over_budget = 0  # layers that did not stash, for the warning

    def admit(self, copy: _HostCopy) -> None:
        """Whether ``copy``'s layer may stash: the host bytes held now plus one layer's stash within budget."""
        if self.host_budget is None:
            self.host_budget = int(STASH_HOST_FRACTION * host_memory_bytes())
        held = sum(c.host_bytes() for c in self.live)
        copy.may_stash = held + self.stash_bytes <= self.host_budget
        if not copy.may_stash:
            self.over_budget += 1
            if self.over_budget == 1:
                warnings.warn(f"offload: {held / 2**30:.1f} GiB of pinned host memory held, a layer's projection stash "
                              f"({self.stash_bytes / 2**30:.2f} GiB) would pass the budget of "
                              f"{self.host_budget / 2**30:.1f} GiB: such layers recompute their projections",
                              stacklevel=2)

    def stashed(self, copy: _HostCopy, input_bytes: int) -> None:
        self.stash_bytes = max(self.stash_bytes, copy.host_bytes() - input_bytes)

    def new_copy(self, hidden: torch.Tensor) -> _HostCopy:
        if hidden.is_cuda and self.stream is None:
            self.stream = torch.cuda.Stream(hidden.device)
        last = self.last() if self.last is not None else None
        if last is not None:
            last.kept = []  # no longer the newest: its device tensors go (their host copies are made)
        # a copy whose backward already ran (the previous step's) is no layer below this one
        copy = _HostCopy(hidden, self.stream, last if last is not None and last.host is not None else None)
        self.last = weakref.ref(copy)
        self.live.add(copy)
        self.admit(copy)
        return copy


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, run, hidden, *rest):
        ctx.run, ctx.rest = run, rest
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        # the random state the layer starts from: the recompute draws the same dropout masks (as
        # torch.utils.checkpoint's preserve_rng_state)
        ctx.rng = (torch.get_rng_state(),
                   torch.cuda.get_rng_state(hidden.device) if hidden.device.type == "cuda" else None)
        ctx.copy = state.new_copy(hidden)
        input_bytes = ctx.copy.host_bytes()
        outer, _forward.copy = getattr(_forward, "copy", None), ctx.copy
        try:
            with torch.no_grad():
                out = run(hidden, *rest)
        finally:
            _forward.copy = outer
        state.stashed(ctx.copy, input_bytes)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.copy.fetch().requires_grad_()
        enabled, dtype = ctx.autocast
        _recompute.depth = getattr(_recompute, "depth", 0) + 1
        outer, _recompute.copy = getattr(_recompute, "copy", None), ctx.copy
        cpu_rng, device_rng = ctx.rng
        try:  # fork_rng: the recompute's draws leave the training's random stream where it was
            with torch.random.fork_rng(devices=[hidden.device] if device_rng is not None else []):
                torch.set_rng_state(cpu_rng)
                if device_rng is not None:
                    torch.cuda.set_rng_state(device_rng, hidden.device)
                with torch.enable_grad(), torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
                    out = ctx.run(hidden, *ctx.rest)
        finally:
            _recompute.depth -= 1
            _recompute.copy = outer
        if ctx.copy.extras:
            raise RuntimeError(f"offload recompute left stashed tensors unused: {ctx.copy.tags}")
        edge = torch.autograd.graph.get_gradient_edge(out)
        del out  # its values are never read: free the (tokens x hidden) tensor before the layer's backward
        torch.autograd.backward(edge, grad_out)
        n_rest = len(ctx.rest)
        ctx.copy = ctx.run = ctx.rest = ctx.rng = None
        return (None, None, hidden.grad) + (None,) * n_rest


def offloaded_checkpoint_function(state: _OffloadState | None = None):
    """A drop-in for ``torch.utils.checkpoint.checkpoint`` as transformers calls it per layer
    (``fn(run, hidden, *rest)``), sharing one side stream and prefetch chain across the model's layers."""
    state = state if state is not None else _OffloadState()

    def offloaded_checkpoint(run, hidden, *rest):
        return _OffloadedCheckpoint.apply(state, run, hidden, *rest)

    offloaded_checkpoint.state = state
    return offloaded_checkpoint


# element size -> an array-interface type string of that size (bf16 has none: the bytes are described as
# integers and viewed back as the tensor's dtype)
_SAME_SIZE_TYPE = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}


class _HostArray:
    """A pinned host tensor described as CUDA memory (``__cuda_array_interface__``): under unified
    addressing a pinned host pointer is valid on the device (torch checks that it is registered)."""

    def __init__(self, host: torch.Tensor):
        assert host.is_pinned() and host.is_contiguous()
        self.host = host  # kept alive by the CUDA tensor's storage, which holds this object
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": _SAME_SIZE_TYPE[host.element_size()],
                                         "data": (host.data_ptr(), False), "version": 2, "strides": None}


def host_resident(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor with ``t``'s values whose storage is pinned host memory (``t``'s device memory is
    freed once the caller drops ``t``). Reads cross the host link: for tensors read sparsely or rarely.
    Pinned blocks come from torch's host allocator, which rounds sizes up to a power of two."""
    host = t.detach().to("cpu").contiguous().pin_memory()
    view = torch.as_tensor(_HostArray(host), device=t.device).view(t.dtype)
    assert view.data_ptr() == host.data_ptr() and view.is_cuda and view.shape == t.shape
    return view


def _frozen_untied_input_embedding(base: nn.Module) -> nn.Embedding | None:
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding) or emb.weight.requires_grad or not emb.weight.is_cuda:
        return None
    if emb.max_norm is not None:  # F.embedding would renormalise rows in place
        return None
    tied = getattr(getattr(base, "config", None), "tie_word_embeddings", False)
    if tied or (out is not None and out.weight.data_ptr() == emb.weight.data_ptr()):
        return None  # tied: the same table is the lm_head, read in full by every step's loss
    return emb


def move_input_embedding_to_host(model: nn.Module, impl: str | None = None) -> bool:
    """Put a frozen, untied input embedding of ``model`` in pinned host memory (module docstring); its
    forward then gathers rows with ``tuneforge_kernels.embedding`` (subclasses with their own forward, e.g.
    Gemma's scaled embedding, keep it and read the host table through torch's gather). False if the
    model has no such table or it is not on a CUDA device."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = _frozen_untied_input_embedding(base)
    if emb is None:
        return False
    try:
        host = host_resident(emb.weight.data)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # no unified addressing, no numpy...
        warnings.warn(f"offload: the input embedding stays in device memory ({type(e).__name__}: {e})")
        return False
    emb.weight.data = host
    torch.cuda.empty_cache()  # the device copy goes back to the driver, not only to torch's pool
    if type(emb) is nn.Embedding:
        from tuneforge_kernels.embedding import embedding_rows

        def forward(self, input_ids):
            return embedding_rows(input_ids, self.weight, impl=impl)

        emb.forward = MethodType(forward, emb)
    return True


def apply_memory_mode(model: nn.Module, mode: str) -> None:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {mode!r}")
    if mode == "off":
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    if mode == "offload":
        # the layer input must require grad or the recompute's LoRA grads never run (layer 0's input is
        # a frozen embedding's output)
        base.enable_input_require_grads()
        checkpoint = offloaded_checkpoint_function()
        for module in base.modules():
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = checkpoint
        # Not under DeepSpeed (an initialized process group): ZeRO broadcasts and partitions parameters with
        # NCCL collectives, which expect device memory; the table stays on the device there.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            move_input_embedding_to_host(model)
