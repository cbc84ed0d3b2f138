"""The gated MLP of a LoRA-adapted decoder layer (gate/up/down, SwiGLU or GeGLU) as one autograd node with
a hand-derived backward.

Per projection ``p``: ``y_p = x W_p^T + s_p (x A_p^T) B_p^T`` with the base ``W_p`` frozen.
Forward saves only ``x``, the base products ``x W_g^T``, ``x W_u^T`` and the rank-r products ``x A_g^T``,
``x A_u^T``, ``h A_d^T``; stock HF+PEFT also keeps ``act(g)`` and ``h = act(g) * u`` alive (two more tokens x
intermediate tensors per layer). The gate's and up's rank-r terms, and in backward the down projection's
term of ``dh``, are computed inside the activation kernels (lora_glu.py), not added onto the
(tokens x intermediate) tensors by separate passes. Backward recomputes ``h`` inside the
activation-backward kernel, writing ``h, dg, du`` over the ``dh, x W_g^T, x W_u^T`` buffers, and
computes no gradient for any frozen weight:

    dh   = dy W_d + s_d (dy B_d) A_d
    dA_d = s_d (dy B_d)^T h          dB_d = s_d dy^T (h A_d^T)
    dA_g = s_g (dg B_g)^T x          dB_g = s_g dg^T (x A_g^T)        (same for u)
    dx   = dg W_g + du W_u + s_g (dg B_g) A_g + s_u (du B_u) A_u      (the two rank-r terms: one GEMM)

A base weight may be a tensor ``(out, in)`` or any object with ``dequantize() -> (out, in)`` tensor
(QLoRA: the 4-bit weight is expanded into a transient buffer for each matmul and never kept).
Because backward overwrites the saved ``g``/``u``, the graph cannot be backpropagated twice
(``retain_graph=True``); activation checkpointing recomputes them and is fine.

``output_unused=True`` ("deferred") is for a checkpointed layer's recompute, where the MLP's output only
leads to the layer's (discarded) output: backward reads ``g``, ``u``, ``x A^T`` and ``dy``, never ``y``
or ``h``. So forward computes nothing and returns an uninitialised tensor of the output's shape (the
caller guarantees that nothing reads its values), and backward computes ``g``, ``u`` itself, in blocks
of rows: the down projection of the recompute (a third of the MLP's FLOPs) is never computed, and only
a block's (rows x intermediate) tensors are alive instead of the whole ``g``, ``u`` and ``dh``.

Adapter dropout (``LoraWeights.dropout``, dropout.py): each adapter reads its input dropped (``x`` for gate
and up, ``h`` for down), with masks drawn in PEFT's order and computed again in backward (gate's and up's
terms through dropout.py's fused passes, down's inside lora_glu); deferred mode draws them in forward too,
so a recompute draws what its forward drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge_kernels import gated_gemm, lora_glu
from tuneforge_kernels.backend import use_triton
from tuneforge_kernels.cast_blocks import cast_blocks
from tuneforge_kernels.copy_rows import copy_rows
from tuneforge_kernels.dropout import (Mask, add_masked_input_grads_, drop, dropout_reference,
                                       dropped_input_grads, dropped_input_products)
from tuneforge_kernels.fp8 import Fp8Weight, fp8_input_grad, fp8_linear, fp8_linear_reference, quantize_rows

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class LoraWeights:
    """One projection: frozen ``weight (out, in)`` and optional adapter ``lora_a (r, in)``,
    ``lora_b (out, r)``, ``scale``, the adapter's ``dropout`` on its input while training (dropout.py;
    0: none), and an optional frozen ``bias (out,)`` (Qwen2's q/k/v; lora_linears adds it, the MLP takes
    none)."""

    weight: object
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0
    dropout: float = 0.0
    bias: torch.Tensor | None = None


def _out_features(w) -> int:
    # a tensor (out, in), or a quantised weight exposing ``shape`` like one
    return int(w.shape[0])


def _dense(w, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w if w.dtype == dtype else w.to(dtype)
    return w.dequantize().to(dtype)


def _fp8_input(x, weights):
    """``x`` quantised once for every FP8 weight among ``weights`` that reads it (fp8.py), else None."""
    if not any(isinstance(w, Fp8Weight) for w in weights):
        return None
    return quantize_rows(x, pad=True)


def frozen_linear(x, w, dtype: torch.dtype, c=None, xq=None) -> torch.Tensor:
    """``x W^T (+ c)`` for a frozen weight: a GEMM in ``dtype`` (``c`` read as its C: an (N, out) tensor, or a
    bias (out,) broadcast over the rows), or FP8's (``Fp8Weight``; ``xq``: ``x`` already quantised by
    ``_fp8_input``)."""
    if isinstance(w, Fp8Weight):
        y = fp8_linear(x, w, dtype, xq)
        return y if c is None else y.add_(c)
    w = _dense(w, dtype)
    return x @ w.t() if c is None else torch.addmm(c, x, w.t())


def frozen_input_grad(dy, w, dtype: torch.dtype, out=None, add: bool = False) -> torch.Tensor:
    """``dy W``, the input gradient through a frozen weight; into ``out`` (``add``: added to it)."""
    if isinstance(w, Fp8Weight):
        d = fp8_input_grad(dy, w, dtype)
        return d if out is None else out.add_(d) if add else out.copy_(d)
    w = _dense(w, dtype)
    if out is None:
        return dy @ w
    return out.addmm_(dy, w) if add else torch.mm(dy, w, out=out)


def _act_forward(g, u, act, terms):
    # h = act(g) * u, the gate's and up's rank-r terms (``terms``: lora_glu's keywords) added in the kernel
    return lora_glu.lora_glu_forward(g, u, act, **terms)


def _compute_dtype(x):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def cast_group(tensors, dtype: torch.dtype, copy: bool = False, scales=None) -> list:
    """``[t.to(dtype, copy=copy) for t in tensors]`` (None stays None) into one buffer in one launch per six
    (2D tensors, cast_blocks) or two kernels (``torch.cat``, then the cast), instead of one per tensor: the
    adapters' float32 weights of one node (six in the MLP or Q/K/V), a few KB each, cost a launch each, ~14 per
    layer and direction (bench/NOTES.md, session 10), and their gradients are often strided views of a wider
    product, which ``torch.cat`` copies one launch each (session 46). The casts are views of one buffer, in
    order, so consecutive ones with the same row length are row blocks of one tensor (``joined``: the A of
    q/k/v or gate/up without a ``torch.cat``). ``copy``: a tensor already in ``dtype`` is copied too (the
    rank-r products saved out of their wide buffers). ``scales``: per tensor None or a float32 vector its
    columns are multiplied by on the way (``(t * scale).to(dtype)``: a norm's weight, ``NormRecipe``)."""
    scales = scales if scales is not None else [None] * len(tensors)
    todo = [t for t, k in zip(tensors, scales, strict=True)
            if t is not None and (copy or k is not None or t.dtype != dtype)]
    if len(todo) < 2:
        return [None if t is None else t.to(dtype, copy=copy) if k is None else (t * k).to(dtype)
                for t, k in zip(tensors, scales)]
    present = [(t, k) for t, k in zip(tensors, scales) if t is not None]
    blocks = all(t.dim() == 2 for t, _ in present)
    if blocks:
        flat = present[0][0].new_empty(sum(t.numel() for t, _ in present), dtype=dtype)
    else:
        flat = torch.cat([(t if k is None else t * k).reshape(-1) for t, k in present]).to(dtype)
    views, start = [], 0
    for t, _ in present:
        views.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    if blocks:  # impl: in the Triton nodes
        cast_blocks([(v, t) for v, (t, _) in zip(views, present)], impl="triton", scales=[k for _, k in present])
    views = iter(views)
    return [None if t is None else next(views) for t in tensors]


def _cast_grads(grads, dtypes, scales=None) -> list:
    """The adapters' gradients (compute dtype, None where not wanted) in their parameters' dtypes, one
    ``cast_group`` where those agree (float32 master weights: always). ``scales``: cast_group's."""
    wanted = {d for g, d in zip(grads, dtypes) if g is not None}
    if len(wanted) == 1:
        return cast_group(grads, wanted.pop(), scales=scales)
    scales = scales if scales is not None else [None] * len(grads)
    return [None if g is None else g.to(d) if k is None else (g * k).to(d) for g, d, k in zip(grads, dtypes, scales)]


def rows_of(parts) -> torch.Tensor:
    """The 2D tensors ``parts`` stacked by rows: a view when they are row blocks of one buffer (``joined``),
    else a ``torch.cat``."""
    if len(parts) == 1:
        return parts[0]
    both = joined(list(parts), 0)
    return both if both is not None else torch.cat(list(parts))


def _x_for_saving(ctx, x, x2):
    """What to save for the input ``x`` (viewed as ``x2 (N, in)``): the recipe's tensors when ``x`` is a
    Triton rms_norm output in the compute dtype (recomputed in backward, see NormRecipe), else ``x2``."""
    from tuneforge_kernels.rms_norm import norm_recipe

    recipe = norm_recipe(x)
    if recipe is None or x2.data_ptr() != x.data_ptr():
        ctx.recipe = None
        return (x2,)
    # ctx keeps only the recipe's scalars: a tensor held by ctx (not saved) would escape activation
    # checkpointing's pack hooks and stay alive (measured: +2.2 GB at 8B with checkpointing)
    ctx.recipe = recipe.without_tensors()
    return recipe.tensors()


def _restore_x(ctx, saved):
    if ctx.recipe is None:
        return saved[0]
    x = ctx.recipe.recompute(*saved)
    return x.reshape(-1, x.shape[-1])


def _saved_input_product(ctx, saved, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``g^T @ x2`` (every dA at once, ``g`` (N, R)) for a backward that reads ``x`` only there: an rms_norm
    output's from the norm's input (``NormRecipe.product``: no recompute of ``x``), else the saved ``x2``'s.
    Returns the product and None, or (the norm's) a product still to be multiplied by a float32 vector along its
    columns, which the gradients' cast does (``_cast_grads``'s ``scales``)."""
    if ctx.recipe is not None and saved[0].dtype == g.dtype:
        return ctx.recipe.product(g, *saved, scaled=False)
    return g.t() @ _restore_x(ctx, saved), None


def _scaled_mm(a, b, s: float) -> torch.Tensor:
    """``s * (a @ b)`` as one GEMM: the scale is cuBLAS's alpha (an adapter's gradients in backward; beta 0
    ignores the uninitialised 0-dim input), not a second kernel over the product; none for ``s == 1``."""
    if s == 1.0:
        return a @ b
    return torch.addmm(a.new_empty(()), a, b, beta=0.0, alpha=s)


def _input_product(x, a, dropped=None) -> torch.Tensor:
    """``x A^T`` (N, r), or ``drop(x) A^T`` where the adapter has dropout (``dropped``: its dropout.Mask)."""
    return x @ a.t() if dropped is None else dropped_input_products(x, [(a, dropped)], impl="triton")


def adapter_input_terms(x2, parts, dx, want, a_joined=None) -> list:
    """Backward of the rank-r inputs ``x A_k^T`` of the adapters that read ``x2 (N, in)``. ``parts``: per
    adapter ``(d_b, a, dropped)`` with ``d_b = s dy B (N, r)``, ``a (r, in)`` and ``dropped`` None or its
    dropout's mask (dropout.Mask, drawn); ``want``: per adapter, whether its dA is needed. Returns the
    dA's ``(r, in)`` (None where not wanted) and adds every adapter's term of ``dx`` into ``dx`` (None: not
    needed).

    The adapters without dropout: their dA's in one GEMM (x read once) and their dx terms in one pass over
    dx (``a_joined``: their A's as one tensor when all of them are). Those with dropout (dropout.py): their
    dA's from one pass over x and their masked dx terms in one pass over dx."""
    out = [None] * len(parts)
    plain = [k for k, part in enumerate(parts) if part[2] is None]
    if plain:
        d_b = torch.cat([parts[k][0] for k in plain], dim=1) if len(plain) > 1 else parts[plain[0]][0]
        if any(want[k] for k in plain):
            d_a, col = d_b.t() @ x2, 0                                              # (sum r, in)
            for k in plain:
                r = parts[k][1].shape[0]
                out[k] = d_a[col:col + r] if want[k] else None
                col += r
        if dx is not None:
            whole = a_joined is not None and len(plain) == len(parts)
            dx.addmm_(d_b, a_joined if whole else rows_of([parts[k][1] for k in plain]))
    masked = [k for k, part in enumerate(parts) if part[2] is not None and want[k]]
    if masked:  # x read once for all of them
        d_as = dropped_input_grads(x2, [(parts[k][0], parts[k][2]) for k in masked], impl="triton")
        for k, d_a in zip(masked, d_as):
            out[k] = d_a                                                             # (r, in)
    if dx is not None:
        add_masked_input_grads_(dx, [(d_b, a, dropped, 1.0) for d_b, a, dropped in parts if dropped is not None],
                                impl="triton")
    return out


def _draw(shape, p: float, has_adapter: bool, device) -> Mask | None:
    # the mask of an adapter with dropout p, else None
    return Mask.draw(shape, p, device) if p and has_adapter else None


def _redraw(masks) -> list:
    """The masks a node kept (released) drawn again for its backward, once each (a shared one stays
    shared)."""
    drawn = {}
    for m in masks:
        if m is not None and id(m) not in drawn:
            drawn[id(m)] = m.again()
    return [drawn[id(m)] if m is not None else None for m in masks]


def _project(x, w, a, b, s, dtype, c=None, dropped=None):
    # x: (N, in) -> (N, out) (+ c, added by the GEMM), plus the (N, r) product x A^T when there is an adapter
    # (``dropped``: its dropout.Mask, the adapter reads x dropped)
    y = frozen_linear(x, w, dtype, c)
    if a is None:
        return y, None
    xa = _input_product(x, a, dropped)
    y.addmm_(xa, b.t(), alpha=s)
    return y, xa


def joined(parts, dim: int) -> torch.Tensor | None:
    """The one 2D tensor that holds ``parts`` one after another along ``dim`` (0: row blocks, as the q/k/v
    or gate/up weights the patcher stores in one buffer; 1: column blocks, as the halves of one gate+up
    product), a view of their common storage; None where they are not laid out so (separate
    allocations, other dtypes, quantised weights...)."""
    first = parts[0]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.stride(1) == 1 for t in parts):
        return None
    size, ld = list(first.shape), first.stride(0)
    for prev, t in zip(parts, parts[1:]):  # the cheap tests first: this runs at every call
        step = prev.numel() if dim == 0 else prev.shape[1]
        if t.data_ptr() != prev.data_ptr() + step * prev.element_size() or t.stride(0) != ld:
            return None
        if t.shape[1 - dim] != first.shape[1 - dim] or t.dtype != first.dtype:
            return None
        size[dim] += t.shape[dim]
    if dim == 0 and ld != size[1] or dim == 1 and size[1] > ld:
        return None
    # adjacent memory is not enough: one storage must hold them all (as_strided reads from first's)
    storage = first.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != storage for t in parts[1:]):
        return None
    return first.as_strided(size, (ld, 1), first.storage_offset())


