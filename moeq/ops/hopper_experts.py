"""The fused Triton Hopper SwiGLU experts as one registry entry (``kernel="triton"``).

FP8 (moeq/ops/fp8_hopper.py) and MXFP8 (moeq/ops/mxfp8_hopper.py) each quantize an
activation once inside the passes that already touch it (docs/fp8_hopper.md,
docs/mxfp8_hopper.md). Both modules import Triton, so they load on the first call, not
when the registry is built.
"""
from __future__ import annotations

from typing import Optional

import torch

from moeq.numerics.recipes import QuantizationType
from moeq.ops.device import DeviceInfo

# The fused Hopper blocks read and return bfloat16 activations.
FUSED_DTYPES = frozenset({torch.bfloat16})


def unsupported_reason(qtype: QuantizationType, device: DeviceInfo) -> Optional[str]:
    """None on an NVIDIA SM90 GPU (H100/H200), else why the fused kernels cannot run."""
    if not (device.nvidia_cuda and device.capability == (9, 0)):
        return f"it needs an SM90 GPU (H100/H200), got {device}"
    return None


def emulation_reason(qtype: QuantizationType, device: DeviceInfo) -> Optional[str]:
    """None for FP8 (FP8 tensor-core GEMMs); for MXFP8 how Hopper computes it."""
    if qtype is QuantizationType.MXFP8:
        return (
            "Hopper has no MXFP8 tensor-core GEMM: Triton passes fake-quantize the operands and a bf16 "
            "torch._grouped_mm computes the MXFP8 GEMM exactly up to fp32 accumulation order"
        )
    return None


def swiglu_experts(x, gate_up_proj, down_proj, offs, qtype: QuantizationType, *, quantized_weights=None) -> torch.Tensor:
    """SwiGLU experts on grouped rows (see ``moeq.experts.gemms.swiglu_experts_quantized``)."""
    if qtype is QuantizationType.FP8:
        from moeq.ops.fp8_hopper import fp8_swiglu_experts

        return fp8_swiglu_experts(x, gate_up_proj, down_proj, offs, quantized_weights=quantized_weights)
    from moeq.ops.mxfp8_hopper import mxfp8_swiglu_experts

    return mxfp8_swiglu_experts(x, gate_up_proj, down_proj, offs, quantized_weights=quantized_weights)


def routed_swiglu_experts(
    tokens, expert_indices, expert_weights, gate_up_proj, down_proj, qtype: QuantizationType, *, quantized_weights=None
) -> torch.Tensor:
    """A routed SwiGLU experts block straight from the routing (bf16 tokens): MXFP8 fuses
    the gather into its fake-quant pass; FP8 folds the routing weights into the down
    GEMM's epilogue and their gradient into the SwiGLU backward pass."""
    if qtype is QuantizationType.FP8:
        from moeq.ops.fp8_hopper import fp8_routed_swiglu_experts

        return fp8_routed_swiglu_experts(
            tokens, expert_indices, expert_weights, gate_up_proj, down_proj, quantized_weights=quantized_weights
        )
    from moeq.ops.mxfp8_hopper import mxfp8_routed_swiglu_experts

    return mxfp8_routed_swiglu_experts(
        tokens, expert_indices, expert_weights, gate_up_proj, down_proj, quantized_weights=quantized_weights
    )
