"""Reading a projection module (plain ``nn.Linear``, PEFT LoRA ``Linear``, or bitsandbytes ``Linear4bit``
under either) as the ``tuneforge_kernels.lora_mlp.LoraWeights`` the fused kernels take, or ``None`` when the
fused path cannot compute the same function (a trained weight or bias, DoRA, several active adapters...),
in which case the caller runs the module's stock forward. A frozen bias (Qwen2's q/k/v) is added by the
nodes. An adapter's dropout (PEFT's ``lora_dropout``) is read while training and drawn by the fused nodes
(tuneforge_kernels/dropout.py).

Read at every call, not at patch time: PEFT's ``disable_adapter()``, ``merge_adapter()`` and
``set_adapter()`` change what the module computes after patching.

Fused modules (Phi-3's ``gate_up_proj``) are split by output rows with ``split_rows``: views of the
frozen weight and of ``lora_B``, the shared ``lora_A`` passed to each part (autograd sums its gradients).
``join_frozen_weights`` goes the other way for separate projections of one input (q/k/v, gate/up).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch
from torch import nn

from tuneforge_kernels.lora_mlp import LoraWeights


# (shape, dtype, nested, device) -> the tuneforge_kernels.nf4 variant this kind of weight uses: the fastest
# of those that gave bitsandbytes' exact values on the first weight of the kind, or False (bitsandbytes'
# own dequantisation) where none did
_NF4_CHECKED: dict = {}
# the same keys -> what pick_variant saw: each variant's milliseconds or why it was not used (the benchmark
# reports it)
_NF4_OUTCOMES: dict = {}


def _nf4_state(qs):
    from tuneforge_kernels.nf4 import NF4State

    if qs.quant_type != "nf4" or not isinstance(qs.code, torch.Tensor) or qs.code.numel() != 16:
        return None
    common = dict(code=qs.code.float(), blocksize=int(qs.blocksize), shape=tuple(qs.shape), dtype=qs.dtype)
    if not qs.nested:
        return NF4State(absmax=qs.absmax, **common)
    s2 = qs.state2
    return NF4State(absmax=qs.absmax, code2=s2.code, absmax2=s2.absmax, blocksize2=int(s2.blocksize),
                    offset=torch.as_tensor(qs.offset, device=qs.absmax.device), **common)


class _NF4Weight:
    """A bitsandbytes 4-bit weight, expanded on demand into a transient ``(out, in)`` tensor by
    ``tuneforge_kernels.nf4`` (one pass, the fastest variant that matched bitsandbytes bit for bit), else by
    bitsandbytes."""

    def __init__(self, param):
        self.param = param

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.param.quant_state.shape)  # the unquantised (out, in)

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        data, qs = self.param.data, self.param.quant_state
        state = _nf4_state(qs) if data.is_cuda else None
        if state is None:
            return bnbf.dequantize_4bit(data, qs)
        from tuneforge_kernels.nf4 import dequantize_nf4, pick_variant

        key = (state.shape, state.dtype, state.nested, data.device)
        variant = _NF4_CHECKED.get(key)
        if variant is None:  # first weight of this kind: every variant against bitsandbytes, then timed
            ref = bnbf.dequantize_4bit(data, qs)
            try:
                variant, outcomes = pick_variant(data, state, ref)
            except Exception as e:  # noqa: BLE001  (a kernel that cannot run here falls back, loudly)
                variant, outcomes = None, {"all": f"{type(e).__name__}: {e}"}
            if variant is None:
                warnings.warn(f"tuneforge_kernels.nf4 not used for {key[:3]}: {outcomes}; "
                              "bitsandbytes dequantises")
            _NF4_CHECKED[key], _NF4_OUTCOMES[key] = variant or False, outcomes
            return ref
        return dequantize_nf4(data, state, variant=variant) if variant else bnbf.dequantize_4bit(data, qs)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` alone (``tuneforge_kernels.nf4.row_block``: the same values as the whole
        weight's rows) where this kind of weight uses our kernel and the rows begin a quantisation block;
        else the whole weight expanded and sliced."""
        from tuneforge_kernels.nf4 import dequantize_nf4, row_block

        data = self.param.data
        state = _nf4_state(self.param.quant_state) if data.is_cuda else None
        variant = state and _NF4_CHECKED.get((state.shape, state.dtype, state.nested, data.device))
        block = row_block(data, state, start, stop) if variant else None
        if block is None:
            return self.dequantize()[start:stop]
        return dequantize_nf4(*block, variant=variant)


