"""The "torch" grouped GEMMs: FP8 rowwise through ``torch._scaled_grouped_mm`` (SM90/SM100).

Operands are quantized in plain torch (moeq/numerics/fp8_rowwise.py) and handed to the
cuBLAS/CUTLASS scaled grouped GEMM with their float32 dequantization scales; its output
is bf16. ``use_fast_accum=True`` as torchao does: Hopper's FP8 tensor cores then
accumulate without periodic fp32 promotion, an error far below the e4m3 rounding's.

Layouts torch._scaled_grouped_mm requires: left operand row-major, right column-major,
16-byte aligned strides (K and N multiples of 16, checked by the caller), and in the
2D x 2D weight-gradient GEMM every group size a multiple of 16 (``GROUP_ALIGNMENT[FP8]``),
which ``round_up_last_offset`` ensures given aligned group starts.

BF16 goes to plain ``torch._grouped_mm`` (the emulated functions, which do no
quantization for BF16).
"""
from __future__ import annotations

import torch

from moeq.numerics.fp8_rowwise import fp8_per_group_colwise_quantize, fp8_rowwise_quantize
from moeq.numerics.groups import pad_rows, round_up_last_offset, zero_slack_rows
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType

_OUT_DTYPE = torch.bfloat16  # the only output dtype torch._scaled_grouped_mm supports
_FAST_ACCUM = True
_FP8_GROUP_ALIGNMENT = GROUP_ALIGNMENT[QuantizationType.FP8]


def _col_major(x: torch.Tensor) -> torch.Tensor:
    """Same values and shape, memory column-major in the last two dims."""
    return x.transpose(-2, -1).contiguous().transpose(-2, -1)


def scaled_fp8_forward(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(M, K) x (E, N, K) -> (M, N) bf16, FP8 rowwise along K."""
    a_q, a_s = fp8_rowwise_quantize(a.contiguous(), -1)  # (M, K), (M, 1)
    b_q, b_s = fp8_rowwise_quantize(b.contiguous(), -1)  # (E, N, K) row-major = (E, K, N) col-major
    out = torch._scaled_grouped_mm(
        a_q, b_q.transpose(-2, -1), a_s.squeeze(-1), b_s.squeeze(-1),
        offs=offs, out_dtype=_OUT_DTYPE, use_fast_accum=_FAST_ACCUM,
    )
    return zero_slack_rows(out, offs)


def scaled_fp8_dgrad(grad_out: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(M, N) x (E, N, K) -> (M, K) bf16, FP8 rowwise along N."""
    g_q, g_s = fp8_rowwise_quantize(grad_out.contiguous(), -1)  # (M, N), (M, 1)
    b_q, b_s = fp8_rowwise_quantize(b, -2)  # (E, N, K), (E, 1, K)
    out = torch._scaled_grouped_mm(
        g_q, _col_major(b_q), g_s.squeeze(-1), b_s.squeeze(-2),
        offs=offs, out_dtype=_OUT_DTYPE, use_fast_accum=_FAST_ACCUM,
    )
    return zero_slack_rows(out, offs)


def scaled_fp8_wgrad(grad_out: torch.Tensor, a: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(M, N), (M, K) -> (E, N, K) bf16, FP8 per (group, column) along the tokens."""
    align = _FP8_GROUP_ALIGNMENT
    g_q, g_s = fp8_per_group_colwise_quantize(pad_rows(grad_out, align), offs)  # (Mp, N), (E, N)
    x_q, x_s = fp8_per_group_colwise_quantize(pad_rows(a, align), offs)  # (Mp, K), (E, K)
    return torch._scaled_grouped_mm(
        g_q.t().contiguous(), _col_major(x_q), g_s.reshape(-1), x_s.reshape(-1),
        offs=round_up_last_offset(offs, align), out_dtype=_OUT_DTYPE, use_fast_accum=_FAST_ACCUM,
    )