def _joined_weights(weights, dtype):
    """The frozen weights as one (sum out, in) tensor when they are row blocks of one buffer (``joined``)
    and need no cast to ``dtype``; else None."""
    w_all = joined(list(weights), 0) if len(weights) > 1 else None
    return w_all if w_all is not None and w_all.dtype == dtype else None


def _gate_up(x, weights, dtype, lora, scales, fused, dropped=(None, None)):
    """``x W_g^T``, ``x W_u^T`` and the rank-r ``x A_g^T``, ``x A_u^T`` (one GEMM for both, x read once; one
    product when gate and up share their A, as Phi-3's split ``gate_up_proj``). Weights stored in one
    buffer (``joined``: Phi-3's ``gate_up_proj``, or the patcher's layout for small models) give one
    GEMM whose column halves are ``g`` and ``u``. ``fused``: the base products only, the kernels add the
    rank-r terms; else the terms are added here (ranks over lora_glu.MAX_RANK). A quantised weight is
    expanded for its GEMM alone (one transient at a time). ``dropped``: the gate's and up's masks
    (dropout.Mask) where their adapters have dropout (the same one for a shared A)."""
    ag, bg, au, bu = lora
    both = _joined_weights(weights, dtype)
    if both is not None:
        gu = x @ both.t()                                                         # (N, 2I)
        g, u = gu.split(weights[0].shape[0], dim=1)
    else:
        xq = _fp8_input(x, weights)
        g = frozen_linear(x, weights[0], dtype, xq=xq)                          # (N, I)
        u = frozen_linear(x, weights[1], dtype, xq=xq)                          # (N, I)
    if ag is not None and au is not None and ag is not au and all(d is not None for d in dropped):
        xa = dropped_input_products(x, [(ag, dropped[0]), (au, dropped[1])], impl="triton")  # x read once
        xa_g, xa_u = xa[:, :ag.shape[0]], xa[:, ag.shape[0]:]
    elif ag is None or au is None or any(d is not None for d in dropped) and ag is not au:
        xa_g = _input_product(x, ag, dropped[0]) if ag is not None else None
        xa_u = _input_product(x, au, dropped[1]) if au is not None else None
    elif ag is au:
        xa_g = xa_u = _input_product(x, ag, dropped[0])
    else:
        xa = x @ rows_of([ag, au]).t()                                            # (N, r_g + r_u)
        xa_g, xa_u = xa[:, :ag.shape[0]], xa[:, ag.shape[0]:]
    if not fused:
        for y, xa, b, s in ((g, xa_g, bg, scales[0]), (u, xa_u, bu, scales[1])):
            if xa is not None:
                y.addmm_(xa, b.t(), alpha=s)
    return g, u, xa_g, xa_u