class _RowSlice:
    """Rows ``[start, stop)`` of a weight that is only available through ``dequantize()`` (NF4): expanded
    alone where the weight can (``dequantize_rows``), so a fused weight's parts do not each expand all of
    it."""

    def __init__(self, weight, start: int, stop: int):
        self.weight, self.start, self.stop = weight, start, stop

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.stop - self.start, *self.weight.shape[1:]))

    def dequantize(self) -> torch.Tensor:
        rows = getattr(self.weight, "dequantize_rows", None)
        if rows is not None:
            return rows(self.start, self.stop)
        return self.weight.dequantize()[self.start:self.stop]


def split_rows(p: LoraWeights, sizes: list[int]) -> list[LoraWeights]:
    """``p`` as consecutive output-row blocks of the given sizes (y = cat(y_0, y_1, ...) along features)."""
    from tuneforge_kernels.fp8 import Fp8Weight

    parts, start = [], 0
    for n in sizes:
        if isinstance(p.weight, torch.Tensor):
            w = p.weight[start:start + n]
        elif isinstance(p.weight, Fp8Weight):
            w = p.weight.rows(start, start + n)
        else:
            w = _RowSlice(p.weight, start, start + n)
        b = p.lora_b[start:start + n] if p.lora_b is not None else None
        bias = p.bias[start:start + n] if p.bias is not None else None
        parts.append(LoraWeights(w, p.lora_a, b, p.scale, p.dropout, bias))  # one adapter: one mask (dropout.py)
        start += n
    return parts


def join_frozen_weights(modules: list[nn.Module]) -> bool:
    """Store the frozen (not quantised) base weights of ``modules`` (projections of one input, no bias) as
    consecutive row blocks of one buffer; each parameter becomes a view of its block. The fused kernels
    then compute the projections with one GEMM (``tuneforge_kernels.lora_mlp.joined``), which is faster
    for small models' shapes (bench/NOTES.md v14). Parameters, state dicts and adapters are unchanged;
    anything that later replaces a weight tensor (a safe merge, ``.to()``) only undoes the layout, and the
    kernels fall back to one GEMM per weight. Returns whether the weights are joined now."""
    from tuneforge_kernels.lora_mlp import joined

    weights = [_base_weight(m.get_base_layer() if hasattr(m, "base_layer") else m) for m in modules]
    if not all(isinstance(w, nn.Parameter) and not w.requires_grad and w.is_floating_point() and w.is_contiguous()
               for w in weights):
        return False
    first = weights[0]
    if any(w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1] for w in weights):
        return False
    if joined(weights, 0) is not None:
        return True
    buffer = torch.cat([w.detach() for w in weights])                            # (sum out, in)
    start = 0
    for w in weights:
        w.data = buffer[start:start + w.shape[0]]
        start += w.shape[0]
    return True


