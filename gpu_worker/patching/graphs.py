"""CUDA graphs for the decoder layers of a fixed-shape training step.

A small model's step is host-bound on an H200: at 1B the GPU needs ~95 ms a step and the host about as
long to issue it (~100 aten ops and Triton launches per layer and direction, each through Python and the
dispatcher; bench/NOTES.md, session 8), so every host stall shows in the step time. With fixed shapes the
work of a layer is the same every step, so it is issued once, as a CUDA graph, and replayed: one launch
per layer and direction.

How: a training forward whose layers see the same shapes as the forward before it captures every layer's
forward and backward (``torch.cuda.graph``, one memory pool, in the order they run: forward 0..L-1, then
backward L-1..0, as ``torch.cuda.make_graphed_callables`` does), and later forwards with those shapes
replay them. Layer i+1's captured input is layer i's captured output, and layer i's captured input
gradient is layer i-1's output gradient, so the replays chain with no copies; only the first layer's
input, the last layer's output gradient and the attention's tables (cos/sin, a mask) are copied in.
Not ``make_graphed_callables`` itself: its backward hands autograd the graph's own parameter-gradient
buffers as fresh tensors, which autograd then adopts as ``.grad`` (no copy), so the next replay would
overwrite a gradient being accumulated over micro-batches; here autograd gets a copy of them (one
``torch.cat`` a layer), which it adopts or adds into the gradient being accumulated, as in eager mode.

Adapter dropout replays too (by default since session 25: on an H100 host where the eager 1B step is
host-bound, 7-10% faster; bench/NOTES.md): the fused LoRA nodes draw ``philox`` masks
(tuneforge_kernels/dropout.py), which the kernels compute from a seed tensor. Each layer's capture runs
under ``dropout.seeded_by`` its own static seed (the draws record a pointer to it and their salts, and touch
no generator), and the seed is drawn again from the default CUDA generator before each replay, outside the
graph: every step gets new masks, and the layer's backward replay reads the ones its forward used. Any other
random op in a layer (PEFT's own dropout, where a projection keeps its stock forward; an attention dropout)
keeps the model eager: the warm-up before a capture looks for them (``_RandomOps``; a capture of PEFT's
dropout once invalidated the capture and left the CUDA generator refusing every eager dropout:
bench/NOTES.md, session 13).

A layer runs its stock (eager) forward instead when anything differs from what was captured: no grad or
eval mode, other shapes, dtypes or autocast state, a KV cache, hooks on the layer or inside it, a parameter or
buffer replaced since the capture (a merge, ``.to()``), adapters switched or rescaled, activation
checkpointing, or the layer's last replay still waiting for its backward (two forwards before one
backward: a replay would overwrite what that backward reads). A training step with another shape drops the
graphs at once (their pool holds a step's activations, which the eager step would need a second time:
memory stays near the eager step's), and a shape that repeats is captured again; graphs that served fewer
than ``MIN_REPLAYED_STEPS`` steps before their shape changed count as wasted. After each wasted capture a
shape must repeat on twice as many steps in a row before it is captured (one, then two, then four), and
``WASTED_CAPTURES`` of them turn graphs off for the model (shapes that change all the time), as does a
capture that fails (an op that cannot be captured); ``LayerGraphs.status`` says why.

Packed batches (several documents per row) replay too: with graphs attached, the patched causal LM pads
their document boundaries (``cu_seqlens``) with empty documents to a bucket of document counts that only
grows, sets ``max_len`` to the row width (decoder._packing), and pads their rows with empty rows (every
label ignored) to a row count that only grows (decoder.pad_rows: documents packed first-fit take more
rows on some steps than on others), so a job's packed rows of one width take a few shapes at most; the
boundaries are a static input like the tables. Not where a layer's sliding window
is shorter than the rows (Gemma 2 and 3): those boundaries stay tight, and the layers eager.

A replayed layer's output is the graph's buffer: the next step's replay overwrites it, so a tensor kept
from one step's layers (not their values) changes at the next step.
"""

from __future__ import annotations

import copy
import gc
import logging
import weakref
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gpu_worker.patching.decoder import layer_subclass
from gpu_worker.patching.lora import fp8_enabled
from tuneforge_kernels import dropout
from tuneforge_kernels.varlen_attention import Packing

