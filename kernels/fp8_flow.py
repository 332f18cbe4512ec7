"""Quantize-once kernels of the FP8 dataflow block (``moeq.quant.fp8_flow``), each with a
plain-torch reference beside it.

* ``gather_quantize_rows``: the permute-and-pad that moves routed tokens into the padded,
  expert-major layout writes their FP8 row copy (e4m3, one power-of-two scale per row
  along D) directly, so the bf16 padded tokens are never written. Bitwise
  ``quantize_rowwise_reference(permute_and_pad(tokens)[0])``: the same amax, scale and
  rounding helpers as kernels/fp8_rowwise.py. Padding and slack rows are all-zero rows
  (quantized like any zero row: code 0, the finite 1/scale of amax 0).
* ``columns_from_rows``: the weight gradient's other orientation (one scale per (group,
  column) along the group's tokens, stored transposed) made from the FP8 row copy instead of
  re-reading bf16: a *scaling-aware transpose*. Every row element is ``q * 2**-a`` (q an
  e4m3 code, ``2**-a`` the row's power-of-two 1/scale), so re-expressing it on its column's
  power-of-two scale ``2**b`` is the exponent shift ``q * 2**(b - a)``. The column amax is
  taken over the dequantized row values, so ``|q * 2**(b-a)| <= 448`` always and the shift
  is **exact** except where it moves a value below e4m3's normal range (2**-6): there it is
  rounded to the subnormal grid (multiples of 2**-9, nearest-even) or flushes to zero. Those
  are values under 2**-6 / 448 = 3.5e-5 of their column's amax. The result is bitwise
  ``quantize_colwise_grouped_reference(row.float() * row_inv[:, None], offs)``.

  Numerics against quantizing bf16 directly along the columns (today's block): the column
  copy carries the row copy's rounding (relative 2**-4 at most per element) instead of its
  own, i.e. one e4m3 rounding either way for all but the underflowing elements; the error of
  the weight gradient vs float64 is measured in tests/test_fp8_flow.py.

  It is the column strip pass of kernels/fp8_strips.py run on the e4m3 source with the row
  1/scales as per-row factors (its routing-weight path), so it shares that kernel's tiles,
  slack handling and bit-exact rounding.
"""
from __future__ import annotations

from typing import Tuple

import torch

