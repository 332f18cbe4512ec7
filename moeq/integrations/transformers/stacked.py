"""Adapters for transformers experts with stacked (E, 2I, D) / (E, D, I) weights but no
``@use_experts_implementation`` flags: Step 3.7's ``Step3p7Experts`` and LongCat-Flash's
``LongcatFlashExperts`` (with zero-compute identity experts).

Both are called like the generic transformers experts, ``experts(hidden_states (T, D),
top_k_index (T, k), top_k_weights (T, k))``, and convert through the generic adapter's
path: one ``permute_and_pad`` straight to the recipe's layout, so they never pad again.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from moeq.experts.gemms import routed_swiglu_experts
from moeq.experts.plan import module_plan
from moeq.integrations.base import is_silu
from moeq.integrations.transformers.grouped_layers import gated_experts, routed_experts
from moeq.integrations.transformers.experts import EP_ONLY_DECORATED, TransformersExpertsAdapter, is_transformers_class
from moeq.experts.padding_policy import local_tensor as _local
from moeq.numerics.groups import row_group_ids
from moeq.experts.weight_cache import module_weight_cache


class Step3p7ExpertsAdapter(TransformersExpertsAdapter):
    """Step 3.7 ``Step3p7Experts``: SwiGLU with an optional clamp (``limit``: the gate
    clamped above, the up projection to [-limit, limit]). Unclamped experts (limit None or inf)
    take the fused SwiGLU path; clamped ones run per GEMM with their own ``_apply_gate``."""

    family = "transformers Step3p7Experts"
    expert_parallel_unsupported = EP_ONLY_DECORATED

    def matches(self, module: nn.Module) -> bool:
        return is_transformers_class(module, "Step3p7Experts") and hasattr(module, "gate_up_proj")

    def is_plain_swiglu(self, module: nn.Module) -> bool:
        # transformers 5.25 writes no clamp as limit=None (earlier releases: inf)
        limit = getattr(module, "limit", None)
        return is_silu(module.act_fn) and (limit is None or math.isinf(limit))


class LongcatFlashExpertsAdapter(TransformersExpertsAdapter):
    """LongCat-Flash ``LongcatFlashExperts``: ``n_routed_experts`` SwiGLU experts
    (``gate_up_proj`` has a row block per expert of all ``total_experts``, of which the
    first ``num_routed_experts`` are used) plus ``zero_expert_num`` identity experts
    (ids ``>= num_routed_experts``: the token, times its routing weight).

    The identity experts' copies join one extra group after the real experts: the GEMMs
    see only the real groups, and the identity rows pass through as they are."""

    family = "transformers LongcatFlashExperts"
    expert_parallel_unsupported = EP_ONLY_DECORATED

    def matches(self, module: nn.Module) -> bool:
        return is_transformers_class(module, "LongcatFlashExperts") and hasattr(module, "num_routed_experts")

    def unconvertible(self, module: nn.Module) -> Optional[str]:
        if module.gate_up_proj is None or module.num_routed_experts == 0:
            return "it has no routed experts (n_routed_experts=0), only zero-compute identity experts: no GEMM to convert"
        return None

    def dims(self, module: nn.Module) -> Dict[str, int]:
        if module.down_proj is None:
            return {}
        _, d, i = module.down_proj.shape
        return {"dim": d, "hidden_dim": i}

    def is_plain_swiglu(self, module: nn.Module) -> bool:
        return module.zero_expert_num == 0 and is_silu(module.act_fn)

    def swiglu(self, module: nn.Module) -> bool:
        # the identity experts' rows are zeroed for the SwiGLU GEMMs, which may still fuse
        return is_silu(module.act_fn)

    def forward(self, module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """Args: hidden_states (T, D); top_k_index (T, k) ids in [0, total_experts);
        top_k_weights (T, k). Returns (T, D) in hidden_states.dtype."""
        if top_k_index.numel() == 0:
            return torch.zeros_like(hidden_states)
        num_routed = module.num_routed_experts
        plan = module_plan(module)
        gate_up = _local(module.gate_up_proj)[:num_routed]
        down = _local(module.down_proj)
        if module.zero_expert_num == 0 and is_silu(module.act_fn):
            return routed_swiglu_experts(
                hidden_states, top_k_index, top_k_weights, gate_up, down, plan,
                weight_cache=module_weight_cache(module),
            )

        def expert_math(grouped: Tensor, offs_all: Tensor) -> Tensor:
            offs = offs_all[:num_routed]  # the identity group's rows are slack to the GEMMs...
            identity = (row_group_ids(offs, grouped.shape[0]) == num_routed).unsqueeze(-1)
            zero = torch.zeros((), dtype=grouped.dtype, device=grouped.device)
            # ...and zero there, as slack rows are in every layout moeq's kernels get
            out = gated_experts(torch.where(identity, zero, grouped), offs, gate_up, down, module.act_fn, plan,
                                weight_cache=module_weight_cache(module))
            return torch.where(identity, grouped.to(out.dtype), out)

        # every identity expert id becomes the one extra group num_routed
        indices = top_k_index.clamp(max=num_routed)
        return routed_experts(hidden_states, indices, top_k_weights, num_routed + 1, plan, expert_math)


STEP3P7_EXPERTS = Step3p7ExpertsAdapter()
LONGCAT_FLASH_EXPERTS = LongcatFlashExpertsAdapter()