log = logging.getLogger(__name__)

# graphs dropped after fewer replayed steps than this were not worth their capture (about two steps of
# the layers' work); this many such captures turn the model's graphs off
MIN_REPLAYED_STEPS = 8
WASTED_CAPTURES = 3
_MAX_LEN = "packed_sequences.max_len"  # a packed batch's max_len among a call's plain values
# keyword arguments of a decoder layer's forward whose non-tensor values must be falsy to replay
_MUST_BE_EMPTY = ("past_key_values", "cache", "use_cache", "output_attentions", "layer_past")


class _Graph:
    """One layer's captured forward and backward, and the static tensors they read and write."""

    def __init__(self, modules: list[nn.Module], signature, x: torch.Tensor, params: tuple[torch.Tensor, ...]):
        self.signature = signature  # the call this graph computes (LayerGraphs.run)
        self.identity = _identity(modules)
        self.x = x  # the static input: a leaf, requires_grad as the real input
        self.params = params
        self.statics: tuple[_Static, ...] = ()
        self.fwd = torch.cuda.CUDAGraph()
        self.bwd: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.grad_out: torch.Tensor | None = None
        self.grads: tuple = ()  # (input gradient or None, *parameter gradients or None)
        # the adapters' dropout masks' seed (dropout.seeded_by), drawn again before each replay where the
        # capture drew any (``draws``)
        self.seed = dropout.new_seed(x.device)
        self.draws = 0
        # the autograd node of a replayed forward whose backward has not run yet (weak: a dropped autograd
        # graph frees the layer for the next replay)
        self.pending: weakref.ref | None = None

    def is_pending(self) -> bool:
        return self.pending is not None and self.pending() is not None


class _Static:
    """A static copy of a table or mask (cos, sin, an attention mask, position ids) that the graphs of a
    group of layers read: the layers that got the same tensor in the eager step before the capture (all of
    them for Llama's rotary tables; Gemma 3's local and global tables make two groups)."""

    def __init__(self, like: torch.Tensor):
        self.tensor = torch.empty_like(like)
        self.source = None  # the tensor it was last loaded from (held, so identity is safe)
        self.readers: list[_Graph] = []

    def load(self, src: torch.Tensor) -> bool:
        if self.source is src:
            return True  # a layer before this one loaded the same tensor
        if any(g.is_pending() for g in self.readers):
            return False  # a backward still to run reads the values in place
        self.tensor.copy_(src)
        self.source = src
        return True


def _static_groups(sources: dict[int, tuple], like: tuple, n_layers: int) -> list[tuple[_Static, ...]]:
    """Each layer's static tables: one ``_Static`` per group of layers that got the same tensor in that slot
    in the last eager step (``sources``: layer -> its tensors then; a layer missing there gets its own),
    shaped like the first layer's tensors ``like``."""
    groups, statics = {}, []
    for i in range(n_layers):
        seen = sources.get(i, ())
        row = []
        for k, t in enumerate(like):
            key = (k, id(seen[k]) if k < len(seen) else ("layer", i))
            if key not in groups:
                groups[key] = _Static(t)
            row.append(groups[key])
        statics.append(tuple(row))
    return statics


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: _Graph, n_tensors: int, x, *rest):
        if graph.x.data_ptr() != x.data_ptr():
            graph.x.copy_(x)
        if graph.draws:
            graph.seed.random_(0, dropout.SEED_HIGH)  # this step's masks (eager: the generator moves as usual)
        graph.fwd.replay()
        graph.pending = weakref.ref(ctx)
        ctx.graph, ctx.n_tensors = graph, n_tensors
        return graph.out.detach()  # a new tensor each call: autograd sets its grad_fn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        graph = ctx.graph
        if graph.grad_out.data_ptr() != grad.data_ptr():
            graph.grad_out.copy_(grad)
        graph.bwd.replay()
        graph.pending = None
        dx, *dparams = graph.grads
        # dx is the graph's buffer that the layer below reads as its output gradient (no copy); the parameter
        # gradients are handed over as copies (_handed_over)
        return (None, None, dx, *([None] * ctx.n_tensors), *_handed_over(dparams))


