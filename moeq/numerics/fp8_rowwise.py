"""FP8 e4m3 rowwise dynamic quantization with power-of-two scales.

Recipe (the same scaling choices as torchao's ``_to_fp8_rowwise_then_scaled_grouped_mm``):

* every operand, gradients included, is cast to ``float8_e4m3fn`` (max 448);
* one scale per row along the GEMM's contraction dim, computed dynamically from that
  row's absolute max; ``amax`` is clamped below by ``AMAX_EPS = 1e-12`` so all-zero rows
  get a finite scale;
* the scale is a power of two: the quantization multiplier is
  ``s = 2 ** floor(log2(448 / max(amax, 1e-12)))``, the largest power of two with
  ``amax * s <= 448``. Power-of-two scales make scaling exact (only the e4m3 rounding
  loses bits) and make "dequantize, then GEMM in bf16" equal the scaled FP8 GEMM.

Scale convention: functions here return the **dequantization** scale ``d = 1 / s``
(``x ~= data * d``), which is what ``torch._scaled_grouped_mm`` takes as ``scale_a`` /
``scale_b``. torchao stores ``s`` and passes its reciprocal; the numbers are identical.

``floor(log2(.))`` is computed exactly from the bits of ``amax`` (integer ops), not with
a floating-point ``log2``: writing ``amax = m * 2**e`` with ``m`` in [1, 2),
``448 / amax = (7 / m) * 2**(6 - e)`` and ``7 / m >= 4`` iff ``m <= 1.75``, so
``d = 2**(e - 8)`` when ``m <= 1.75`` and ``2**(e - 7)`` otherwise. Exact on every
backend, so Triton kernels can match it bitwise. (torchao's kernels compute
``exp2(floor(log2(fp32(448 / amax))))``, which agrees except where an approximate
``log2`` rounds across an integer.)

No clamp before the cast: ``|x| * s <= 448`` holds by construction, and a NaN/Inf input
then becomes NaN in the e4m3 data instead of being saturated into a finite wrong value.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from moeq.numerics.groups import row_group_ids

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
AMAX_EPS = 1e-12

_F32_MANTISSA_BITS = 23
_F32_MANTISSA_MASK = (1 << _F32_MANTISSA_BITS) - 1
# m <= 1.75 <=> mantissa field <= 0.75 * 2**23
_MANTISSA_1_75 = 3 << (_F32_MANTISSA_BITS - 2)


def fp8_pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """Dequantization scale ``1 / 2**floor(log2(448 / max(amax, 1e-12)))``, exactly.

    Args:
        amax: any shape, any float dtype; non-negative absolute maxima.
    Returns:
        float32 tensor of ``amax``'s shape holding powers of two.
    """
    a = amax.to(torch.float32).clamp(min=AMAX_EPS)
    bits = a.view(torch.int32)
    biased_exp = (bits >> _F32_MANTISSA_BITS) & 0xFF
    above_1_75 = ((bits & _F32_MANTISSA_MASK) > _MANTISSA_1_75).to(torch.int32)
    # AMAX_EPS keeps biased_exp - 8 >= 1 (a normal float); amax <= fp32 max keeps it <= 254.
    return ((biased_exp - 8 + above_1_75) << _F32_MANTISSA_BITS).view(torch.float32)


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # 1/scale is exact (a normal power of two), so x * (1/scale) only rounds at the cast.
    return (x.to(torch.float32) * scale.reciprocal()).to(FP8_DTYPE)


def fp8_rowwise_quantize(x: torch.Tensor, dim: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to e4m3 with one power-of-two scale per slice along ``dim``.

    ``dim`` is the GEMM's contraction dim: ``dim=-1`` quantizes a 2D (M, K) activation
    per row, or a 3D (E, N, K) weight per expert per row along K; ``dim=-2`` quantizes a
    3D (E, N, K) weight along N (per expert per column), as the input-gradient GEMM needs.

    Args:
        x: bf16/fp32 tensor, any rank >= 1.
        dim: the dim to reduce over.
    Returns:
        ``(data, scale)``: ``data`` float8_e4m3fn of ``x.shape``; ``scale`` float32 of
        ``x.shape`` with size 1 at ``dim`` (dequantization scale, ``x ~= data * scale``).
    """
    amax = x.abs().amax(dim=dim, keepdim=True)
    scale = fp8_pow2_scale(amax)
    return _cast(x, scale), scale


def fp8_dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``data * scale`` (broadcasting) in ``dtype``: exact for bf16/fp32 (see module doc).

    Args:
        data: float8_e4m3fn tensor.
        scale: float32 tensor broadcastable to ``data``.
    """
    return (data.to(torch.float32) * scale).to(dtype)


def fp8_rowwise_fake_quantize(
    x: torch.Tensor, dim: int = -1, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Quantize along ``dim`` then dequantize: ``x``'s shape, ``out_dtype`` (default ``x.dtype``).

    With power-of-two scales and ``amax >= 1e-12`` the dequantized values are exact in
    bf16 and fp32, so GEMMs of fake-quantized operands equal the scaled FP8 GEMM up to
    accumulation order.
    """
    data, scale = fp8_rowwise_quantize(x, dim)
    return fp8_dequantize(data, scale, out_dtype or x.dtype)


def fp8_per_group_colwise_quantize(x: torch.Tensor, offs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a grouped (M, N) tensor along the token dim, one scale per (group, column).

    This is the operand quantization of the weight-gradient GEMM ``grad_out.T @ x``,
    whose contraction dim is the tokens of each group. Computed without host syncs:
    rows map to groups with ``searchsorted`` and the per-(group, column) amax is a
    ``scatter_reduce``. Slack rows (at or past ``offs[-1]``) quantize to zero.

    Args:
        x: (M, N) bf16/fp32, rows grouped by expert.
        offs: (E,) int32 cumulative group end offsets.
    Returns:
        ``(data, scale)``: ``data`` (M, N) float8_e4m3fn; ``scale`` (E, N) float32
        dequantization scales (empty groups get the scale of an all-zero column).
    """
    num_groups = offs.shape[0]
    gid = row_group_ids(offs, x.shape[0])  # (M,), num_groups for slack rows
    xa = x.abs().to(torch.float32)
    amax = torch.zeros((num_groups + 1, x.shape[1]), dtype=torch.float32, device=x.device)
    amax = amax.scatter_reduce(0, gid.unsqueeze(1).expand_as(xa), xa, reduce="amax", include_self=True)
    scale = fp8_pow2_scale(amax)  # (E + 1, N); row E belongs to slack rows
    in_group = (gid < num_groups).unsqueeze(1)
    x_in = torch.where(in_group, x.to(torch.float32), torch.zeros((), device=x.device))
    data = _cast(x_in, scale.index_select(0, gid))
    return data, scale[:num_groups]


def fp8_per_group_colwise_fake_quantize(
    x: torch.Tensor, offs: torch.Tensor, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``fp8_per_group_colwise_quantize`` then dequantize: (M, N) in ``out_dtype``
    (default ``x.dtype``); slack rows zero."""
    data, scale = fp8_per_group_colwise_quantize(x, offs)
    gid = row_group_ids(offs, x.shape[0]).clamp(max=offs.shape[0] - 1)
    return fp8_dequantize(data, scale.index_select(0, gid), out_dtype or x.dtype)
