"""Adapter for DBRX's experts (transformers ``DbrxExperts``).

DBRX keeps its experts flat in ``experts.mlp`` (``DbrxExpertGLU``): ``w1`` (gate), ``v1``
(up) and ``w2`` (down), each (E * I, D), expert e's rows ``[e*I, (e+1)*I)``; the down
projection computes ``h @ w2_e`` (so ``w2`` is the transpose of moeq's (E, D, I)). The
converted forward keeps the module's call, ``experts(hidden_states, top_k_index,
top_k_weights)``, views the weights per expert and brings them to moeq's layout
(``cat(w1, v1)`` (E, 2I, D), ``w2`` transposed (E, D, I): copies made per call, so
``moeq.quantized_weight_cache`` does not apply), then routes once to the recipe's layout.
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


class DbrxExpertsAdapter(ExpertsAdapter):
    """``DbrxExperts`` (mlp.w1 / mlp.v1 / mlp.w2 (E * I, D), ``mlp.activation_fn``)."""

    family = "transformers DbrxExperts"
    routes_tokens = True
    expert_parallel_unsupported = EP_ONLY_DECORATED

    def matches(self, module: nn.Module) -> bool:
        return is_transformers_class(module, "DbrxExperts") and hasattr(module, "mlp")

    def dims(self, module: nn.Module) -> Dict[str, int]:
        return {"dim": module.hidden_size, "hidden_dim": module.ffn_hidden_size}

    def local_weights(self, module: nn.Module) -> Dict[str, Tensor]:
        return {f"mlp.{n}": _local(getattr(module.mlp, n)) for n in ("w1", "v1", "w2")}

    def swiglu(self, module: nn.Module) -> bool:
        return is_silu(module.mlp.activation_fn)

    def forward(self, module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """Args: hidden_states (B, S, D) or (T, D); top_k_index, top_k_weights (T, k).
        Returns (B, S, D) (``(T, 1, D)`` for 2-D input), as ``DbrxExperts.forward``."""
        dim, hidden, num_experts = module.hidden_size, module.ffn_hidden_size, module.num_experts
        w = {n.removeprefix("mlp."): t.view(num_experts, hidden, dim) for n, t in self.local_weights(module).items()}
        gate_up = torch.cat([w["w1"], w["v1"]], dim=1)  # (E, 2I, D)
        down = w["w2"].transpose(1, 2).contiguous()  # (E, D, I)
        x = hidden_states.reshape(-1, dim)
        plan, act = module_plan(module), module.mlp.activation_fn
        if is_silu(act):
            out = routed_swiglu_experts(x, top_k_index, top_k_weights, gate_up, down, plan)
        else:
            out = routed_experts(
                x, top_k_index, top_k_weights, num_experts, plan,
                lambda grouped, offs: gated_experts(grouped, offs, gate_up, down, act, plan),
            )
        return out.view(hidden_states.shape[0], -1, dim)


DBRX_EXPERTS = DbrxExpertsAdapter()
