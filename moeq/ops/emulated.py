"""The "emulated" grouped GEMMs: quantize -> dequantize to bf16 -> ``torch._grouped_mm``.

Runs wherever ``torch._grouped_mm`` does (CPU, any CUDA GPU). With power-of-two scales the
dequantized operands are exact in bf16 and their products exact in fp32, so the result is
the FP8 / MXFP8 scaled GEMM up to fp32 accumulation order, rounded to bf16 like the
hardware kernels' output (see moeq/numerics/mxfp8.py for the argument and its one caveat).

The three functions are the kernel interface of moeq/ops/registry.py: forward
``a @ b[e].T``, input gradient ``grad_out @ b[e]``, weight gradient
``grad_out[group e].T @ a[group e]``. Outputs follow the dispatch contract: rows at or
past ``offs[-1]`` are zero; weight gradients of empty groups are zero.
"""
from __future__ import annotations

import torch

from moeq.numerics.fp8_rowwise import fp8_per_group_colwise_fake_quantize, fp8_rowwise_fake_quantize
from moeq.numerics.groups import zero_slack_rows
from moeq.numerics.mxfp8 import mxfp8_fake_quantize, mxfp8_fake_quantize_token_groups
from moeq.numerics.recipes import QuantizationType

_BF16 = torch.bfloat16


def _along(x: torch.Tensor, dim: int, qtype: QuantizationType) -> torch.Tensor:
    """Fake-quantize along a contraction dim; bf16 result (exact, see module doc)."""
    if qtype is QuantizationType.FP8:
        return fp8_rowwise_fake_quantize(x, dim, out_dtype=_BF16)
    if qtype is QuantizationType.MXFP8:
        return mxfp8_fake_quantize(x, dim, out_dtype=_BF16)
    return x


def _along_tokens(x: torch.Tensor, offs: torch.Tensor, qtype: QuantizationType) -> torch.Tensor:
    """Fake-quantize a grouped (M, C) tensor along the token dim, per group; bf16 result."""
    if qtype is QuantizationType.FP8:
        return fp8_per_group_colwise_fake_quantize(x, offs, out_dtype=_BF16)
    if qtype is QuantizationType.MXFP8:
        return mxfp8_fake_quantize_token_groups(x, offs, out_dtype=_BF16)
    return x


def emulated_forward(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, qtype: QuantizationType) -> torch.Tensor:
    """(M, K) x (E, N, K) -> (M, N): a quantized per row along K, b per (expert, row) along K."""
    out = torch._grouped_mm(_along(a, -1, qtype), _along(b, -1, qtype).transpose(-2, -1), offs=offs)
    return zero_slack_rows(out, offs)


def emulated_dgrad(grad_out: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, qtype: QuantizationType) -> torch.Tensor:
    """(M, N) x (E, N, K) -> (M, K): grad_out quantized per row along N, b along N."""
    out = torch._grouped_mm(_along(grad_out, -1, qtype), _along(b, -2, qtype), offs=offs)
    return zero_slack_rows(out, offs)


def emulated_wgrad(grad_out: torch.Tensor, a: torch.Tensor, offs: torch.Tensor, qtype: QuantizationType) -> torch.Tensor:
    """(M, N), (M, K) -> (E, N, K): both quantized along the tokens of each group."""
    g = _along_tokens(grad_out, offs, qtype)
    x = _along_tokens(a, offs, qtype)
    return torch._grouped_mm(g.transpose(0, 1), x, offs=offs)
