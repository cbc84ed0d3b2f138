"""SwiGLU inside its GEMMs' epilogues: QuACK's warp-specialised Hopper GEMMs, for the padded MLP.

The padded MLP (lora_mlp.py) computes ``[g | u] = xa W^T`` and then ``h = silu(g) u`` in a separate pass
(lora_glu), and in backward ``dh = dya W_d`` and then ``dg, du, h`` in another. Each pass moves
(tokens x intermediate) tensors the GEMM beside it has just written or is about to write: at 8B ~24 ms a
step (bench/NOTES.md, session 41). QuACK (quack-kernels, Tri Dao's CuTe DSL kernels, which FlashAttention-4
already depends on) has Hopper GEMMs whose epilogue runs in ping-pong warp groups beside the next tile's
main loop, with these two epilogues:

    gated_forward:   acc = xa W^T;  preact = acc (stored);  h = silu(acc_g) acc_u
    gated_backward:  acc = dya W_d; dg, du = silu's and the product's derivatives at (g, u) times acc;
                     h = silu(g) u  (recomputed from the stored preact)

Both pair each gate column with its up column, so the preact, ``[dg | du]`` and the weight's rows are
interleaved (``g_0, u_0, g_1, u_1, ...``): the padded layout stores the frozen gate and up weights that way
when this path serves it (``lora_mlp.pad_weights(interleave=True)``), which keeps every other GEMM of the
layer (the input gradient over ``[dg | du]`` above all) in cuBLAS.

Numerics: ``h`` and ``dg, du`` are computed from the float32 accumulator, where the unfused path rounds
``g, u`` (forward) and ``dh`` (backward) to the compute dtype first: one rounding fewer, not an
approximation (sigmoid through ``ex2.approx`` and ``rcp.approx``, as Triton's). The stored preact is
bit-identical to cuBLAS's (bench/results/2026-12-07-h100-v45-quack-glu.jsonl).

The reference path (CPU, and ``impl="reference"``) computes the same outputs in float32 with torch.
"""

from __future__ import annotations

import functools
import os

import torch

ACTS = {"silu": "swiglu"}  # ours -> QuACK's gated activation; GeGLU keeps the unfused path


@functools.cache
def _quack():
    try:
        from quack.gemm_config import GemmConfig
        from quack.gemm_interface import gemm_dgated, gemm_gated
    except Exception as err:  # noqa: BLE001 - any import failure (no CUDA 13 DSL, ...) means "not here"
        return err
    key_dsl_internals()
    # ping-pong 128 x 192, cluster 2 x 1 (QuACK's SM90 default): the fastest of ten tiles for both epilogues at
    # the 8B layer's shapes (session 42: forward 2.83-2.85 ms against 2.88-3.85, backward 1.63-1.66 against
    # 1.74-2.82; bench/results/2026-12-07-h100-v45-quack-*.jsonl)
    config = GemmConfig(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1,
                        is_dynamic_persistent=False, device_capacity=9)
    return gemm_gated, gemm_dgated, config


def key_dsl_internals() -> None:
    """QuACK 0.6.5 fingerprints everything an epilogue function reaches, to key its compile cache, and
    refuses what it cannot fingerprint. Under nvidia-cutlass-dsl 4.8.1 (FlashAttention-4's pin) the gated
    epilogues reach the DSL's source-location machinery (a ``ContextVar``, ``code.co_positions``: not math)
    and every call fails with "no fail-closed semantic key". Such a value is keyed by its type and name
    here; the kernels' math does not depend on it."""
    from quack.gemm_runtime import identity

    keyer = identity.semantic_value_key
    if getattr(keyer, "_tf_lenient", False):
        return

    def semantic_value_key(value, seen):
        try:
            return keyer(value, seen)
        except TypeError:
            return ("opaque", type(value).__module__, type(value).__qualname__,
                    getattr(value, "__qualname__", getattr(value, "name", None)))

    semantic_value_key._tf_lenient = True
    identity.semantic_value_key = semantic_value_key


def unavailable(device: torch.device, act: str, dtype: torch.dtype) -> str | None:
    """Why the fused epilogues cannot serve an MLP with this activation and compute dtype on ``device``, or
    None. ``TUNEFORGE_GATED_GEMM=0`` switches them off."""
    if os.environ.get("TUNEFORGE_GATED_GEMM", "1") == "0":
        return "TUNEFORGE_GATED_GEMM=0"
    return _unavailable(device, act, dtype)


@functools.cache  # asked at every fused forward and backward (``_fused``): the answer is the machine's
def _unavailable(device: torch.device, act: str, dtype: torch.dtype) -> str | None:
    if act not in ACTS:
        return f"QuACK has no epilogue for {act!r} here"
    if dtype != torch.bfloat16:  # QuACK takes fp16 too; only bf16 has run on a GPU here
        return f"the compute dtype is {dtype}, not bf16"
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "its kernels here are for Hopper GPUs (compute capability 9.x)"
    quack = _quack()
    if isinstance(quack, Exception):
        return f"quack-kernels is not importable ({type(quack).__name__}: {quack})"
    return None


