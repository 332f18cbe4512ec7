"""The "torchao" grouped-GEMM kernel: torchao's own FP8 rowwise and MXFP8 grouped GEMMs.

moeq.ops.registry registers these functions as ``kernel="torchao"``. Importing this
module is cheap: torchao itself is imported only when the kernel is asked whether it can
run, or runs.

**How it plugs in.** torchao's grouped GEMMs are whole autograd functions
(``torchao.prototype.moe_training._to_fp8_rowwise_then_scaled_grouped_mm`` and
``_to_mxfp8_then_scaled_grouped_mm``): forward and backward in one ``autograd.Function``,
and for FP8 rowwise the backward's quantizations are inline, with no per-GEMM entry
points. So this is a *whole-op* kernel (``GroupedMMKernel.grouped_mm``): moeq validates
the inputs and selects it, then calls torchao's differentiable function and lets its
backward compute both gradients. Nothing of torchao's numerics is re-implemented here.

**Modes.**

* MXFP8, native (``KernelPreference.AUTO``): on an NVIDIA SM100 (compute capability 10.x)
  GPU whose torchao build has its SM100 kernels (the CUDA extension, CUDA 12.8+, and the
  CuTe DSL runtime ``nvidia-cutlass-dsl`` + ``apache-tvm-ffi``). Those kernels check at
  import which device is current, and ``TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1`` turns them
  off. "auto" takes this kernel there. **It has not been run on SM100 in moeq's tests**
  (no such GPU was available); the CPU tests cover the emulated mode only.
* MXFP8, emulated (``KernelPreference.EMULATED``): everywhere else (CPU, any CUDA GPU):
  torchao's ``to_mx`` quantization, dequantization to bf16 and a bf16
  ``torch._grouped_mm``. Only chosen by an explicit ``kernel="torchao"``; on a GPU it
  warns once that it is emulated (moeq.ops.registry). torchao's SM100 path is never
  called elsewhere: on SM90 its kernels are absent (torchao asserts) and the MXFP8
  ``torch._scaled_grouped_mm`` kills the CUDA context.
* FP8 rowwise: torchao has no emulated mode; its quantizers are Triton CUDA kernels and
  its GEMM is ``torch._scaled_grouped_mm``, so it runs on NVIDIA SM90/SM100 only (on CPU
  torchao raises NotImplementedError "requires triton installed"). Not auto-selected:
  moeq's ``"torch"`` kernel has the same numerics and a higher FP8 priority.

**Layout.** moeq's groups start at multiples of ``GROUP_ALIGNMENT`` (16 / 32 rows) with
any size, followed by slack rows holding anything. torchao needs every group *size* to be
a multiple of its alignment (FP8: 16; MXFP8 emulated: 32, its wgrad quantizes blocks of
32 tokens over the whole M; MXFP8 SM100: 128, its CuTe quantizer asserts it on the device)
and no slack. So the tokens are re-laid out first (``regroup``): each group copied to a
start at a multiple of the alignment, zero rows after it, no slack; the output rows are
gathered back, slack rows zero. Zero rows change no product and no scale (an MX block's
amax ignores zeros, and group starts stay multiples of 32 so token blocks are the same),
so the re-layout is exact; it costs one gather of ``a`` and of the output (and their
scatters in backward). All sync-free with static shapes.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch

from moeq.ops.device import DeviceInfo, device_info
from moeq.numerics.groups import group_sizes
from moeq.numerics.mxfp8 import MX_BLOCK_SIZE
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType

FP8, MXFP8 = QuantizationType.FP8, QuantizationType.MXFP8

# Group-size multiples torchao needs (see the module docstring).
FP8_ALIGNMENT = GROUP_ALIGNMENT[FP8]  # torch._scaled_grouped_mm's 2D x 2D wgrad
MXFP8_EMULATED_ALIGNMENT = MX_BLOCK_SIZE  # its wgrad's to_mx blocks along all of M
MXFP8_SM100_ALIGNMENT = 128  # torchao's CuTe MXFP8 quantizer: "Group sizes must be multiples of 128"

_OUT_DTYPE = torch.bfloat16  # moeq's contract: quantized GEMMs round to bf16


# --- what torchao offers in this process ------------------------------------------------

# No caches here: Python's import system is the cache, and dynamo would trace through
# (and warn about) functools.lru_cache wrappers.
def _torchao_api():
    """torchao's entry points and options; raises ImportError if missing."""
    from torchao.prototype.moe_training import (
        _to_fp8_rowwise_then_scaled_grouped_mm,
        _to_mxfp8_then_scaled_grouped_mm,
    )
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.quantization.quantize_.common import KernelPreference

    return _to_fp8_rowwise_then_scaled_grouped_mm, _to_mxfp8_then_scaled_grouped_mm, KernelPreference, ScaleCalculationMode


