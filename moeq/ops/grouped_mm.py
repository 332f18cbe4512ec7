"""``quantized_grouped_mm``: a differentiable grouped GEMM with FP8 / MXFP8 numerics.

Forward ``out[g] = a[g] @ b[e].T`` for each expert ``e``'s token group ``g``; backward
computes the input gradient ``grad_out[g] @ b[e]`` and the weight gradient
``grad_out[g].T @ a[g]``. For quantized recipes each GEMM quantizes its two operands
along its own contraction dim (K, N, and the tokens of each group, respectively);
docs/recipes.md states the numerics. ``quantized_grouped_mm`` (the public functional
op) resolves its kernel argument per call (moeq/ops/registry.py); converted experts
modules call :func:`planned_grouped_mm` with the kernel their plan resolved once.
"""
from __future__ import annotations

from typing import Optional

import torch

from moeq.ops.registry import KERNEL_AUTO, GroupedMMKernel, select_kernel
from moeq.numerics.fp8_rowwise import FP8_DTYPE
from moeq.numerics.mxfp8 import MX_BLOCK_SIZE
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType, RecipeLike, parse_recipe
from moeq.numerics.validation import NonFiniteError
from moeq.numerics.validation import device_check as _check

# The operand dtypes every recipe's grouped GEMMs take (convert_model refuses other
# expert-weight dtypes at conversion).
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INPUT_DTYPES = INPUT_DTYPES
# The quantizing kernels read bfloat16 or float32. float16 is exact in float32, so a
# float16 operand is quantized from its float32 copy: the same FP8 / MXFP8 values as
# quantizing the float16 numbers directly.
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)
# A plain-dict copy: dynamo cannot trace lookups in a mappingproxy with enum keys.
_GROUP_ALIGNMENT = dict(GROUP_ALIGNMENT)
# torch._scaled_grouped_mm needs 16-byte aligned strides: 16 e4m3 elements.
_FP8_DIM_MULTIPLE = 16 // FP8_DTYPE.itemsize


def _dim_multiple(qtype: QuantizationType) -> Optional[int]:
    """K and N must be multiples of this for the recipe (None: no constraint)."""
    if qtype is QuantizationType.MXFP8:
        return MX_BLOCK_SIZE
    if qtype is QuantizationType.FP8:
        return _FP8_DIM_MULTIPLE
    return None