def _glu_terms(fused, xa_g, xa_u, lora, scales):
    # lora_glu's keyword arguments for the gate's and up's rank-r terms (none where g, u hold them)
    if not fused:
        return {}
    bg, bu = lora[1], lora[3]
    return {"xa_g": xa_g, "b_g": bg, "s_g": scales[0], "xa_u": xa_u, "b_u": bu, "s_u": scales[1]}


# deferred mode (``output_unused``): the MLP is recomputed in backward in blocks of this many token rows,
# so at most (rows x intermediate) of g, u and dh are alive instead of (tokens x intermediate): 3 x 59 MB
# instead of 3 x 235 MB at 8B with 8192 tokens. 2048: the GEMMs keep M = 2048 (16 x 56 output tiles of
# 128 x 256 for the gate projection at 8B, many waves on 132 SMs); not measured against other sizes.
_DEFERRED_ROWS = 2048


def _rows_backward(dy2, x2, g, u, xa_g, xa_u, lora, weights, scales, need, act, fused, dtype, dx, xa_d=None,
                   dropped=(None, None, None)):
    """Backward of a block of rows whose ``x W_g^T``, ``x W_u^T`` (``g``/``u``: with the rank-r terms
    unless ``fused``) and ``x A^T`` are given (``g``/``u`` are overwritten): writes ``dx (rows, H)`` when
    it is not None and returns the six adapter-gradient terms in the compute dtype (dA_g, dB_g, dA_u,
    dB_u, dA_d, dB_d; None where not wanted). ``xa_d``: the forward's ``h A_d^T`` (else recomputed from
    ``h``). Weights are dequantised at each use (one transient at a time) unless the caller passes
    tensors. ``dropped``: the mask (dropout.Mask) of each adapter (gate, up, down) with dropout, the rows'
    part; with one on down, ``h`` below is ``h`` dropped (what its adapter read)."""
    ag, bg, au, bu, ad, bd = lora
    wg, wu, wd = weights
    sg, su, sd = scales
    dh = frozen_input_grad(dy2, wd, dtype)                                      # (N, I)
    dy_b = dy2 @ bd if ad is not None else None                                 # (N, r)
    drop_d = dropped[2]
    if ad is not None and not fused:
        if drop_d is None:
            dh.addmm_(dy_b, ad, alpha=sd)
        else:
            add_masked_input_grads_(dh, [(dy_b, ad, drop_d, sd)], impl="triton")
    down = {"dy_b": dy_b, "a_d": ad, "s_d": sd, "dropped_d": drop_d} if fused else {}
    lora_glu.lora_glu_backward_inplace(dh, g, u, act, **_glu_terms(fused, xa_g, xa_u, lora, scales), **down)
    h, dg, du = dh, g, u
    if drop_d is not None and not fused:
        h = drop(h, drop_d, impl="triton")  # (the kernel wrote h dropped over dh where it is fused)
    grads = [None] * 6
    if ad is not None:
        if need[8]:
            grads[4] = _scaled_mm(dy_b.t(), h, sd)                              # (r, I)
        if need[9]:
            grads[5] = _scaled_mm(dy2.t(), xa_d if xa_d is not None else h @ ad.t(), sd)  # (H, r)
    del h
    if dx is not None:
        both = _joined_weights((wg, wu), dtype)
        dgu = joined([dg, du], 1) if both is not None else None
        if dgu is not None:  # g, u were one product
            torch.mm(dgu, both, out=dx)                                         # (N, H)
        else:
            frozen_input_grad(dg, wg, dtype, out=dx)                            # (N, H)
            frozen_input_grad(du, wu, dtype, out=dx, add=True)
    adapted = [(i, d, a, b, xa, s) for i, (d, a, b, xa, s)
               in enumerate(((dg, ag, bg, xa_g, sg), (du, au, bu, xa_u, su))) if a is not None]
    for i, d, _, b, xa, s in adapted:
        if need[3 + 3 * i]:
            grads[2 * i + 1] = _scaled_mm(d.t(), xa, s)                         # (I, r)
    if adapted:
        d_as = adapter_input_terms(x2, [(_scaled_mm(d, b, s), a, dropped[i]) for i, d, a, b, _, s in adapted],
                                   dx, [need[2 + 3 * i] for i, *_ in adapted])
        for (i, *_), d_a in zip(adapted, d_as):
            grads[2 * i] = d_a                                                  # (r, H)
    return grads


