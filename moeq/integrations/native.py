"""Adapter for moeq's own ``GroupedExperts`` (also inside ``moeq.MoE``).

Its callers say per call how the token groups are laid out
(``forward(x, num_tokens_per_expert, group_alignment=a)``: moeq.MoE's permute-and-pad and
the EP dispatch pass the recipe's alignment), so nothing is read at conversion.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from moeq.experts.converted import ConvertedExperts
from moeq.experts.gemms import grouped_swiglu_experts, routed_swiglu_experts
from moeq.experts.plan import module_plan
from moeq.nn.experts import GroupedExperts
from moeq.integrations.base import ExpertsAdapter, local_parameters
from moeq.experts.padding_policy import local_tensor as _local
from moeq.numerics.recipes import QuantizationType
from moeq.numerics.validation import check_counts, check_counts_values
from moeq.experts.weight_cache import module_weight_cache


class QuantizedGroupedExperts(ConvertedExperts, GroupedExperts):
    """moeq.GroupedExperts whose GEMMs follow ``moeq_recipe``; pads only when needed."""

    def _experts(self, x, num_tokens_per_expert, group_alignment, *, validate_counts: bool):
        # GroupedExperts.forward's body (its contract; see moeq.experts.padding_policy for padding):
        # the same checks, count values skipped only for counts moeq made itself
        # (moeq.nn.experts.run_on_trusted_counts)
        w13, w2 = _local(self.gate_up_proj), _local(self.down_proj)
        plan = module_plan(self, w13)
        if plan.recipe is QuantizationType.BF16:
            return super()._experts(x, num_tokens_per_expert, group_alignment, validate_counts=validate_counts)
        if validate_counts:
            # (the quantized GEMMs allow float32 master weights with bf16 tokens, so no dtype
            # equality check here; the recipe's kernels check their own operands)
            check_counts("num_tokens_per_expert", num_tokens_per_expert, w13.shape[0], x)
            check_counts_values("num_tokens_per_expert", num_tokens_per_expert, x.shape[0], group_alignment)
        return grouped_swiglu_experts(
            x, w13, w2, num_tokens_per_expert, plan,
            incoming_alignment=group_alignment, weight_cache=module_weight_cache(self),
        )

    def routed_forward(self, tokens, expert_indices, expert_weights):
        """Same contract as :meth:`GroupedExperts.routed_forward`, in ``moeq_recipe``."""
        w13, w2 = _local(self.gate_up_proj), _local(self.down_proj)
        plan = module_plan(self, w13)
        if plan.recipe is QuantizationType.BF16:
            return super().routed_forward(tokens, expert_indices, expert_weights)
        return routed_swiglu_experts(
            tokens, expert_indices, expert_weights, w13, w2, plan, weight_cache=module_weight_cache(self),
        )


class MoeqExpertsAdapter(ExpertsAdapter):
    """moeq.GroupedExperts (gate_up_proj (E, 2H, D), down_proj (E, D, H))."""

    family = "moeq.GroupedExperts"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, GroupedExperts)

    def dims(self, module: nn.Module) -> Dict[str, int]:
        return {"dim": module.dim, "hidden_dim": module.hidden_dim}

    def local_weights(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        return local_parameters(module, ("gate_up_proj", "down_proj"))

    def swiglu(self, module: nn.Module) -> bool:
        return True

    def plan_weight(self, module: nn.Module) -> torch.Tensor:
        return _local(module.gate_up_proj)

    def forward(self, module, x, num_tokens_per_expert, *, group_alignment=None):
        return QuantizedGroupedExperts.forward(module, x, num_tokens_per_expert, group_alignment=group_alignment)

    def converted_class(self, cls: type) -> type:
        # Every GroupedExperts (ShardedGroupedExperts included) becomes the one quantized
        # class: its forward computes on the local shard as GroupedExperts' does.
        return QuantizedGroupedExperts


MOEQ_EXPERTS = MoeqExpertsAdapter()
QuantizedGroupedExperts.moeq_adapter = MOEQ_EXPERTS
