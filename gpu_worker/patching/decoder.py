"""Instance-level forwards for Llama-family decoders (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3; Gemma 3's
inside its multimodal wrapper too) that route the model's norms, Q/K/V and O projections (LoRA fused), rotary
embedding, MLP and loss through ``kernels``.

Each function here replaces ``forward`` on one module *instance* (``module.forward = MethodType(...)``),
except ``patch_residual_norm``, which gives a standard decoder layer instance a subclass of its class
(transformers checkpoints layers by wrapping the class's ``forward``); the classes themselves, other
models and ``torch.nn.functional`` are untouched. Attention itself stays whatever
``config._attn_implementation`` selects (SDPA / flash), so masks and sliding windows behave exactly as in
transformers, with one exception: a packed batch (``position_ids`` restarting at 0, no mask, no KV
cache) runs ``tuneforge_kernels.varlen_attention`` (flash attention's variable-length kernel, the
documents found once per forward) instead of SDPA under a document mask.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import typing
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.patching import hopper_attention
from gpu_worker.patching.lora import lora_weights, split_rows
from gpu_worker.patching.memory import recomputing, replaying, stash, stashing, unstash
from tuneforge_kernels.cross_entropy import fused_linear_cross_entropy
from tuneforge_kernels.lora_linear import GradLanding, lora_linears
from tuneforge_kernels.lora_mlp import lora_mlp
from tuneforge_kernels.rms_norm import rms_norm
from tuneforge_kernels.rope import rope
from tuneforge_kernels.varlen_attention import packed_sequences, varlen_attention

# config.hidden_act -> tuneforge_kernels.lora_mlp activation
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def patch_rms_norm(norm: nn.Module, impl: str | None, offset: float = 0.0) -> None:
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, eps, offset=offset, impl=impl)

    norm.forward = MethodType(forward, norm)
    norm._tf_rms_norm = (eps, offset, impl)  # what the fused layer forward calls in its place


# the last statements of a decoder layer's forward when the MLP's output is only added to the residual
# and returned (Llama, Mistral, Qwen2/3, Gemma); Gemma 2/3 normalise it first, Phi-3 applies dropout
_RESIDUAL_TAIL = ("hidden_states = self.mlp(hidden_states)", "hidden_states = residual + hidden_states",
                  "return hidden_states")


def mlp_output_only_feeds_the_residual(layer: nn.Module) -> bool:
    """Whether ``layer``'s forward ends by adding the MLP's output to the residual and returning it, read
    from the source of the forward that checkpointing recomputes; anything else (or no source): False."""
    if "forward" in vars(layer):
        return False
    try:
        src = inspect.getsource(inspect.unwrap(type(layer).forward))
    except (OSError, TypeError):
        return False
    lines = [ln.split("#")[0].strip() for ln in src.splitlines()]
    return tuple(ln for ln in lines if ln)[-3:] == _RESIDUAL_TAIL


# the rest of a decoder layer's forward after the attention call, when it adds the residual around the
# attention and the MLP and normalises in between (Llama, Mistral, Qwen2/3, Gemma)
_AFTER_ATTENTION = ("hidden_states = residual + hidden_states", "residual = hidden_states",
                    "hidden_states = self.post_attention_layernorm(hidden_states)", *_RESIDUAL_TAIL)


def _pass_through_layer_defaults(layer: nn.Module) -> dict | None:
    """If ``layer``'s forward is exactly ``residual = h; h = input_layernorm(h); h, _ = self_attn(h=h, every
    argument passed on by its own name, **kwargs)`` then ``_AFTER_ATTENTION`` (read from its source), the
    defaults of its keyword parameters (what it passes to the attention when the caller does not);
    else None."""
    if "forward" in vars(layer):
        return None
    stock = inspect.unwrap(type(layer).forward)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(stock)))
    except (OSError, TypeError, SyntaxError):
        return None
    fn = tree.body[0]
    body = [st for st in fn.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
    if len(body) != 3 + len(_AFTER_ATTENTION):
        return None
    head = [ast.unparse(st) for st in body[:2]]
    if head != ["residual = hidden_states", "hidden_states = self.input_layernorm(hidden_states)"]:
        return None
    call = body[2]
    if not (isinstance(call, ast.Assign) and ast.unparse(call.targets[0]).strip("()") == "hidden_states, _"
            and isinstance(call.value, ast.Call) and ast.unparse(call.value.func) == "self.self_attn"
            and not call.value.args):
        return None
    for kw in call.value.keywords:  # name=name, or **kwargs: every argument passed on unchanged
        passed = kw.arg is None or (isinstance(kw.value, ast.Name) and kw.value.id == kw.arg)
        if not passed:
            return None
    if [ast.unparse(st) for st in body[3:]] != list(_AFTER_ATTENTION):
        return None
    params = list(inspect.signature(stock).parameters.values())[2:]  # after self, hidden_states
    if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params):
        return None
    return {p.name: p.default for p in params if p.kind != p.VAR_KEYWORD and p.default is not p.empty}


def patch_residual_norm(layer: nn.Module, impl: str | None, offset: float = 0.0) -> bool:
    """Fuse a standard layer's residual adds into the kernels around them: the add after the attention into
    the post-attention RMSNorm (one kernel reads the attention output and the residual, writes their sum
    and its norm; in backward the residual's gradient is added in the norm's kernel), the add after the
    MLP into the down projection's GEMM (``lora_mlp``'s ``residual``), and in backward the sum of the layer
    input's two gradients (through the input norm and along the residual stream) into the input norm's
    kernel (``rms_norm``'s ``with_input``): four elementwise passes and four launches less per layer. Only for a
    layer whose stock forward is the standard one (``_pass_through_layer_defaults``); the stock forward
    runs when it is called positionally or when a hook watches the norm (addends of different dtypes are
    summed in HF's promoted dtype by ``rms_norm``). Call after ``mlp_output_only_feeds_the_residual`` (it reads the
    stock source). Returns whether the layer computes the fused form.

    The layer's class becomes a subclass with this forward (not an instance ``forward``): transformers
    5.2x applies activation checkpointing by wrapping each layer class's ``forward``, which an instance
    attribute would bypass."""
    if any(c in _FUSED_LAYER_CLASSES.values() for c in type(layer).__mro__):  # patched before (graphs.py may
        return True                                                             # have subclassed it since)
    defaults = _pass_through_layer_defaults(layer)
    if defaults is None:
        return False
    norm = layer.post_attention_layernorm
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    layer._tf_residual_norm = (defaults, eps, offset, impl)
    layer.__class__ = _fused_layer_class(type(layer))
    return True


_FUSED_LAYER_CLASSES: dict = {}


def _fused_layer_class(cls: type) -> type:
    stock = cls.forward

    def forward(self, hidden_states, *args, **kwargs):
        norm, in_norm, mlp = self.post_attention_layernorm, self.input_layernorm, self.mlp
        if args or _hooked(norm) or _hooked(in_norm) or _hooked(mlp):
            return stock(self, hidden_states, *args, **kwargs)
        defaults, eps, offset, impl = self._tf_residual_norm
        spec = in_norm.__dict__.get("_tf_rms_norm")
        if spec is not None:  # the residual stream's two gradients summed in the norm's backward kernel
            in_eps, in_offset, in_impl = spec
            # padded Q/K/V (lora.pad_frozen_qkv) write their input's rank-r products after the norm's rows
            spare = self.self_attn.__dict__.get("_tf_input_spare", 0)
            # and the padded MLP below writes its dy's rank-r products after the input gradient's rows
            grad_spare = self.__dict__.get("_tf_input_grad_spare", 0)
            hidden_states, residual = rms_norm(hidden_states, in_norm.weight, in_eps, offset=in_offset,
                                               with_input=True, spare=spare, grad_spare=grad_spare, impl=in_impl)
        else:
            residual = hidden_states
            hidden_states = in_norm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, **{**defaults, **kwargs})
        # a padded MLP (lora.pad_frozen_mlp) writes its input's rank-r products after the norm's rows; the sum
        # takes HF's promoted dtype (a bf16 attention output on a float32 stream under autocast stays float32)
        # and a padded O (lora.pad_frozen_o) writes its output gradient's after the input gradient's rows: the
        # residual's producer is then the input norm, which writes none there
        o_grad_spare = self.self_attn.__dict__.get("_tf_output_grad_spare", 0) if spec is not None else 0
        hidden_states, residual = rms_norm(hidden_states, norm.weight, eps, offset=offset, residual=residual,
                                           spare=mlp.__dict__.get("_tf_input_spare", 0), grad_spare=o_grad_spare,
                                           impl=impl)
        if mlp.__dict__.get("_tf_adds_residual"):  # the down projection's GEMM adds the residual
            return mlp(hidden_states, residual=residual)
        return residual + mlp(hidden_states)

    return layer_subclass(cls, _FUSED_LAYER_CLASSES, forward=forward)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook would see this module's call (the fused layer forward bypasses the norms'
    calls and changes what the MLP returns)."""
    g = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or g._global_forward_hooks
                or g._global_forward_pre_hooks)