def _fused(t: torch.Tensor, act: str, impl: str | None) -> bool:
    if impl not in (None, "quack", "reference"):
        raise ValueError(f"impl must be None, 'quack' or 'reference', got {impl!r}")
    if impl is not None:
        return impl == "quack"
    return t.is_cuda and unavailable(t.device, act, t.dtype) is None


def gated_forward(xa: torch.Tensor, w: torch.Tensor, preact: torch.Tensor, h: torch.Tensor, act: str = "silu",
                  *, impl: str | None = None) -> None:
    """``preact = xa w^T`` and ``h = act(g) u`` into the given (N, 2I) and (N, I) buffers (rows of any
    16-byte-aligned stride), ``w`` (2I, K) with gate and up rows interleaved; g, u are preact's even and odd
    columns."""
    if _fused(xa, act, impl):
        gemm_gated, _, config = _quack()
        gemm_gated(xa, w.t(), activation=ACTS[act], preact_out=preact, postact_out=h, config=config, tuned=False)
        return
    acc = xa.float() @ w.float().t()
    preact.copy_(acc)
    h.copy_(_act(acc[:, 0::2], act) * acc[:, 1::2])


def gated_backward(dya: torch.Tensor, w_d: torch.Tensor, preact: torch.Tensor, dgu: torch.Tensor, h: torch.Tensor,
                   act: str = "silu", *, impl: str | None = None) -> None:
    """With ``dh = dya w_d`` ((N, K) @ (K, I), kept in float32): ``dgu`` (N, 2I, interleaved like ``preact``)
    gets ``dg, du`` and ``h`` (N, I) gets ``act(g) u``. ``dgu`` may be ``preact`` itself (each output tile
    reads only its own preact tile, before it writes)."""
    if _fused(dya, act, impl):
        _, gemm_dgated, config = _quack()
        gemm_dgated(dya, w_d, preact, activation=ACTS[act], dx_out=dgu, postact_out=h, config=config, tuned=False)
        return
    dh = dya.float() @ w_d.float()
    g, u = (preact[:, k::2].to(torch.float32, copy=True) for k in (0, 1))  # copies: dgu may be preact
    s = torch.sigmoid(g)
    dgu[:, 0::2] = dh * u * s * (1 + g * (1 - s))
    dgu[:, 1::2] = dh * g * s
    h.copy_(g * s * u)


def _act(g: torch.Tensor, act: str) -> torch.Tensor:
    if act not in ACTS:
        raise ValueError(f"act must be one of {tuple(ACTS)}, got {act!r}")
    return torch.nn.functional.silu(g)


@functools.cache
def trial(device: torch.device, act: str, hidden: int, inter: int, spare: int, spare_d: int) -> str | None:
    """Both fused epilogues once on 128 rows in the padded layout's shapes and strides (``hidden``, ``inter``
    and the two spare widths), against the float32 reference: why they cannot serve such an MLP (they do
    not compile, launch or agree), or None. The patcher asks before it interleaves a layer's weights: a QuACK
    that fails here leaves the layout concatenated (lora_glu's passes) instead of failing the job's first
    step. Compiles what the step then reuses; cached per shape."""
    n, k, k_d = 128, hidden + spare, hidden + spare_d
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device).mul_(scale).to(torch.bfloat16)

    w = rand(2 * inter + spare, k, scale=k ** -0.5)[:2 * inter]
    w_d = rand(k_d, inter + spare_d, scale=inter ** -0.5)[:, :inter]
    xa, dya = rand(n, k), rand(n, k_d)
    outs = []
    try:
        for impl in ("quack", "reference"):
            pre, h = rand(n, 2 * inter + spare)[:, :2 * inter], rand(n, inter + spare_d)[:, :inter]
            gated_forward(xa, w, pre, h, act, impl=impl)
            h_f = h.clone()
            h_b = torch.empty(n, inter, device=device, dtype=torch.bfloat16)
            gated_backward(dya, w_d, pre, pre, h_b, act, impl=impl)  # in place, as the padded MLP calls it
            outs.append((h_f, pre, h_b))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - any failure to compile or launch is the answer
        first = (str(err).splitlines() or [""])[0][:200]
        return f"QuACK's fused epilogues failed a trial run ({type(err).__name__}: {first})"
    for name, got, ref in zip(("h", "dg/du", "recomputed h"), *outs):
        err = float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
        if not err < 2e-2:  # one bf16 rounding fewer than the reference's: ~3e-3 (session 42)
            return f"QuACK's fused epilogues disagreed with the reference in a trial run ({name}: {err:.2g})"
    return None
