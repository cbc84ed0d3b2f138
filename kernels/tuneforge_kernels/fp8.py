"""FP8 (e4m3) GEMMs for the frozen base weights: the opt-in mode that gives up exact bf16 for speed.

The frozen projections' GEMMs are ~75% of an 8B LoRA step (bench/NOTES.md, session 14's profile), and the
H200's tensor cores run e4m3 at twice the bf16 rate (in the power-capped 8B step the mode saved 16% of the
step time: session 15). In this mode each frozen weight ``W (out, in)`` is
quantised once (``Fp8Weight``: e4m3 with one float32 scale per output row, kept next to the bf16 weight),
and the two GEMMs a frozen weight takes part in read e4m3 operands quantised per row at each call:

    forward          y  = q(x) W_q^T                       scales: x's per token, W's per output row
    input gradient   dx = q(dy * s_W) W_q                  W's row scales folded into dy's columns first

(``q``: one float32 scale per row, ``amax / 448``, the row multiplied by its inverse and rounded to e4m3).
The adapters' own GEMMs, the norms, attention and the loss stay in the compute dtype, and no gradient of
a frozen weight exists to quantise. What this changes in the loss is what the worker reports against
bf16 (gpu_worker/patching: ``fp8_disabled``).

On CUDA the GEMMs are ``torch._scaled_mm`` (cuBLASLt, row-wise scales; compute capability 8.9 or later),
whose operands' dimensions must be multiples of 16: the token rows are padded to one with zero rows,
and weights whose sides are not are left in bf16 (``fp8_eligible``). Hopper's FP8 GEMM takes its second
operand column-major only, so the input gradient reads a transposed copy of ``W_q`` made for the call
(out x in bytes, one alive at a time) rather than a second one kept for good. Elsewhere (CPU, the tests)
the same products are computed from the dequantised operands in float32: what ``_scaled_mm``
computes up to the order of its sums.

The spec, ``fp8_linear_reference``, is the forward of the mode with a straight-through input gradient
``dy dequant(W_q)``: the kernels' input gradient also rounds ``dy``, which its tolerance allows for.
"""

from __future__ import annotations

import torch

from tuneforge_kernels.backend import launcher, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# the scale's floor: the smallest normal float32, so that its inverse is finite (a row of zeros, or of
# values this small, quantises to zeros with this scale)
_MIN_SCALE = 1.1754943508222875e-38
# _scaled_mm takes operands whose dimensions are multiples of this
ALIGN = 16
# columns a program reads per step; a row is read twice (its amax, then its values)
_BLOCK = 2048
# cuBLASLt's fast accumulation (Hopper: the tensor cores' partial sums never promoted to float32) for the
# forward GEMMs, as torchao's float8 training does; the input gradients always promote. Off until measured
# (bench/train_step.py --fp8-fast-accum)
FAST_ACCUM_FORWARD = False

