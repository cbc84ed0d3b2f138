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
per step (~2.5 GB per 8B layer at 131,072 tokens), so it is bounded.

Host memory is bounded too: the model's copies (inputs and stashes) hold at most ``host_budget()`` of
pinned memory, all of the host's (the machine's, or the container's limit if lower) but ``HOST_RESERVE``.
A layer stashes only if its stash still leaves room for the inputs of the layers above it (a forward that
stashed greedily would leave the last layers' inputs nowhere to go: at 327,680 tokens an 8B model's
inputs alone are 80 GiB); the layers over it recompute their projections. A layer input that would pass
the budget stays on the device, as in ``checkpointing``. The copies are made of row blocks sized for torch's
pinned allocator, which rounds each block up to a power of two (a 2.5 GiB input in one block would take
4 GiB; in blocks, less than a row more).

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

import contextlib
import os
import threading
import warnings
import weakref
from pathlib import Path
from types import MethodType

import torch
from torch import nn

MEMORY_MODES = ("off", "checkpointing", "offload")
# host memory an ``offload`` model's pinned copies leave to the process itself and the rest of the machine;
# the Kubernetes Job asks for 64 GiB a GPU on top of the plan's host_memory_gb (scheduler/kube.py), so
# within a container sized so the budget covers the whole estimate
HOST_RESERVE = 32 * 2**30
# copies smaller than this are one block: below it the allocator's rounding is not worth more copies
BLOCK_FLOOR = 2**20
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