def _validate_static(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, qtype: QuantizationType) -> None:
    """Checks on shapes, dtypes and devices (no device data read)."""
    for name, t in (("a", a), ("b", b), ("offs", offs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dim() != 2:
        raise ValueError(f"a must be 2D (tokens, K), got shape {tuple(a.shape)}")
    if b.dim() != 3:
        raise ValueError(f"b must be 3D (experts, N, K) in the (out, in) layout, got shape {tuple(b.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in _INPUT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; quantized_grouped_mm takes bfloat16, float16 or float32")
    if qtype is QuantizationType.BF16 and a.dtype != b.dtype:
        raise TypeError(
            f"the bf16 recipe runs torch._grouped_mm, which needs a and b of one dtype; got "
            f"a {a.dtype} and b {b.dtype}: cast one of them"
        )
    if offs.dim() != 1 or offs.dtype != torch.int32:
        raise TypeError(
            f"offs must be a 1D int32 tensor of cumulative group end offsets, got "
            f"{offs.dim()}D {offs.dtype}: use num_tokens_per_expert.cumsum(0).to(torch.int32)"
        )
    if not (a.device == b.device == offs.device):
        raise ValueError(f"a, b and offs must be on one device, got {a.device}, {b.device}, {offs.device}")
    num_experts, n, k = b.shape
    if offs.shape[0] != num_experts or num_experts == 0:
        raise ValueError(
            f"offs has {offs.shape[0]} entries but b has {num_experts} experts: one end offset per expert"
        )
    if a.shape[1] != k:
        raise ValueError(f"contraction dims differ: a is {tuple(a.shape)} (M, K), b is {tuple(b.shape)} (E, N, K)")
    multiple = _dim_multiple(qtype)
    if multiple is not None:
        for dim_name, size, role in (
            ("K = a.shape[1] = b.shape[2]", k, "forward"),
            ("N = b.shape[1]", n, "input-gradient"),
        ):
            if size % multiple != 0:
                why = (
                    f"the MX block size along the {role} GEMM's contraction dim"
                    if qtype is QuantizationType.MXFP8
                    else "torch._scaled_grouped_mm's 16-byte stride alignment"
                )
                raise ValueError(
                    f"{dim_name} is {size}, not a multiple of {multiple} as {qtype.value} needs "
                    f"({why}): pad that dim to a multiple of {multiple}"
                )


def _validate_offsets(offs: torch.Tensor, num_rows: int, qtype: QuantizationType) -> None:
    """Value checks on offs: non-decreasing, within [0, M], aligned group starts."""
    _check(offs[0] >= 0, "offs must be non-negative cumulative end offsets")
    _check(
        (offs[1:] >= offs[:-1]).all(),
        "offs must be non-decreasing (cumulative end offsets of the expert groups)",
    )
    # Under torch.compile the size stays out of the message: formatting a symbolic size
    # would specialise the graph on it (a recompile per new token count).
    rows = "" if torch.compiler.is_compiling() else f" = {num_rows}"
    _check(offs[-1] <= num_rows, f"offs[-1] (the total routed rows) exceeds a.shape[0]{rows}")
    align = _GROUP_ALIGNMENT[qtype]
    if align is not None and offs.shape[0] > 1:
        _check(
            (offs[:-1] % align == 0).all(),
            f"{qtype.value} needs every expert group to start at a multiple of {align} rows "
            f"(GROUP_ALIGNMENT); pad the token groups (moeq.ops.padding.pad_token_groups)",
        )


def _check_finite(t: torch.Tensor, name: str) -> None:
    _check(torch.isfinite(t).all(), f"{name} contains NaN or Inf (or a value that overflowed its dtype)",
           NonFiniteError, detail=lambda: _non_finite_message(t, name))


def _non_finite_message(t: torch.Tensor, name: str) -> str:
    """Which problem it is (read on the host, eager CPU only)."""
    if bool(torch.isnan(t).any()):
        return f"{name} contains NaN: a NaN reached the quantized GEMM; find the op that made it"
    return (
        f"{name} contains Inf: a value beyond the range of {t.dtype} (|x| > {torch.finfo(t.dtype).max:.3g}) "
        f"reached the quantized GEMM. With finite inputs an earlier op overflowed: the experts' SwiGLU "
        f"multiplies two projections of a token, so tokens of magnitude ~1e19 and up overflow "
        f"float32/bfloat16; scale the inputs down (normalise them) or lower the learning rate if training "
        f"diverged"
    )


def _finite_checks_on(check_finite: Optional[bool], device: torch.device) -> bool:
    if check_finite is None:
        return device.type == "cpu" and not torch.compiler.is_compiling()
    return check_finite


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Skip no-op casts: torch 2.11's compiled autograd.Function miscompiles a no-op
    # .to() on a kernel output (it failed with bad strides / returned zero grads).
    return t if t.dtype == dtype else t.to(dtype)


class _QuantizedGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, offs, qtype, kernel, check_finite):
        ctx.save_for_backward(a, b, offs)
        ctx.qtype = qtype
        ctx.kernel = kernel
        ctx.check_finite = check_finite
        return _cast(kernel.forward(a, b, offs, qtype), a.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        a, b, offs = ctx.saved_tensors
        kernel = ctx.kernel
        grad_out = grad_out.contiguous()
        if ctx.check_finite:
            _check_finite(grad_out, "grad_out (the gradient of quantized_grouped_mm's output)")
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _cast(kernel.dgrad(grad_out, b, offs, ctx.qtype), a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = _cast(kernel.wgrad(grad_out, a, offs, ctx.qtype), b.dtype)
        return grad_a, grad_b, None, None, None, None


def quantized_grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor,
    *,
    qtype: RecipeLike,
    kernel: str = KERNEL_AUTO,
    check_finite: Optional[bool] = None,
) -> torch.Tensor:
    """Grouped GEMM ``a[group e] @ b[e].T`` with the recipe's numerics, differentiable.

    Args:
        a: (M, K) bfloat16/float16/float32, rows grouped by expert (expert 0's rows first).
        b: (E, N, K) bfloat16/float16/float32 expert weights in the stored (out, in) layout.
            Quantized recipes read float16 operands through exact float32 copies.
        offs: (E,) int32 cumulative group end offsets on a's device; group ``e`` is rows
            ``[offs[e-1], offs[e])``. For FP8/MXFP8 every group starts at a multiple of
            ``GROUP_ALIGNMENT[qtype]`` (16/32) rows; empty groups are fine. Rows at or
            past ``offs[-1]`` are slack: their output and input-gradient rows are zero.
        qtype: "bf16" | "fp8" | "mxfp8" or a QuantizationType. bf16 runs plain
            ``torch._grouped_mm``; fp8 quantizes every GEMM operand to e4m3 with one
            power-of-two scale per row of the contraction dim; mxfp8 uses e4m3 with one
            e8m0 scale per 32 elements of it. K and N must be multiples of 16 (fp8) or
            32 (mxfp8).
        kernel: "auto" (best native kernel, else "emulated"), "emulated" (plain torch:
            quantize, dequantize, bf16 grouped GEMM; CPU and any GPU), "torch"
            (torch._scaled_grouped_mm FP8 on SM90/SM100), "torchao" (torchao's FP8 rowwise
            on SM90/SM100 and MXFP8: native on SM100, emulated elsewhere), or any name
            registered in moeq.ops.registry. A kernel that cannot run on the device
            raises RuntimeError naming the ones that can.
        check_finite: raise on NaN/Inf in a, b and (backward) grad_out. Default: on CPU
            in eager mode only (a host read). True on CUDA adds device-side asserts
            (``torch._assert_async``, no sync) at the cost of one extra read of each
            tensor. Unchecked non-finite inputs come out as NaN/Inf, never as finite values.
    Returns:
        (M, N) tensor in a.dtype. Quantized recipes round their GEMM results to bf16 (as
        torch._scaled_grouped_mm does) before the cast; gradients come back in a.dtype
        and b.dtype.

    Offsets are checked on CPU with clear errors and on CUDA with ``torch._assert_async``
    (device-side assert, no host sync).
    """
    q = parse_recipe(qtype)
    _validate_static(a, b, offs, q)
    return planned_grouped_mm(a, b, offs, q, select_kernel(kernel, q, a.device), check_finite=check_finite, validated=True)


def planned_grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor,
    qtype: QuantizationType,
    impl: GroupedMMKernel,
    *,
    check_finite: Optional[bool] = None,
    validated: bool = False,
) -> torch.Tensor:
    """:func:`quantized_grouped_mm` with the recipe and kernel already resolved (an experts
    module's plan holds both): the same checks and numerics, no parsing or selection.

    Args:
        a, b, offs, check_finite: as :func:`quantized_grouped_mm`.
        qtype: a QuantizationType. impl: a per-GEMM or whole-op registry kernel.
        validated: the static checks already ran (internal).
    Returns:
        (M, N) in a.dtype.
    """
    q = qtype
    if not validated:
        _validate_static(a, b, offs, q)
    if q is not QuantizationType.BF16 and (a.dtype not in _KERNEL_DTYPES or b.dtype not in _KERNEL_DTYPES):
        out_dtype = a.dtype
        a = a if a.dtype in _KERNEL_DTYPES else a.float()
        b = b if b.dtype in _KERNEL_DTYPES else b.float()
        out = planned_grouped_mm(a, b, offs, q, impl, check_finite=check_finite, validated=True)
        return _cast(out, out_dtype)
    _validate_offsets(offs, a.shape[0], q)
    checks = _finite_checks_on(check_finite, a.device)
    if checks:
        _check_finite(a, "a")
        _check_finite(b, "b")
    if impl.grouped_mm is not None:  # a whole differentiable op (torchao's): its own backward
        out = impl.grouped_mm(a, b, offs, q)
        if checks and out.requires_grad:
            out.register_hook(lambda g: _check_finite(g, "grad_out (the gradient of quantized_grouped_mm's output)"))
        return _cast(out, a.dtype)
    return _QuantizedGroupedMM.apply(a, b, offs, q, impl, checks)
