"""Expert parallelism setup for transformers 5.x experts modules converted by ``moeq.convert_model``.

A transformers experts module (``@use_experts_implementation``: Qwen3-MoE, Mixtral,
OLMoE, DeepSeek-V3, GPT-OSS, ...) receives each layer's routing from its MoE block:
``forward(hidden_states (T, D), top_k_index (T, k), top_k_weights (T, k))``. Under
``moeq.apply_expert_parallel`` its per-expert weights (and biases) become DTensors
sharded ``Shard(0)`` over ``mesh["ep"]`` and it gets an
:class:`~moeq.parallel.expert_parallel.ExpertParallelDispatcher` in
``moeq_expert_dispatcher``; the converted forward (moeq/integrations/transformers/experts.py)
hands its tokens to the dispatcher, which runs ``HFLocalExperts`` on the tokens it laid
out for this rank's experts. The router stays replicated, as for ``moeq.MoE``.

This module holds the setup side: finding those modules and checking them. The module
must be converted first (any recipe, ``"bf16"`` included): the recipe fixes the padded
layout the dispatcher writes, and the converted forward is what consults the
dispatcher. An unconverted module is refused with an error naming the call to make.
"""
from __future__ import annotations

from typing import List

from torch import nn

from moeq.experts.converted import ConvertedExperts
from moeq.integrations.transformers.experts import EXPERT_PARAMETERS, TRANSFORMERS_EXPERTS

__all__ = ["EXPERT_PARAMETERS", "check_hf_experts", "find_hf_experts"]


def find_hf_experts(model: nn.Module):
    """(fqn, module) of every transformers experts module in ``model``, converted or not."""
    return [(fqn, m) for fqn, m in model.named_modules() if TRANSFORMERS_EXPERTS.matches(m)]


def check_hf_experts(fqn: str, module: nn.Module, ep: int) -> List[str]:
    """Validate one transformers experts module for EP; return the names of its tensors to shard.

    Raises:
        ValueError: not converted by moeq.convert_model, E not divisible by ``ep``,
            transformers' own expert parallelism on it, or moeq EP already applied.
        NotImplementedError: a direct parameter EP does not know how to shard.
    """
    name = fqn or "<root>"
    if not isinstance(module, ConvertedExperts):
        raise ValueError(
            f"{name} is a transformers {type(module).__name__} not converted by moeq: call "
            f"moeq.convert_model(model, recipe) first (recipe 'bf16' keeps BF16 GEMMs), then "
            f"moeq.apply_expert_parallel(model, mesh)"
        )
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(
            f"{name} already runs transformers' own expert parallelism: load the model without it "
            f"(no distributed_config / EP tp_plan) to use moeq.apply_expert_parallel"
        )
    if getattr(module, "moeq_expert_dispatcher", None) is not None:
        raise ValueError(f"{name}: apply_expert_parallel was already applied")
    E = module.num_experts
    if E % ep:
        raise ValueError(
            f"{name} has {E} experts, not divisible by the EP size {ep}: pick an 'ep' mesh size that "
            f"divides the number of experts"
        )
    direct = [n for n, _ in module.named_parameters(recurse=False)]
    unknown = [n for n in direct if n not in EXPERT_PARAMETERS]
    if unknown:
        raise NotImplementedError(
            f"{name} ({type(module).__name__}) has parameters {unknown} that apply_expert_parallel does not know "
            f"how to shard (it shards {', '.join(EXPERT_PARAMETERS)} along the expert dim)"
        )
    for n in direct:
        if getattr(module, n).shape[0] != E:
            raise NotImplementedError(
                f"{name}.{n} has leading dim {getattr(module, n).shape[0]}, not the {E} experts: "
                f"apply_expert_parallel cannot shard it along the expert dim"
            )
    return direct
