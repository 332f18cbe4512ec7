"""Grouped-GEMM kernel names, the registry, and kernel resolution.

The one place kernel names live. A kernel implements the grouped GEMMs of a quantized
grouped linear layer for some recipes (``QuantizationType``), taking high-precision
tensors and doing its own quantization (so fast kernels can fuse it). It comes in one of
three forms:

* **per GEMM** (moeq's own kernels): three functions that moeq's autograd function
  (moeq/ops/grouped_mm.py) calls,

  * ``forward(a, b, offs, qtype)``: a (M, K), b (E, N, K) -> (M, N), ``a[g] @ b[e].T``;
  * ``dgrad(grad_out, b, offs, qtype)``: (M, N), (E, N, K) -> (M, K), ``grad_out[g] @ b[e]``;
  * ``wgrad(grad_out, a, offs, qtype)``: (M, N), (M, K) -> (E, N, K), ``grad_out[g].T @ a[g]``;

* **whole op** (a library's own autograd function, e.g. torchao's): one differentiable
  ``grouped_mm(a, b, offs, qtype) -> (M, N)`` whose backward computes both gradients
  itself. Splitting such a function into moeq's three entries would mean re-writing its
  backward; calling it whole runs exactly the library's code.

* **fused experts** (moeq's Triton Hopper kernels, ``"triton"``): whole SwiGLU experts
  ``swiglu_experts(x, gate_up_proj, down_proj, offs, qtype, quantized_weights=None)`` and
  ``routed_swiglu_experts(tokens, expert_indices, expert_weights, gate_up_proj,
  down_proj, qtype, quantized_weights=None)``, quantizing each activation once inside the
  passes that already touch it. Layouts they do not cover (biases, other activations)
  run a per-GEMM kernel, which ``resolve_experts_kernels`` picks alongside.

Contract for both: outputs in bf16 (or any float dtype; the caller casts), rows at or past
``offs[-1]`` zero in forward/dgrad, zero weight gradients for empty groups, no host
syncs. Inputs arrive validated (shapes, dtypes, alignments: moeq/ops/grouped_mm.py).

Built-in kernels: ``"emulated"`` (quantize/dequantize + ``torch._grouped_mm``; CPU and
any GPU; every recipe), ``"torch"`` (``torch._scaled_grouped_mm`` FP8 rowwise on
SM90/SM100; BF16 via ``torch._grouped_mm``) and ``"torchao"`` (torchao's FP8 rowwise and
MXFP8 grouped GEMMs, a whole-op kernel: moeq/ops/torchao_kernel.py, which imports
torchao only when that kernel is asked whether it can run, or runs). Other modules add
kernels with ``register_kernel``; list a module that registers on import in
``KERNEL_PLUGIN_MODULES`` so selection imports it first (the first selection must then
run eagerly: dynamo cannot trace ``importlib``).

Selection (``select_kernel``) is a pure function of the kernel choice, the recipe, a
``DeviceInfo`` (device type, CUDA compute capability, ROCm or not) and the registry,
which only grows at import time: there is no mutable global configuration, and any GPU
can be described without one (``DeviceInfo("cuda", 0, (10, 0))``). ``"auto"`` takes the
highest-priority kernel that runs the recipe **natively** there (low-precision GEMMs on
the hardware; for BF16 plain bf16 GEMMs); only when none does it falls back to
``"emulated"``. On a GPU that fallback (and any other choice that ends up emulating the
recipe, e.g. ``"torchao"`` on a non-SM100 GPU) is announced once per process and
(kernel choice, recipe, device) with an ``EmulatedKernelWarning`` naming the device and
the faster kernels with what they need. On CPU emulation is the only way to run FP8/MXFP8
(no CPU has FP8 GEMMs), so there it is expected and not warned about. ``kernel="emulated"``
states the choice explicitly and is never warned about. Under ``torch.compile`` no
warning is given (dynamo cannot trace ``warnings.warn`` in a full graph): eager calls and
``emulation_notice`` report it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

import torch

from moeq.ops import emulated as _emulated
from moeq.ops import hopper_experts as _hopper
from moeq.ops import scaled_mm as _scaled
from moeq.ops import torchao_kernel as _torchao  # light: torchao itself loads on first use
from moeq.ops.device import DeviceInfo, DeviceLike, device_info
from moeq.numerics.recipes import QuantizationType, RecipeLike, parse_recipe

KERNEL_AUTO = "auto"
KERNEL_EMULATED = "emulated"
KERNEL_TORCH = "torch"
KERNEL_TORCHAO = "torchao"
KERNEL_TRITON = "triton"  # the fused Triton Hopper SwiGLU experts (moeq/ops/hopper_experts.py)

# Modules imported (once, on first selection) so the kernels they register are known.
# A missing module is skipped; any other import error propagates.
KERNEL_PLUGIN_MODULES: Tuple[str, ...] = ()


class EmulatedKernelWarning(UserWarning):
    """A quantized recipe runs with emulated numerics on a GPU (slow; see the message)."""


GemmFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, QuantizationType], torch.Tensor]
ReasonFn = Callable[[QuantizationType, DeviceInfo], Optional[str]]


def runs_natively(qtype: QuantizationType, device: DeviceInfo) -> Optional[str]:
    """The default ``emulation_reason``: the kernel never emulates."""
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupedMMKernel:
    """A grouped-GEMM implementation of some recipes (see the module docstring).

    Attributes:
        name: the ``kernel=`` value that selects it.
        qtypes: recipes it implements.
        forward, dgrad, wgrad: the three per-GEMM functions, or all None when
            ``grouped_mm`` is given.
        grouped_mm: a whole differentiable op ``(a, b, offs, qtype) -> out`` (its own
            backward), or None for a per-GEMM kernel.
        unsupported_reason: ``(qtype, DeviceInfo) -> None`` if it can run there, else a
            sentence saying why not. Must not touch device data, and must say no for
            any device it could crash (e.g. MXFP8 via torch._scaled_grouped_mm on SM90
            kills the CUDA context instead of raising).
        emulation_reason: ``(qtype, DeviceInfo) -> None`` where it runs the recipe's
            GEMMs natively, else a sentence saying how it emulates them and why. "auto"
            only takes native kernels (then falls back to "emulated").
        priority: "auto" takes the highest-priority native kernel; an int, or a
            ``{qtype: int}`` mapping (recipes missing from it get 0).
        swiglu_experts, routed_swiglu_experts: the fused-experts form (see the module
            docstring). dtypes: the activation dtypes a fused kernel takes (None: any).
    """

    name: str
    qtypes: FrozenSet[QuantizationType]
    unsupported_reason: ReasonFn
    forward: Optional[GemmFn] = None
    dgrad: Optional[GemmFn] = None
    wgrad: Optional[GemmFn] = None
    grouped_mm: Optional[GemmFn] = None
    swiglu_experts: Optional[Callable[..., torch.Tensor]] = None
    routed_swiglu_experts: Optional[Callable[..., torch.Tensor]] = None
    dtypes: Optional[FrozenSet[torch.dtype]] = None
    emulation_reason: ReasonFn = runs_natively
    priority: Union[int, Mapping[QuantizationType, int]] = 0

    def __post_init__(self):
        per_gemm = (self.forward, self.dgrad, self.wgrad)
        fused = (self.swiglu_experts, self.routed_swiglu_experts)
        if self.grouped_mm is None and not any(fused) and any(f is None for f in per_gemm):
            raise TypeError(f"kernel {self.name!r}: give forward, dgrad and wgrad, or grouped_mm")
        forms = [any(f is not None for f in per_gemm), self.grouped_mm is not None, any(f is not None for f in fused)]
        if forms.count(True) != 1 or (forms[2] and not all(fused)):
            raise TypeError(
                f"kernel {self.name!r}: give one form, not both: forward, dgrad and wgrad; or grouped_mm; "
                f"or swiglu_experts and routed_swiglu_experts"
            )

    @property
    def fused(self) -> bool:
        """True for a whole-SwiGLU-experts kernel (it runs no single grouped GEMM)."""
        return self.swiglu_experts is not None

    def priority_for(self, qtype: QuantizationType) -> int:
        """This kernel's priority for ``qtype`` in "auto"."""
        if isinstance(self.priority, int):
            return self.priority
        return self.priority.get(qtype, 0)

    def reason_unavailable(self, qtype: QuantizationType, device: DeviceLike) -> Optional[str]:
        """None when this kernel runs ``qtype`` on ``device``, else why not."""
        if qtype not in self.qtypes:
            return f"kernel={self.name!r} does not implement {qtype.value}"
        return self.unsupported_reason(qtype, device_info(device))

    def reason_emulated(self, qtype: QuantizationType, device: DeviceLike) -> Optional[str]:
        """None when this kernel runs ``qtype`` natively on ``device``, else how it emulates it."""
        return self.emulation_reason(qtype, device_info(device))


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


