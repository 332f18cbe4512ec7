"""Experts-module adapters, one per family, and the registry ``convert_model`` asks.

| module | families |
|---|---|
| ``moeq.integrations.native`` | moeq's own ``GroupedExperts`` (also inside ``moeq.MoE``) |
| ``moeq.integrations.transformers.experts`` | transformers 5.x ``@use_experts_implementation`` experts |
| ``moeq.integrations.transformers.stacked`` | transformers Step 3.7 and LongCat-Flash experts (stacked weights, no flags) |
| ``moeq.integrations.transformers.llama4`` | transformers Llama 4 MoE block (dense experts routed sparsely) |
| ``moeq.integrations.transformers.dbrx`` | transformers DBRX experts (flat per-expert weights) |
| ``moeq.integrations.transformers.module_lists`` | transformers Switch Transformers and NLLB-MoE experts (a module per expert) |
| ``moeq.integrations.transformers.jetmoe`` | transformers JetMoE ``JetMoeParallelExperts`` (one grouped linear) |
| ``moeq.integrations.torchtitan.experts`` | torchtitan 0.3 ``GroupedExperts`` and ``GptOssGroupedExperts``, 0.2.x ``GroupedExperts`` |

``moeq.integrations.transformers.interface`` registers moeq in transformers' own
experts switch (``experts_implementation="moeq_mxfp8"``); it sits above
``moeq.convert``, and nothing here imports it.

The interface is :class:`moeq.integrations.base.ExpertsAdapter`. To support a new family,
write its adapter next to its framework's others and add an instance to ``ADAPTERS``
(before any more generic adapter its modules would also match). docs/design.md has the
checklist.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

from moeq.integrations.base import ExpertsAdapter
from moeq.integrations.native import MOEQ_EXPERTS
from moeq.integrations.torchtitan.experts import TORCHTITAN_ADAPTERS, unknown_torchtitan_experts
from moeq.integrations.transformers.experts import TRANSFORMERS_EXPERTS, unsupported_transformers_experts
from moeq.integrations.transformers.dbrx import DBRX_EXPERTS
from moeq.integrations.transformers.jetmoe import JETMOE_EXPERTS
from moeq.integrations.transformers.llama4 import LLAMA4_MOE
from moeq.integrations.transformers.module_lists import NLLB_MOE_EXPERTS, SWITCH_TRANSFORMERS_EXPERTS
from moeq.integrations.transformers.stacked import LONGCAT_FLASH_EXPERTS, STEP3P7_EXPERTS

# transformers families without @use_experts_implementation (matched by class name).
TRANSFORMERS_FAMILY_ADAPTERS: Tuple[ExpertsAdapter, ...] = (
    LLAMA4_MOE,
    DBRX_EXPERTS,
    JETMOE_EXPERTS,
    SWITCH_TRANSFORMERS_EXPERTS,
    NLLB_MOE_EXPERTS,
    LONGCAT_FLASH_EXPERTS,
    STEP3P7_EXPERTS,
)

# First match wins: specific families before generic ones.
ADAPTERS: Tuple[ExpertsAdapter, ...] = (
    MOEQ_EXPERTS,
    *TORCHTITAN_ADAPTERS,
    *TRANSFORMERS_FAMILY_ADAPTERS,
    TRANSFORMERS_EXPERTS,
)


def find_adapter(module: nn.Module) -> Optional[ExpertsAdapter]:
    """The adapter of ``module``'s family (converted or not), or None if it is no experts module."""
    adapter = getattr(type(module), "moeq_adapter", None)
    if adapter is not None:
        return adapter
    return next((a for a in ADAPTERS if a.matches(module)), None)


def unsupported_experts(module: nn.Module) -> Optional[str]:
    """Why ``module``, an experts module of a known framework but of no adapter's layout,
    cannot be converted (convert_model raises rather than skip it); None otherwise."""
    return unknown_torchtitan_experts(module) or unsupported_transformers_experts(module)


def family_names() -> str:
    """The families moeq converts, for messages."""
    return ", ".join(a.family for a in ADAPTERS)


__all__ = ["ADAPTERS", "ExpertsAdapter", "family_names", "find_adapter", "unsupported_experts"]