def pad_frozen_mlp(mlp: nn.Module, act: str | None = None) -> bool:
    """Store the frozen base weights of a gated MLP with separate ``gate_proj``/``up_proj``/``down_proj`` LoRA
    modules in ``tuneforge_kernels.lora_mlp``'s padded layout for their adapters' ranks: each parameter
    becomes a view of its block (rows of a wider buffer), and the fused MLP carries the rank-r terms in its
    GEMMs. As with ``join_frozen_weights``, values, state dicts and adapters are unchanged, and anything that
    replaces a weight tensor or an adapter of another rank only undoes the layout (the MLP then runs
    unpadded). With ``act`` (the MLP's activation) where ``tuneforge_kernels.gated_gemm`` can serve it, the
    gate's and up's rows are interleaved, which its fused epilogues read. Returns whether the weights are
    padded now."""
    from tuneforge_kernels import gated_gemm
    from tuneforge_kernels.lora_mlp import gate_up_rows, pad_weights, padded, spare_width

    found = _adapted(mlp, ("gate_proj", "up_proj", "down_proj"))
    if found is None:
        return False
    modules, parts = found
    buffers = padded(*parts)
    if buffers is None:
        weights = [p.weight for p in parts]
        if not _movable(weights) or parts[0].lora_a is parts[1].lora_a:
            return False
        (i, h), ranks = weights[0].shape, tuple(p.lora_a.shape[0] for p in parts)
        if weights[1].shape != (i, h) or weights[2].shape != (h, i):
            return False
        # the epilogues' TMA wants 16-byte row strides (every buffer's width a multiple of 8 elements: not so
        # at train_step.py's --pad-align 1), and sizes that are multiples of 64 are the ones run on a GPU
        sp, sp_d = spare_width(ranks[0] + ranks[1], h, i), spare_width(ranks[2], h, i)
        inter = act is not None and h % 64 == 0 and i % 64 == 0 and (h + sp) % 8 == 0 and (i + sp_d) % 8 == 0 \
            and gated_gemm.unavailable(weights[0].device, act, weights[0].dtype) is None
        if inter:  # a QuACK that cannot run them leaves lora_glu's passes, and the job's events say why
            mlp._tf_gated_off = gated_gemm.trial(weights[0].device, act, h, i, sp, sp_d)
            inter = mlp._tf_gated_off is None
        gu, d = pad_weights(*(w.detach() for w in weights), ranks, interleave=inter)
        gate_rows, up_rows = gate_up_rows(i, inter)
        weights[0].data, weights[1].data, weights[2].data = gu[gate_rows, :h], gu[up_rows, :h], d[:h, :i]
        buffers = padded(*(lora_weights(m) for m in modules))
        if buffers is None:
            return False
    (gu, d), h = buffers, parts[0].weight.shape[1]
    # the fused layer's post-attention norm leaves the layout's spare columns after its rows for s x A^T
    # (rms_norm's spare): no copy of the MLP's input into the padded GEMM's operand
    mlp._tf_input_spare = gu.shape[1] - h
    # and the next layer's input norm leaves the down projection's after its input gradient's rows
    # (rms_norm's grad_spare, patch_model): no copy of the MLP's output gradient into [dy | s dy B_d]
    mlp._tf_output_grad_spare = d.shape[0] - h
    return True


def mlp_interleaved(mlp: nn.Module) -> bool:
    """Whether ``pad_frozen_mlp`` laid this MLP's gate and up rows out interleaved (its fused epilogues run)."""
    from tuneforge_kernels.lora_mlp import interleaved, padded

    found = _adapted(mlp, ("gate_proj", "up_proj", "down_proj"))
    return found is not None and padded(*found[1]) is not None and interleaved(*found[1][:2])


def pad_frozen_qkv(attn: nn.Module) -> bool:
    """``pad_frozen_mlp`` for an attention's separate ``q_proj``/``k_proj``/``v_proj`` LoRA modules
    (``tuneforge_kernels.lora_linear``'s padded layout): the fused Q/K/V node carries the adapters' rank-r
    terms in its GEMMs. Returns whether the weights are padded now."""
    buf = _pad_linears(attn, ("q_proj", "k_proj", "v_proj"))
    if buf is None:
        return False
    # the fused layer's input norm leaves the layout's spare columns after its rows for s x A^T (rms_norm's
    # spare)
    attn._tf_input_spare = buf.shape[1] - attn.q_proj.in_features
    return True