def check_kernel_choice(kernel: str) -> str:
    """Return ``kernel`` if it is "auto" or a registered name, else raise ValueError naming
    the choices (the fused experts kernels, then the per-GEMM ones)."""
    _load_plugins()
    if kernel == KERNEL_AUTO or kernel in _REGISTRY:
        return kernel
    fused = [n for n in sorted(_REGISTRY) if _REGISTRY[n].fused]
    gemm = [n for n in sorted(_REGISTRY) if not _REGISTRY[n].fused]
    raise ValueError(
        f"unknown kernel {kernel!r}: use 'auto', "
        + "".join(f"{n!r} (fused SM90 SwiGLU experts) or " for n in fused)
        + f"a per-GEMM kernel ({', '.join(repr(n) for n in gemm)})"
    )


def _by_priority(qtype: QuantizationType, fused: bool = False) -> List[GroupedMMKernel]:
    ks = [k for k in _REGISTRY.values() if qtype in k.qtypes and k.fused == fused]
    return sorted(ks, key=lambda k: (-k.priority_for(qtype), k.name))


def _auto(qtype: QuantizationType, info: DeviceInfo) -> Optional[GroupedMMKernel]:
    # Stop at the first hit: a kernel's costlier checks (torchao's import) only run
    # where it could be the answer.
    for k in _by_priority(qtype):
        if k.emulation_reason(qtype, info) is None and k.unsupported_reason(qtype, info) is None:
            return k
    fallback = _REGISTRY[KERNEL_EMULATED]
    return fallback if fallback.unsupported_reason(qtype, info) is None else None