def torchao_missing_reason() -> Optional[str]:
    """None when torchao's grouped GEMMs import, else why not."""
    try:
        _torchao_api()
    except ImportError as e:
        return f"torchao's grouped GEMMs (torchao.prototype.moe_training, torchao>=0.18) do not import: {e}"
    return None


def sm100_kernels_missing_reason() -> Optional[str]:
    """None when torchao's SM100 MXFP8 kernels are loaded in this process, else why not.

    torchao decides this at import from the *current* CUDA device; these are its own flags.
    """
    missing = torchao_missing_reason()
    if missing is not None:
        return missing
    import torchao
    from torchao.prototype.moe_training import mxfp8_grouped_mm as tao_mx
    from torchao.prototype.moe_training.kernels.mxfp8 import quant as tao_quant

    if getattr(torchao, "skip_loading_so_files", False):
        why = getattr(torchao, "_skip_reason", None) or "torchao skipped them"
        if os.environ.get("TORCHAO_FORCE_SKIP_LOADING_SO_FILES") == "1":
            why = "TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 is set"
        return f"torchao's CUDA extensions are not loaded ({why})"
    if not getattr(tao_mx, "_SM100_KERNELS_AVAILABLE", False):
        return "torchao's SM100 MXFP8 kernels are not available (needs a CUDA 12.8+ torchao build, Triton, an SM100 current device)"
    if not getattr(tao_quant, "_mxfp8_cutedsl_kernels_available", False):
        missing = getattr(tao_quant, "_missing_cutedsl_runtime_packages", lambda: [])()
        need = ", ".join(missing) if missing else "nvidia-cutlass-dsl, apache-tvm-ffi"
        return f"torchao's CuTe DSL MXFP8 quantizers are not available (install {need})"
    return None


def mxfp8_native_missing_reason(device: DeviceInfo) -> Optional[str]:
    """None when torchao's native SM100 MXFP8 grouped GEMM runs on ``device``, else why not."""
    if not device.nvidia_cuda or device.capability[0] != 10:
        return (
            "torchao's native MXFP8 grouped GEMM needs an NVIDIA SM100 (Blackwell, compute "
            f"capability 10.x) GPU, the device is {device}"
        )
    return sm100_kernels_missing_reason()


def unsupported_reason(qtype: QuantizationType, device: DeviceInfo) -> Optional[str]:
    """The kernel's ``unsupported_reason``: None where it runs ``qtype`` at all (natively or
    in torchao's emulated mode), else why not. Cheap checks first; torchao is imported last."""
    if device.type not in ("cpu", "cuda"):
        return f"runs on cpu and cuda devices only, not {device.type}"
    if qtype is FP8:
        if not device.nvidia_cuda or device.capability[0] not in (9, 10):
            return (
                "torchao's FP8 rowwise grouped GEMM has no emulated mode (Triton CUDA quantizers, "
                f"torch._scaled_grouped_mm): it needs an NVIDIA SM90/SM100 GPU, the device is {device}"
            )
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torchao's FP8 rowwise grouped GEMM needs Triton"
    return torchao_missing_reason()


def emulation_reason(qtype: QuantizationType, device: DeviceInfo) -> Optional[str]:
    """The kernel's ``emulation_reason``: None where torchao runs ``qtype`` natively (FP8
    wherever it runs; MXFP8 on SM100 with its kernels loaded), else why it emulates."""
    if qtype is FP8:
        return None  # native where it runs at all
    why = mxfp8_native_missing_reason(device)
    if why is None:
        return None
    return f"{why}; otherwise it runs torchao's EMULATED mode (to_mx, dequantize, bf16 torch._grouped_mm)"


# --- the re-layout ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Regrouped:
    """A token layout whose group sizes are multiples of ``alignment`` (see ``regroup``).

    Attributes:
        offs: (E,) int32 end offsets in the new layout.
        src_rows: (Mp,) int64, for each new row the old row it copies (0 for zero rows).
        src_valid: (Mp, 1) bool, False for the new layout's zero rows.
        dst_rows: (M,) int64, for each old row its new row (0 for slack rows).
        dst_valid: (M, 1) bool, False for old slack rows.
    """

    offs: torch.Tensor
    src_rows: torch.Tensor
    src_valid: torch.Tensor
    dst_rows: torch.Tensor
    dst_valid: torch.Tensor


