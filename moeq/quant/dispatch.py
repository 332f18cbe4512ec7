"""Grouped-GEMM kernel names, the registry, and per-call kernel selection.

The one place kernel names live. A kernel implements the three GEMMs of a quantized
grouped linear layer for some recipes (``QuantizationType``), each taking high-precision
tensors and doing its own quantization (so fast kernels can fuse it):

* ``forward(a, b, offs, qtype)``: a (M, K), b (E, N, K) -> (M, N), ``a[g] @ b[e].T``;
* ``dgrad(grad_out, b, offs, qtype)``: (M, N), (E, N, K) -> (M, K), ``grad_out[g] @ b[e]``;
* ``wgrad(grad_out, a, offs, qtype)``: (M, N), (M, K) -> (E, N, K), ``grad_out[g].T @ a[g]``.

Contract: outputs in bf16 (or any float dtype; the caller casts), rows at or past
``offs[-1]`` zero in forward/dgrad, zero weight gradients for empty groups, no host
syncs. Inputs arrive validated (shapes, dtypes, alignments: moeq/quant/grouped_mm.py).

Built-in kernels: ``"emulated"`` (quantize/dequantize + ``torch._grouped_mm``; CPU and
any GPU; every recipe) and ``"torch"`` (``torch._scaled_grouped_mm`` FP8 rowwise on
SM90/SM100; BF16 via ``torch._grouped_mm``). ``"auto"`` picks, per call, the available
kernel of highest priority for the recipe and device. Other modules add kernels with
``register_kernel`` (e.g. ``"triton"`` from moeq.kernels); list a module that registers
on import in ``KERNEL_PLUGIN_MODULES`` so selection imports it first.

Selection is a pure function of its arguments plus the registry, which only grows at
import time: there is no mutable global configuration.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from moeq.quant import emulated as _emulated
from moeq.quant import scaled_mm as _scaled
from moeq.recipes import QuantizationType, RecipeLike, parse_recipe

KERNEL_AUTO = "auto"
KERNEL_EMULATED = "emulated"
KERNEL_TORCH = "torch"
KERNEL_TRITON = "triton"  # reserved for the Triton kernels in moeq.kernels (issues 5/6)

# Modules imported (once, on first selection) so the kernels they register are known.
# A missing module is skipped; any other import error propagates.
KERNEL_PLUGIN_MODULES: Tuple[str, ...] = ()

GemmFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, QuantizationType], torch.Tensor]
ReasonFn = Callable[[QuantizationType, torch.device], Optional[str]]


@dataclasses.dataclass(frozen=True)
class GroupedMMKernel:
    """A grouped-GEMM implementation of some recipes.

    Attributes:
        name: the ``kernel=`` value that selects it.
        qtypes: recipes it implements.
        forward, dgrad, wgrad: the three GEMMs (see the module docstring).
        unsupported_reason: ``(qtype, device) -> None`` if it can run there, else a
            sentence saying why not. Must not touch device data, and must say no for
            any device it could crash (e.g. MXFP8 via torch._scaled_grouped_mm on SM90
            kills the CUDA context instead of raising).
        priority: "auto" takes the highest-priority available kernel.
    """

    name: str
    qtypes: FrozenSet[QuantizationType]
    forward: GemmFn
    dgrad: GemmFn
    wgrad: GemmFn
    unsupported_reason: ReasonFn
    priority: int = 0

    def reason_unavailable(self, qtype: QuantizationType, device: torch.device) -> Optional[str]:
        """None when this kernel runs ``qtype`` on ``device``, else why not."""
        if qtype not in self.qtypes:
            return f"kernel={self.name!r} does not implement {qtype.value}"
        return self.unsupported_reason(qtype, torch.device(device))


_REGISTRY: Dict[str, GroupedMMKernel] = {}
_plugins_loaded = False


def register_kernel(kernel: GroupedMMKernel, *, replace: bool = False) -> None:
    """Add ``kernel`` to the registry under ``kernel.name`` (call at import time).

    Raises ValueError for the reserved name "auto" or, unless ``replace``, a taken name.
    """
    if kernel.name == KERNEL_AUTO:
        raise ValueError(f"{KERNEL_AUTO!r} is reserved for automatic selection")
    if kernel.name in _REGISTRY and not replace:
        raise ValueError(f"a grouped-GEMM kernel named {kernel.name!r} is already registered")
    _REGISTRY[kernel.name] = kernel


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in KERNEL_PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def kernel_names() -> Tuple[str, ...]:
    """Valid ``kernel=`` values: "auto" then the registered names."""
    _load_plugins()
    return (KERNEL_AUTO, *sorted(_REGISTRY))


def get_kernel(name: str) -> GroupedMMKernel:
    """The registered kernel called ``name``; ValueError listing the valid names otherwise."""
    _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown grouped-GEMM kernel {name!r}: use one of "
            f"{', '.join(repr(n) for n in kernel_names())}"
        )
    return _REGISTRY[name]


def available_kernels(qtype: RecipeLike, device) -> List[str]:
    """Names of the kernels that can run ``qtype`` on ``device``, best (auto's choice) first."""
    q = parse_recipe(qtype)
    _load_plugins()
    dev = torch.device(device)
    ok = [k for k in _REGISTRY.values() if k.reason_unavailable(q, dev) is None]
    return [k.name for k in sorted(ok, key=lambda k: (-k.priority, k.name))]


def select_kernel(kernel: str, qtype: RecipeLike, device) -> GroupedMMKernel:
    """Resolve a ``kernel=`` value for ``qtype`` on ``device``.

    "auto" gives the highest-priority available kernel. A named kernel that cannot run
    there raises RuntimeError saying why and which ``kernel=`` values can; it is never
    dispatched anyway (some would crash the device rather than raise).
    """
    q = parse_recipe(qtype)
    dev = torch.device(device)
    if kernel == KERNEL_AUTO:
        names = available_kernels(q, dev)
        if not names:
            raise RuntimeError(f"no grouped-GEMM kernel runs {q.value} on {dev}")
        return _REGISTRY[names[0]]
    k = get_kernel(kernel)
    reason = k.reason_unavailable(q, dev)
    if reason is not None:
        alternatives = available_kernels(q, dev)
        hint = (
            f"use kernel={alternatives[0]!r} (or 'auto'); available here: "
            f"{', '.join(repr(n) for n in alternatives)}"
            if alternatives
            else "no kernel runs it here"
        )
        raise RuntimeError(f"kernel={kernel!r} cannot run {q.value} on {dev}: {reason}; {hint}")
    return k


# --- built-in kernels ------------------------------------------------------------------

def _cuda_capability(device: torch.device) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _emulated_reason(qtype: QuantizationType, device: torch.device) -> Optional[str]:
    if device.type not in ("cpu", "cuda"):
        return f"runs on cpu and cuda devices only, not {device.type}"
    return None


def _torch_reason(qtype: QuantizationType, device: torch.device) -> Optional[str]:
    if qtype is QuantizationType.BF16:
        return _emulated_reason(qtype, device)
    if device.type != "cuda" or torch.version.hip is not None:
        return "torch._scaled_grouped_mm needs an NVIDIA CUDA device"
    major, minor = _cuda_capability(device)
    arch = f"sm_{major}{minor}"
    if qtype is QuantizationType.FP8:
        if major not in (9, 10):
            return f"torch._scaled_grouped_mm FP8 rowwise needs SM90 or SM100, the device is {arch}"
        return None
    if major < 10:
        return (
            f"torch._scaled_grouped_mm MXFP8 needs SM100+, the device is {arch} (there it "
            "crashes the CUDA context instead of raising)"
        )
    return (
        "MXFP8 through torch._scaled_grouped_mm (SM100 blocked e8m0 scale layouts) is not "
        "implemented in moeq yet"
    )


def _torch_forward(a, b, offs, qtype):
    if qtype is QuantizationType.FP8:
        return _scaled.scaled_fp8_forward(a, b, offs)
    return _emulated.emulated_forward(a, b, offs, qtype)


def _torch_dgrad(grad_out, b, offs, qtype):
    if qtype is QuantizationType.FP8:
        return _scaled.scaled_fp8_dgrad(grad_out, b, offs)
    return _emulated.emulated_dgrad(grad_out, b, offs, qtype)


def _torch_wgrad(grad_out, a, offs, qtype):
    if qtype is QuantizationType.FP8:
        return _scaled.scaled_fp8_wgrad(grad_out, a, offs)
    return _emulated.emulated_wgrad(grad_out, a, offs, qtype)


register_kernel(
    GroupedMMKernel(
        name=KERNEL_EMULATED,
        qtypes=frozenset(QuantizationType),
        forward=_emulated.emulated_forward,
        dgrad=_emulated.emulated_dgrad,
        wgrad=_emulated.emulated_wgrad,
        unsupported_reason=_emulated_reason,
        priority=0,
    )
)
register_kernel(
    GroupedMMKernel(
        name=KERNEL_TORCH,
        qtypes=frozenset({QuantizationType.BF16, QuantizationType.FP8, QuantizationType.MXFP8}),
        forward=_torch_forward,
        dgrad=_torch_dgrad,
        wgrad=_torch_wgrad,
        unsupported_reason=_torch_reason,
        priority=10,
    )
)