def available_kernels(qtype: RecipeLike, device: DeviceLike) -> List[str]:
    """Names of the per-GEMM kernels that can run ``qtype`` on ``device``, auto's choice
    first, then the other native ones by priority, then the emulating ones."""
    q = parse_recipe(qtype)
    _load_plugins()
    info = device_info(device)
    first = _auto(q, info)
    ok = [k for k in _by_priority(q) if k is not first and k.unsupported_reason(q, info) is None]
    rest = sorted(ok, key=lambda k: k.emulation_reason(q, info) is not None)  # stable
    return ([first.name] if first is not None else []) + [k.name for k in rest]


def choose_kernel(kernel: str, qtype: RecipeLike, device: DeviceLike) -> GroupedMMKernel:
    """The pure part of ``select_kernel``: resolve ``kernel`` for ``qtype`` on ``device``
    (a DeviceInfo describes any device without touching it), no warning."""
    q = parse_recipe(qtype)
    info = device_info(device)
    if kernel == KERNEL_AUTO:
        _load_plugins()
        k = _auto(q, info)
        if k is None:
            raise RuntimeError(f"no grouped-GEMM kernel runs {q.value} on {info}")
        return k
    k = get_kernel(kernel)
    if k.fused:
        raise ValueError(
            f"kernel={kernel!r} runs whole SwiGLU experts, not one grouped GEMM: pass a per-GEMM kernel "
            f"({', '.join(repr(n) for n in kernel_names() if n == KERNEL_AUTO or not _REGISTRY[n].fused)})"
        )
    reason = k.reason_unavailable(q, info)
    if reason is not None:
        alternatives = available_kernels(q, info)
        hint = (
            f"use kernel={alternatives[0]!r} (or 'auto'); available here: "
            f"{', '.join(repr(n) for n in alternatives)}"
            if alternatives
            else "no kernel runs it here"
        )
        raise RuntimeError(f"kernel={kernel!r} cannot run {q.value} on {info}: {reason}; {hint}")
    return k


