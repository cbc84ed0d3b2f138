"""The gated MLP of a LoRA-adapted decoder layer (gate/up/down, SwiGLU or GeGLU) as one autograd node with
a hand-derived backward.

Per projection ``p``: ``y_p = x W_p^T + s_p (x A_p^T) B_p^T`` with the base ``W_p`` frozen.
Forward saves only ``x``, ``g``, ``u`` and the rank-r products ``x A_g^T``, ``x A_u^T``; stock HF+PEFT
also keeps ``act(g)`` and ``h = act(g) * u`` alive (two more tokens x intermediate tensors per layer).
Backward recomputes ``h`` inside the activation-backward kernel, writing ``h, dg, du`` over the
``dh, g, u`` buffers, and computes no gradient for any frozen weight:

    dh   = dy W_d + s_d (dy B_d) A_d
    dA_d = s_d (dy B_d)^T h          dB_d = s_d dy^T (h A_d^T)
    dA_g = s_g (dg B_g)^T x          dB_g = s_g dg^T (x A_g^T)        (same for u)
    dx   = dg W_g + du W_u + s_g (dg B_g) A_g + s_u (du B_u) A_u

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge_kernels.backend import use_triton

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class LoraWeights:
    """One projection: frozen ``weight (out, in)`` and optional adapter ``lora_a (r, in)``,
    ``lora_b (out, r)``, ``scale``."""

    weight: object
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0


def _out_features(w) -> int:
    # a tensor (out, in), or a quantised weight exposing ``shape`` like one
    return int(w.shape[0])


def _dense(w, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w if w.dtype == dtype else w.to(dtype)
    return w.dequantize().to(dtype)


def _act_forward(g, u, act, triton_path):
    if triton_path:
        if act == "silu":
            from tuneforge_kernels.swiglu import swiglu_forward
            return swiglu_forward(g, u)
        from tuneforge_kernels.geglu import geglu_forward
        return geglu_forward(g, u, "tanh" if act == "gelu_tanh" else "none")
    return _act_reference(g, u, act)


def _act_backward_inplace(dh, g, u, act, triton_path):
    # afterwards: dh holds h, g holds dg, u holds du
    if triton_path:
        if act == "silu":
            from tuneforge_kernels.swiglu import swiglu_backward_inplace
            return swiglu_backward_inplace(dh, g, u)
        from tuneforge_kernels.geglu import geglu_backward_inplace
        return geglu_backward_inplace(dh, g, u, "tanh" if act == "gelu_tanh" else "none")
    with torch.enable_grad():
        gg, uu = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
        h = _act_fn(gg, act) * uu
        dg, du = torch.autograd.grad(h, (gg, uu), dh.float())
    dh.copy_(h.detach())
    g.copy_(dg)
    u.copy_(du)


def _act_fn(x, act):
    if act == "silu":
        return torch.nn.functional.silu(x)
    return torch.nn.functional.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def _act_reference(g, u, act):
    low = g.dtype in (torch.bfloat16, torch.float16)
    gg, uu = (g.float(), u.float()) if low else (g, u)
    return (_act_fn(gg, act) * uu).to(g.dtype)


def _compute_dtype(x):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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


def _project(x, w, a, b, s):
    # x: (N, in) -> (N, out), plus the (N, r) product x A^T when there is an adapter
    y = x @ w.t()
    if a is None:
        return y, None
    xa = x @ a.t()
    y.addmm_(xa, b.t(), alpha=s)
    return y, xa


# deferred mode (``output_unused``): the MLP is recomputed in backward in blocks of this many token rows,
# so at most (rows x intermediate) of g, u and dh are alive instead of (tokens x intermediate): 3 x 59 MB
# instead of 3 x 235 MB at 8B with 8192 tokens. 2048: the GEMMs keep M = 2048 (16 x 56 output tiles of
# 128 x 256 for the gate projection at 8B, many waves on 132 SMs); not measured against other sizes.
_DEFERRED_ROWS = 2048


def _rows_backward(dy2, x2, g, u, xa_g, xa_u, lora, weights, scales, need, act, triton_path, dtype, dx):
    """Backward of a block of rows whose ``g``, ``u`` and ``x A^T`` are given (``g``/``u`` are overwritten):
    writes ``dx (rows, H)`` when it is not None and returns the six adapter-gradient terms in the compute
    dtype (dA_g, dB_g, dA_u, dB_u, dA_d, dB_d; None where not wanted). Weights are dequantised at each
    use (one transient at a time) unless the caller passes tensors."""
    ag, bg, au, bu, ad, bd = lora
    wg, wu, wd = weights
    sg, su, sd = scales
    dh = dy2 @ _dense(wd, dtype)                                                # (N, I)
    dy_b = None
    if ad is not None:
        dy_b = dy2 @ bd                                                         # (N, r)
        dh.addmm_(dy_b, ad, alpha=sd)
    _act_backward_inplace(dh, g, u, act, triton_path)
    h, dg, du = dh, g, u
    grads = [None] * 6
    if ad is not None:
        if need[8]:
            grads[4] = sd * (dy_b.t() @ h)                                      # (r, I)
        if need[9]:
            grads[5] = sd * (dy2.t() @ (h @ ad.t()))                            # (H, r)
    del h
    if dx is not None:
        torch.mm(dg, _dense(wg, dtype), out=dx)                                 # (N, H)
        dx.addmm_(du, _dense(wu, dtype))
    for i, (d, a, b, xa, s) in enumerate(((dg, ag, bg, xa_g, sg), (du, au, bu, xa_u, su))):
        if a is None:
            continue
        d_b = d @ b                                                             # (N, r)
        if need[2 + 3 * i]:
            grads[2 * i] = s * (d_b.t() @ x2)                                   # (r, H)
        if need[3 + 3 * i]:
            grads[2 * i + 1] = s * (d.t() @ xa)                                 # (I, r)
        if dx is not None:
            dx.addmm_(d_b, a, alpha=s)
    return grads


class _LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, wu, au, bu, wd, ad, bd, sg, su, sd, act, triton_path, output_unused):
        dtype = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        cast = [t.to(dtype) if t is not None else None for t in (ag, bg, au, bu, ad, bd)]
        ag_, bg_, au_, bu_, ad_, bd_ = cast
        if output_unused:  # deferred (module docstring): nothing reads y, backward recomputes g and u
            g = u = xa_g = xa_u = None
            y = x2.new_empty(x2.shape[0], _out_features(wd))                    # (N, H)
        else:
            g, xa_g = _project(x2, _dense(wg, dtype), ag_, bg_, sg)              # (N, I), (N, r)
            u, xa_u = _project(x2, _dense(wu, dtype), au_, bu_, su)              # (N, I), (N, r)
            h = _act_forward(g, u, act, triton_path)                            # (N, I)
            y, _ = _project(h, _dense(wd, dtype), ad_, bd_, sd)                 # (N, H)
        ctx.save_for_backward(g, u, xa_g, xa_u, ag_, bg_, au_, bu_, ad_, bd_, *_x_for_saving(ctx, x, x2))
        ctx.weights = (wg, wu, wd)
        ctx.scales = (sg, su, sd)
        ctx.act, ctx.triton_path, ctx.shape, ctx.dtype = act, triton_path, shape, dtype
        ctx.deferred = output_unused
        ctx.param_dtypes = [t.dtype if t is not None else None for t in (ag, bg, au, bu, ad, bd)]
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        g, u, xa_g, xa_u, *rest = ctx.saved_tensors
        lora, x_saved = rest[:6], rest[6:]
        x2 = _restore_x(ctx, x_saved)
        dtype = ctx.dtype
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)                            # (N, H)
        dx = x2.new_empty(x2.shape) if need[0] else None                        # (N, H), contiguous
        common = (lora, ctx.scales, need, ctx.act, ctx.triton_path, dtype)
        if not ctx.deferred:
            grads = _rows_backward(dy2, x2, g, u, xa_g, xa_u, lora, ctx.weights, *common[1:], dx)
        else:
            ag, bg, au, bu = lora[:4]
            sg, su = ctx.scales[:2]
            # dequantised once for all blocks (QLoRA: three transients instead of one at a time)
            weights = [_dense(w, dtype) for w in ctx.weights]
            grads = [None] * 6
            for start in range(0, x2.shape[0], _DEFERRED_ROWS):
                rows = slice(start, start + _DEFERRED_ROWS)
                xc = x2[rows]
                g, xa_g = _project(xc, weights[0], ag, bg, sg)                  # (C, I), (C, r)
                u, xa_u = _project(xc, weights[1], au, bu, su)                  # (C, I), (C, r)
                part = _rows_backward(dy2[rows], xc, g, u, xa_g, xa_u, lora, weights, *common[1:],
                                      dx[rows] if dx is not None else None)
                # block terms summed in float32
                grads = [gr if p is None else p.float() if gr is None else gr.add_(p)
                         for gr, p in zip(grads, part)]
        grads = [gr.to(pd) if gr is not None else None for gr, pd in zip(grads, ctx.param_dtypes)]
        if dx is not None:
            dx = dx.view(ctx.shape)
        return (dx, None, grads[0], grads[1], None, grads[2], grads[3], None, grads[4], grads[5],
                None, None, None, None, None, None)


def lora_mlp(x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights, act: str = "silu",
             *, impl: str | None = None, output_unused: bool = False) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA on any of the three projections (``lora_a=None`` for none).

    ``output_unused``: the caller never reads the output's values, only backpropagates through it (a
    checkpointed layer's recompute; module docstring). A permission: the reference path ignores it."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    for p in (gate, up, down):
        assert (p.lora_a is None) == (p.lora_b is None), "lora_a and lora_b come together"
    if not use_triton(x, *(p.lora_a for p in (gate, up, down)), impl=impl):
        return lora_mlp_reference(x, gate, up, down, act)
    return _LoraMLPFunction.apply(
        x, gate.weight, gate.lora_a, gate.lora_b, up.weight, up.lora_a, up.lora_b,
        down.weight, down.lora_a, down.lora_b, float(gate.scale), float(up.scale), float(down.scale),
        act, True, bool(output_unused))


def _project_reference(x, p: LoraWeights):
    dtype = x.dtype
    y = x @ _dense(p.weight, dtype).t()
    if p.lora_a is not None:
        y = y + (x @ p.lora_a.to(dtype).t()) @ p.lora_b.to(dtype).t() * p.scale
    return y


def lora_mlp_reference(x, gate: LoraWeights, up: LoraWeights, down: LoraWeights, act: str = "silu"):
    """The spec, through plain autograd: what HF's MLP with PEFT LoRA layers (dropout 0) computes."""
    x = x.to(_compute_dtype(x))
    g, u = _project_reference(x, gate), _project_reference(x, up)
    return _project_reference(_act_fn(g, act) * u, down)
