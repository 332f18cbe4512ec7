"""Adapter for JetMoE's experts (transformers ``JetMoeParallelExperts``).

JetMoE builds its MoE feed-forward (``JetMoeMoE``: input_linear, activation,
output_linear) and its mixture of attention heads (``JetMoeMoA``: query and output
projections) from ``JetMoeParallelExperts``: one grouped linear layer, ``weight`` (E, N, K),
called as ``experts(inputs (M, K) rows in expert order, expert_size)`` with the group
sizes as a list of ints (JetMoE's router reads them on the host). Every one of them is
converted: one grouped GEMM in the recipe, its groups padded for the recipe (and the
output unpadded) only when the recipe needs it (moeq.experts.padding_policy).
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import torch
from torch import Tensor, nn

from moeq.experts.gemms import align_token_groups, restore_token_groups
from moeq.integrations.base import ExpertsAdapter
from moeq.experts.plan import module_plan
from moeq.integrations.transformers.grouped_layers import grouped_linear
from moeq.integrations.transformers.experts import EP_ONLY_DECORATED, is_transformers_class
from moeq.experts.padding_policy import local_tensor as _local


class JetMoeExpertsAdapter(ExpertsAdapter):
    """``JetMoeParallelExperts`` (weight (num_experts, output_size, input_size))."""

    family = "transformers JetMoeParallelExperts"
    expert_parallel_unsupported = EP_ONLY_DECORATED

    def matches(self, module: nn.Module) -> bool:
        return is_transformers_class(module, "JetMoeParallelExperts") and hasattr(module, "weight")

    def dims(self, module: nn.Module) -> Dict[str, int]:
        return {"input_size": module.input_size, "output_size": module.output_size}

    def local_weights(self, module: nn.Module) -> Dict[str, Tensor]:
        return {"weight": _local(module.weight)}

    def forward(self, module, inputs: Tensor, expert_size: Union[Sequence[int], Tensor]) -> Tensor:
        """Args: inputs (M, input_size) rows in expert order; expert_size: E group sizes
        (ints or an (E,) integer tensor) summing to M. Returns (M, output_size) in
        inputs.dtype."""
        plan = module_plan(module)
        counts = torch.as_tensor(expert_size, dtype=torch.int64, device=inputs.device)
        aligned = align_token_groups(inputs, counts, plan, plan.incoming_alignment)
        out = grouped_linear(aligned.x, _local(module.weight), aligned.offs, plan)
        return restore_token_groups(out, aligned)


JETMOE_EXPERTS = JetMoeExpertsAdapter()