class _LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, wu, au, bu, wd, ad, bd, sg, su, sd, act, output_unused, residual, dropouts):
        dtype = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        # one A shared by gate and up (Phi-3's split gate_up_proj): one cast, one x A^T
        shared = au is ag
        ag_, au_, ad_, bg_, bu_, bd_ = cast_group((ag, None if shared else au, ad, bg, bu, bd), dtype)
        au_ = ag_ if shared else au_
        cast = [ag_, bg_, au_, bu_, ad_, bd_]
        fused = lora_glu.fusable(bg_, bu_, bd_)
        # the adapters' dropout masks, drawn in PEFT's order (gate, up, down; one for a shared A), also
        # where nothing is computed (deferred): a recompute draws what its forward drew
        pg, pu, pd = dropouts
        drop_g = _draw(x2.shape, pg, ag is not None, x2.device)
        drop_u = drop_g if shared else _draw(x2.shape, pu, au is not None, x2.device)
        drop_d = _draw((x2.shape[0], ad.shape[1]), pd, True, x2.device) if ad is not None else None  # h's shape
        if output_unused:  # deferred (module docstring): nothing reads y, backward recomputes g and u
            g = u = xa_g = xa_u = xa_d = None
            y = x2.new_empty(x2.shape[0], _out_features(wd))                    # (N, H)
        else:
            g, u, xa_g, xa_u = _gate_up(x2, (wg, wu), dtype, cast[:4], (sg, su), fused, (drop_g, drop_u))
            h = _act_forward(g, u, act, _glu_terms(fused, xa_g, xa_u, cast, (sg, su)))  # (N, I)
            # h A_d^T (N, r) is kept: backward's dB_d reads it (a pass over h less for r columns)
            c = residual.reshape(-1, residual.shape[-1]) if residual is not None else None
            y, xa_d = _project(h, wd, ad_, bd_, sd, dtype, c, drop_d)          # (N, H)
        ctx.save_for_backward(g, u, xa_g, xa_u, xa_d, ag_, bg_, au_, bu_, ad_, bd_, *_x_for_saving(ctx, x, x2))
        released = {id(d): d.released() for d in (drop_g, drop_u, drop_d) if d is not None}  # drawn again in backward
        ctx.masks = [released[id(d)] if d is not None else None for d in (drop_g, drop_u, drop_d)]
        ctx.weights = (wg, wu, wd)
        ctx.scales = (sg, su, sd)
        ctx.act, ctx.shape, ctx.dtype = act, shape, dtype
        ctx.deferred, ctx.fused = output_unused, fused
        ctx.param_dtypes = [t.dtype if t is not None else None for t in (ag, bg, au, bu, ad, bd)]
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        g, u, xa_g, xa_u, xa_d, *rest = ctx.saved_tensors
        lora, x_saved = rest[:6], rest[6:]
        x2 = _restore_x(ctx, x_saved)
        masks = _redraw(ctx.masks)
        dtype = ctx.dtype
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)                            # (N, H)
        dx = x2.new_empty(x2.shape) if need[0] else None                        # (N, H), contiguous
        common = (ctx.scales, need, ctx.act, ctx.fused, dtype)
        if not ctx.deferred:
            grads = _rows_backward(dy2, x2, g, u, xa_g, xa_u, lora, ctx.weights, *common, dx, xa_d, masks)
        else:
            # dequantised once for all blocks (QLoRA: three transients instead of one at a time); FP8
            # weights with their column-major copies made once (each block's input gradients read them)
            weights = [w.for_input_grads() if isinstance(w, Fp8Weight) else _dense(w, dtype) for w in ctx.weights]
            grads = [None] * 6
            for start in range(0, x2.shape[0], _DEFERRED_ROWS):
                rows = slice(start, start + _DEFERRED_ROWS)
                xc = x2[rows]
                dropped = [m.rows(rows) if m is not None else None for m in masks]
                dropped[1] = dropped[0] if masks[1] is masks[0] else dropped[1]  # one shared A: one mask
                g, u, xa_g, xa_u = _gate_up(xc, weights[:2], dtype, lora[:4], ctx.scales, ctx.fused, dropped[:2])
                part = _rows_backward(dy2[rows], xc, g, u, xa_g, xa_u, lora, weights, *common,
                                      dx[rows] if dx is not None else None, dropped=dropped)
                # block terms summed in float32
                grads = [gr if p is None else p.float() if gr is None else gr.add_(p)
                         for gr, p in zip(grads, part)]
        grads = _cast_grads(grads, ctx.param_dtypes)
        if dx is not None:
            dx = dx.view(ctx.shape)
        d_residual = dy if ctx.needs_input_grad[15] else None  # the residual passes through the sum
        return (dx, None, grads[0], grads[1], None, grads[2], grads[3], None, grads[4], grads[5],
                None, None, None, None, None, d_residual, None)


