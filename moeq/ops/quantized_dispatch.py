"""Quantized EP dispatch ops: pack rows as FP8/MXFP8 + scales, unpack into the padded layout.

``torch.library`` custom ops (opaque to torch.compile) over ``moeq.kernels.dispatch_quant``:
Triton kernels on CUDA, their plain-torch references elsewhere (bitwise equal). See
docs/expert_parallel.md ("Quantized dispatch") for the format and the numerics.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moeq.kernels import dispatch_quant as _k
from moeq.kernels.dispatch_quant import QUANTIZED_RECIPES, packed_row_bytes, quantized_recipe

__all__ = ["QUANTIZED_RECIPES", "packed_row_bytes", "pack_rows", "unpack_to_padded"]


def _use_triton(t: Tensor) -> bool:
    return t.device.type == "cuda"


@torch.library.custom_op("moeq::pack_rows_quantized", mutates_args=())
def _pack_op(x: Tensor, recipe: str) -> Tensor:
    fn = _k.pack_rows_triton if _use_triton(x) else _k.pack_rows_reference
    return fn(x, recipe)


@_pack_op.register_fake
def _(x, recipe):
    return x.new_empty((x.shape[0], packed_row_bytes(x.shape[1], recipe)), dtype=torch.uint8)


@torch.library.custom_op("moeq::unpack_rows_to_padded", mutates_args=())
def _unpack_op(packed: Tensor, source_rows: Tensor, dim: int, recipe: str) -> Tensor:
    fn = _k.unpack_to_padded_triton if _use_triton(packed) else _k.unpack_to_padded_reference
    return fn(packed, source_rows, dim, recipe)


@_unpack_op.register_fake
def _(packed, source_rows, dim, recipe):
    return packed.new_empty((source_rows.shape[0], dim), dtype=torch.bfloat16)


def pack_rows(x: Tensor, recipe) -> Tensor:
    """Quantize the rows of ``x`` along D with the recipe's numerics and pack data + scales.

    Args:
        x: (N, D) bfloat16 routed rows (the all-to-all send buffer); D a multiple of
            ``GROUP_ALIGNMENT[recipe]``.
        recipe: "fp8" or "mxfp8" (or the QuantizationType).
    Returns:
        (N, packed_row_bytes(D, recipe)) uint8; not differentiable (the dispatch's autograd
        function passes gradients straight through, in bf16).
    """
    q = quantized_recipe(recipe)
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"pack_rows expects 2D (rows, D) tokens, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"pack_rows expects bfloat16 (or float32) tokens, got {x.dtype}: cast the activations first")
    _k.check_dim(x.shape[1], q)
    return torch.ops.moeq.pack_rows_quantized(x.contiguous(), q.value)


def unpack_to_padded(
    packed: Tensor, source_rows: Tensor, dim: int, recipe, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Dequantize packed rows straight into the experts' padded, expert-major layout.

    Args:
        packed: (N, R) uint8 rows from :func:`pack_rows` (after the all-to-all).
        source_rows: (P,) int32, the packed row of each padded row, -1 on padding rows
            (``DispatchPlan.source_rows``).
        dim: D. recipe: "fp8" or "mxfp8".
        out_dtype: bfloat16 (default) or float32: the model's activation dtype, so a
            float32 model's experts see float32 rows.
    Returns:
        (P, D) in ``out_dtype``; padding rows zero. Values are e4m3 times a power of two,
        dequantized to bfloat16 as the experts' own quantization does (exact, bar the
        bf16-subnormal tail of MXFP8 blocks below ~2**-118), then widened exactly.
    """
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(
            f"out_dtype must be torch.bfloat16 or torch.float32 (the activations' dtype), got {out_dtype}"
        )
    q = quantized_recipe(recipe)
    _k.check_dim(dim, q)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_row_bytes(dim, q):
        raise ValueError(
            f"packed rows must be (N, {packed_row_bytes(dim, q)}) uint8 for {q.value} with D={dim}, got "
            f"{tuple(packed.shape)} {packed.dtype}: pass the output of pack_rows with the same D and recipe"
        )
    if source_rows.dtype != torch.int32 or source_rows.dim() != 1:
        raise ValueError(f"source_rows must be 1D int32, got {tuple(source_rows.shape)} {source_rows.dtype}")
    out = torch.ops.moeq.unpack_rows_to_padded(packed, source_rows, dim, q.value)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)
