"""Converting one experts module in place, and undoing it.

``moeq.convert_model`` (moeq/convert.py) walks a model and calls these per module; the
transformers registration (``experts_implementation="moeq_*"``) calls them for the
modules transformers asks about. They live at the integrations layer so both can.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moeq.experts.converted import ConvertedExperts
from moeq.experts.plan import PLAN_ATTR, ExpertsPlan, plan_module
from moeq.integrations.base import ExpertsAdapter, original_class
from moeq.numerics.recipes import QuantizationType, group_alignment
from moeq.ops.grouped_mm import INPUT_DTYPES


# Attributes a conversion sets on a module (ConvertedExperts' per-instance attributes).
_CONVERSION_ATTRS = ("moeq_recipe", "moeq_kernel", "group_alignment", "moeq_incoming_alignment", PLAN_ATTR)


def check_dims(fqn: str, adapter: ExpertsAdapter, module: nn.Module, qtype: QuantizationType) -> None:
    """Raise ValueError (naming the module, the dim and the multiple) if a contraction dim
    of ``module`` (``adapter.dims``) is not a multiple of the recipe's alignment."""
    multiple = group_alignment(qtype)
    if multiple is None:
        return
    for name, size in adapter.dims(module).items():
        if size % multiple:
            raise ValueError(
                f"cannot convert {fqn or '<root>'} to {qtype.value}: its {name} is {size}, not a multiple of "
                f"{multiple} (the {qtype.value} GEMMs need every contraction dim to be one). Leave this module "
                f"out with filter_fqns, or use recipe='bf16'."
            )


def check_dtypes(fqn: str, adapter: ExpertsAdapter, module: nn.Module, qtype: QuantizationType) -> None:
    """Raise TypeError (naming the module, the tensor, its dtype and the supported ones) if
    an expert weight of ``module`` (``adapter.local_weights``) has a dtype moeq's grouped
    GEMMs do not take (float64, ...): refused here rather than at the first
    forward. float16 is taken: quantized recipes quantize it through exact float32 copies."""
    for name, weight in adapter.local_weights(module).items():
        if weight.dtype not in INPUT_DTYPES:
            supported = " or ".join(str(d).removeprefix("torch.") for d in INPUT_DTYPES)
            raise TypeError(
                f"cannot convert {fqn or '<root>'} to {qtype.value}: its expert weight {name} is "
                f"{str(weight.dtype).removeprefix('torch.')}, and moeq's grouped GEMMs take {supported} weights. "
                f"Cast the model first (model.to(torch.bfloat16)), or leave this module out with filter_fqns."
            )


def check_convertible(fqn: str, adapter: ExpertsAdapter, module: nn.Module, qtype: QuantizationType) -> None:
    """Every check a conversion makes before changing anything: the family's own
    (``adapter.unconvertible``, TypeError), the dims (:func:`check_dims`, ValueError) and
    the weight dtypes (:func:`check_dtypes`, TypeError). Each error names the module."""
    reason = adapter.unconvertible(module)
    if reason:
        raise TypeError(f"cannot convert {fqn or '<root>'} ({type(module).__name__}): {reason}")
    check_dims(fqn, adapter, module, qtype)
    check_dtypes(fqn, adapter, module, qtype)


def parent_module(model: nn.Module, fqn: str) -> Optional[nn.Module]:
    """The module holding ``model``'s submodule ``fqn`` (None for the root itself)."""
    if not fqn:
        return None
    parent_fqn = fqn.rpartition(".")[0]
    return model.get_submodule(parent_fqn) if parent_fqn else model


def convert_experts_module(
    module: nn.Module,
    qtype: QuantizationType,
    kernel: str,
    *,
    adapter: ExpertsAdapter,
    fqn: str = "",
    incoming_alignment: Optional[int] = None,
    plan: Optional[ExpertsPlan] = None,
) -> nn.Module:
    """Convert one experts module in place (its family's adapter given).

    Args:
        module: an experts module ``adapter.matches``.
        qtype: the recipe. kernel: a kernel choice accepted by :func:`check_kernel`.
        fqn: its name, for messages.
        incoming_alignment: what its caller guarantees about the token groups it hands
            over (``adapter.incoming_alignment``), stored as ``moeq_incoming_alignment``.
        plan: the module's plan if the caller made it (:func:`plan_experts_module`);
            made here otherwise. Stored as ``moeq_plan``.
    Returns:
        ``module``, now an instance of ``adapter.converted_class(original class)``.
    Raises:
        ValueError: a contraction dim not divisible by the recipe's alignment.
        TypeError: an expert weight dtype moeq does not take, or a module its family
            cannot convert (``adapter.unconvertible``).
    """
    check_convertible(fqn, adapter, module, qtype)
    if plan is None:
        plan = plan_experts_module(module, adapter, qtype, kernel, incoming_alignment)
    module.__class__ = adapter.converted_class(original_class(module))
    module.moeq_recipe = qtype
    module.moeq_kernel = kernel
    module.group_alignment = group_alignment(qtype)
    module.moeq_incoming_alignment = incoming_alignment
    module.__dict__[PLAN_ATTR] = plan
    return module


def plan_experts_module(
    module: nn.Module,
    adapter: ExpertsAdapter,
    qtype: QuantizationType,
    kernel: str,
    incoming_alignment: Optional[int],
    device: Optional[torch.device] = None,
) -> ExpertsPlan:
    """The plan converting ``module`` to ``qtype`` with ``kernel`` gives it, for its expert
    weights' current device (or ``device``) and dtype (nothing is changed)."""
    return plan_module(module, adapter, adapter.plan_weight(module), qtype, kernel, incoming_alignment, device)


def unconvert_experts_module(module: nn.Module, fqn: str = "") -> nn.Module:
    """Undo :func:`convert_experts_module` in place: ``module`` gets its original class
    back and loses the conversion's attributes, so it computes exactly as before
    conversion (its parameters were never touched). A module that is not converted is
    returned as it is.

    Raises:
        RuntimeError: the module is sharded by ``moeq.apply_expert_parallel`` (its
            original forward cannot run on the shards).
    """
    if not isinstance(module, ConvertedExperts):
        return module
    if getattr(module, "moeq_expert_dispatcher", None) is not None:
        raise RuntimeError(
            f"cannot switch {fqn or '<root>'} back to its own implementation: moeq.apply_expert_parallel "
            f"sharded its experts, and only moeq's converted forward runs on the shards. Switch before "
            f"applying expert parallelism, or rebuild the model."
        )
    module.__class__ = original_class(module)
    for name in _CONVERSION_ATTRS:
        module.__dict__.pop(name, None)
    return module