def emulation_notice(kernel: str, qtype: RecipeLike, device: DeviceLike) -> Optional[str]:
    """The warning ``select_kernel(kernel, qtype, device)`` gives (once), or None.

    Says something when a quantized recipe ends up emulated on a GPU through any choice
    but an explicit ``kernel="emulated"``: which device, how it is emulated, and which
    faster kernels exist with what each needs. None on CPU (emulation is the only way to
    run FP8/MXFP8 there) and wherever the chosen kernel is native.
    """
    q = parse_recipe(qtype)
    info = device_info(device)
    chosen = choose_kernel(kernel, q, info)
    how = chosen.emulation_reason(q, info)
    if info.type == "cpu" or kernel == KERNEL_EMULATED or how is None:
        return None
    others = []
    for k in _by_priority(q):
        if k is chosen or k.name == KERNEL_EMULATED:
            continue
        why_not = k.unsupported_reason(q, info) or k.emulation_reason(q, info)
        others.append(f"kernel={k.name!r}: " + (why_not or "runs natively here"))
    options = "; ".join(others) if others else "none registered"
    return (
        f"kernel={kernel!r} runs {q.value} on {info} with emulated numerics, through "
        f"kernel={chosen.name!r} ({how}): several times slower than bf16. Native {q.value} "
        f"kernels: {options}. Pass kernel={KERNEL_EMULATED!r} to choose the emulated numerics "
        f"explicitly (no warning), or use recipe='bf16' for speed."
    )


@functools.lru_cache(maxsize=None)
def _warn_once(kernel: str, qtype: QuantizationType, info: DeviceInfo) -> None:
    # The cache is the "once": one warning per process and (choice, recipe, device).
    message = emulation_notice(kernel, qtype, info)
    if message is not None:
        warnings.warn(message, EmulatedKernelWarning, stacklevel=4)


def select_kernel(kernel: str, qtype: RecipeLike, device: DeviceLike) -> GroupedMMKernel:
    """Resolve a ``kernel=`` value for ``qtype`` on ``device``.

    "auto" gives the highest-priority kernel that runs the recipe natively there, else
    "emulated". A named kernel that cannot run there raises RuntimeError saying why and
    which ``kernel=`` values can; it is never dispatched anyway (some would crash the
    device rather than raise). A choice that ends up emulating a quantized recipe on a
    GPU warns once (``EmulatedKernelWarning``, text from ``emulation_notice``), except
    an explicit ``kernel="emulated"`` and under torch.compile.
    """
    q = parse_recipe(qtype)
    info = device_info(device)
    k = choose_kernel(kernel, q, info)
    if info.type != "cpu" and k.emulation_reason(q, info) is not None and not torch.compiler.is_compiling():
        _warn_once(kernel, q, info)
    return k


@dataclasses.dataclass(frozen=True)
class ExpertsKernels:
    """What one kernel choice resolves to for an experts module's GEMMs.

    Attributes:
        fused: the whole-SwiGLU-experts kernel, or None (no fused path).
        per_gemm: the kernel for each single grouped GEMM (layouts the fused kernel does
            not cover, and every GEMM when ``fused`` is None).
        fused_why, per_gemm_why: one sentence each: why this kernel (or why none).
    """

    fused: Optional[GroupedMMKernel]
    per_gemm: GroupedMMKernel
    fused_why: str
    per_gemm_why: str


def resolve_experts_kernels(kernel: str, qtype: QuantizationType, device: DeviceLike) -> ExpertsKernels:
    """The one resolver of a user's kernel choice for an experts module (called once per
    module and device, when its plan is made: moeq/experts/plan.py).

    "auto": the highest-priority fused experts kernel that can run ``qtype`` on
    ``device`` (its numerics may be emulated: on SM90 the MXFP8 one computes the MXFP8
    GEMM exactly up to accumulation order on bf16 tensor cores), and per GEMM the
    best native kernel, else "emulated". A fused kernel's name: that kernel (RuntimeError
    naming the fix where it cannot run) with "auto" per GEMM. A per-GEMM name: that
    kernel for every GEMM, no fused path. Emulation on a GPU warns as ``select_kernel``.
    """
    check_kernel_choice(kernel)
    info = device_info(device)
    if kernel != KERNEL_AUTO and get_kernel(kernel).fused:
        fused = get_kernel(kernel)
        reason = fused.reason_unavailable(qtype, info)
        if reason is not None:
            raise RuntimeError(
                f"kernel={kernel!r} ({qtype.value} fused experts) cannot run on {info}: {reason}; use "
                f"kernel='auto' or kernel={KERNEL_EMULATED!r}"
            )
        per_gemm = select_kernel(KERNEL_AUTO, qtype, info)
        return ExpertsKernels(fused, per_gemm, f"kernel={kernel!r} asked for it", _why(KERNEL_AUTO, per_gemm, qtype, info))
    fused = None
    fused_why = f"no fused experts kernel implements {qtype.value}"
    if kernel == KERNEL_AUTO:
        for k in _by_priority(qtype, fused=True):
            why_not = k.unsupported_reason(qtype, info)
            if why_not is None:
                fused, fused_why = k, f"the highest-priority fused experts kernel that runs {qtype.value} on {info}"
                break
            fused_why = f"kernel={k.name!r}: {why_not}"
    else:
        fused_why = f"kernel={kernel!r} is a per-GEMM kernel"
    per_gemm = select_kernel(kernel, qtype, info)
    return ExpertsKernels(fused, per_gemm, fused_why, _why(kernel, per_gemm, qtype, info))