def pad_frozen_o(attn: nn.Module) -> bool:
    """The same layout for an attention's ``o_proj`` alone: its node's input gradient is one GEMM over
    ``[dy | s dy B]``. Returns whether the weight is padded now."""
    buf = _pad_linears(attn, ("o_proj",))
    if buf is None:
        return False
    # the fused layer's post-attention norm leaves the spare columns after its input gradient's rows for
    # s dy B (rms_norm's grad_spare): no copy of O's output gradient into [dy | s dy B]
    attn._tf_output_grad_spare = buf.shape[0] - attn.o_proj.out_features
    # and FA4's batched attention writes the input there (hopper_attention.causal's spare): no copy into
    # [x | s x A^T] either
    attn._tf_o_input_spare = buf.shape[1] - attn.o_proj.in_features
    return True


def _pad_linears(owner: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    """The padded layout's buffer of ``owner``'s named LoRA projections (of one input), their frozen weights
    made views of its blocks unless they are already; None where they cannot be."""
    from tuneforge_kernels.lora_linear import pad_linear_weights, padded_linears

    found = _adapted(owner, names)
    if found is None:
        return None
    modules, parts = found
    buf = padded_linears(parts)
    if buf is not None:
        return buf
    weights = [p.weight for p in parts]
    if not _movable(weights) or any(w.shape[1] != weights[0].shape[1] for w in weights):
        return None
    buf = pad_linear_weights([w.detach() for w in weights], [p.lora_a.shape[0] for p in parts])
    start, h = 0, weights[0].shape[1]
    for w in weights:
        w.data = buf[start:start + w.shape[0], :h]
        start += w.shape[0]
    return padded_linears([lora_weights(m) for m in modules])


def _adapted(owner: nn.Module, names: tuple[str, ...]):
    """``owner``'s named PEFT LoRA modules and their ``LoraWeights``, when each has an adapter and no bias
    (the padded layouts carry none); else None."""
    modules = [getattr(owner, n, None) for n in names]
    if any(m is None or not hasattr(m, "base_layer") for m in modules):
        return None
    parts = [lora_weights(m) for m in modules]
    if any(p is None or p.lora_a is None or p.bias is not None for p in parts):
        return None
    return modules, parts


def _movable(weights) -> bool:
    """Frozen dense weights of one dtype and device, each its own contiguous tensor: a padded layout may
    re-store them."""
    return all(isinstance(w, nn.Parameter) and not w.requires_grad and w.is_floating_point() and w.is_contiguous()
               and w.dtype == weights[0].dtype and w.device == weights[0].device for w in weights)


def contiguous_weights(model: nn.Module) -> int:
    """Give every parameter stored as rows of a wider buffer (``pad_frozen_mlp``) a contiguous tensor of its
    own, which transformers' ``save_pretrained`` needs (it reads tensors sharing a buffer through
    ``view(-1)``); for a merged model before saving. The count re-stored."""
    moved = 0
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
            moved += 1
    return moved


def _base_weight(layer: nn.Module, fp8: bool = True):
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    if type(weight).__name__ == "Params4bit":
        return _NF4Weight(weight)
    if isinstance(layer, nn.Linear):
        if fp8 and _FP8_ON.get():
            return _fp8_weight(layer, weight)
        return _DeviceCopy(weight) if "_tf_on_host" in layer.__dict__ else weight
    return None


class _DeviceCopy:
    """A bf16 weight that FP8 mode keeps in host memory (``keep_fp8_sources_on_host``), read in bf16
    (``fp8_disabled``): copied into device memory for its GEMM alone, one transient at a time. A GEMM
    reading it in place would fetch it over the host link once per tile row of its output."""

    def __init__(self, param):
        self.param = param

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def dequantize(self) -> torch.Tensor:
        return self.param.detach().clone()


# FP8 mode (patch_model(fp8=True)): each frozen projection of the decoder layers holds an e4m3 copy of its
# weight as ``_tf_fp8`` (tuneforge_kernels.fp8.Fp8Weight), which the fused kernels read instead of the
# weight while this is True (``fp8_disabled`` turns it off: the worker's bf16 loss beside the FP8 one)
_FP8_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("tuneforge_fp8_on", default=True)


def attach_fp8(decoder_layer: nn.Module) -> int:
    """Give every frozen ``nn.Linear`` (a bias, if any, frozen too) of ``decoder_layer`` its FP8 copy
    (``_tf_fp8``); how many took one (weights whose sides are not multiples of 16, trainable or quantised
    weights keep their GEMMs).
    PEFT's merge writes the adapter into the weight through ``.data``, which the copy cannot see: a LoRA
    module's ``merge`` sets its base's copy aside and its ``unmerge`` quantises the weight into it again
    (in place: CUDA graphs that read it stay valid)."""
    from tuneforge_kernels.fp8 import Fp8Weight, fp8_eligible

    taken = 0
    for module in decoder_layer.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, nn.Linear) and (module.bias is None or not module.bias.requires_grad)
                and type(weight) is nn.Parameter
                and not weight.requires_grad and fp8_eligible(weight)):
            module._tf_fp8 = Fp8Weight(weight)
            taken += 1
    for module in decoder_layer.modules():
        if callable(getattr(module, "merge", None)) and hasattr(getattr(module, "base_layer", None), "_tf_fp8"):
            _copies_follow_merges(module)
    return taken


