"""MXFP8 quantization: e4m3 data, one e8m0 (power-of-two) scale per 32 contiguous elements.

Blocks of ``MX_BLOCK_SIZE = 32`` run along the GEMM's contraction dim. The scale is
derived with RCEIL rounding (cuBLAS / OCP MX "round the descale up to a power of two"),
the mode torchao's ``to_mx(..., scaling_mode=ScaleCalculationMode.RCEIL)`` implements:

* ``descale = fp32(amax / 448)`` (true fp32 division, as torchao);
* ``exponent = clamp(ceil(log2(descale)), -127, 127) + 127`` stored as e8m0; NaN amax
  gives 255 (NaN), Inf amax 254;
* ``data = e4m3(clamp(x * rcp, -448, 448))`` with ``rcp = 2**(127 - exponent)``, except
  that exponent 0 (blocks with ``amax <= 448 * 2**-127``) uses ``rcp = 1``: such blocks
  quantize to (signed) zeros, exactly as torchao does.

``ceil(log2(descale))`` is computed exactly from the bits of ``descale`` (integer ops),
which is what Blackwell's ``cvt.rp.satfinite.ue8m0x2.f32`` does and what a Triton kernel
can reproduce bitwise. torchao's eager fallback evaluates a floating-point
``torch.log2``; the two agree bitwise on every bf16 input (a bf16 amax over 448 is never
within 1/224 relative above a power of two unless it is one, far outside log2's
rounding error), and on fp32 inputs except blocks whose descale lies within ~32 ulp
above a power of two, where torchao's ``log2`` rounds down onto the integer and it picks
the exponent one lower (the block's max then saturates to 448). tests/test_quant.py pins
both facts.

Exactness that the emulated GEMM relies on: an e4m3 value (4 significant bits) times a
power of two is exactly representable in fp32, and in bf16 unless it falls below bf16's
subnormal range (|v| < 2**-133, only for blocks with amax < ~2**-118); a product of two
such values has <= 8 significant bits, exact in fp32. So "quantize -> dequantize to bf16
-> bf16 GEMM with fp32 accumulation" is the MXFP8 GEMM up to accumulation order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from moeq.numerics.groups import pad_rows, zero_slack_rows
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType

MX_BLOCK_SIZE = 32  # fixed by the OCP MX format, not a tunable
E8M0_DTYPE = torch.float8_e8m0fnu
E4M3_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3_DTYPE).max)  # 448.0
E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_INF = 254  # what RCEIL gives an infinite amax

# Token-dim scale blocks must not straddle two groups: groups start at multiples of
# GROUP_ALIGNMENT[MXFP8], so that alignment must be a multiple of the block size.
assert GROUP_ALIGNMENT[QuantizationType.MXFP8] % MX_BLOCK_SIZE == 0

_F32_MANTISSA_BITS = 23
_F32_MANTISSA_MASK = (1 << _F32_MANTISSA_BITS) - 1
_F32_EXP_BIAS = 127


def _rceil_exponent(descale: torch.Tensor) -> torch.Tensor:
    """Biased e8m0 exponent ``clamp(ceil(log2(descale)), -127, 127) + 127`` as int32, exactly.

    descale: float32, >= 0 or NaN/Inf.
    """
    bits = descale.view(torch.int32)
    field = (bits >> _F32_MANTISSA_BITS) & 0xFF
    mant = bits & _F32_MANTISSA_MASK
    # normal: descale = 1.mant * 2**(field - 127); ceil adds one unless mant == 0
    normal = field - _F32_EXP_BIAS + (mant != 0).to(torch.int32)
    # subnormal: descale = mant * 2**-149 <= 2**-126; ceil(log2) is -126 iff mant > 2**22
    subnormal = (mant > (1 << 22)).to(torch.int32) - 127
    unbiased = torch.where(field == 0, subnormal, normal).clamp(-E8M0_BIAS, E8M0_BIAS)
    exponent = unbiased + E8M0_BIAS
    exponent = torch.where(torch.isinf(descale), E8M0_INF, exponent)
    return torch.where(torch.isnan(descale), E8M0_NAN, exponent)


def _pow2_from_biased(e: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(e - 127)`` for int32 ``e`` in [1, 254]."""
    return (e << _F32_MANTISSA_BITS).view(torch.float32)