def _handed_over(grads) -> list:
    """Copies of a layer's parameter-gradient buffers for autograd: one new allocation per dtype, written
    by one ``torch.cat``, and views of it. The buffers themselves cannot become ``.grad`` (the next replay
    writes them); autograd adopts a gradient that nothing else references as ``.grad`` without a copy,
    and adds it into a gradient being accumulated. Handed the buffers, autograd copied each one: 14
    small copies a layer (224 a 1B step), each a launch."""
    out = list(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        if g is not None:
            by_dtype.setdefault(g.dtype, []).append(i)
    for slots in by_dtype.values():
        flat = torch.cat([grads[i].reshape(-1) for i in slots])
        for i, piece in zip(slots, flat.split([grads[i].numel() for i in slots])):
            out[i] = piece.view_as(grads[i])
    return out


def _identity(modules: list[nn.Module]) -> tuple:
    """What a captured layer (its ``modules()``) must still be to replay: the same parameter and buffer
    storages (a merge or ``.to()`` replaces them) and the same adapter state (PEFT's active adapters,
    disabled or merged flags and scales, which the patched forward reads at every call)."""
    ident = []
    for m in modules:
        ident += [None if t is None else t.data_ptr() for t in m._parameters.values()]
        ident += [None if t is None else t.data_ptr() for t in m._buffers.values()]
        if "lora_A" in m._modules:
            ident.append((tuple(getattr(m, "active_adapters", ()) or ()), getattr(m, "disable_adapters", None),
                          getattr(m, "merged", None), tuple(sorted(getattr(m, "scaling", {}).items()))))
    return tuple(ident)


class _RandomOps(TorchDispatchMode):
    """Records the random ops run inside it (``draws_random``): a capture must not draw from the CUDA
    generator (module docstring)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if draws_random(func, args, kwargs):
            self.seen.append(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


def draws_random(func, args, kwargs) -> bool:
    """Whether an ATen op call draws from a generator: ATen's ``nondeterministic_seeded`` ops (dropout,
    bernoulli, rand...), but the attention kernels only with a ``dropout_p`` above 0 (they carry the tag
    for their dropout)."""
    if torch.Tag.nondeterministic_seeded not in func.tags or "no_dropout" in func.name():
        return False
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get("dropout_p", arg.default_value)
            return bool(value)
    return True


class _Uncapturable(Exception):
    pass


def _fresh_generator_state(device: torch.device) -> None:
    """After a failed capture: the capture that never ended stays registered in the device's default
    generator, whose eager draws then fail ("Offset increment outside graph capture encountered
    unexpectedly": the next dropout mask would stop the run). The generator takes a copy of its seed and
    offset, without that registration; its random stream goes on where it was."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    try:  # a failure here must not stop a run that draws nothing (the path passed its GPU test: session 25)
        generator.graphsafe_set_state(generator.clone_state())
    except RuntimeError as err:
        log.warning("the default CUDA generator keeps the failed capture (%s): its eager draws may fail", err)


@contextmanager
def _no_collection():
    """Python's cyclic collector off, after one collection: a collection within a capture could destroy a
    dead graph's CUDAGraph, whose teardown a capturing stream does not permit, and the capture fails
    ("operation not permitted when stream is capturing", session 24). torch's own capture collects only
    with ``torch.compiler.config.force_cudagraph_gc``."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _has_hooks(modules) -> bool:
    """Whether a hook could run in a captured layer (one marked ``graph_safe`` says that it cannot or that
    it fails the capture: FP8 mode's, lora.py)."""
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks \
            or g._global_backward_pre_hooks:
        return True
    return any(m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
               or any(not getattr(hook, "graph_safe", False) for hook in m._forward_pre_hooks.values())
               for m in modules)


def _autocast_state() -> tuple:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


def _split_kwargs(kwargs: dict):
    """(names of the tensor inputs, their tensors, the rest as a hashable signature) of a layer call, or
    None when the call cannot be replayed. ``position_embeddings`` is the (cos, sin) pair."""
    names, tensors, rest = [], [], []
    for name in sorted(kwargs):
        value = kwargs[name]
        if name in _MUST_BE_EMPTY:
            if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu":
                value = bool(value)  # collate's use_cache=tensor(False)
            if value:
                return None
            continue
        if name == "packed_sequences" and isinstance(value, Packing):
            # the documents' boundaries are a tensor input; their count and max_len are the signature's
            # (decoder._packing pads them to a bucket, max_len the row width). The captured call gets no
            # host-side starts: only the flash kernel (cu_seqlens, max_len) can serve a replay
            names.append((name, None))
            tensors.append(value.cu_seqlens)
            rest.append((_MAX_LEN, value.max_len))
        elif name == "packed_sequences" and value is not None:
            return None
        elif name == "position_embeddings" and isinstance(value, tuple) and len(value) == 2 \
                and all(isinstance(t, torch.Tensor) for t in value):
            names += [("position_embeddings", 0), ("position_embeddings", 1)]
            tensors += list(value)
        elif isinstance(value, torch.Tensor):
            names.append((name, None))
            tensors.append(value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            rest.append((name, value))
        else:
            return None
    if any(not t.is_cuda or t.requires_grad for t in tensors):
        return None
    return tuple(names), tuple(tensors), tuple(rest)


def _tensor_signature(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad


def _rebuild_kwargs(names, tensors, rest) -> dict:
    kwargs = dict(rest)
    pair = {}
    for (name, slot), t in zip(names, tensors):
        if name == "position_embeddings":
            pair[slot] = t
        elif name == "packed_sequences":
            kwargs[name] = Packing(t, None, kwargs.pop(_MAX_LEN))
        else:
            kwargs[name] = t
    if pair:
        kwargs["position_embeddings"] = (pair[0], pair[1])
    return kwargs


class LayerGraphs:
    """The captured decoder layers of one model (``attach``), shared by its layers."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.modules: list[list[nn.Module]] | None = None  # each layer's modules(), listed at first use
        self.graphs: list[_Graph] | None = None
        self._seen = None  # the first layer's signature at its last eager call
        self._repeats = 0  # how many eager steps in a row before this one had that signature
        self._sources: dict[int, tuple] = {}  # each layer's tables in the last eager step (which are shared)
        self.captures = 0
        self.replays = 0
        self._steps = 0  # steps replayed by the current graphs
        self._wasted = 0
        self.disabled: str | None = None

    def __deepcopy__(self, memo):
        # a copied model (TRL's reference model) gets its own, empty graphs: CUDA graphs do not copy
        return LayerGraphs([copy.deepcopy(layer, memo) for layer in self.layers])

    @property
    def status(self) -> dict:
        return {"layers": len(self.layers), "captures": self.captures, "replays": self.replays,
                "active": self.graphs is not None, "disabled": self.disabled}

    def run(self, layer: nn.Module, index: int, x: torch.Tensor, kwargs: dict):
        """The layer's output through its graph, or None: the caller runs the eager forward."""
        if self.disabled is not None or not (torch.is_grad_enabled() and layer.training and x.is_cuda):
            return None
        if not fp8_enabled():  # an FP8 model's bf16 measurement: the graphs captured its FP8 GEMMs
            return None
        if getattr(layer, "gradient_checkpointing", False) or torch.cuda.is_current_stream_capturing():
            return None
        if self.modules is None:
            self.modules = [list(m.modules()) for m in self.layers]
        split = _split_kwargs(kwargs)
        if split is None or _has_hooks(self.modules[index]):
            return None
        names, tensors, rest = split
        signature = (_tensor_signature(x), names, tuple(_tensor_signature(t) for t in tensors), rest,
                     _autocast_state())
        if index == 0 and (self.graphs is None or self.graphs[0].signature != signature):
            self.shape_changed()
            if self.disabled is not None:
                return None
            if not self._repeated(signature, tensors):
                return None
            self._capture(x, names, tensors, rest, signature)
        graph = self.graphs[index] if self.graphs is not None else None
        if graph is None or graph.signature != signature or graph.is_pending():
            if index:
                self._sources[index] = tensors
            return None
        if graph.identity != _identity(self.modules[index]):
            self.release()  # the layer changed under the graph: capture again when the shapes repeat
            self._seen = None
            return None
        if not all(s.load(t) for s, t in zip(graph.statics, tensors)):
            return None
        self.replays += 1
        self._steps += index == 0
        return _Replay.apply(graph, len(tensors), x, *tensors, *graph.params)

    def _repeated(self, signature, tensors) -> bool:
        """At an eager step's first layer: whether to capture this step's shape now. Only shapes that
        repeat, on one step in a row, then on twice as many after each wasted capture. A capture groups the
        layers' tables as the eager step before it shared them (``_sources``, which an eager step records
        from here on); that step had the same signature."""
        self._repeats = self._repeats + 1 if signature == self._seen else 0
        self._seen = signature
        if self._repeats >= 1 << self._wasted:
            return True
        self._sources = {0: tensors}
        return False

    def release(self) -> None:
        # a graph and its statics refer to each other (``_Static.readers``): without this the cycle, and the
        # graphs' pool with it, would live until the next collection of the cyclic garbage (session 13: a
        # dropped capture's 8.8 GB pool still held at the end of a 1B run). Broken on the statics' side: a
        # released graph whose backward is still to run (a layer changed mid-step) reads its statics' memory
        for graph in self.graphs or ():
            for static in graph.statics:
                static.readers.clear()
                static.source = None
        self.graphs = None
        self.modules = None  # listed again: a change may have added modules

    def shape_changed(self) -> None:
        """A training step whose first layer does not match the graphs: drop them (their pool would stay
        next to the eager step's activations), and count them as wasted if they served few steps."""
        if self.graphs is None:
            return
        if self._steps < MIN_REPLAYED_STEPS:
            self._wasted += 1
            if self._wasted >= WASTED_CAPTURES:
                self.disabled = (f"the batch shape changed within {MIN_REPLAYED_STEPS} steps of "
                                 f"{WASTED_CAPTURES} captures")
        self.release()
        # the graphs' pool goes back to the device before the eager step allocates its own (kept, the
        # reserved memory would be the pool's plus the eager step's)
        torch.cuda.empty_cache()

    def _capture(self, x, names, tensors, rest, signature) -> None:
        self.captures += 1
        self._steps = 0
        try:
            self._capture_layers(x, names, tensors, rest, signature)
        except _Uncapturable as err:
            self.release()
            self.disabled = str(err)
            log.warning("CUDA graphs off for this model (%s); the layers run eagerly", self.disabled)
        except Exception as err:  # an op that cannot be captured: this model trains eagerly
            self.release()
            self.disabled = f"capture failed: {type(err).__name__}: {err}"
            log.warning("CUDA graphs off for this model (%s); the layers run eagerly", self.disabled, exc_info=True)
            _fresh_generator_state(x.device)
        else:
            return
        gc.collect()  # the failed graphs (held by the traceback's frames) let go of the RNG state they took
        torch.cuda.synchronize()

    def _capture_layers(self, x, names, tensors, rest, signature) -> None:
        enabled, dtype = _autocast_state()
        self.modules = [list(m.modules()) for m in self.layers]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graphs' pool takes their place
        trainable = [_Trainable(mods) for mods in self.modules]
        statics = _static_groups(self._sources, tensors, len(self.layers))
        self._sources = {}

        def call(layer, inp, tables):
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                return type(layer)._tf_eager_forward(layer, inp, **_rebuild_kwargs(names, tables, rest))

        # warm-up on a side stream: lazy initialisation (cuBLAS workspaces...) must not land in a capture;
        # and no random op may (the adapters' dropout draws from a seed tensor, as in the capture)
        values = x.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        seed = dropout.new_seed(x.device)  # drawn before _RandomOps starts recording: it is the only draw allowed
        with torch.cuda.stream(side), _RandomOps() as random_ops, dropout.seeded_by(seed):
            needs_grad = x.requires_grad
            for layer, params in zip(self.layers, trainable):
                sample = values.detach().requires_grad_(needs_grad)  # as the layer's captured input will
                with params.swapped() as proxies:
                    out = call(layer, sample, tensors)
                inputs = ([sample] if sample.requires_grad else []) + proxies
                if out.requires_grad and inputs:
                    torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
                needs_grad = out.requires_grad
                del out, sample
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        del values
        if random_ops.seen:
            raise _Uncapturable(f"live dropout outside the fused kernels (random ops {sorted(set(random_ops.seen))} "
                                f"are not captured)")
        # the warm-up's activations, cached for the side stream, which the graphs' pool cannot reuse: kept,
        # the capture would hold a step's activations twice (session 13: 21 GB reserved against 11.6 eager)
        torch.cuda.empty_cache()

        with _no_collection():
            self._capture_graphs(x, signature, trainable, statics, call)

    def _capture_graphs(self, x, signature, trainable, statics, call) -> None:
        pool = torch.cuda.graph_pool_handle()
        graphs, outs, proxies = [], [], []
        inp = x.detach().clone().requires_grad_(x.requires_grad)
        for i, (layer, params) in enumerate(zip(self.layers, trainable)):
            sig = signature if i == 0 else (_tensor_signature(inp), *signature[1:])
            graph = _Graph(self.modules[i], sig, inp, tuple(params.params))
            graph.statics = statics[i]
            for static in graph.statics:
                static.readers.append(graph)
            with params.swapped() as layer_proxies, dropout.seeded_by(graph.seed) as draws, \
                    torch.cuda.graph(graph.fwd, pool=pool, capture_error_mode="thread_local"):
                out = call(layer, inp, tuple(st.tensor for st in graph.statics))
            graph.draws = draws()
            outs.append(out)
            graphs.append(graph)
            proxies.append(layer_proxies)
            inp = out.detach().requires_grad_(out.requires_grad)  # the next layer reads this buffer
        grad_out = torch.empty_like(outs[-1])
        for graph, out, layer_proxies in zip(reversed(graphs), reversed(outs), reversed(proxies)):
            graph.grad_out = grad_out
            inputs = ([graph.x] if graph.x.requires_grad else []) + layer_proxies
            if out.requires_grad and inputs:
                graph.bwd = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph.bwd, pool=pool, capture_error_mode="thread_local"):
                    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
                dx = grads[0] if graph.x.requires_grad else None
                graph.grads = (dx, *grads[len(grads) - len(graph.params):])
            else:
                graph.grads = (None, *([None] * len(graph.params)))
            graph.out = out.detach()
            grad_out = graph.grads[0] if graph.grads[0] is not None else torch.empty_like(graph.x)
        del outs
        self.graphs = graphs


class _Trainable:
    """A layer's trainable parameters, and their stand-ins for a capture: new leaves over the same storage.
    A capture computes the gradients of the stand-ins, not of the parameters themselves: a parameter's
    gradient accumulator that an earlier step's autograd graph keeps alive (a loop holding on to its last
    loss) belongs to the default stream, and the capture's backward would wait on it, which a capture
    cannot do. The replays read the same storage, so they see every optimizer update."""

    def __init__(self, modules: list[nn.Module]):
        self.slots = [(m, n) for m in modules for n, p in m._parameters.items() if p is not None and p.requires_grad]
        self.params = list({id(m._parameters[n]): m._parameters[n] for m, n in self.slots}.values())

    @contextmanager
    def swapped(self):
        """The stand-ins in the modules' places (in ``params`` order) for the ``with`` block."""
        stand_ins = {id(p): nn.Parameter(p.detach(), requires_grad=True) for p in self.params}
        originals = [m._parameters[n] for m, n in self.slots]
        try:
            for (m, n), p in zip(self.slots, originals):
                m._parameters[n] = stand_ins[id(p)]
            yield list(stand_ins.values())
        finally:
            for (m, n), p in zip(self.slots, originals):
                m._parameters[n] = p


def attach(layers: list[nn.Module]) -> LayerGraphs:
    """Give ``layers`` (a model's decoder layers, in order) replayed CUDA graphs for fixed shapes; the
    layers' classes become subclasses whose forward tries the graph first (a class, not an instance,
    forward: transformers checkpoints layers by wrapping the class's forward)."""
    graphs = LayerGraphs(layers)
    for i, layer in enumerate(layers):
        layer._tf_graphs, layer._tf_graph_index = graphs, i
        layer.__class__ = _graphed_layer_class(type(layer))
    return graphs


_GRAPHED_LAYER_CLASSES: dict = {}


def _graphed_layer_class(cls: type) -> type:
    if "_tf_eager_forward" in cls.__dict__:
        return cls  # attached before
    eager = cls.forward

    def forward(self, hidden_states, *args, **kwargs):
        graphs = self.__dict__.get("_tf_graphs")
        if graphs is not None and not args:
            out = graphs.run(self, self._tf_graph_index, hidden_states, kwargs)
            if out is not None:
                return out
        return eager(self, hidden_states, *args, **kwargs)

    return layer_subclass(cls, _GRAPHED_LAYER_CLASSES, forward=forward, _tf_eager_forward=eager)