def keep_fp8_sources_on_host(decoder_layer: nn.Module) -> int:
    """FP8 mode: move the bf16 weights of ``decoder_layer``'s projections that have an FP8 copy into pinned
    host memory, where the training step never reads them (its GEMMs read the copies); the bytes moved.

    Each stays a CUDA tensor (``memory.host_resident``: the device reads pinned host memory through unified
    addressing), so every reader still works: a bf16 measurement (``fp8_disabled``) copies each weight to
    the device for its GEMM (``_DeviceCopy``), a merge first brings the weight back to device memory
    (``_bring_home``), and so does a module's stock forward (a forward pre-hook), which would otherwise read
    it over the host link. At 8B: 14 GB less device memory than keeping both (bench/NOTES.md, session 16).
    A CPU model's weights are moved to new host storage, which only exercises these paths."""
    moved = 0
    for module in decoder_layer.modules():
        fp8, weight = module.__dict__.get("_tf_fp8"), getattr(module, "weight", None)
        if fp8 is None or "_tf_on_host" in module.__dict__ or not fp8.matches(weight):
            continue
        if weight.is_cuda:
            from gpu_worker.patching.memory import host_resident

            try:
                host = host_resident(weight.data)
            except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # no unified addressing...
                warnings.warn(f"fp8: the bf16 weights stay in device memory ({type(e).__name__}: {e})")
                return moved
        else:
            host = weight.data.clone()
        weight.data = host
        fp8.follow_(weight)
        module._tf_on_host = module.register_forward_pre_hook(_home_before_a_stock_forward)
        moved += weight.numel() * weight.element_size()
    return moved


def _bring_home(module: nn.Module) -> None:
    """A weight ``keep_fp8_sources_on_host`` moved, back in device memory (its FP8 copy follows it)."""
    hook = module.__dict__.pop("_tf_on_host", None)
    if hook is None:
        return
    hook.remove()
    weight = module.weight
    weight.data = weight.data.clone()  # a CUDA tensor's clone: device memory
    for name in ("_tf_fp8", "_tf_fp8_merged"):
        copy = module.__dict__.get(name)
        if copy is not None:
            copy.follow_(weight)


def _home_before_a_stock_forward(module, args):
    # the move cannot be captured: the capture fails and graphs.py runs the model eagerly
    if module.weight.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"a stock forward of {type(module).__name__} moves its bf16 weight to the device, "
                           "which a CUDA graph cannot capture")
    _bring_home(module)


# graphs.py captures a layer despite this hook: the patched layers read their projections' weights and never
# call a projection's own forward; one that did would fail its capture above, and the model trains eagerly
_home_before_a_stock_forward.graph_safe = True