# Padded layout (``pad_weights``): the frozen weights stored with spare rows and columns, so that every
# GEMM carries its adapter's rank-r term in its K dimension (session 11's micro ``aug``: the base GEMM plus a
# rank-r pass over its output cost 25 ms more per 8B step than the longer GEMM alone). For gate and up,
# one (2I + S) x (H + S) buffer (R = r_g + r_u, S = spare_width(R, H, I) >= R) holding
#
#     [ W_g  B_g  0   ]      forward:  [x | s_g x A_g^T | s_u x A_u^T] @ rows [:2I]^T  = [g | u], terms in
#     [ W_u  0    B_u ]      input gradient:  [dg | du | s_g dg B_g | s_u du B_u] @ columns [:, :H] = dx
#     [ A_g  .    .   ]
#     [ A_u  .    .   ]
#
# and for down one (H + S_d) x (I + S_d) buffer [[W_d, B_d], [A_d, .]] the same way. The adapters' current
# values are copied into their blocks at every forward (the blocks marked . are never read); the zero blocks
# keep gate and up apart, and the S - R last rows and columns are zeros (PAD_ALIGN). The activation kernel
# then runs without rank-r terms in both directions (micro: 0.40 against 0.66 ms backward per 8B layer).
# Interleaved (``pad_weights(interleave=True)``, where gated_gemm.py serves the MLP): the first 2I rows hold
# W_g's and W_u's rows alternately, with B_g's and B_u's blocks on them, so [g | u] and [dg | du] alternate
# their columns the same way; QuACK's GEMMs then compute the activation in their epilogues and no lora_glu
# pass runs (-15 ms a step at 8B on an H100, bench/NOTES.md session 42). Models up to this hidden size compute gate and up with one GEMM, larger ones with one each (the joined
# weights' rule, bench/NOTES.md v14).
PADDED_ONE_GEMM_MAX_HIDDEN = 2048
# The spare columns (and rows) are R rounded up to a multiple of this where the layout's other dimensions
# (H, I; lora_linear's H, O) are multiples of it (``spare_width``), so that every K and every row stride of
# the padded GEMMs is one too: on an H100 the forward GEMMs at K = H + 32 and I + 16 ran at 637 and 573
# TFLOP/s where the same GEMMs at K = H and I ran at 724 and 713 (bench/NOTES.md, session 40). The extra
# columns hold zeros: the weights' from ``pad_weights``, the activations' written by the rank-r GEMMs that
# fill the spare (their weight blocks end in zero rows or columns), so the sums are the same. 64 against
# 1 (exactly the ranks' columns) on an H100 at 8B: 473 against 480 ms a step, those GEMMs back at 1.35 ms
# (session 41, bench/results/2026-12-07-h100-v44-*); train_step.py --pad-align 1 times the old layout.
PAD_ALIGN = 64
# The padded MLP's input gradient: True, one GEMM over [dg | du] against gu_w's rows [W | B] gives dx without
# the adapters' term and the rank-r products s dgu B (N-augmented), then the term is added onto dx: [dg | du]
# is read once for both where the K-augmented form (False: the products first, then one GEMM over [dg | du |
# s dgu B]) reads it twice (bench/NOTES.md, session 44).
DX_CARRIES_PRODUCTS = True