def _blocked(x: torch.Tensor, dim: int) -> torch.Tensor:
    """View ``x`` with ``dim`` moved last and split into (..., nblocks, 32)."""
    xm = x.movedim(dim, -1)
    size = xm.shape[-1]
    if size % MX_BLOCK_SIZE != 0:
        raise ValueError(
            f"MXFP8 quantization along dim {dim} needs its size ({size}) to be a multiple "
            f"of the MX block size {MX_BLOCK_SIZE}; pad that dim"
        )
    return xm.reshape(*xm.shape[:-1], size // MX_BLOCK_SIZE, MX_BLOCK_SIZE)


def _unblocked(xb: torch.Tensor, dim: int) -> torch.Tensor:
    return xb.reshape(*xb.shape[:-2], xb.shape[-2] * MX_BLOCK_SIZE).movedim(-1, dim)


def _quantize_blocks(xb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(..., nb, 32) bf16/fp32 -> (e4m3 data of the same shape, (..., nb, 1) int32 exponent)."""
    amax = xb.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    exponent = _rceil_exponent(amax / E4M3_MAX)
    rcp = torch.where(
        exponent == E8M0_NAN,
        torch.full((), float("nan"), device=xb.device),
        torch.where(
            exponent == E8M0_INF,
            torch.full((), 2.0**-127, device=xb.device),
            torch.where(
                exponent == 0,
                torch.ones((), device=xb.device),
                _pow2_from_biased((2 * E8M0_BIAS - exponent).clamp(1, 254)),
            ),
        ),
    )
    scaled = torch.clamp(xb.to(torch.float32) * rcp, min=-E4M3_MAX, max=E4M3_MAX)
    return scaled.to(E4M3_DTYPE), exponent


def _dequant_scale(exponent: torch.Tensor) -> torch.Tensor:
    # exponent 0 blocks hold only zeros: a 0 scale avoids fp32 subnormals (same product).
    # 255 maps to +inf, so NaN blocks dequantize to NaN (0 * inf, x * inf).
    return (exponent << _F32_MANTISSA_BITS).view(torch.float32)


def mxfp8_quantize(x: torch.Tensor, dim: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """MXFP8-quantize ``x`` in blocks of 32 along ``dim`` (RCEIL scales).

    Bitwise equal to torchao ``to_mx(x.movedim(dim, -1).contiguous(), torch.float8_e4m3fn,
    32, ScaleCalculationMode.RCEIL)`` (moved back), with the fp32 exception in the
    module docstring.

    Args:
        x: bf16/fp32 tensor; ``x.shape[dim]`` a multiple of 32.
        dim: contraction dim to block along.
    Returns:
        ``(data, scale)``: ``data`` float8_e4m3fn of ``x.shape`` (a view with ``x``'s dim
        order, contiguous along the blocks); ``scale`` float8_e8m0fnu of ``x.shape`` with
        ``shape[dim] // 32`` at ``dim``.
    """
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"mxfp8_quantize supports bfloat16/float32 inputs, got {x.dtype}")
    data, exponent = _quantize_blocks(_blocked(x, dim))
    scale = exponent.squeeze(-1).to(torch.uint8).view(E8M0_DTYPE).movedim(-1, dim)
    return _unblocked(data, dim), scale


def mxfp8_dequantize(
    data: torch.Tensor, scale: torch.Tensor, dim: int = -1, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of ``mxfp8_quantize``: ``data * 2**(scale - 127)`` per block, in ``dtype``.

    Args:
        data: float8_e4m3fn, blocks of 32 along ``dim``.
        scale: float8_e8m0fnu, ``data.shape`` with ``shape[dim] // 32`` at ``dim``.
    """
    exponent = scale.movedim(dim, -1).view(torch.uint8).to(torch.int32).unsqueeze(-1)
    db = _blocked(data, dim).to(torch.float32) * _dequant_scale(exponent)
    return _unblocked(db.to(dtype), dim)


def mxfp8_fake_quantize(
    x: torch.Tensor, dim: int = -1, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """MXFP8 quantize along ``dim`` (blocks of 32) then dequantize.

    The reference the fast fake-quant kernels (kernels/) are checked against bitwise.
    Values are e4m3 * 2**k: exact in fp32, and in bf16 except below bf16's subnormal range.

    Args:
        x: bf16/fp32 tensor, ``x.shape[dim]`` a multiple of 32.
        dim: contraction dim to block along.
        out_dtype: result dtype (default ``x.dtype``).
    Returns:
        contiguous tensor of ``x.shape`` in ``out_dtype``.
    """
    data, exponent = _quantize_blocks(_blocked(x, dim))
    db = data.to(torch.float32) * _dequant_scale(exponent)
    return _unblocked(db.to(out_dtype or x.dtype), dim).contiguous()


def mxfp8_fake_quantize_token_groups(
    x: torch.Tensor, offs: torch.Tensor, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Fake-quantize a grouped (M, N) tensor along the token dim, blocks of 32 rows.

    The operand quantization of the weight-gradient GEMM (contraction over each group's
    tokens). Groups must start at multiples of 32 (``GROUP_ALIGNMENT[MXFP8]``) so no block
    straddles two groups; slack rows (at or past ``offs[-1]``) are zeroed first, so the
    last group's final block only sees zeros beyond its end. ``M`` need not be a multiple
    of 32: the tensor is zero-padded internally and trimmed back.

    Args:
        x: (M, N) bf16/fp32.
        offs: (E,) int32 cumulative group end offsets.
        out_dtype: result dtype (default ``x.dtype``).
    Returns:
        (M, N) in ``out_dtype``; slack rows zero.
    """
    m = x.shape[0]
    xp = pad_rows(zero_slack_rows(x, offs), MX_BLOCK_SIZE)
    return mxfp8_fake_quantize(xp, dim=0, out_dtype=out_dtype)[:m]