def _why(choice: str, k: GroupedMMKernel, qtype: QuantizationType, info: DeviceInfo) -> str:
    if choice != KERNEL_AUTO:
        return f"kernel={choice!r} asked for it"
    if k.emulation_reason(qtype, info) is None:
        return f"the highest-priority kernel that runs {qtype.value} natively on {info}"
    return f"no kernel runs {qtype.value} natively on {info}"


def faster_option(qtype: QuantizationType, device: DeviceLike, chosen: GroupedMMKernel) -> Optional[str]:
    """Where ``chosen`` emulates ``qtype`` on ``device``: the other kernels and what each
    needs to run it natively (None where ``chosen`` is native)."""
    info = device_info(device)
    if chosen.emulation_reason(qtype, info) is None:
        return None
    options = []
    for k in _by_priority(qtype, fused=True) + _by_priority(qtype):
        if k is chosen or k.name == KERNEL_EMULATED:
            continue
        why_not = k.unsupported_reason(qtype, info) or k.emulation_reason(qtype, info)
        options.append(f"kernel={k.name!r}: " + (why_not or f"runs {qtype.value} natively here"))
    return "; ".join(options) or None


# --- built-in kernels ------------------------------------------------------------------

def _emulated_reason(qtype: QuantizationType, device: DeviceInfo) -> Optional[str]:
    if device.type not in ("cpu", "cuda"):
        return f"runs on cpu and cuda devices only, not {device.type}"
    return None


def _emulated_how(qtype: QuantizationType, device: DeviceInfo) -> Optional[str]:
    if qtype is QuantizationType.BF16:
        return None  # plain bf16 GEMMs: nothing to emulate
    return "moeq's emulated kernel: operands quantized and dequantized in plain torch, then a bf16 torch._grouped_mm"


def _torch_reason(qtype: QuantizationType, device: DeviceInfo) -> Optional[str]:
    if qtype is QuantizationType.BF16:
        return _emulated_reason(qtype, device)
    if not device.nvidia_cuda:
        return "torch._scaled_grouped_mm needs an NVIDIA CUDA device"
    major = device.capability[0]
    if qtype is QuantizationType.FP8:
        if major not in (9, 10):
            return f"torch._scaled_grouped_mm FP8 rowwise needs SM90 or SM100, the device is {device.arch}"
        return None
    if major < 10:
        return (
            f"torch._scaled_grouped_mm MXFP8 needs SM100+, the device is {device.arch} (there it "
            "crashes the CUDA context instead of raising)"
        )
    return (
        "MXFP8 through torch._scaled_grouped_mm (SM100 blocked e8m0 scale layouts) is not "
        "implemented in moeq's 'torch' kernel: use kernel='torchao'"
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
        emulation_reason=_emulated_how,
        priority=0,
    )
)
register_kernel(
    GroupedMMKernel(
        name=KERNEL_TORCHAO,
        qtypes=frozenset({QuantizationType.FP8, QuantizationType.MXFP8}),
        grouped_mm=_torchao.torchao_grouped_mm,
        unsupported_reason=_torchao.unsupported_reason,
        emulation_reason=_torchao.emulation_reason,
        # MXFP8: above "torch" (which has no MXFP8), so auto takes it where it is native
        # (SM100). FP8: below "torch" (same numerics, without the re-layout copies).
        priority={QuantizationType.MXFP8: 20, QuantizationType.FP8: 5},
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
register_kernel(
    GroupedMMKernel(
        name=KERNEL_TRITON,
        qtypes=frozenset({QuantizationType.FP8, QuantizationType.MXFP8}),
        swiglu_experts=_hopper.swiglu_experts,
        routed_swiglu_experts=_hopper.routed_swiglu_experts,
        dtypes=_hopper.FUSED_DTYPES,
        unsupported_reason=_hopper.unsupported_reason,
        emulation_reason=_hopper.emulation_reason,
        priority=30,
    )
)