def layer_subclass(cls: type, made: dict, **attrs) -> type:
    """``cls`` subclassed with ``attrs`` (a forward) under the stock name and module, which transformers'
    and our own checks read; one subclass per class, kept in ``made`` (a patched model does not pickle
    anyway: the instance forwards are closures)."""
    if cls not in made:
        made[cls] = type(cls.__name__, (cls,), {**attrs, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return made[cls]


def patch_mlp(mlp: nn.Module, act: str, impl: str | None, output_discarded_in_recompute: bool = False) -> None:
    """``output_discarded_in_recompute``: the layer's recompute (``offload`` mode) discards what the MLP
    returns (``mlp_output_only_feeds_the_residual``), so it may skip its down projection then."""
    stock = type(mlp).forward

    def forward(self, x, residual=None):
        # residual: the fused layer forward's (``residual + mlp(x)`` returned; the stock forward never
        # passes it)
        parts = _mlp_parts(self)
        if parts is None:  # something the fused path does not compute: stay exact
            out = stock(self, x)
            return out if residual is None else residual + out
        # a forward hook would read the output
        unused = (output_discarded_in_recompute and recomputing() and not self._forward_hooks
                  and not nn.modules.module._global_forward_hooks)
        return lora_mlp(x, *parts, act=act, impl=impl, output_unused=unused, residual=residual)

    mlp.forward = MethodType(forward, mlp)
    mlp._tf_adds_residual = True


def _mlp_parts(mlp: nn.Module):
    """(gate, up, down) as LoraWeights, or None (the fused MLP takes no bias). Phi-3's fused
    ``gate_up_proj`` holds gate rows first (``Phi3MLP``: ``gate, up = gate_up.chunk(2, dim=-1)``)."""
    if hasattr(mlp, "gate_up_proj"):
        fused, down = lora_weights(mlp.gate_up_proj), lora_weights(mlp.down_proj)
        if fused is None or down is None or fused.bias is not None or down.bias is not None:
            return None
        rows = mlp.down_proj.in_features
        return (*split_rows(fused, [rows, rows]), down)
    parts = [lora_weights(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    return None if any(p is None or p.bias is not None for p in parts) else parts


def _linears(x, projections, impl, tag, landing=None):
    """``lora_linears(x, *projections)``. In an ``offload`` layer's forward the outputs are also stashed
    (memory.py: to host memory with the layer input), and the layer's recompute replays them instead of
    recomputing the base GEMMs: the attention side's q/k/v and O projections (22 TFLOP of an 8B step)."""
    if replaying():
        kept = [unstash((tag, i)) for i in range(len(projections))]
        return lora_linears(x, *projections, impl=impl, outputs=kept)
    outs = lora_linears(x, *projections, impl=impl, landing=landing)
    if stashing():
        for i, o in enumerate(outs):
            stash(o, (tag, i))
    return outs


def _project_qkv(attn: nn.Module, hidden_states, impl, landing=None):
    """q, k, v as ``(..., features)`` tensors: one fused node for the three projections, or Phi-3's one
    ``qkv_proj`` split by columns, or the PEFT/HF modules' own forwards when the fused path cannot
    compute them (a trained bias, DoRA...); Qwen2's frozen q/k/v biases are added by the fused node.
    ``landing``: the three projections' node's ``GradLanding``, for the rotary embedding's backward."""
    if hasattr(attn, "qkv_proj"):
        p = lora_weights(attn.qkv_proj)
        qkv = _linears(hidden_states, [p], impl, "qkv")[0] if p is not None else attn.qkv_proj(hidden_states)
        n_q = attn.config.num_attention_heads * attn.head_dim
        n_kv = attn.num_key_value_heads * attn.head_dim
        # v in a buffer of its own, as for the separate projections below: a column view would keep the whole
        # product alive for the attention's backward (q and k are rotated into new tensors)
        return qkv[..., :n_q], qkv[..., n_q:n_q + n_kv], qkv[..., n_q + n_kv:].contiguous()
    qkv = [lora_weights(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    if all(p is not None for p in qkv):  # one node, one x A^T for the three adapters
        q, k, v = _linears(hidden_states, qkv, impl, "qkv", landing)
        # joined weights (lora.join_frozen_weights) give the three as column blocks of one product; the
        # attention saves v for its backward, which would keep the whole product alive (+42 MB a layer at
        # 1B, measured +0.67 GB a step): v gets its own buffer, q and k are rotated into new ones anyway
        return q, k, v if v.is_contiguous() else v.contiguous()
    return attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)


def _rotate(q, k, cos, sin, impl, landing=None):
    """RoPE on ``q (B, Hq, T, D)``, ``k``; partial rotary (Phi-3 family's ``partial_rotary_factor``:
    the tables are narrower than ``D``) rotates the leading dims and passes the rest through, as HF.
    ``landing``: the ``GradLanding`` of the node that computed q and k (rope.py)."""
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return rope(q, k, cos, sin, impl=impl, landing=landing)
    q_rot, k_rot = rope(q[..., :rot], k[..., :rot], cos, sin, impl=impl)
    return torch.cat([q_rot, q[..., rot:]], dim=-1), torch.cat([k_rot, k[..., rot:]], dim=-1)


def patch_attention(attn: nn.Module, impl: str | None, softcap: float | None = None) -> None:
    """``softcap``: the attention logits' tanh cap, where the stock forward applies one (Gemma 2's)."""
    modeling = sys.modules[type(attn).__module__]
    eager = modeling.eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        # transformers >= 5.2x passes the KV cache as `cache`, earlier 5.x as `past_key_values`
        cache = kwargs.pop("cache", None)
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        # the rotation's backward writes q's and k's gradients where the projections' backward reads them
        # (GradLanding), unless Qwen3's q/k norms come between
        landing = None if hasattr(self, "q_norm") else GradLanding()
        q, k, v = _project_qkv(self, hidden_states, impl, landing)
        q, k = q.view(hidden_shape), k.view(hidden_shape)
        v = v.view(hidden_shape).transpose(1, 2)
        if hasattr(self, "q_norm"):  # Qwen3: RMSNorm over head_dim before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = _rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin, impl, landing)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        packing = kwargs.pop("packed_sequences", None)
        if kwargs.pop(CAUSAL_ROWS, False):  # patch_causal_lm's placeholder: is_causal, no mask
            attention_mask = None
        fa4 = self.__dict__.get("_tf_attention") if cache is None else None  # "fa4", "auto" or None
        if packing is not None and cache is None and _takes_varlen(self, packing):
            # (B, H, S, D) -> (B*S, H, D); the output comes back as (B*S, Hq, D)
            flat = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v))
            if fa4 and hopper_attention.takes(self, q, packing.max_len):
                out = hopper_attention.varlen(*flat, packing, self.scaling)
            else:
                out = varlen_attention(*flat, packing, self.scaling, impl=impl)
            weights = None
        elif hopper_attention.batched_rows(self, fa4) and attention_mask is None and q.shape[2] > 1 \
                and hopper_attention.takes(self, q, q.shape[2]):
            # a padded O (lora.pad_frozen_o) reads its input from a wider buffer: FA4 writes the output there
            spare = self.__dict__.get("_tf_o_input_spare", 0)
            out, weights = hopper_attention.causal(q, k, v, self.scaling, spare=spare), None  # (B, S, Hq, D)
        else:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
            if self._tf_softcap is not None:  # Gemma 2
                kwargs["softcap"] = self._tf_softcap
            out, weights = interface(self, q, k, v, attention_mask, dropout=_dropout(self), scaling=self.scaling,
                                     sliding_window=_sliding_window(self), **kwargs)
        wide, held = getattr(out, "_tf_spare_columns", 0), getattr(out, "_tf_held_for_backward", False)
        out = out.reshape(*input_shape, -1)
        if wide:  # the first columns of [x | s x A^T] (hopper_attention.causal's spare)
            out._tf_spare_columns, out._tf_held_for_backward = wide, held
        else:
            out = out.contiguous()
        o = lora_weights(self.o_proj)
        return (_linears(out, [o], impl, "o")[0] if o is not None else self.o_proj(out)), weights

    attn.forward = MethodType(forward, attn)
    attn._tuneforge_attention = True
    attn._tf_softcap = softcap


def _sliding_window(attn: nn.Module) -> int | None:
    return getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))


def _dropout(attn: nn.Module) -> float:
    return attn.attention_dropout if attn.training else 0.0


def _takes_varlen(attn: nn.Module, packing) -> bool:
    """Whether a patched attention computes a packed batch with ``varlen_attention``: not with a logit
    softcap (Gemma 2), live attention dropout or a sliding window shorter than the longest document,
    which keep transformers' masked path."""
    sliding = _sliding_window(attn)
    return (attn._tf_softcap is None and not _dropout(attn)
            and (sliding is None or sliding >= packing.max_len))


def _without_cache(model, use_cache, kwargs) -> bool:
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:  # either 5.x name
        return False
    return not (use_cache if use_cache is not None else getattr(model.config, "use_cache", False))


def _packing(model, attentions, attention_mask, position_ids, use_cache, kwargs, impl):
    """The documents of a packed batch (positions restarting at 0, no mask, no KV cache, as training
    passes them), for every layer's variable-length attention; None for anything else. On CPU only when
    the ops are forced to Triton (the tests): there the per-document reference runs, slower than
    transformers' masked SDPA."""
    if position_ids is None or attention_mask is not None or not _without_cache(model, use_cache, kwargs):
        return None
    if not (position_ids.is_cuda or impl == "triton"):
        return None
    if not getattr(model, "_tf_pad_documents", False) or not position_ids.is_cuda \
            or any((w := _sliding_window(a)) is not None and w < position_ids.shape[-1] for a in attentions):
        # the padded form's max_len is the row width: a sliding window shorter than the rows would send
        # every batch to transformers' masked path, where the documents themselves fit the window
        return packed_sequences(position_ids)
    # replayed layers (graphs.py): a document count padded to a bucket that only grows (from the first
    # packed batch on), so that a job's packed batches take a few shapes at most
    packing = packed_sequences(position_ids, bucket=getattr(model, "_tf_document_bucket", 1))
    if packing is not None:
        model._tf_document_bucket = len(packing.cu_seqlens) - 1
    return packing


def _replays_packed_rows(model, layers, input_ids, position_ids, attention_mask, labels, shift_labels,
                         kwargs) -> bool:
    """Whether a packed training batch goes to replayed layers (graphs.py attached to ``model`` and not
    turned off), so that its row count is padded to the model's row bucket (``pad_rows``): only where the
    fused loss returns no logits (nor hidden states) with rows the caller did not pass."""
    if input_ids is None or position_ids is None or attention_mask is not None or not input_ids.is_cuda:
        return False
    head = model.lm_head
    if type(head) is not nn.Linear or head.bias is not None or kwargs.get("output_hidden_states"):
        return False
    if labels is None and shift_labels is None or not (model.training and torch.is_grad_enabled()):
        return False
    graphs = getattr(layers[0], "_tf_graphs", None) if getattr(model, "_tf_pad_documents", False) else None
    return graphs is not None and graphs.disabled is None


def pad_rows(model, input_ids, position_ids, labels, shift_labels):
    """A packed batch padded with empty rows to a row count that only grows (``model._tf_row_bucket``, from
    the first such batch on), so that packed batches whose row count changes (documents packed first-fit)
    keep one shape for the replayed layers: each empty row is one document of token 0 at positions
    0..T-1, every label ignored, so it adds nothing to the loss, its normalisation or any gradient (its
    cost is its compute). Returns ``(input_ids, position_ids, labels, shift_labels)``."""
    rows, width = input_ids.shape
    bucket = max(getattr(model, "_tf_row_bucket", 0), rows)
    model._tf_row_bucket = bucket
    if rows == bucket:
        return input_ids, position_ids, labels, shift_labels
    extra = bucket - rows

    def padded(t, value):
        return None if t is None else torch.cat([t, t.new_full((extra, t.shape[1]), value)])

    positions = torch.arange(width, device=position_ids.device, dtype=position_ids.dtype).expand(extra, width)
    return (padded(input_ids, 0), torch.cat([position_ids, positions]), padded(labels, -100),
            padded(shift_labels, -100))


# the keyword with which patch_causal_lm tells every patched attention that its mask is a placeholder and
# the rows are plain causal sequences
CAUSAL_ROWS = "tf_causal_rows"
# attention functions that compute causal attention when given no mask (SDPA's and flash's is_causal)
_CAUSAL_WITHOUT_MASK = ("sdpa", "flash_attention_2", "flash_attention_3")


def _plain_causal_rows(model, attentions, attention_mask, position_ids, use_cache, kwargs, rows) -> bool:
    """Whether a batch without mask, position ids or KV cache (a training step on full rows) needs no mask:
    every layer's attention would be given none by transformers and take is_causal (SDPA or flash, no
    sliding window shorter than the ``rows``, ids or embeddings, no softcap). Transformers decides the same
    only after checking the positions it derives for packed documents with ``.all()``: a host sync a step."""
    if attention_mask is not None or position_ids is not None or not _without_cache(model, use_cache, kwargs):
        return False
    for attn in attentions:
        sliding = _sliding_window(attn)
        if (attn.config._attn_implementation not in _CAUSAL_WITHOUT_MASK or not getattr(attn, "is_causal", True)
                or attn._tf_softcap is not None
                or (sliding is not None and sliding < rows.shape[1])):
            return False
    return True


def _placeholder_mask(rows: torch.Tensor) -> torch.Tensor:
    # a 4D mask (one element per row) that transformers passes to the layers as it is, building nothing
    return torch.ones((rows.shape[0], 1, 1, 1), dtype=torch.bool, device=rows.device)


def patch_causal_lm(model: nn.Module, impl: str | None, ce_chunk_logits: int | None = None,
                    decoder: nn.Module | None = None, softcap: float | None = None) -> None:
    """Loss through the fused linear cross-entropy when labels are given (logits are then not returned);
    without labels, or with a head the fused path cannot read, the stock head and loss. ``ce_chunk_logits``:
    the fused loss's chunk (``fused_linear_cross_entropy``'s ``chunk_logits``). ``decoder``: the module
    holding the layers (default ``model.model``; a multimodal wrapper's language model, whose ``model.model``
    merges image features and builds the masks); ``softcap``: the final logits' tanh cap, where the stock
    forward applies one."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # the KV cache's name in model outputs and forward kwargs: `cache` from transformers 5.2x, before
    # that `past_key_values` (since then a deprecated alias that warns)
    cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    output = _output_class(model, cache_field)
    extra_fields = [f for f in output.__dataclass_fields__
                    if f not in ("loss", "logits", "hidden_states", "attentions", cache_field)]
    vocab_size = model.config.get_text_config().vocab_size

    # packed batches take the variable-length attention only where every layer's attention is ours
    layers = (model.model if decoder is None else decoder).layers
    attentions = [layer.self_attn for layer in layers]
    all_ours = all(getattr(a, "_tuneforge_attention", False) for a in attentions)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        if past_key_values is not None:  # older 5.x name; newer ones pass `cache`, which stays in kwargs
            kwargs[cache_field] = past_key_values
        if use_cache is None and labels is not None and self.training and torch.is_grad_enabled():
            # a training step reads no cache; transformers would build one from the config's default (True),
            # and a cache in the layers' calls keeps them off their CUDA graphs (graphs.py)
            use_cache = False
        # token types (a multimodal batch with images) make transformers build a mask with bidirectional image
        # blocks: no placeholder, no variable-length attention then
        ours = all_ours and kwargs.get("token_type_ids") is None
        if ours and _replays_packed_rows(self, layers, input_ids, position_ids, attention_mask, labels, shift_labels,
                                         kwargs):
            input_ids, position_ids, labels, shift_labels = pad_rows(self, input_ids, position_ids, labels,
                                                                     shift_labels)
        packing = _packing(self, attentions, attention_mask, position_ids, use_cache, kwargs, impl) if ours else None
        if packing is not None:
            kwargs["packed_sequences"] = packing
            if all(_takes_varlen(a, packing) for a in attentions):
                # no layer reads a mask: a 4D placeholder, which transformers passes through as it is,
                # instead of the (rows, 1, S, S) document mask it would build (4 GiB at 4 rows of 32K)
                attention_mask = _placeholder_mask(position_ids)
        elif ours and _plain_causal_rows(self, attentions, attention_mask, position_ids, use_cache, kwargs,
                                         rows := input_ids if input_ids is not None else inputs_embeds):
            # the same placeholder, which every layer drops for is_causal: transformers would reach no mask too,
            # after a host sync
            kwargs[CAUSAL_ROWS] = True
            attention_mask = _placeholder_mask(rows)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        head = self.lm_head
        fusable = type(head) is nn.Linear and head.bias is None
        loss = logits = None
        if (labels is not None or shift_labels is not None) and fusable:
            if shift_labels is None:  # HF's ForCausalLMLoss shift: the last position predicts nothing
                shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
            loss = fused_linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device),
                                              softcap=softcap, num_items=num_items, chunk_logits=ce_chunk_logits,
                                              impl=impl)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = head(hidden[:, keep, :])
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size,
                                          num_items_in_batch=num_items, shift_labels=shift_labels)
        return output(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                      **{cache_field: getattr(out, cache_field)}, **{f: getattr(out, f, None) for f in extra_fields})

    model.forward = MethodType(forward, model)


def _output_class(model: nn.Module, cache_field: str) -> type:
    """The output class the stock forward of ``model`` declares (Gemma3ForConditionalGeneration's carries the
    image features too), where it has a causal LM's fields; else ``CausalLMOutputWithPast``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput

    try:
        declared = typing.get_type_hints(inspect.unwrap(type(model).forward)).get("return")
    except Exception:  # an annotation that does not resolve: the plain class
        declared = None
    for cls in typing.get_args(declared) or (declared,):
        if (isinstance(cls, type) and issubclass(cls, ModelOutput) and hasattr(cls, "__dataclass_fields__")
                and {"loss", "logits", "hidden_states", "attentions", cache_field} <= set(cls.__dataclass_fields__)):
            return cls
    return CausalLMOutputWithPast
