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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.backend import use_triton

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class LoraWeights:
    """One projection: frozen ``weight (out, in)`` and optional adapter ``lora_a (r, in)``,
    ``lora_b (out, r)``, ``scale``."""

    weight: object
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0


def _dense(w, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w if w.dtype == dtype else w.to(dtype)
    return w.dequantize().to(dtype)


def _act_forward(g, u, act, triton_path):
    if triton_path:
        if act == "silu":
            from kernels.swiglu import swiglu_forward
            return swiglu_forward(g, u)
        from kernels.geglu import geglu_forward
        return geglu_forward(g, u, "tanh" if act == "gelu_tanh" else "none")
    return _act_reference(g, u, act)


def _act_backward_inplace(dh, g, u, act, triton_path):
    # afterwards: dh holds h, g holds dg, u holds du
    if triton_path:
        if act == "silu":
            from kernels.swiglu import swiglu_backward_inplace
            return swiglu_backward_inplace(dh, g, u)
        from kernels.geglu import geglu_backward_inplace
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
    from kernels.rms_norm import norm_recipe

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


def _project(x, w, a, b, s, xa=None):
    # x: (N, in) -> (N, out), plus the (N, r) product x A^T when there is an adapter (given or computed).
    # The rank-r term is written first and the base GEMM accumulates onto it (beta=s scales it in the
    # GEMM's epilogue): the (N, out) output is written once by the small GEMM and read once inside the
    # large, compute-bound one, instead of a separate addmm_ pass reading and writing it again
    # (bench/NOTES.md, v4: ~45 GB less memory traffic per step at 8B)
    if a is None:
        return x @ w.t(), None
    if xa is None:
        xa = x @ a.t()
    y = xa @ b.t()
    y.addmm_(x, w.t(), beta=s)
    return y, xa


def _lora_input_grads(x2, parts, need_a, need_dx=True):
    """Input-side LoRA gradients of several adapters reading the same ``x2 (N, in)``.

    ``parts``: ``(d_b (N, r_i), a_i (r_i, in))`` with ``d_b = s_i dY_i B_i`` (the gradient reaching
    ``x A_i^T``). Returns ``(dx_lora (N, in) or None, [dA_i (r_i, in) or None])``: one GEMM each for all
    adapters together (x2 is read once, dx written once), instead of one read/read-modify-write per
    adapter."""
    if not parts:
        return None, []
    d_cat = torch.cat([d for d, _ in parts], dim=1) if len(parts) > 1 else parts[0][0]      # (N, sum r)
    a_cat = torch.cat([a for _, a in parts], dim=0) if len(parts) > 1 else parts[0][1]      # (sum r, in)
    da_cat = d_cat.t() @ x2 if any(need_a) else None                                        # (sum r, in)
    das, row = [], 0
    for (d, _), need in zip(parts, need_a):
        r = d.shape[1]
        das.append(da_cat[row:row + r] if need else None)
        row += r
    return (d_cat @ a_cat if need_dx else None), das


class _LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, wu, au, bu, wd, ad, bd, sg, su, sd, act, triton_path):
        dtype = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        cast = [t.to(dtype) if t is not None else None for t in (ag, bg, au, bu, ad, bd)]
        ag_, bg_, au_, bu_, ad_, bd_ = cast
        xa_g = xa_u = None
        if ag_ is not None and au_ is not None:  # one x A^T for both adapters: x2 read once
            xa_gu = x2 @ torch.cat([ag_, au_]).t()                              # (N, r_g + r_u)
            xa_g, xa_u = xa_gu[:, :ag_.shape[0]], xa_gu[:, ag_.shape[0]:]
        g, xa_g = _project(x2, _dense(wg, dtype), ag_, bg_, sg, xa_g)           # (N, I), (N, r)
        u, xa_u = _project(x2, _dense(wu, dtype), au_, bu_, su, xa_u)           # (N, I), (N, r)
        h = _act_forward(g, u, act, triton_path)                                # (N, I)
        y, _ = _project(h, _dense(wd, dtype), ad_, bd_, sd)                     # (N, H)
        ctx.save_for_backward(g, u, xa_g, xa_u, ag_, bg_, au_, bu_, ad_, bd_, *_x_for_saving(ctx, x, x2))
        ctx.weights = (wg, wu, wd)
        ctx.scales = (sg, su, sd)
        ctx.act, ctx.triton_path, ctx.shape, ctx.dtype = act, triton_path, shape, dtype
        ctx.param_dtypes = [t.dtype if t is not None else None for t in (ag, bg, au, bu, ad, bd)]
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        g, u, xa_g, xa_u, ag, bg, au, bu, ad, bd, *x_saved = ctx.saved_tensors
        x2 = _restore_x(ctx, x_saved)
        wg, wu, wd = ctx.weights
        sg, su, sd = ctx.scales
        dtype = ctx.dtype
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)                            # (N, H)
        dy_b = None
        if ad is not None:  # LoRA term first, base GEMM accumulates onto it (see _project)
            dy_b = dy2 @ bd                                                     # (N, r)
            dh = dy_b @ ad                                                      # (N, I)
            dh.addmm_(dy2, _dense(wd, dtype), beta=sd)
        else:
            dh = dy2 @ _dense(wd, dtype)                                        # (N, I)
        _act_backward_inplace(dh, g, u, ctx.act, ctx.triton_path)
        h, dg, du = dh, g, u
        grads = [None] * 6  # dA_g, dB_g, dA_u, dB_u, dA_d, dB_d
        if ad is not None:
            if need[8]:
                grads[4] = sd * (dy_b.t() @ h)                                  # (r, I)
            if need[9]:
                grads[5] = sd * (dy2.t() @ (h @ ad.t()))                        # (H, r)
        del h
        parts, need_a = [], []
        for i, (d, a, b, xa, s) in enumerate(((dg, ag, bg, xa_g, sg), (du, au, bu, xa_u, su))):
            if a is None:
                continue
            if need[3 + 3 * i]:
                grads[2 * i + 1] = s * (d.t() @ xa)                             # (I, r)
            parts.append(((d @ b).mul_(s), a))                                  # (N, r)
            need_a.append((i, need[2 + 3 * i]))
        dx_lora, das = _lora_input_grads(x2, parts, [n for _, n in need_a], need[0])
        for (i, _), da in zip(need_a, das):
            grads[2 * i] = da                                                   # (r, H)
        dx = None
        if need[0]:
            if dx_lora is None:
                dx = dg @ _dense(wg, dtype)                                     # (N, H)
            else:
                dx = dx_lora
                dx.addmm_(dg, _dense(wg, dtype))
            dx.addmm_(du, _dense(wu, dtype))
        grads = [gr.to(pd) if gr is not None else None for gr, pd in zip(grads, ctx.param_dtypes)]
        if dx is not None:
            dx = dx.view(ctx.shape)
        return (dx, None, grads[0], grads[1], None, grads[2], grads[3], None, grads[4], grads[5],
                None, None, None, None, None)


def lora_mlp(x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights, act: str = "silu",
             *, impl: str | None = None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA on any of the three projections (``lora_a=None`` for none)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    for p in (gate, up, down):
        assert (p.lora_a is None) == (p.lora_b is None), "lora_a and lora_b come together"
    if not use_triton(x, *(p.lora_a for p in (gate, up, down)), impl=impl):
        return lora_mlp_reference(x, gate, up, down, act)
    return _LoraMLPFunction.apply(
        x, gate.weight, gate.lora_a, gate.lora_b, up.weight, up.lora_a, up.lora_b,
        down.weight, down.lora_a, down.lora_b, float(gate.scale), float(up.scale), float(down.scale),
        act, True)


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