def regroup(offs: torch.Tensor, num_rows: int, alignment: int) -> Regrouped:
    """Index maps from moeq's layout (groups ending at ``offs``, then slack) to one where
    every group starts at a multiple of ``alignment`` and its size is rounded up to one.

    The new row count ``Mp = round_up(num_rows + E * (alignment - 1), alignment)`` is a
    bound from shapes only (static under torch.compile); rows past the last new group
    are zero rows too. No host syncs.

    Args:
        offs: (E,) int32 cumulative end offsets; ``offs[-1] <= num_rows``.
        num_rows: M, rows of the tensors laid out by ``offs``.
        alignment: the group-size multiple to produce.
    """
    num_groups = offs.shape[0]
    sizes = group_sizes(offs)
    starts = offs - sizes
    new_sizes = (sizes + (alignment - 1)) // alignment * alignment
    new_offs = torch.cumsum(new_sizes, 0, dtype=torch.int32)
    new_starts = new_offs - new_sizes
    bound = num_rows + num_groups * (alignment - 1)
    new_rows = (bound + alignment - 1) // alignment * alignment

    def to_rows(ends, begins, other_begins, limit, n):
        rows = torch.arange(n, device=offs.device, dtype=offs.dtype)
        group = torch.searchsorted(ends, rows, right=True)
        g = group.clamp(max=num_groups - 1)
        within = rows - begins[g]
        valid = (group < num_groups) & (within < limit[g])
        return torch.where(valid, other_begins[g] + within, 0).long(), valid.unsqueeze(-1)

    src_rows, src_valid = to_rows(new_offs, new_starts, starts, sizes, new_rows)
    dst_rows, dst_valid = to_rows(offs, starts, new_starts, sizes, num_rows)
    return Regrouped(new_offs, src_rows, src_valid, dst_rows, dst_valid)


def _gather_rows(x: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` with invalid rows zero; differentiable (backward scatters back)."""
    return torch.where(valid, x.index_select(0, rows), torch.zeros((), dtype=x.dtype, device=x.device))


# --- the kernel ---------------------------------------------------------------------------

def torchao_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, qtype: QuantizationType) -> torch.Tensor:
    """torchao's differentiable grouped GEMM ``a[g] @ b[e].T`` in moeq's layout (the kernel).

    Args:
        a: (M, K) bf16/fp32, groups starting at multiples of ``GROUP_ALIGNMENT[qtype]``,
            slack rows after ``offs[-1]``.
        b: (E, N, K) bf16/fp32 (any strides).
        offs: (E,) int32 cumulative group end offsets.
        qtype: FP8 (SM90/SM100 only) or MXFP8 (native on SM100, emulated elsewhere).
    Returns:
        (M, N) bf16; slack rows zero. Its backward is torchao's: grads in a's / b's dtype.
    """
    if qtype is FP8:
        return torchao_fp8_grouped_mm(a, b, offs)
    native = mxfp8_native_missing_reason(device_info(a.device)) is None
    alignment = MXFP8_SM100_ALIGNMENT if native else MXFP8_EMULATED_ALIGNMENT
    return torchao_mxfp8_grouped_mm(a, b, offs, emulated=not native, alignment=alignment)


def torchao_fp8_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torchao's FP8 rowwise grouped GEMM (``_to_fp8_rowwise_then_scaled_grouped_mm``) in
    moeq's layout; shapes as ``torchao_grouped_mm``. NVIDIA SM90/SM100 only."""
    fp8_mm, _, _, _ = _torchao_api()
    op = functools.partial(fp8_mm, out_dtype=_OUT_DTYPE, pad_token_groups_for_grouped_mm=False)
    return _in_torchao_layout(op, a, b, offs, FP8_ALIGNMENT)


def torchao_mxfp8_grouped_mm(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, emulated: bool, alignment: int
) -> torch.Tensor:
    """torchao's MXFP8 grouped GEMM (``_to_mxfp8_then_scaled_grouped_mm``, RCEIL scales,
    MXFP8 weight gradient) in moeq's layout; shapes as ``torchao_grouped_mm``.

    Args:
        emulated: torchao's ``KernelPreference.EMULATED`` (any device) instead of AUTO
            (its SM100 kernels).
        alignment: group-size multiple of the re-layout: 128 for the SM100 kernels, 32
            (``MX_BLOCK_SIZE``) or any multiple of it for the emulated mode.
    """
    _, mxfp8_mm, kernel_preference, scale_mode = _torchao_api()
    op = functools.partial(
        mxfp8_mm,
        out_dtype=_OUT_DTYPE,
        kernel_preference=kernel_preference.EMULATED if emulated else kernel_preference.AUTO,
        wgrad_with_hp=False,
        scale_calculation_mode=scale_mode.RCEIL,
        pad_token_groups_for_grouped_mm=False,
    )
    return _in_torchao_layout(op, a, b, offs, alignment)


def _in_torchao_layout(op, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, alignment: int) -> torch.Tensor:
    """``op(a_packed, b_t, offs_packed)`` on the re-laid-out tokens, gathered back to moeq's rows."""
    layout = regroup(offs, a.shape[0], alignment)
    b_t = b.contiguous().transpose(-2, -1)  # (E, K, N) column-major, as torchao requires
    out = op(_gather_rows(a, layout.src_rows, layout.src_valid), b_t, layout.offs)
    return _gather_rows(out, layout.dst_rows, layout.dst_valid)
