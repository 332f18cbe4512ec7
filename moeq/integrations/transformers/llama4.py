"""Adapter for Llama 4's MoE block (transformers ``Llama4TextMoe``).

transformers' Llama 4 runs its experts densely: ``Llama4TextExperts`` gets every token
once per expert, ``(E * T, D)`` rows scaled by the router score (zero for the experts a
token did not choose) and computes all of them. Converting that module alone would
quantize E/k times the useful work, so moeq converts the block: it asks the block's own
router, routes each token's top-k copies (input scaled by its score, as Llama 4 does)
straight to the recipe's padded layout, runs the experts' SwiGLU on those rows only and
adds the shared expert. The unchosen experts contributed exact zeros (no biases), so the
result is the dense computation's.

Weights stay where they are: ``experts.gate_up_proj`` (E, D, 2I) and
``experts.down_proj`` (E, I, D), transposed relative to moeq's layout; each forward
makes (E, 2I, D) / (E, D, I) copies for the GEMMs (so ``moeq.quantized_weight_cache``
does not apply).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from moeq.experts.gemms import routed_swiglu_experts
from moeq.experts.plan import module_plan
from moeq.integrations.base import ExpertsAdapter, is_silu
from moeq.integrations.transformers.grouped_layers import gated_experts, routed_experts
from moeq.integrations.transformers.experts import EP_ONLY_DECORATED, is_transformers_class
from moeq.experts.padding_policy import local_tensor as _local


class Llama4MoeAdapter(ExpertsAdapter):
    """``Llama4TextMoe``: router (top-k of sigmoid scores), ``Llama4TextExperts``
    (gate_up_proj (E, D, 2I), down_proj (E, I, D), ``act_fn``) and a shared expert."""

    family = "transformers Llama4TextMoe"
    routes_tokens = True
    expert_parallel_unsupported = EP_ONLY_DECORATED

    def matches(self, module: nn.Module) -> bool:
        return is_transformers_class(module, "Llama4TextMoe") and hasattr(module, "experts")

    def dims(self, module: nn.Module) -> Dict[str, int]:
        _, dim, two_i = module.experts.gate_up_proj.shape
        return {"dim": dim, "hidden_dim": two_i // 2}

    def local_weights(self, module: nn.Module) -> Dict[str, Tensor]:
        return {n: _local(getattr(module.experts, n)) for n in ("gate_up_proj", "down_proj")}

    def swiglu(self, module: nn.Module) -> bool:
        return is_silu(module.experts.act_fn)

    def forward(self, module, hidden_states: Tensor):
        """Args: hidden_states (..., D). Returns ((T, D) output in hidden_states.dtype,
        (T, E) router logits), as ``Llama4TextMoe.forward``."""
        x = hidden_states.reshape(-1, module.hidden_dim)
        router_scores, router_logits = module.router(x)  # (T, E): sigmoid scores, 0 off the top-k
        scores, chosen = router_scores.topk(module.top_k, dim=1)
        tokens, k = chosen.shape
        # Each (token, choice) is one routed row, its input scaled by the score.
        routed_in = (x.unsqueeze(1) * scores.unsqueeze(-1)).reshape(tokens * k, -1)
        experts = module.experts
        w = self.local_weights(module)
        gate_up = w["gate_up_proj"].transpose(1, 2).contiguous()  # (E, 2I, D)
        down = w["down_proj"].transpose(1, 2).contiguous()  # (E, D, I)
        plan = module_plan(module)
        one_choice = chosen.reshape(tokens * k, 1)
        if is_silu(experts.act_fn):
            ones = torch.ones((tokens * k, 1), dtype=routed_in.dtype, device=x.device)
            routed = routed_swiglu_experts(routed_in, one_choice, ones, gate_up, down, plan)
        else:
            routed = routed_experts(
                routed_in, one_choice, None, gate_up.shape[0], plan,
                lambda grouped, offs: gated_experts(grouped, offs, gate_up, down, experts.act_fn, plan),
            )
        out = module.shared_expert(x)
        out.add_(routed.reshape(tokens, k, -1).sum(dim=1))
        return out, router_logits


LLAMA4_MOE = Llama4MoeAdapter()