if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(X, C, Q, S, n_rows, n_cols, stride_x, HAS_C: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        # rows past n_rows are the zero padding up to a multiple of ALIGN: nothing of theirs is read
        n_read = tl.where(row < n_rows, n_cols, 0)
        x_row = X + row.to(tl.int64) * stride_x
        q_row = Q + row.to(tl.int64) * n_cols
        amax = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(_scaled_values(x_row, C, cols, n_read, n_cols, HAS_C)))
        # IEEE division (Triton's ``/`` is approximate): the reference's scale and inverse, bit for bit
        s = tl.maximum(tl.math.div_rn(tl.max(amax, 0), 448.0), 1.1754943508222875e-38)
        inv = tl.math.div_rn(1.0, s)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = _scaled_values(x_row, C, cols, n_read, n_cols, HAS_C)
            q = _round_to_e4m3(tl.minimum(tl.maximum(v * inv, -448.0), 448.0))
            tl.store(q_row + cols, q.to(Q.dtype.element_ty), mask=cols < n_cols)
        tl.store(S + row, s)

    @triton.jit
    def _scaled_values(x_row, C, cols, n_read, n_cols, HAS_C: tl.constexpr):
        # a block of the row in float32, times the column scales when there are some
        v = tl.load(x_row + cols, mask=cols < n_read, other=0.0).to(tl.float32)
        if HAS_C:
            v = v * tl.load(C + cols, mask=cols < n_cols, other=0.0)
        return v

    @triton.jit
    def _round_to_e4m3(v):
        # v (|v| <= 448) rounded to the nearest e4m3 value, ties to even, in float32: the conversion that
        # follows is then exact wherever it runs (Triton's CPU interpreter rounds to e4m3 wrongly: 124.3 ->
        # 64, 170 -> 176). Normal range (|v| >= 2^-6): 3 of the 23 mantissa bits kept, by integer
        # arithmetic on the bits (a carry rounds up into the exponent). Below it, multiples of 2^-9 by the
        # 1.5 * 2^23 addition (round to integer, ties to even) on |v|, v's sign bit put back by bit
        # arithmetic (a negation compiles to 0 - x on the GPU, which turns -0 into +0).
        bits = v.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        a = tl.abs(v)
        sub = ((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
        sub = (sub.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
        return tl.where(a < 0.015625, sub, normal)


def padded_rows(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None, *, pad: bool = False,
                  impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (N, K)`` (times ``col_scale (K,)`` per column, in float32) as e4m3 with one float32 scale per row:
    ``(q (N', K), s (N', 1))`` with ``x * col_scale ~ q * s``. ``pad``: N' is N rounded up to a multiple of
    ``ALIGN``, the extra rows zeros (``_scaled_mm``'s operands); else N' = N."""
    assert x.dim() == 2 and x.is_floating_point(), x.shape
    n, k = x.shape
    rows = padded_rows(n) if pad else n
    if col_scale is not None:
        col_scale = col_scale.reshape(-1).float()
        assert col_scale.numel() == k, (col_scale.shape, x.shape)
    if not use_triton(x, col_scale, impl=impl) or not k:
        return quantize_rows_reference(x, col_scale, rows)
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(rows, k, device=x.device, dtype=E4M3)
    s = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    block = min(_BLOCK, next_power_of_2(k))
    launcher(_quantize_rows_kernel, x)[(rows,)](
        x, col_scale if col_scale is not None else s, q, s, n, k, x.stride(0), HAS_C=col_scale is not None,
        BLOCK=block, num_warps=4 if block >= 1024 else 2)
    return q, s


def quantize_rows_reference(x: torch.Tensor, col_scale: torch.Tensor | None = None,
                            rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec (float32 throughout, IEEE division: what the kernel computes, bit for bit)."""
    v = x.float()
    if col_scale is not None:
        v = v * col_scale.reshape(1, -1).float()
    rows = x.shape[0] if rows is None else rows
    if rows > v.shape[0]:
        v = torch.cat([v, v.new_zeros(rows - v.shape[0], v.shape[1])])
    amax = v.abs().amax(dim=1, keepdim=True) if v.shape[1] else v.new_zeros(rows, 1)
    # tensor by tensor: torch on CUDA divides by a Python scalar as a multiplication by its rounded
    # reciprocal, one ulp off IEEE division in some rows
    s = (amax / torch.full_like(amax, E4M3_MAX)).clamp_min(_MIN_SCALE)
    q = (v * (torch.ones_like(s) / s)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, s


def dequantize_rows(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * s).to(dtype)


def fp8_eligible(weight) -> bool:
    """Whether a frozen weight can take the FP8 GEMMs: a floating 2D tensor whose sides are multiples of
    ``ALIGN`` (real models' projections all are)."""
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()
            and weight.dtype != E4M3 and all(d % ALIGN == 0 and d > 0 for d in weight.shape))


def fp8_supported(device: torch.device) -> bool:
    """Whether ``device`` runs the e4m3 GEMMs natively (CUDA, compute capability 8.9 or later); CPU computes
    them from dequantised operands (tests)."""
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Weight:
    """A frozen ``(out, in)`` weight as e4m3 with one float32 scale per output row, quantised once from
    ``source`` (which stays as it is: the bf16 path and merges read it). ``matches(w)`` says whether it was
    taken from ``w`` as it is now: same storage, no in-place write through the parameter since (a write
    through ``.data`` does not count: see gpu_worker/patching/lora.py); ``follow_(w)`` when the same values
    moved to other storage."""

    def __init__(self, source: torch.Tensor, impl: str | None = None):
        assert fp8_eligible(source), (tuple(source.shape), source.dtype)
        self._column_major = None
        with torch.no_grad():
            self.qweight, scale = quantize_rows(source.detach(), impl=impl)     # (out, in), (out, 1)
        self.scale = scale.reshape(-1)                                           # (out,)
        self.dtype = source.dtype
        self._ones = torch.ones(1, source.shape[1], device=source.device, dtype=torch.float32)
        self._key = _key(source)

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def rows(self, start: int, stop: int) -> Fp8Weight:
        """Output rows ``[start, stop)`` (a fused projection's part, as Phi-3's ``qkv_proj``): views, no
        copy."""
        part = self._like()
        part.qweight, part.scale = self.qweight[start:stop], self.scale[start:stop]
        return part

    def for_input_grads(self) -> Fp8Weight:
        """This weight with the column-major copy of ``W_q`` that ``fp8_input_grad`` reads made once, for a
        caller that takes several input gradients through it (the deferred MLP's blocks of rows): out x in
        bytes alive while the caller holds it."""
        held = self._like()
        held._column_major = _column_major(self.qweight)
        return held

    def _like(self) -> Fp8Weight:
        other = object.__new__(Fp8Weight)
        other.qweight, other.scale, other.dtype, other._ones, other._key = (
            self.qweight, self.scale, self.dtype, self._ones, None)
        other._column_major = None
        return other

    def matches(self, source: torch.Tensor) -> bool:
        return self._key == _key(source)

    def follow_(self, source: torch.Tensor) -> Fp8Weight:
        """The source's values moved to other storage (FP8 mode keeps them in host memory, and brings them
        back): taken from ``source`` now, without quantising again."""
        assert tuple(source.shape) == tuple(self.qweight.shape) and source.dtype == self.dtype, (
            tuple(source.shape), source.dtype)
        self._key = _key(source)
        return self

    def retake_(self, source: torch.Tensor) -> Fp8Weight:
        """Quantise ``source`` again into this copy's own buffers (CUDA graphs captured with them stay valid);
        a new copy where the shape, dtype or device changed."""
        if tuple(source.shape) != tuple(self.qweight.shape) or source.dtype != self.dtype \
                or source.device != self.qweight.device:
            return Fp8Weight(source)
        fresh = Fp8Weight(source)
        self.qweight.copy_(fresh.qweight)
        self.scale.copy_(fresh.scale)
        self._key = fresh._key
        return self

    def dequantize(self) -> torch.Tensor:
        """``W_q`` scaled back, in the source's dtype (the reference path's weight)."""
        return dequantize_rows(self.qweight, self.scale[:, None], self.dtype)


def _key(source: torch.Tensor) -> tuple:
    return source.data_ptr(), source._version, tuple(source.shape), source.dtype


def _column_major(b: torch.Tensor) -> torch.Tensor:
    # Hopper's FP8 GEMM takes its second operand column-major only
    return b if b.stride(0) == 1 or not b.is_cuda else b.t().contiguous().t()


def _mm(q_a, s_a, b, s_b, dtype, fast_accum=False):
    # q_a (M, K) e4m3 row-major, b (K, N) e4m3, s_a (M, 1), s_b (1, N): (s_a * s_b) * (q_a @ b)
    if q_a.is_cuda:
        b = _column_major(b)
        return torch._scaled_mm(q_a, b, scale_a=s_a, scale_b=s_b, out_dtype=dtype, use_fast_accum=fast_accum)
    return ((q_a.float() * s_a) @ (b.float() * s_b)).to(dtype)


def fp8_linear(x: torch.Tensor, w: Fp8Weight, dtype: torch.dtype | None = None,
               xq: tuple[torch.Tensor, torch.Tensor] | None = None, impl: str | None = None) -> torch.Tensor:
    """``q(x) W_q^T (N, out)`` for ``x (N, in)``; ``xq``: ``quantize_rows(x, pad=True)`` made once for several
    weights of one input. No autograd: the callers' Functions call ``fp8_input_grad`` in backward."""
    n = x.shape[0]
    q, s = xq if xq is not None else quantize_rows(x, pad=True, impl=impl)
    y = _mm(q, s, w.qweight.t(), w.scale[None, :], dtype or x.dtype, FAST_ACCUM_FORWARD)
    return y[:n]


def fp8_input_grad(dy: torch.Tensor, w: Fp8Weight, dtype: torch.dtype | None = None,
                   impl: str | None = None) -> torch.Tensor:
    """``q(dy * s_W) W_q (N, in)`` for ``dy (N, out)``: the input gradient of ``fp8_linear``."""
    n = dy.shape[0]
    q, s = quantize_rows(dy, w.scale, pad=True, impl=impl)
    # W_q (out, in) is the GEMM's (K, N) operand, read column-major (made here unless the caller holds one)
    b = w._column_major
    return _mm(q, s, w.qweight if b is None else b, w._ones, dtype or dy.dtype)[:n]


class _StraightThrough(torch.autograd.Function):
    # x -> dequant(q(x)) in float32; the gradient passes through in x's dtype
    @staticmethod
    def forward(ctx, x):
        ctx.dtype = x.dtype
        q, s = quantize_rows_reference(x.reshape(-1, x.shape[-1]))
        return dequantize_rows(q, s).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        return dy.to(ctx.dtype)


def fp8_linear_reference(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """The spec, through autograd: ``dequant(q(x)) dequant(W_q)^T`` in float32, rounded to ``x``'s dtype
    (what the GEMM computes), the input's rounding passed through by its gradient (straight-through)."""
    return (_StraightThrough.apply(x) @ dequantize_rows(w.qweight, w.scale[:, None]).t()).to(x.dtype)