from moeq.kernels.common import HAS_TRITON, INTERPRET
from moeq.kernels.common import next_pow2 as _next_pow2
from moeq.kernels.fp8_rowwise import (
    ALIGN,
    FP8_DTYPE,
    MODE_PLAIN,
    quantize_colwise_grouped_reference,
    quantize_rowwise_reference,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from moeq.kernels.fp8_rowwise import _abs_nan_inf, _exp2_from_biased, _inv_scale, _scale_exponent, _to_e4m3



# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------


def gather_rows_reference(tokens: torch.Tensor, source_rows: torch.Tensor, top_k: int) -> torch.Tensor:
    """(M, D) padded rows: ``tokens[source_rows // top_k]``, zero where ``source_rows < 0``."""
    src = source_rows.long()
    tok = torch.where(src >= 0, src // top_k, 0)
    rows = tokens[tok]
    return torch.where((src >= 0)[:, None], rows, torch.zeros((), dtype=tokens.dtype, device=tokens.device))


def gather_quantize_rows_reference(tokens: torch.Tensor, source_rows: torch.Tensor, top_k: int):
    """Reference of :func:`gather_quantize_rows`: (row (M, D) e4m3, row_inv (M,) float32)."""
    return quantize_rowwise_reference(gather_rows_reference(tokens, source_rows, top_k))


def columns_from_rows_reference(row: torch.Tensor, row_inv: torch.Tensor, offs: torch.Tensor):
    """Reference of :func:`columns_from_rows`: (col (D, M) e4m3, col_inv (E, D) float32).

    Column ``m`` >= M of the kernel's (D, round_up(M, 16)) copy is unspecified; the
    reference has exactly M columns."""
    return quantize_colwise_grouped_reference(row.float() * row_inv.float()[:, None], offs)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _gather_quant_rows_kernel(tok_ptr, src_ptr, row_ptr, row_inv_ptr, M, D, stride_tok,
                                  TOP_K: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
        # BR padded rows per program, each row's D columns in one tile (one read of the token
        # row, kept in registers from the amax to the cast)
        pid = tl.program_id(0)
        rows = pid * BR + tl.arange(0, BR)
        rmask = rows < M
        src = tl.load(src_ptr + rows, mask=rmask, other=-1)
        valid = src >= 0
        tok = tl.where(valid, src // TOP_K, 0)
        cols = tl.arange(0, BD)
        cmask = cols < D
        v = tl.load(tok_ptr + tok.to(tl.int64)[:, None] * stride_tok + cols[None, :],
                    mask=(valid & rmask)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        ra = tl.max(_abs_nan_inf(v), axis=1)
        s = _exp2_from_biased(_scale_exponent(ra))[:, None]
        tl.store(row_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], _to_e4m3(v * s),
                 mask=rmask[:, None] & cmask[None, :])
        tl.store(row_inv_ptr + rows, _inv_scale(ra), mask=rmask)


def _gather_quantize_rows_impl(tokens: torch.Tensor, source_rows: torch.Tensor, top_k: int):
    m = source_rows.shape[0]
    d = tokens.shape[1]
    row = torch.empty((m, d), dtype=FP8_DTYPE, device=tokens.device)
    row_inv = torch.empty((m,), dtype=torch.float32, device=tokens.device)
    if m == 0:
        return row, row_inv
    bd = max(16, _next_pow2(d))
    br = 2 if INTERPRET else max(1, min(16, 8192 // bd))
    _gather_quant_rows_kernel[(triton.cdiv(m, br),)](
        tokens, source_rows, row, row_inv, m, d, tokens.stride(0), TOP_K=top_k, BR=br, BD=bd,
        num_warps=4 if bd * br >= 4096 else 2,
    )
    return row, row_inv


@torch.library.custom_op("moeq::fp8_gather_quantize_rows", mutates_args=())
def _gather_quantize_rows_op(tokens: torch.Tensor, source_rows: torch.Tensor, top_k: int
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _gather_quantize_rows_impl(tokens, source_rows, top_k)


@_gather_quantize_rows_op.register_fake
def _(tokens, source_rows, top_k):
    m = source_rows.shape[0]
    return tokens.new_empty((m, tokens.shape[1]), dtype=FP8_DTYPE), tokens.new_empty((m,), dtype=torch.float32)


def gather_quantize_rows(tokens: torch.Tensor, source_rows: torch.Tensor, top_k: int):
    """Permute-and-pad routed tokens straight into their FP8 row copy.

    Args:
        tokens: (T, D) bfloat16/float32, unit last stride, D % 16 == 0.
        source_rows: (M,) int32 original routed row (``t * top_k + j``) of each padded row,
            -1 on padding and slack rows (``PaddedLayout.source_rows``).
        top_k: copies per token.
    Returns:
        (row (M, D) float8_e4m3fn, row_inv (M,) float32 1/scale): bitwise
        :func:`gather_quantize_rows_reference`. One read of each routed token row, no host
        sync; a custom op under torch.compile.
    """
    if tokens.dim() != 2 or tokens.stride(-1) != 1 or tokens.shape[1] % 16:
        raise ValueError(f"tokens must be (T, D) with unit last stride and D % 16 == 0, got {tuple(tokens.shape)} "
                         f"strides {tokens.stride()}")
    if source_rows.dtype != torch.int32 or source_rows.dim() != 1 or source_rows.device != tokens.device:
        raise ValueError(f"source_rows must be a 1D int32 tensor on {tokens.device}, got {source_rows.dtype} "
                         f"{tuple(source_rows.shape)} on {source_rows.device}")
    if torch.compiler.is_compiling():
        return torch.ops.moeq.fp8_gather_quantize_rows(tokens, source_rows, top_k)
    return _gather_quantize_rows_impl(tokens, source_rows, top_k)


def columns_from_rows(row: torch.Tensor, row_inv: torch.Tensor, offs: torch.Tensor):
    """The scaling-aware transpose: the per-(group, column) copy from the FP8 row copy.

    Args:
        row: (M, K) float8_e4m3fn row copy (one scale per row), K % 16 == 0.
        row_inv: (M,) float32 power-of-two 1/scale of each row.
        offs: (E,) int32 cumulative group ends (multiples of ``GROUP_ALIGNMENT[FP8]``).
    Returns:
        (col (K, round_up(M, 16)) float8_e4m3fn, col_inv (E, K) float32): bitwise
        :func:`columns_from_rows_reference` on the first M columns; columns >= M and rows
        past ``offs[-1]`` are zero. Exact re-expression except for underflow (module doc).
    """
    from moeq.kernels.fp8_strips import _strips

    if row.dtype != FP8_DTYPE or row.dim() != 2 or row.shape[1] % 16 or not row.is_contiguous():
        raise ValueError(f"row must be a contiguous (M, K) float8_e4m3fn tensor with K % 16 == 0, got {row.dtype} "
                         f"{tuple(row.shape)}")
    if row_inv.dtype != torch.float32 or row_inv.shape != (row.shape[0],) or not row_inv.is_contiguous():
        raise ValueError(f"row_inv must be a contiguous ({row.shape[0]},) float32 tensor, got {row_inv.dtype} "
                         f"{tuple(row_inv.shape)}")
    _, _, col, col_inv, _, _ = _strips(MODE_PLAIN, row, None, offs, offs.numel(), False, True, row_inv, False, True)
    return col, col_inv


__all__ = [
    "ALIGN",
    "gather_rows_reference",
    "gather_quantize_rows",
    "gather_quantize_rows_reference",
    "columns_from_rows",
    "columns_from_rows_reference",
]
