"""Adapters for transformers experts kept as a module per expert: Switch Transformers'
``SwitchTransformersExperts`` and NLLB-MoE's ``NllbMoeExperts`` (``nn.ModuleDict`` of
``expert_{i}``, each a two-layer ``DenseActDense`` MLP: Linear, activation, dropout,
Linear).

The converted forward keeps the module's call and its routing (both routers drop tokens
past an expert's capacity: those copies get weight zero), stacks the experts' weights
into (E, N, K) tensors per call (their gradients flow back to each expert's own
parameters; ``moeq.quantized_weight_cache`` does not apply), routes once to the recipe's
padded layout and runs two grouped GEMMs with the experts' biases, activation and
dropout.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from moeq.ops import padding as _padding
from moeq.experts.swiglu import group_end_offsets
from moeq.integrations.base import ExpertsAdapter
from moeq.experts.plan import module_plan
from moeq.integrations.transformers.grouped_layers import grouped_linear, routed_experts, row_experts
from moeq.integrations.transformers.experts import EP_ONLY_DECORATED, is_transformers_class
from moeq.experts.padding_policy import local_tensor as _local


class _ModuleListAdapter(ExpertsAdapter):
    """Experts ``module[f"expert_{i}"]`` (i < ``module.num_experts``), each with linear
    layers ``linear_in`` (D -> F) and ``linear_out`` (F -> D), ``act`` and ``dropout``."""

    expert_parallel_unsupported = EP_ONLY_DECORATED
    routes_tokens = True
    experts_class = ""
    linear_in, linear_out = "", ""

    def matches(self, module: nn.Module) -> bool:
        return is_transformers_class(module, self.experts_class) and hasattr(module, "num_experts")

    def experts(self, module: nn.Module) -> List[nn.Module]:
        return [module[f"expert_{i}"] for i in range(module.num_experts)]

    def unconvertible(self, module: nn.Module) -> Optional[str]:
        experts = self.experts(module)
        first = experts[0]
        for i, e in enumerate(experts[1:], 1):
            if type(e) is not type(first) or type(e.act) is not type(first.act) or any(
                getattr(e, n).weight.shape != getattr(first, n).weight.shape
                or (getattr(e, n).bias is None) != (getattr(first, n).bias is None)
                for n in (self.linear_in, self.linear_out)
            ):
                return (
                    f"its expert_{i} differs from expert_0 in class, activation, shapes or biases; moeq's grouped "
                    f"GEMMs run experts of one layout"
                )
        return None

    def dims(self, module: nn.Module) -> Dict[str, int]:
        hidden, dim = getattr(self.experts(module)[0], self.linear_in).weight.shape
        return {"dim": dim, "hidden_dim": hidden}

    def local_weights(self, module: nn.Module) -> Dict[str, Tensor]:
        out = {}
        for i, e in enumerate(self.experts(module)):
            for layer in (self.linear_in, self.linear_out):
                for name, p in getattr(e, layer).named_parameters():
                    out[f"expert_{i}.{layer}.{name}"] = _local(p)
        return out

    def stacked(self, module: nn.Module, layer: str) -> Tuple[Tensor, Optional[Tensor]]:
        """(E, N, K) weight and (E, N) bias (or None) of every expert's ``layer``."""
        linears = [getattr(e, layer) for e in self.experts(module)]
        weight = torch.stack([_local(lin.weight) for lin in linears])
        bias = None if linears[0].bias is None else torch.stack([_local(lin.bias) for lin in linears])
        return weight, bias

    def expert_math(self, module: nn.Module, grouped: Tensor, offs: Tensor) -> Tensor:
        """The experts' MLP on grouped rows (groups aligned for the recipe). Returns
        (M, D); padding and slack rows hold arbitrary values (never combined)."""
        plan = module_plan(module)
        first = self.experts(module)[0]
        w_in, b_in = self.stacked(module, self.linear_in)
        w_out, b_out = self.stacked(module, self.linear_out)
        ids = row_experts(offs, grouped.shape[0]) if b_in is not None or b_out is not None else None
        h = grouped_linear(grouped, w_in, offs, plan, bias=b_in, expert_ids=ids)
        h = first.dropout(first.act(h))
        return grouped_linear(h, w_out, offs, plan, bias=b_out, expert_ids=ids)


class SwitchTransformersExpertsAdapter(_ModuleListAdapter):
    """``SwitchTransformersExperts(hidden_states (T, D), selected_experts (T, K, E)
    one-hot dispatch mask (all zero for a token dropped at capacity), routing_weights
    (T, K))``; experts ``wi`` / ``wo`` without biases."""

    family = "transformers SwitchTransformersExperts"
    experts_class = "SwitchTransformersExperts"
    linear_in, linear_out = "wi", "wo"

    def forward(self, module, hidden_states: Tensor, selected_experts: Tensor, routing_weights: Tensor) -> Tensor:
        """Returns (T, D) in hidden_states.dtype."""
        chosen = selected_experts.argmax(dim=-1)  # (T, K); a dropped copy goes anywhere with weight 0
        kept = selected_experts.amax(dim=-1) > 0
        weights = routing_weights * kept.to(routing_weights.dtype)
        math = functools.partial(self.expert_math, module)
        return routed_experts(hidden_states, chosen, weights, module.num_experts, module_plan(module), math)


class NllbMoeExpertsAdapter(_ModuleListAdapter):
    """``NllbMoeExperts(hidden_states (T, D), router_mask (T, K) expert ids,
    router_probs (T, K))``; experts ``fc1`` / ``fc2`` with biases; the weighted outputs
    pass ``moe_token_dropout`` (dropout in training, scaled by 1 - p in eval).

    As the module's own forward does, ``router_mask[t, j]`` is the expert of token t's
    j-th copy. (transformers 5.24's ``NllbMoeSparseMLP`` passes the router's top-1
    one-hot mask here, so only experts 0 and 1 ever run; moeq keeps that behavior.)"""

    family = "transformers NllbMoeExperts"
    experts_class = "NllbMoeExperts"
    linear_in, linear_out = "fc1", "fc2"

    def forward(self, module, hidden_states: Tensor, router_mask: Tensor, router_probs: Tensor) -> Tensor:
        """Returns (T, D) in hidden_states.dtype."""
        plan, p = module_plan(module), module.moe_token_dropout
        math = functools.partial(self.expert_math, module)
        if p <= 0 or not module.training:
            # in eval the dropout is a scaling, folded into the combine's weights
            weights = router_probs if p <= 0 else router_probs * (1 - p)
            return routed_experts(hidden_states, router_mask, weights, module.num_experts, plan, math)
        # training: dropout acts on each weighted copy before the sum
        tokens, k = router_mask.shape
        align = plan.alignment
        grouped, counts, layout = _padding.permute_and_pad(hidden_states, router_mask, module.num_experts, align)
        out = math(grouped, group_end_offsets(counts, align))[layout.dest_rows.long()]
        out = module.token_dropout(out * router_probs.reshape(-1, 1).to(out.dtype))
        out = out.reshape(tokens, k, -1).sum(dim=1)
        return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


SWITCH_TRANSFORMERS_EXPERTS = SwitchTransformersExpertsAdapter()
NLLB_MOE_EXPERTS = NllbMoeExpertsAdapter()
