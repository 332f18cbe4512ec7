"""moeq's ops: every torch.library op and autograd function, and the grouped-GEMM kernel
registry (kernel names, ``resolve_experts_kernels``). Re-exports the quantization
references of moeq.numerics for convenience.

See docs/recipes.md for what each recipe quantizes where, docs/design.md for the layers.
"""
from moeq.ops.device import DeviceInfo, device_info
from moeq.ops.registry import (
    KERNEL_AUTO,
    KERNEL_EMULATED,
    KERNEL_TORCH,
    KERNEL_TORCHAO,
    KERNEL_TRITON,
    EmulatedKernelWarning,
    GroupedMMKernel,
    ExpertsKernels,
    available_kernels,
    check_kernel_choice,
    choose_kernel,
    emulation_notice,
    kernel_names,
    register_kernel,
    resolve_experts_kernels,
    select_kernel,
)
from moeq.numerics.fp8_rowwise import (
    fp8_dequantize,
    fp8_per_group_colwise_fake_quantize,
    fp8_per_group_colwise_quantize,
    fp8_pow2_scale,
    fp8_rowwise_fake_quantize,
    fp8_rowwise_quantize,
)
from moeq.ops.grouped_mm import quantized_grouped_mm
from moeq.numerics.mxfp8 import (
    MX_BLOCK_SIZE,
    mxfp8_dequantize,
    mxfp8_fake_quantize,
    mxfp8_fake_quantize_token_groups,
    mxfp8_quantize,
)

__all__ = [
    "KERNEL_AUTO",
    "KERNEL_EMULATED",
    "KERNEL_TORCH",
    "KERNEL_TORCHAO",
    "KERNEL_TRITON",
    "DeviceInfo",
    "EmulatedKernelWarning",
    "ExpertsKernels",
    "GroupedMMKernel",
    "MX_BLOCK_SIZE",
    "available_kernels",
    "check_kernel_choice",
    "choose_kernel",
    "device_info",
    "emulation_notice",
    "fp8_dequantize",
    "fp8_per_group_colwise_fake_quantize",
    "fp8_per_group_colwise_quantize",
    "fp8_pow2_scale",
    "fp8_rowwise_fake_quantize",
    "fp8_rowwise_quantize",
    "kernel_names",
    "mxfp8_dequantize",
    "mxfp8_fake_quantize",
    "mxfp8_fake_quantize_token_groups",
    "mxfp8_quantize",
    "quantized_grouped_mm",
    "register_kernel",
    "resolve_experts_kernels",
    "select_kernel",
]
