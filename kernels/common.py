"""What moeq's Triton kernels share, defined once.

* ``INTERPRET``: kernels run under ``TRITON_INTERPRET=1`` (CPU tests). Read once at
  import: Triton decides interpretation when it is imported.
* ``HAS_TRITON``: Triton imports (it ships with torch on Linux x86-64).
* ``next_pow2``: block sizes.
* ``FP8_MAX``, ``EPS`` and ``pow2_scale_reference``: the power-of-two FP8 scale (the
  numerics live in ``moeq.numerics.fp8_rowwise``); ``scale_exponent``, ``inv_scale``,
  ``to_e4m3``, ... : the same scale and the e4m3 cast in Triton.
* ``zero_slack_rows_triton``: zero the rows of a grouped GEMM output at or past
  ``offs[-1]`` in place (the torch.library op around it is ``moeq.ops.slack_rows``;
  the plain-torch reference is ``moeq.numerics.groups.zero_slack_rows``).

Imports torch, triton and moeq.numerics only.
"""
from __future__ import annotations

import os

import torch

from moeq.numerics.fp8_rowwise import AMAX_EPS as EPS
from moeq.numerics.fp8_rowwise import FP8_MAX, fp8_pow2_scale

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux x86-64
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "EPS",
    "FP8_MAX",
    "HAS_TRITON",
    "INTERPRET",
    "next_pow2",
    "pow2_scale_reference",
    "zero_slack_rows_triton",
]


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pow2_scale_reference(amax: torch.Tensor):
    """float32 amax (any shape, >= 0) -> (scale, 1 / scale), float32 powers of two.

    ``scale = 2**floor(log2(448 / max(amax, EPS)))`` (``fp8_pow2_scale`` gives 1 / scale,
    exactly). A non-finite amax (Inf/NaN in the data) makes 1 / scale NaN, so the GEMM
    output turns NaN instead of silently finite.
    """
    amax = amax.float()
    finite = torch.isfinite(amax)
    inv = fp8_pow2_scale(torch.where(finite, amax, 0.0))
    # 448 / amax is 0 for amax = +inf and NaN (exponent field all ones: Inf) for NaN
    off_range = torch.where(torch.isnan(amax), float("inf"), 0.0)
    scale = torch.where(finite, 1.0 / inv, off_range)
    return scale, torch.where(finite, inv, float("nan"))


if HAS_TRITON:
    # On the GPU the e4m3 cast is the hardware's cvt.rn.satfinite.e4m3x2.f32 (round to
    # nearest even, one instruction per two values); the interpreter's float8 cast does not
    # round ties to even, so there the kernels round on the bits. Both give the same bits
    # for the clamped, finite values they see (GPU tests check it against the references).
    HW_CAST = tl.constexpr(not INTERPRET)

    @triton.jit
    def scale_exponent(amax):
        # Biased float32 exponent of 2**floor(log2(448 / max(amax, EPS))), from amax's bits:
        # amax = 2**(e-127) * (1 + m), 448 = 2**8 * 1.75, so the quotient's exponent is
        # 8 - (e - 127), one less when 1 + m > 1.75. Equals the reference's rounded float32
        # division followed by an exponent mask (the rounding never reaches the next power).
        a = tl.maximum(amax, 1e-12)
        b = a.to(tl.int32, bitcast=True)
        e = (b >> 23) & 0xFF
        return 262 - e - ((b & 0x7FFFFF) > 0x600000).to(tl.int32)

    @triton.jit
    def exp2_from_biased(f):
        return (f << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def inv_scale(amax):
        # 1 / scale, NaN where amax is +inf (a NaN or Inf in the data): see pow2_scale_reference
        return tl.where(amax < float("inf"), exp2_from_biased(254 - scale_exponent(amax)), float("nan"))

    @triton.jit
    def to_e4m3(v):
        # v is already scaled: |v| <= 448. Round to the e4m3 grid (nearest, ties to even) in
        # float32 so the final cast is exact on every backend.
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if HW_CAST:
            return v.to(tl.float8e4nv)
        bits = v.to(tl.int32, bitcast=True)
        sign = bits & -2147483648  # 0x80000000
        mag = bits & 0x7FFFFFFF
        # normals (|v| >= 2**-6): keep 3 mantissa bits
        rn = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0x7FF00000
        # subnormals: multiples of 2**-9; (t + 2**23) - 2**23 rounds t to an integer, ties even
        a = mag.to(tl.float32, bitcast=True)
        t = a * 512.0
        t = (t + 8388608.0) - 8388608.0
        sub = (t * 0.001953125).to(tl.int32, bitcast=True)
        r = tl.where(mag >= 0x3C800000, rn, sub) | sign
        return r.to(tl.float32, bitcast=True).to(tl.float8e4nv)

    @triton.jit
    def abs_nan_inf(v):
        # |v| with NaN -> +inf so that a NaN makes the amax non-finite (tl.max drops NaNs)
        return tl.where(v == v, tl.abs(v), float("inf"))

    @triton.jit
    def _zero_slack_kernel(out_ptr, offs_ptr, M, N, stride_o, num_groups, BM: tl.constexpr, BN: tl.constexpr):
        end = tl.load(offs_ptr + num_groups - 1)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = ((rows >= end) & (rows < M))[:, None] & (cols[None, :] < N)
        ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :]
        tl.store(ptrs, tl.zeros((BM, BN), dtype=out_ptr.dtype.element_ty), mask=mask)


def zero_slack_rows_triton(out: torch.Tensor, offs: torch.Tensor) -> None:
    """Zero, in place, the rows of ``out`` (M, N), unit last stride, at or past
    ``offs[-1]`` (``offs`` (E,) int32 on out's device): one launch, no host sync."""
    m, n = out.shape
    if m and n:
        bm, bn = (32, 64) if INTERPRET else (128, 256)
        _zero_slack_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            out, offs, m, n, out.stride(0), offs.numel(), BM=bm, BN=bn, num_warps=4
        )