def spare_width(r: int, *dims: int) -> int:
    """The spare columns a padded layout leaves beside ``dims`` for adapters of total rank ``r``."""
    a = PAD_ALIGN
    return -(-r // a) * a if all(d % a == 0 for d in dims) else r


def pad_weights(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ranks: tuple[int, int, int],
                interleave: bool = False):
    """The padded layout's two buffers for these frozen ``(out, in)`` weights and adapter ranks (r_g, r_u,
    r_d), the weights copied in (zeros elsewhere). The caller makes its parameters views of ``buffers[0]
    [:I, :H]``, ``[I:2I, :H]`` and ``buffers[1][:H, :I]``, which ``padded`` recognises. ``interleave``: the
    gate's and up's rows alternate instead (views ``[0:2I:2, :H]`` and ``[1:2I:2, :H]``), the layout
    gated_gemm.py's fused epilogues read."""
    (i, h), (rg, ru, rd) = gate.shape, ranks
    sp, sp_d = spare_width(rg + ru, h, i), spare_width(rd, h, i)
    gu = gate.new_zeros(2 * i + sp, h + sp)
    gate_rows, up_rows = gate_up_rows(i, interleave)
    gu[gate_rows, :h] = gate
    gu[up_rows, :h] = up
    d = down.new_zeros(h + sp_d, i + sp_d)
    d[:h, :i] = down
    return gu, d


def gate_up_rows(i: int, interleave: bool) -> tuple[slice, slice]:
    """The gate's and the up projection's rows of a padded gate/up buffer (``pad_weights``)."""
    return (slice(0, 2 * i, 2), slice(1, 2 * i, 2)) if interleave else (slice(0, i), slice(i, 2 * i))


def interleaved(gate: LoraWeights, up: LoraWeights) -> bool:
    """Whether a padded gate/up buffer holds these weights' rows interleaved (``pad_weights``)."""
    wg, wu = gate.weight, up.weight
    return wg.shape[0] > 1 and wg.stride(0) == wu.stride(0) and wu.data_ptr() == wg.data_ptr() + \
        wg.stride(0) // 2 * wg.element_size()


def _spans(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    # the (rows, cols) row-major tensor starting at w's first element, where w's storage holds it. Not a view
    # of w (a tensor of its own over the same memory): writing its other columns leaves w's version counter
    # alone, which autograd checks on views (w may be a function's output view, rms_norm's spare)
    if w.stride() != (cols, 1) or (w.storage_offset() + rows * cols) * w.element_size() > w.untyped_storage().nbytes():
        return None
    return w.new_empty(0).set_(w.untyped_storage(), w.storage_offset(), (rows, cols), (cols, 1))


def padded(gate: LoraWeights, up: LoraWeights, down: LoraWeights):
    """The padded layout's buffers (gate/up, down) when the three frozen weights are laid out in them for the
    adapters' current ranks (an adapter of another rank, a separate A shared by gate and up, a replaced or
    quantised weight: None, and the MLP runs unpadded)."""
    wg, wu, wd = gate.weight, up.weight, down.weight
    if not all(isinstance(w, torch.Tensor) for w in (wg, wu, wd)) or gate.lora_a is up.lora_a:
        return None
    if any(p.lora_a is None for p in (gate, up, down)):
        return None
    (i, h), rg, ru, rd = wg.shape, gate.lora_a.shape[0], up.lora_a.shape[0], down.lora_a.shape[0]
    if wu.shape != wg.shape or wd.shape != (h, i) or wd.dtype != wg.dtype or wu.dtype != wg.dtype:
        return None
    sp, sp_d = spare_width(rg + ru, h, i), spare_width(rd, h, i)
    if wu.untyped_storage().data_ptr() != wg.untyped_storage().data_ptr():
        return None
    if wg.stride() == (2 * (h + sp), 1) and interleaved(gate, up):
        gu = wg.new_empty(0).set_(wg.untyped_storage(), wg.storage_offset(), (wg.shape[0], h + sp), (h + sp, 1))
        gu = _spans(gu, 2 * i + sp, h + sp)
    elif wu.data_ptr() == wg.data_ptr() + i * (h + sp) * wg.element_size():
        gu = _spans(wg, 2 * i + sp, h + sp)
    else:
        return None
    d = _spans(wd, h + sp_d, i + sp_d)
    return None if gu is None or d is None else (gu, d)


def spare_columns(x: torch.Tensor) -> int:
    """How many columns after each of ``x``'s rows its producer left for its consumer to fill (``rms_norm``'s
    ``spare``, and ``grad_spare`` for a gradient): the padded MLP then writes ``s x A^T`` (``s dy B_d``) there
    instead of copying ``x`` (``dy``) into a wider buffer."""
    return getattr(x, "_tf_spare_columns", 0)


def held_for_backward(x: torch.Tensor) -> bool:
    """Whether ``x``'s producer keeps ``x`` (its whole storage: the spare columns too) for its own backward,
    which runs after any consumer's (FlashAttention-4's output in the padded O's wide input): a consumer may
    then keep a view of those columns rather than a copy, and holds no memory that is not held anyway."""
    return getattr(x, "_tf_held_for_backward", False)


def wide_input(x: torch.Tensor, x2: torch.Tensor, r: int) -> torch.Tensor:
    """``x2`` (``x`` as ``(N, H)``) in the first columns of an ``(N, H + r)`` buffer for a padded layout's GEMM:
    the buffer ``x``'s producer left with ``r`` spare columns (``spare_columns``), else a new one with ``x``
    copied in. The spare columns hold anything: the caller writes every one."""
    xa = _spans(x2, x2.shape[0], x2.shape[1] + r) if spare_columns(x) == r and x2.data_ptr() == x.data_ptr() \
        else None
    if xa is None:
        xa = x2.new_empty(x2.shape[0], x2.shape[1] + r)
        copy_rows(xa[:, :x2.shape[1]], x2, impl="triton")
    return xa


def _mm_into(out, a, b, s: float) -> None:
    # out = s * (a @ b), out a view of a wider buffer (cuBLAS writes it in place: row stride >= columns)
    if s == 1.0:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(out, a, b, beta=0.0, alpha=s, out=out)


class _PaddedMLPFunction(torch.autograd.Function):
    """lora_mlp over the padded layout (above): the same function and gradients as ``_LoraMLPFunction``,
    with ``x A^T`` saved scaled by s (so dB = dy^T (s x A^T))."""

    @staticmethod
    def forward(ctx, x, ag, bg, au, bu, ad, bd, sg, su, sd, gu_w, d_w, act, residual, inter):
        dtype = _compute_dtype(x)
        shape = x.shape
        hd, rg, ru, rd = shape[-1], ag.shape[0], au.shape[0], ad.shape[0]
        i = bg.shape[0]
        r = rg + ru
        sp, sp_d = gu_w.shape[1] - hd, d_w.shape[1] - i  # the spare columns: r, r_d rounded up (PAD_ALIGN)
        # the adapters' current values into their blocks (the casts to the compute dtype)
        gate_rows, up_rows = gate_up_rows(i, inter)
        cast_blocks([(gu_w[gate_rows, hd:hd + rg], bg), (gu_w[up_rows, hd + rg:hd + r], bu),
                     (gu_w[2 * i:2 * i + rg, :hd], ag), (gu_w[2 * i + rg:2 * i + r, :hd], au),
                     (d_w[:hd, i:i + rd], bd), (d_w[hd:hd + rd, :i], ad)])  # one launch
        x2 = x.reshape(-1, hd).to(dtype)
        n = x2.shape[0]
        xa = wide_input(x, x2, sp)                                                # [x | s x A^T | 0] below
        xs = xa[:, :hd]  # x read from the wide buffer either way: one GEMM layout, the same values
        if sg == su:  # gu_w's rows after A_u are zeros: the GEMM writes the padding's zeros too
            _mm_into(xa[:, hd:], xs, gu_w[2 * i:, :hd].t(), sg)
        else:
            _mm_into(xa[:, hd:hd + rg], xs, gu_w[2 * i:2 * i + rg, :hd].t(), sg)
            _mm_into(xa[:, hd + rg:], xs, gu_w[2 * i + rg:, :hd].t(), su)
        gu = x2.new_empty(n, 2 * i + sp)                           # [g | u | spare] (inter: g_0, u_0, ...)
        ha = x2.new_empty(n, i + sp_d)                                            # [h | s h A_d^T | 0]
        if inter:  # h from the GEMM's epilogue (gated_gemm.py)
            gated_gemm.gated_forward(xa, gu_w[:2 * i], gu[:, :2 * i], ha[:, :i], act)
        else:
            if hd <= PADDED_ONE_GEMM_MAX_HIDDEN:
                torch.mm(xa, gu_w[:2 * i].t(), out=gu[:, :2 * i])
            else:
                torch.mm(xa, gu_w[:i].t(), out=gu[:, :i])
                torch.mm(xa, gu_w[i:2 * i].t(), out=gu[:, i:2 * i])
            lora_glu.lora_glu_forward(gu[:, :i], gu[:, i:2 * i], act, out=ha[:, :i])
        _mm_into(ha[:, i:], ha[:, :i], d_w[hd:, :i].t(), sd)                     # A_d, then zero rows
        if residual is not None:
            y = torch.addmm(residual.reshape(-1, hd), ha, d_w[:hd].t())
        else:
            y = ha @ d_w[:hd].t()                                                 # (N, H)
        # the rank-r products leave their wide buffers (kept, x's would hold the whole (N, H + R)), in one launch
        kept = cast_group((xa[:, hd:hd + r], ha[:, i:i + rd]), dtype, copy=True)
        ctx.save_for_backward(gu, *kept, *_x_for_saving(ctx, x, x2))
        ctx.buffers, ctx.scales, ctx.ranks = (gu_w, d_w), (sg, su, sd), (rg, ru, rd)
        ctx.act, ctx.shape, ctx.dtype, ctx.inter, ctx.interleaved = act, shape, dtype, i, inter
        ctx.param_dtypes = [t.dtype for t in (ag, bg, au, bu, ad, bd)]
        return y.view(*shape[:-1], hd)

    @staticmethod
    def backward(ctx, dy):
        gu, xa, xa_d, *x_saved = ctx.saved_tensors
        (gu_w, d_w), (sg, su, sd), (rg, ru, rd) = ctx.buffers, ctx.scales, ctx.ranks
        hd, i, r = ctx.shape[-1], ctx.inter, rg + ru
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, hd).to(ctx.dtype)
        dya = wide_input(dy, dy2, d_w.shape[0] - hd)                              # [dy | s dy B_d | 0]
        _mm_into(dya[:, hd:], dy2, d_w[:hd, i:], sd)                              # B_d, then zero columns
        inter = ctx.interleaved
        if inter:  # dh stays in the GEMM's registers: dg, du over g, u, and h (gated_gemm.py)
            h = dy2.new_empty(dy2.shape[0], i)
            gated_gemm.gated_backward(dya, d_w[:, :i], gu[:, :2 * i], gu[:, :2 * i], h, ctx.act)
        else:
            dh = dya @ d_w[:, :i]                                                 # (N, I), the term inside
            lora_glu.lora_glu_backward_inplace(dh, gu[:, :i], gu[:, i:2 * i], ctx.act)   # h, dg, du
            h = dh
        dgu = gu[:, :2 * i]  # [dg | du], or interleaved
        grads = [None] * 6
        if need[5]:
            grads[4] = dya[:, hd:hd + rd].t() @ h                                 # dA_d (r_d, I)
        if need[6]:
            grads[5] = dy2.t() @ xa_d                                             # dB_d (H, r_d)
        del h
        dx = None
        products = gu[:, 2 * i:2 * i + r]  # s dg B_g | s du B_u, (N, R)
        if need[0] and DX_CARRIES_PRODUCTS:
            # gu_w's first 2I rows are [W_g | B_g 0] and [W_u | 0 B_u] (either layout): one GEMM over [dg | du]
            # gives [dgu W | dg B_g | du B_u | 0], so [dg | du] is read once for dx and the products, and the
            # products' own term of dx, s (dgu B) A, is added after (an (N x H) pass where the products' GEMM
            # reads the (N x 2I) [dg | du])
            # (the products stay in out's columns: addmm_ reads them beside the columns it writes)
            out = dgu @ gu_w[:2 * i]                                              # (N, H + S)
            products = out[:, hd:hd + r]
            if sg != 1.0 or su != 1.0:
                products[:, :rg] *= sg
                products[:, rg:] *= su
            dx = out[:, :hd].addmm_(products, gu_w[2 * i:2 * i + r, :hd]).view(ctx.shape)
        elif inter:
            # interleaved, gu_w[:2I, H:]'s rows hold B_g (even rows, first r_g columns) and B_u (odd rows, the
            # next r_u), zeros elsewhere: over all of [dg | du] the products are the same sums
            if sg == su:
                _mm_into(gu[:, 2 * i:], dgu, gu_w[:2 * i, hd:], sg)               # s dg B_g | s du B_u | 0
            else:
                _mm_into(gu[:, 2 * i:2 * i + rg], dgu, gu_w[:2 * i, hd:hd + rg], sg)
                _mm_into(gu[:, 2 * i + rg:], dgu, gu_w[:2 * i, hd + rg:], su)
        else:
            _mm_into(gu[:, 2 * i:2 * i + rg], dgu[:, :i], gu_w[:i, hd:hd + rg], sg)      # s dg B_g
            _mm_into(gu[:, 2 * i + rg:], dgu[:, i:], gu_w[i:2 * i, hd + rg:], su)         # s du B_u, zeros
        if need[0] and dx is None:
            dx = (gu @ gu_w[:, :hd]).view(ctx.shape)                             # every term: one GEMM
        if inter and (need[2] or need[4]):  # one pass over [dg | du] for both: dg^T (s x A_g^T), du^T (...)
            d_b = dgu.t() @ xa
            grads[1] = d_b[0::2, :rg] if need[2] else None                        # dB_g (I, r_g)
            grads[3] = d_b[1::2, rg:] if need[4] else None                        # dB_u (I, r_u)
        else:
            if need[2]:
                grads[1] = dgu[:, :i].t() @ xa[:, :rg]                            # dB_g (I, r_g)
            if need[4]:
                grads[3] = dgu[:, i:].t() @ xa[:, rg:]                            # dB_u (I, r_u)
        k = None  # dA's column scale (the norm's weight), if any
        if need[1] or need[3]:
            d_a, k = _saved_input_product(ctx, x_saved, products)                  # dA_g, dA_u (R, H)
            grads[0], grads[2] = d_a[:rg] if need[1] else None, d_a[rg:] if need[3] else None
        grads = _cast_grads(grads, ctx.param_dtypes, scales=[k, None, k, None, None, None])
        d_residual = dy if need[13] else None
        return (dx, *grads, None, None, None, None, None, None, d_residual, None)


def lora_mlp(x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights, act: str = "silu",
             *, impl: str | None = None, output_unused: bool = False,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA on any of the three projections (``lora_a=None`` for none).

    ``output_unused``: the caller never reads the output's values, only backpropagates through it (a
    checkpointed layer's recompute; module docstring). A permission: the reference path ignores it.

    ``residual``: returns ``residual + mlp(x)``, the decoder layer's residual add done by the down
    projection's GEMM (``addmm``: it reads the residual as the GEMM's C) instead of a separate pass over
    (tokens x hidden); one rounding where the stock add rounds the MLP output first. A residual in
    another dtype than the compute dtype is added as HF adds it (promoting)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    for p in (gate, up, down):
        assert (p.lora_a is None) == (p.lora_b is None), "lora_a and lora_b come together"
        assert p.bias is None, "the fused MLP takes no bias (the patcher leaves such MLPs to their stock forward)"
    if not use_triton(x, *(p.lora_a for p in (gate, up, down)), impl=impl):
        out = lora_mlp_reference(x, gate, up, down, act)
        return out if residual is None else residual + out
    fused_residual = residual if residual is not None and residual.dtype == _compute_dtype(x) \
        and residual.shape == (*x.shape[:-1], _out_features(down.weight)) else None
    dropouts = tuple(float(p.dropout) if p.lora_a is not None else 0.0 for p in (gate, up, down))
    buffers = padded(gate, up, down) if not output_unused and not any(dropouts) else None
    if buffers is not None and buffers[0].dtype == _compute_dtype(x):
        out = _PaddedMLPFunction.apply(
            x, gate.lora_a, gate.lora_b, up.lora_a, up.lora_b, down.lora_a, down.lora_b, float(gate.scale),
            float(up.scale), float(down.scale), *buffers, act, fused_residual, interleaved(gate, up))
        return out if residual is None or fused_residual is not None else residual + out
    out = _LoraMLPFunction.apply(
        x, gate.weight, gate.lora_a, gate.lora_b, up.weight, up.lora_a, up.lora_b,
        down.weight, down.lora_a, down.lora_b, float(gate.scale), float(up.scale), float(down.scale),
        act, bool(output_unused), fused_residual, dropouts)
    return out if residual is None or fused_residual is not None else residual + out


def _project_reference(x, p: LoraWeights, dropped=None):
    # dropped: the adapter's input, x with its dropout (else drawn here)
    dtype = x.dtype
    y = fp8_linear_reference(x, p.weight) if isinstance(p.weight, Fp8Weight) else x @ _dense(p.weight, dtype).t()
    if p.bias is not None:
        y = y + p.bias.to(dtype)
    if p.lora_a is not None:
        xd = dropped if dropped is not None else dropout_reference(x, p.dropout)
        y = y + (xd @ p.lora_a.to(dtype).t()) @ p.lora_b.to(dtype).t() * p.scale
    return y


def lora_mlp_reference(x, gate: LoraWeights, up: LoraWeights, down: LoraWeights, act: str = "silu"):
    """The spec, through plain autograd: what HF's MLP with PEFT LoRA layers computes, adapter dropout
    drawn as PEFT draws it (dropout.py; one mask for gate and up sharing an A, as Phi-3's gate_up_proj)."""
    x = x.to(_compute_dtype(x))
    x_g = dropout_reference(x, gate.dropout) if gate.lora_a is not None else None
    g = _project_reference(x, gate, x_g)
    u = _project_reference(x, up, x_g if up.lora_a is gate.lora_a else None)
    return _project_reference(lora_glu.act_fn(g, act) * u, down)