def host_budget() -> int:
    """Pinned host memory an ``offload`` model's copies may hold: all of the host's but ``HOST_RESERVE``,
    and at least half of it."""
    host = host_memory_bytes()
    return max(host // 2, host - HOST_RESERVE)


def row_blocks(rows: int, row_bytes: int) -> list[int]:
    """Split ``rows`` rows of ``row_bytes`` bytes into blocks (their row counts) that each fill all but less
    than a row of a power-of-two pinned block: the largest such block that fits what is left, then the
    same for the rest, down to ``BLOCK_FLOOR``."""
    blocks, left = [], rows
    while left:
        size = left * row_bytes
        if size <= BLOCK_FLOOR:
            blocks.append(left)
            break
        n = min(left, max(1, (1 << (size.bit_length() - 1)) // row_bytes))
        blocks.append(n)
        left -= n
    return blocks


def _pinned_size(nbytes: int) -> int:
    """What torch's host allocator takes for a pinned block of ``nbytes``: rounded up to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes else 0


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a view whose first dimension can be split into blocks: (tokens, width) where its layout
    allows, else the whole tensor as one row."""
    try:
        return t.view(-1, t.shape[-1])
    except (RuntimeError, IndexError):  # a strided view that rows cannot describe, or a scalar
        return t.unsqueeze(0)


def _split(t: torch.Tensor) -> tuple[torch.Tensor, int, list[int]]:
    """``t`` as rows (``_as_rows``), a row's bytes, and the row counts of its copy's blocks."""
    rows = _as_rows(t)
    row_bytes = t.nbytes // len(rows) if len(rows) else 0
    return rows, row_bytes, row_blocks(len(rows), row_bytes) if row_bytes else [len(rows)]


class _HostTensor:
    """One tensor's values in host memory, in row blocks (pinned, copied on ``stream``, for a CUDA tensor)."""

    def __init__(self, t: torch.Tensor, stream):
        self.shape, self.dtype = t.shape, t.dtype
        rows, _, counts = _split(t.detach())
        self.blocks, start = [], 0
        if t.is_cuda:
            stream.wait_stream(torch.cuda.current_stream(t.device))
        for n in counts:
            src = rows[start:start + n]
            if t.is_cuda:
                host = torch.empty(src.shape, dtype=t.dtype, pin_memory=True)
                with torch.cuda.stream(stream):
                    host.copy_(src, non_blocking=True)
            else:
                host = src.clone()
            self.blocks.append(host)
            start += n
        if t.is_cuda:
            t.record_stream(stream)

    @property
    def host_bytes(self) -> int:
        return sum(_pinned_size(b.nbytes) if b.is_pinned() else b.nbytes for b in self.blocks)

    @staticmethod
    def bytes_for(t: torch.Tensor) -> int:
        """``host_bytes`` of ``t``'s copy, before it is made."""
        if not t.is_cuda:
            return t.nbytes
        _, row_bytes, counts = _split(t)
        return sum(_pinned_size(n * row_bytes) for n in counts)

    def to(self, device: torch.device, stream=None) -> torch.Tensor:
        """The values in a new tensor on ``device``, allocated on the current stream and copied on ``stream``
        (CUDA: asynchronously; the caller orders the streams)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        rows, start = _as_rows(out), 0
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for block in self.blocks:
                rows[start:start + len(block)].copy_(block, non_blocking=True)
                start += len(block)
        return out


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
    way back to the device (CPU tensors: plain clones, so the same bookkeeping runs in CPU tests). A
    ``resident`` copy is over the host budget: it keeps the input on the device and stashes nothing."""

    def __init__(self, hidden: torch.Tensor, stream, previous: _HostCopy | None, resident: bool = False):
        self.device = hidden.device
        self.stream = stream
        # the copy made just before this one (the layer below): prefetched when this one is fetched; a
        # weak reference, so a forward whose graph is dropped without backward frees its host buffers
        self.previous = weakref.ref(previous) if previous is not None else None
        self.loaded = None       # event: the device buffers are filled (CUDA)
        self.on_device = None    # the prefetched device tensors
        self.host = []           # _HostTensors: the layer input, then the stashed ones; None once fetched
        self.tags = []
        self.extras = []         # after fetch: the stashed tensors on the device, in stash order
        # the device tensors themselves, while this is the newest copy: the top layer's backward comes
        # right after its forward, so it uses them instead of waiting for a copy back (~4 ms at 8B)
        self.kept = []
        self.resident = resident
        self.may_stash = not resident  # and within the budget: _OffloadState.admit
        # the layer's place in its forward (0: the first layer), for the budget of the inputs still to come
        self.index = previous.index + 1 if previous is not None else 0
        if resident:
            self.kept.append(hidden.detach())
            self.tags.append("input")
        else:
            self.add(hidden, "input")

    def host_bytes(self) -> int:
        """Host memory the copies hold (pinned blocks as torch's host allocator rounds them)."""
        return sum(h.host_bytes for h in self.host) if self.host is not None else 0

    def add(self, t: torch.Tensor, tag) -> None:
        self.host.append(_HostTensor(t, self.stream))
        if t.is_cuda:
            self.kept.append(t.detach())
        self.tags.append(tag)

    def prefetch(self) -> None:
        """Start the copies back to the device (no-op if started or already consumed)."""
        if self.on_device is not None or self.host is None:
            return
        if self.kept:  # the newest copy, or a resident one: nothing to bring back
            self.on_device, self.kept = self.kept, []
            return
        if not self.device.type == "cuda":
            self.on_device = [h.to(self.device) for h in self.host]
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        bufs = [h.to(self.device, self.stream) for h in self.host]  # the compute stream's pool
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
    """Per model: the side stream, the most recent host copy (the next copy's ``previous``) and the budget
    of the pinned host memory the copies hold (module docstring)."""

    def __init__(self, layers: int | None = None):
        self.stream = None
        self.layers = layers  # the checkpointed layers of one forward (None: unknown, no room kept for them)
        self.last = None  # weakref to the newest _HostCopy
        self.live = weakref.WeakSet()  # copies whose host buffers may still be held
        self.host_budget = None  # bytes; host_budget(), set on first use
        # the largest stash a layer has made: what the next one will add (0 until one has: the first
        # layer's stash can pass the budget by its own size)
        self.stash_bytes = 0
        self.over_budget = 0  # layers that did not stash, for the warning
        self.resident = 0  # layer inputs kept on the device, for the warning

    def new_copy(self, hidden: torch.Tensor) -> _HostCopy:
        if hidden.is_cuda and self.stream is None:
            self.stream = torch.cuda.Stream(hidden.device)
        if self.host_budget is None:
            self.host_budget = host_budget()
        last = self.last() if self.last is not None else None
        if last is not None and not last.resident:
            last.kept = []  # no longer the newest: its device tensors go (their host copies are made)
        # a copy whose backward already ran (the previous step's) is no layer below this one
        previous = last if last is not None and last.host is not None else None
        held = sum(c.host_bytes() for c in self.live)
        need = _HostTensor.bytes_for(hidden)
        resident = held + need > self.host_budget
        if resident:
            self.resident += 1
            if self.resident == 1:
                warnings.warn(f"offload: {held / 2**30:.1f} GiB of pinned host memory held, a layer input "
                              f"({need / 2**30:.2f} GiB) would pass the budget of {self.host_budget / 2**30:.1f} "
                              "GiB: such layers keep their input in device memory", stacklevel=2)
        copy = _HostCopy(hidden, self.stream, previous, resident)
        self.last = weakref.ref(copy)
        self.live.add(copy)
        if not resident:
            self.admit(copy, held + need, need)
        return copy

    def admit(self, copy: _HostCopy, held: int, input_bytes: int) -> None:
        """Whether ``copy``'s layer may stash: the host bytes held with its input, one layer's stash, and the
        inputs of the layers still to come in this forward within budget."""
        above = max(0, self.layers - copy.index - 1) if self.layers is not None else 0
        copy.may_stash = held + self.stash_bytes + above * input_bytes <= self.host_budget
        if not copy.may_stash:
            self.over_budget += 1
            if self.over_budget == 1:
                stash = (f"a layer's projection stash ({self.stash_bytes / 2**30:.2f} GiB) and "
                         if self.stash_bytes else "")
                warnings.warn(f"offload: {held / 2**30:.1f} GiB of pinned host memory held, {stash}the {above} "
                              f"inputs still to come ({input_bytes / 2**30:.2f} GiB each) would pass the budget of "
                              f"{self.host_budget / 2**30:.1f} GiB: such layers recompute their projections",
                              stacklevel=3)

    def stashed(self, copy: _HostCopy, input_bytes: int) -> None:
        self.stash_bytes = max(self.stash_bytes, copy.host_bytes() - input_bytes)


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
        from transformers.modeling_layers import GradientCheckpointingLayer

        takers = [module for module in base.modules()
                  if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func")]
        # the layers one forward checkpoints (the model itself carries the flag too, and calls them)
        layers = sum(isinstance(module, GradientCheckpointingLayer) for module in takers)
        checkpoint = offloaded_checkpoint_function(_OffloadState(layers=layers or None))
        for module in takers:
            module._gradient_checkpointing_func = checkpoint
        # Not under DeepSpeed (an initialized process group): ZeRO broadcasts and partitions parameters with
        # NCCL collectives, which expect device memory; the table stays on the device there.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            move_input_embedding_to_host(model)
