"""``moeq.convert_model``: swap routed experts to FP8 / MXFP8 / BF16 grouped GEMMs.

Conversion changes a module's class (to a subclass made by its family's adapter,
moeq/integrations/) and sets a few plain attributes; parameters, their dtypes and
state_dict keys are untouched, so checkpoints load both ways and optimizers built before
conversion keep working. The converted forward reads the module's parameters on every
call, so a parallelizer may still replace them (DTensor shards) afterwards.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from moeq.experts.converted import ConvertedExperts
from moeq.integrations import family_names, find_adapter, unsupported_experts
from moeq.experts.plan import PLAN_ATTR, ModelPlan, ModulePlan, module_plan
from moeq.integrations.conversion import (
    check_convertible,
    check_dims,
    check_dtypes,
    convert_experts_module,
    parent_module,
    plan_experts_module,
    unconvert_experts_module,
)
from moeq.numerics.recipes import QuantizationType, RecipeLike, parse_recipe
from moeq.ops.registry import check_kernel_choice
from moeq.numerics.validation import check_convert_args

FilterLike = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

__all__ = [
    "ConvertedExperts",
    "FilterLike",
    "check_convertible",
    "check_dims",
    "check_dtypes",
    "check_kernel",
    "convert_experts_module",
    "convert_found",
    "convert_model",
    "find_experts",
    "parent_module",
    "plan",
    "plan_found",
    "unconvert_experts_module",
]

def check_kernel(kernel: str) -> str:
    """Return ``kernel`` if convert_model knows it ("auto" or a registered kernel), else
    raise ValueError naming the choices."""
    return check_kernel_choice(kernel)


def _matches(fqn: str, module: nn.Module, filter_fqns: FilterLike) -> bool:
    if filter_fqns is None:
        return True
    if callable(filter_fqns):
        return bool(filter_fqns(fqn, module))
    return any(f in fqn for f in filter_fqns)


def find_experts(model: nn.Module, filter_fqns: FilterLike = None):
    """The routed-experts modules of ``model`` that ``filter_fqns`` selects (see
    :func:`convert_model`), as ``[(fqn, module, adapter)]`` in ``named_modules`` order.

    Raises:
        TypeError: a selected module of a known framework's experts class but of no
            adapter's layout (named, with why).
    """
    found = []
    for fqn, module in model.named_modules():
        adapter = find_adapter(module)
        unsupported = unsupported_experts(module) if adapter is None else None
        # the filter is asked about experts modules only (a callable never sees the rest)
        if (adapter is None and not unsupported) or not _matches(fqn, module, filter_fqns):
            continue
        if unsupported:
            raise TypeError(
                f"convert_model cannot convert {fqn or '<root>'}: it is {unsupported}. Leave it out with filter_fqns."
            )
        found.append((fqn, module, adapter))
    return found


def convert_model(
    model: nn.Module,
    recipe: RecipeLike,
    *,
    filter_fqns: FilterLike = None,
    kernel: str = "auto",
    linears=False,
) -> nn.Module:
    """Swap every routed-experts module of ``model`` to the recipe's grouped GEMMs, in place.

    Finds the experts of every family in ``moeq.integrations.ADAPTERS``: moeq
    ``GroupedExperts`` (also inside ``moeq.MoE``), transformers 5.x experts modules
    (``@use_experts_implementation``: Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, GPT-OSS, ...)
    and torchtitan's (0.3 ``GroupedExperts`` and ``GptOssGroupedExperts``, 0.2.x
    ``GroupedExperts``). Routers, shared experts, attention and embeddings are left
    alone. Converting again to the same recipe is a no-op; converting to another recipe
    switches it. For torchtitan models, ``moeq.torchtitan`` converts at config time.

    Args:
        model: any nn.Module.
        recipe: ``"bf16"``, ``"fp8"``, ``"mxfp8"`` or a QuantizationType.
        filter_fqns: None (all experts), a substring of module FQNs to convert (a str
            is one substring), a list of them, or ``f(fqn, module) -> bool``.
        kernel: ``"auto"`` (fastest path the device runs), ``"emulated"`` (plain-torch
            quantization numerics, any device), ``"triton"`` (fused Hopper
            kernels; SM90 only), or a per-GEMM kernel from
            ``moeq.ops.registry.kernel_names()``.
        linears: also put the dense ``nn.Linear`` layers (attention projections, shared
            experts, dense MLPs) in the recipe, through torchao's own training linears:
            False (default: experts only), True (moeq's default choice: no lm_head,
            router gates, tied weights, odd dims, or linears too small to gain), or
            ``f(fqn, module) -> bool`` among those the safety skips leave. See
            ``moeq.integrations.torchao.linears.convert_linears``.
    Returns:
        ``model``, with ``model.moeq_converted_fqns`` listing the converted modules and
        ``model.moeq_plan`` (a ``ModelPlan``, what ``moeq.plan`` prints) their plans:
        every module keeps its own (``module.moeq_plan``), which its forward, backward
        and the EP dispatch read. When ``linears`` is not False, ``model.moeq_linears``
        (a ``LinearsPlan``) names each linear's torchao class or skip reason.
    Raises:
        ValueError: unknown recipe or kernel, nothing matched, or a dim not divisible by
            the recipe's alignment (names the module, the dim and the multiple).
        TypeError: an experts module of a layout moeq does not know or cannot convert
            (torchtitan's fused ``w13``, Doge's vector experts), an expert weight
            dtype moeq's GEMMs do not take (float64), or ``kernel="triton"`` on weights
            that are not bfloat16: each names the module and why.
        RuntimeError: a kernel that cannot run on the weights' device (names the ones
            that can).
    """
    qtype, found = _find_for(model, recipe, kernel, filter_fqns, "convert_model")
    if linears is not False:
        from moeq.integrations.torchao.linears import plan_linears

        plan_linears(model, qtype, linears, kernel=kernel)  # a bad ``linears`` fails before anything changes
    convert_found(model, found, qtype, kernel)
    if linears is not False:
        from moeq.integrations.torchao.linears import convert_linears

        convert_linears(model, qtype, linears, kernel=kernel)
    return model


def warn_unfused_dtypes(model_plan: ModelPlan) -> None:
    """Say at conversion, in one line, which modules the device's fused experts kernel
    cannot take because of their dtype (float16/float32 weights on SM90): they run the
    per-GEMM kernels (float16 through exact float32 copies)."""
    other = [(m.fqn or "<root>", m.plan.dtype) for m in model_plan.modules if m.plan.unfused_dtype]
    if other:
        q = model_plan.recipe.value
        dtypes = sorted({str(d).removeprefix("torch.") for _, d in other})
        warnings.warn(
            f"moeq: {len(other)} {q} experts module(s) ({other[0][0]}, ...) are {'/'.join(dtypes)}; the fused "
            f"SM90 {q} experts take bfloat16, so they run the per-GEMM kernels: model.to(torch.bfloat16) "
            f"for the fused ones",
            stacklevel=3,
        )


def _find_for(model, recipe, kernel, filter_fqns, who: str):
    filter_fqns = check_convert_args(model, filter_fqns)  # a str is one FQN substring
    qtype = parse_recipe(recipe)
    check_kernel(kernel)
    found = find_experts(model, filter_fqns)
    if not found:
        what = "routed-experts modules" if filter_fqns is None else f"experts modules matching filter_fqns={filter_fqns!r}"
        raise ValueError(f"{who} found no {what} in {type(model).__name__}: it converts {family_names()}")
    return qtype, found


def plan(
    model: nn.Module,
    recipe: Optional[RecipeLike] = None,
    *,
    kernel: str = "auto",
    filter_fqns: FilterLike = None,
    device: Optional[torch.device] = None,
) -> ModelPlan:
    """What ``convert_model(model, recipe, kernel=kernel, filter_fqns=...)`` would run, per
    experts module, without converting anything: the modules, the kernel of every GEMM on
    the weights' device (and why), who pads token groups, what runs with emulated
    numerics and the faster option where there is one. ``print()`` it.

    Args:
        model: any nn.Module. recipe: as :func:`convert_model`; None reports the plans
            of an already converted model (``model.moeq_plan``'s modules, current
            device). kernel, filter_fqns: as :func:`convert_model`.
        device: plan for this device instead of the weights' (e.g. a model built on
            the meta device, planned for ``cuda``); the plans conversion stores are
            always for the weights' device.
    Returns:
        A ``ModelPlan``: the same plans conversion stores (``model.moeq_plan``).
    Raises:
        As :func:`convert_model` (every check runs; nothing changes).
    """
    if recipe is None:
        converted = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, ConvertedExperts)]
        if not converted:
            raise ValueError(
                f"{type(model).__name__} has no converted experts: pass a recipe, e.g. moeq.plan(model, 'fp8')"
            )
        return ModelPlan(None, None, tuple(ModulePlan(fqn, m.moeq_adapter.family, module_plan(m)) for fqn, m in converted))
    qtype, found = _find_for(model, recipe, kernel, filter_fqns, "moeq.plan")
    for fqn, module, adapter in found:
        check_convertible(fqn, adapter, module, qtype)
    return plan_found(model, found, qtype, kernel, device)


def plan_found(
    model: nn.Module, found, qtype: QuantizationType, kernel: str, device: Optional[torch.device] = None
) -> ModelPlan:
    """The plans of the modules :func:`find_experts` returned (each checked already)."""
    modules = []
    for fqn, module, adapter in found:
        incoming = adapter.incoming_alignment(module, parent_module(model, fqn))
        entry = plan_experts_module(module, adapter, qtype, kernel, incoming, device)
        modules.append(ModulePlan(fqn, adapter.family, entry))
    return ModelPlan(qtype, kernel, tuple(modules))


def convert_found(model: nn.Module, found, qtype: QuantizationType, kernel: str) -> None:
    """Convert the modules :func:`find_experts` returned, all or none: every one is checked
    (:func:`check_convertible`) and planned before any changes. Sets
    ``model.moeq_converted_fqns`` and ``model.moeq_plan``."""
    for fqn, module, adapter in found:
        check_convertible(fqn, adapter, module, qtype)
    model_plan = plan_found(model, found, qtype, kernel)
    warn_unfused_dtypes(model_plan)
    for (fqn, module, adapter), entry in zip(found, model_plan.modules):
        convert_experts_module(
            module, qtype, kernel, adapter=adapter, fqn=fqn, incoming_alignment=entry.plan.incoming_alignment,
            plan=entry.plan,
        )
    model.moeq_converted_fqns = [fqn for fqn, _, _ in found]
    if not any(fqn == "" for fqn, _, _ in found):
        # (a root that is itself an experts module keeps its own ExpertsPlan there)
        setattr(model, PLAN_ATTR, model_plan)
