"""``ExpertsPlan``: what one converted experts module runs, decided once.

A plan is made when a module is converted (``moeq.convert_model``, the transformers
``experts_implementation="moeq_*"`` registration, ``moeq.torchtitan``) and made again
only when its weights move to another device or dtype. It holds the recipe (parsed
once), the token-group alignment, the padding case, and the kernel every GEMM runs with
why (resolved once, by ``moeq.ops.registry.resolve_experts_kernels``). The converted
forward, its backward (the kernels ride along into autograd) and the expert-parallel
dispatch read it; nothing parses a recipe or resolves a kernel per call.

``moeq.plan(model, recipe)`` builds the same plans without converting, to print.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from moeq.experts.padding_policy import pads_for
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType
from moeq.ops.registry import (
    KERNEL_AUTO,
    GroupedMMKernel,
    check_kernel_choice,
    faster_option,
    get_kernel,
    resolve_experts_kernels,
    select_kernel,
)

PLAN_ATTR = "moeq_plan"
BF16_GEMM = "torch._grouped_mm"  # what the bf16 recipe runs (no quantization, no registry kernel)


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    """One GEMM (or fused group of GEMMs) of an experts module.

    Attributes:
        gemm: which GEMMs ("gate_up forward", "down forward", "input gradients
            (dgrad)", "weight gradients (wgrad)", or the fused experts).
        kernel: the registry kernel name (``"torch._grouped_mm"`` for bf16).
        why: why this kernel.
        emulated: how its numerics are emulated here, or None (native).
    """

    gemm: str
    kernel: str
    why: str
    emulated: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ExpertsPlan:
    """What a converted experts module runs on one device and dtype.

    Attributes:
        recipe: the recipe of its GEMMs.
        kernel_choice: the user's ``kernel=`` ("auto", a fused or a per-GEMM name).
        device, dtype: of the expert weights the plan was made for (a meta-device plan is
            ``pending``: kernels are resolved when the weights reach a real device).
        alignment: rows each token group must start at for the recipe (None: any).
        incoming_alignment: what the caller guarantees (None: packed groups, or given
            per call by moeq.MoE and the EP dispatch).
        routes_tokens: the module's forward takes routed tokens and lays them out
            aligned in its permute (transformers families): it never pads separately.
        pads: the experts pad token groups before their GEMMs (and unpad after).
        padding: who pads, in words.
        fused: the whole-SwiGLU fused kernel the forward takes, or None.
        per_gemm: the kernel of each single grouped GEMM (for bf16 the registry's
            ``torch._grouped_mm`` kernel); None only while ``pending``.
        gemms: every GEMM with its kernel and why.
        emulated: how the recipe's numerics are emulated here, or None.
        faster: the faster options where the chosen path emulates, or None.
        pending: made on the meta device; kernels are resolved on a real one.
        unfused_dtype: the device runs a fused experts kernel, but not in ``dtype``
            (float16/float32 weights): the module runs per GEMM.
    """

    recipe: QuantizationType
    kernel_choice: str
    device: torch.device
    dtype: torch.dtype
    alignment: Optional[int]
    incoming_alignment: Optional[int]
    routes_tokens: bool
    pads: bool
    padding: str
    fused: Optional[GroupedMMKernel]
    per_gemm: Optional[GroupedMMKernel]
    gemms: Tuple[GemmPlan, ...]
    emulated: Optional[str]
    faster: Optional[str]
    pending: bool = False
    unfused_dtype: bool = False

    def matches(self, weight: torch.Tensor) -> bool:
        """True when the plan was made for ``weight``'s device and dtype."""
        return self.device == weight.device and self.dtype == weight.dtype

    def kernels(self) -> dict:
        """``{gemm: kernel name}``: the part of the plan that says what runs."""
        return {g.gemm: g.kernel for g in self.gemms}

    def describe(self) -> str:
        """The plan in a few lines (what ``moeq.plan`` prints per module)."""
        lines = [
            f"recipe {self.recipe.value}, kernel={self.kernel_choice!r}, on {self.device} {str(self.dtype).removeprefix('torch.')}",
            f"padding: {self.padding}",
        ]
        # GEMMs sharing kernel and reasons print as one line.
        runs: list = []
        for g in self.gemms:
            if runs and (runs[-1][0].kernel, runs[-1][0].why, runs[-1][0].emulated) == (g.kernel, g.why, g.emulated):
                runs[-1].append(g)
            else:
                runs.append([g])
        for run in runs:
            g = run[0]
            line = f"{', '.join(r.gemm for r in run)}: {g.kernel} ({g.why})"
            if g.emulated:
                line += f"; emulated: {g.emulated}"
            lines.append(line)
        if self.faster:
            lines.append(f"faster: {self.faster}")
        return "\n".join(lines)


def _padding_words(recipe: QuantizationType, alignment, incoming, routes_tokens: bool, pads: bool) -> str:
    if alignment is None:
        return f"none ({recipe.value} GEMMs take token groups of any size)"
    if routes_tokens:
        return f"none separate: the routed permute lays token groups out at multiples of {alignment} in one pass"
    if pads:
        return (
            f"the experts pad each token group to a multiple of {alignment} before the GEMMs and unpad after; "
            f"callers that hand over groups aligned to {alignment} (moeq.MoE, moeq's EP dispatch) skip it"
        )
    return f"the caller hands over groups at multiples of {incoming} (>= {alignment}): the experts do not pad"


_PER_GEMM_NAMES = ("gate_up forward", "down forward", "input gradients (dgrad)", "weight gradients (wgrad)")


def build_plan(
    recipe: QuantizationType,
    kernel: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    incoming_alignment: Optional[int] = None,
    swiglu: bool = True,
    routes_tokens: bool = False,
) -> ExpertsPlan:
    """Make the plan of an experts module (the one place kernels are resolved for one).

    Args:
        recipe: a QuantizationType (parsed by the caller, once). kernel: the user's choice.
        device, dtype: of the module's expert weights.
        incoming_alignment: what the caller guarantees about token groups (None: packed).
        swiglu: the module computes plain SwiGLU experts (the fused kernels cover it);
            False for biases or other activations (per-GEMM kernels only).
        routes_tokens: see :class:`ExpertsPlan`.
    Raises:
        ValueError: unknown kernel. RuntimeError: a kernel that cannot run here (names
            the ones that can).
    """
    check_kernel_choice(kernel)
    if kernel != KERNEL_AUTO and recipe is not QuantizationType.BF16:
        chosen = get_kernel(kernel)
        if chosen.fused and not _fused_takes(chosen, dtype):
            takes = " or ".join(sorted(str(d).removeprefix("torch.") for d in chosen.dtypes))
            raise TypeError(
                f"kernel={kernel!r} ({recipe.value} fused Hopper experts) takes {takes} activations, got {dtype}: "
                f"cast the model to {takes}, or use kernel='auto' (per-GEMM kernels in {dtype})"
            )
    device = torch.device(device)
    alignment = GROUP_ALIGNMENT[recipe]
    pads = pads_for(alignment, incoming_alignment) and not routes_tokens
    padding = _padding_words(recipe, alignment, incoming_alignment, routes_tokens, pads)
    common = dict(
        recipe=recipe, kernel_choice=kernel, device=device, dtype=dtype, alignment=alignment,
        incoming_alignment=incoming_alignment, routes_tokens=routes_tokens, pads=pads, padding=padding,
    )
    if device.type == "meta":
        why = "resolved when the weights reach a real device"
        gemms = tuple(GemmPlan(g, "(pending)", why) for g in _PER_GEMM_NAMES)
        return ExpertsPlan(**common, fused=None, per_gemm=None, gemms=gemms, emulated=None, faster=None, pending=True)
    if recipe is QuantizationType.BF16:
        # No quantization: torch._grouped_mm, through the registry's bf16 kernel where a
        # path goes through the grouped-GEMM op (its slack-row contract).
        per_gemm = select_kernel(kernel if _runs_bf16(kernel) else KERNEL_AUTO, recipe, device)
        gemms = tuple(GemmPlan(g, BF16_GEMM, "the bf16 recipe quantizes nothing") for g in _PER_GEMM_NAMES)
        return ExpertsPlan(**common, fused=None, per_gemm=per_gemm, gemms=gemms, emulated=None, faster=None)
    resolved = resolve_experts_kernels(kernel, recipe, device)
    fused = resolved.fused if swiglu else None
    unfused_dtype = fused is not None and not _fused_takes(fused, dtype)
    if unfused_dtype:
        fused = None
    per_gemm = resolved.per_gemm
    gemm_emulated = per_gemm.reason_emulated(recipe, device)
    gemm_note = "; its own backward computes both gradients" if per_gemm.grouped_mm is not None else ""
    if fused is not None:
        fused_emulated = fused.reason_emulated(recipe, device)
        gemms = (
            GemmPlan("SwiGLU experts (gate_up, down; forward and backward, fused)", fused.name,
                     resolved.fused_why, fused_emulated),
        )
        emulated, chosen = fused_emulated, fused
    else:
        why = resolved.per_gemm_why + gemm_note
        if not swiglu and resolved.fused is not None:
            why += f" (the fused {resolved.fused.name!r} kernel covers plain SwiGLU experts only)"
        if unfused_dtype:
            why += f" (the fused {resolved.fused.name!r} kernel does not take {str(dtype).removeprefix('torch.')})"
        gemms = tuple(GemmPlan(g, per_gemm.name, why, gemm_emulated) for g in _PER_GEMM_NAMES)
        emulated, chosen = gemm_emulated, per_gemm
    faster = faster_option(recipe, device, chosen) if emulated else None
    return ExpertsPlan(
        **common, fused=fused, per_gemm=per_gemm, gemms=gemms, emulated=emulated, faster=faster,
        unfused_dtype=unfused_dtype,
    )


def _fused_takes(kernel: GroupedMMKernel, weight_dtype: torch.dtype) -> bool:
    """Whether a fused kernel can run a module whose weights are ``weight_dtype``: one of
    its activation dtypes, or float32 (master weights; the activations decide per call)."""
    return kernel.dtypes is None or weight_dtype in kernel.dtypes or weight_dtype == torch.float32


def _runs_bf16(kernel: str) -> bool:
    if kernel == KERNEL_AUTO:
        return False
    k = get_kernel(kernel)
    return not k.fused and QuantizationType.BF16 in k.qtypes


def module_weight(module: torch.nn.Module) -> torch.Tensor:
    """The expert weight (local shard) whose device and dtype a converted module's plan is
    keyed on (its adapter's ``plan_weight``)."""
    return module.moeq_adapter.plan_weight(module)


def plan_module(module: torch.nn.Module, adapter, weight: torch.Tensor, recipe: QuantizationType, kernel: str,
                incoming_alignment: Optional[int], device: Optional[torch.device] = None) -> ExpertsPlan:
    """The plan of ``module`` (of ``adapter``'s family) for ``weight``'s device (or
    ``device``: what would run once the weights are there) and dtype."""
    return build_plan(
        recipe, kernel, weight.device if device is None else device, weight.dtype,
        incoming_alignment=incoming_alignment,
        swiglu=adapter.swiglu(module), routes_tokens=adapter.routes_tokens,
    )


def refresh_plan(module: torch.nn.Module, weight: Optional[torch.Tensor] = None) -> ExpertsPlan:
    """Make a converted module's plan again for its weights' current device and dtype,
    store it on the module and return it."""
    weight = module_weight(module) if weight is None else weight
    plan = plan_module(module, module.moeq_adapter, weight, module.moeq_recipe, module.moeq_kernel,
                       module.moeq_incoming_alignment)
    module.__dict__[PLAN_ATTR] = plan
    return plan


def module_plan(module: torch.nn.Module, weight: Optional[torch.Tensor] = None) -> ExpertsPlan:
    """A converted module's plan: the stored one, remade only if its weights moved to
    another device or dtype since. ``weight``: the adapter's ``plan_weight`` if the
    caller already holds it."""
    weight = module_weight(module) if weight is None else weight
    plan = module.__dict__.get(PLAN_ATTR)
    if plan is not None and plan.device == weight.device and plan.dtype == weight.dtype:
        return plan
    return refresh_plan(module, weight)


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """One experts module of a model and its plan."""

    fqn: str
    family: str
    plan: ExpertsPlan


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """The plans of a model's experts modules (``moeq.plan(model, recipe)`` before
    conversion; ``model.moeq_plan`` after ``moeq.convert_model``).

    Attributes:
        recipe, kernel: what was asked for (None: read from converted modules).
        modules: one :class:`ModulePlan` per experts module, in ``named_modules`` order.
    """

    recipe: Optional[QuantizationType]
    kernel: Optional[str]
    modules: Tuple[ModulePlan, ...]

    def __getitem__(self, fqn: str) -> ExpertsPlan:
        for m in self.modules:
            if m.fqn == fqn:
                return m.plan
        raise KeyError(f"no experts module {fqn!r} in this plan: it has {[m.fqn for m in self.modules]}")

    def __len__(self) -> int:
        return len(self.modules)

    def fqns(self) -> Tuple[str, ...]:
        """The experts modules' names."""
        return tuple(m.fqn for m in self.modules)

    def summary(self) -> dict:
        """``{fqn: (recipe, {gemm: kernel}, pads)}``: which modules, what runs, who pads."""
        return {m.fqn: (m.plan.recipe.value, m.plan.kernels(), m.plan.pads) for m in self.modules}

    def __str__(self) -> str:
        if not self.modules:
            return "no experts modules"
        # Modules with one plan print it once: a model's layers usually share it.
        groups: dict = {}
        for m in self.modules:
            key = (m.family, m.plan.describe())
            groups.setdefault(key, []).append(m.fqn or "<root>")
        out = []
        for (family, described), fqns in groups.items():
            names = ", ".join(fqns) if len(fqns) <= 4 else f"{', '.join(fqns[:2])}, ... {fqns[-1]} ({len(fqns)} modules)"
            out.append(f"{names} [{family}]")
            out.extend("  " + line for line in described.splitlines())
        return "\n".join(out)


__all__ = [
    "BF16_GEMM",
    "ExpertsPlan",
    "GemmPlan",
    "ModelPlan",
    "ModulePlan",
    "KERNEL_AUTO",
    "PLAN_ATTR",
    "build_plan",
    "module_plan",
    "plan_module",
    "refresh_plan",
]