def _copies_follow_merges(lora_module: nn.Module) -> None:
    merge, unmerge = lora_module.merge, lora_module.unmerge

    def merge_dropping_the_copy(*args, **kwargs):
        _bring_home(lora_module.get_base_layer())  # PEFT adds the adapter into the weight in place
        out = merge(*args, **kwargs)
        base = lora_module.get_base_layer()
        if getattr(base, "_tf_fp8", None) is not None and getattr(lora_module, "merged", False):
            base._tf_fp8_merged, base._tf_fp8 = base._tf_fp8, None  # taken again on unmerge
        return out

    def unmerge_taking_a_new_copy(*args, **kwargs):
        out = unmerge(*args, **kwargs)
        base = lora_module.get_base_layer()
        kept = getattr(base, "_tf_fp8_merged", None)
        if kept is not None and not getattr(lora_module, "merged", False):
            base._tf_fp8, base._tf_fp8_merged = kept.retake_(base.weight), None
        return out

    lora_module.merge, lora_module.unmerge = merge_dropping_the_copy, unmerge_taking_a_new_copy


def _fp8_weight(layer: nn.Module, weight: torch.Tensor):
    """The layer's FP8 copy, re-taken (in place) when the weight is no longer the one it was taken from
    (another storage, or an in-place write through the parameter); the weight itself where it has none. A
    write through ``.data`` (PEFT's merges) is not seen, which is why merges set the copy aside."""
    fp8 = layer.__dict__.get("_tf_fp8")  # every projection asks at every call: no Module.__getattr__ miss
    if fp8 is None:
        return weight
    if not fp8.matches(weight):
        from tuneforge_kernels.fp8 import fp8_eligible

        if "_tf_on_host" in layer.__dict__:  # written in host memory: quantised from device memory again
            _bring_home(layer)
            weight = layer.weight
        if not fp8_eligible(weight):
            del layer._tf_fp8
            return weight
        fp8 = layer._tf_fp8 = fp8.retake_(weight)
    return fp8


def fp8_enabled() -> bool:
    """False within ``fp8_disabled``."""
    return _FP8_ON.get()


@contextlib.contextmanager
def fp8_disabled():
    """Within: every FP8 projection computes with its bf16 weight (the worker measures a loss both ways)."""
    token = _FP8_ON.set(False)
    try:
        yield
    finally:
        _FP8_ON.reset(token)


def dropout_rate(module: nn.Module, name: str) -> float:
    """The training dropout of PEFT LoRA ``module``'s adapter ``name`` (0 for PEFT's ``nn.Identity``)."""
    dropout = module.lora_dropout[name]
    return dropout.p if isinstance(dropout, nn.Dropout) else 0.0


def lora_weights(module: nn.Module) -> LoraWeights | None:
    base = module.get_base_layer() if getattr(module, "base_layer", None) is not None else module
    bias = getattr(base, "bias", None)
    if bias is not None and (bias.requires_grad or not isinstance(bias, torch.Tensor)):
        return None  # a trained bias: the fused nodes compute no gradient for it
    if getattr(getattr(base, "weight", None), "requires_grad", False):
        return None  # a trained weight (full fine-tuning): the same; its stock forward trains it
    w = _base_weight(base)
    if w is None:
        return None
    if base is module:  # not PEFT-wrapped
        return LoraWeights(w, bias=bias)
    if getattr(module, "merged", False):  # the base holds the delta, written where FP8 copies do not see it
        return LoraWeights(_base_weight(base, fp8=False), bias=bias)
    if getattr(module, "disable_adapters", False):
        return LoraWeights(w, bias=bias)  # base only
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return LoraWeights(w, bias=bias)
    if len(active) > 1:
        return None
    name = active[0]
    if getattr(module, "use_dora", {}).get(name, False):
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or b.bias is not None:
        return None
    dropout = dropout_rate(module, name) if module.training else 0.0
    return LoraWeights(w, a.weight, b.weight, float(module.scaling[name]), dropout, bias)
