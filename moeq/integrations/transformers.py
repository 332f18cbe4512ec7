"""Adapter for transformers 5.x experts modules (``@use_experts_implementation``).

Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, GPT-OSS, ...: the MoE block routes and calls
``experts(hidden_states (T, D), top_k_index (T, k), top_k_weights (T, k))``; the
module's flags (``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``) and
its ``_apply_gate`` / ``act_fn`` say how its weights compute. The converted forward goes
from the routing straight to the recipe's padded layout (one ``permute_and_pad``), so it
never pads again. Plain SwiGLU experts take the fused SwiGLU path of moeq.GroupedExperts
(moeq.expert_gemms); the rest (biases, transposed or interleaved weights, other
activations, a post-expert norm: GPT-OSS) run per GEMM.

Under ``moeq.apply_expert_parallel`` (setup: moeq/parallel/hf_experts.py) the module
holds an ``ExpertParallelDispatcher`` in ``moeq_expert_dispatcher``; the converted forward
hands it the tokens and :class:`HFLocalExperts` (its experts interface), which computes
on this rank's expert shard.

Adding a family whose experts differ from the generic contract: subclass
:class:`TransformersExpertsAdapter`, override ``matches`` (e.g. by class name) and the
hooks that differ (``is_plain_swiglu``, ``expert_math``, ``dims``, ``forward``), and list
an instance in ``moeq.integrations.ADAPTERS`` before the generic one (docs/design.md).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from moeq import padding as _padding
from moeq.expert_gemms import per_gemm_kernel, routed_swiglu_experts, swiglu_experts_quantized
from moeq.experts import group_end_offsets, swiglu_experts
from moeq.integrations.base import ExpertsAdapter, local_parameters
from moeq.padding_policy import local_tensor as _local
from moeq.quant.grouped_mm import quantized_grouped_mm
from moeq.quant.groups import row_group_ids
from moeq.recipes import QuantizationType
from moeq.weight_cache import module_weight_cache

# Per-expert tensors of a transformers experts module (leading dim E): what EP shards.
EXPERT_PARAMETERS = (
    "gate_up_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj_bias",
    "up_proj_bias",
    "down_proj_bias",
)


class TransformersExpertsAdapter(ExpertsAdapter):
    """Generic ``@use_experts_implementation`` experts (transformers 5.x)."""

    family = "transformers experts"

    def matches(self, module: nn.Module) -> bool:
        return all(hasattr(module, a) for a in ("is_transposed", "has_gate", "has_bias", "config")) and hasattr(
            module, "down_proj"
        )

    def dims(self, module: nn.Module) -> Dict[str, int]:
        down = module.down_proj  # (E, D, I), or (E, I, D) when transposed
        d, i = (down.shape[-1], down.shape[-2]) if module.is_transposed else (down.shape[-2], down.shape[-1])
        return {"dim": d, "hidden_dim": i}

    def local_weights(self, module: nn.Module) -> Dict[str, Tensor]:
        return local_parameters(module, EXPERT_PARAMETERS)

    def is_plain_swiglu(self, module: nn.Module) -> bool:
        """True for experts computing exactly ``silu(x W_gate) * (x W_up) W_down`` with
        concatenated (E, 2I, D) / (E, D, I) weights and no biases or post-norm."""
        if not module.has_gate or module.has_bias or module.is_transposed:
            return False
        if getattr(module, "has_post_expert_norm", False) or not getattr(module, "is_concatenated", True):
            return False
        if type(getattr(module, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
            return False
        from transformers.integrations.moe import _default_apply_gate

        return getattr(type(module)._apply_gate, "__wrapped__", type(module)._apply_gate) is _default_apply_gate

    def forward(self, module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """Converted forward.

        Args:
            hidden_states: (T, D). top_k_index: (T, k) int64. top_k_weights: (T, k).
        Returns:
            (T, D) in hidden_states.dtype.
        """
        if getattr(module, "_is_expert_parallel", False):
            raise NotImplementedError(
                "transformers' own expert parallelism is not supported by moeq-converted experts: "
                "use moeq.apply_expert_parallel instead"
            )
        dispatcher = getattr(module, "moeq_expert_dispatcher", None)
        if dispatcher is not None:
            out = dispatcher(hidden_states, top_k_index, top_k_weights, HFLocalExperts(module))
            return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)
        qtype = module.moeq_recipe
        if self.is_plain_swiglu(module):
            # Exactly moeq's SwiGLU experts: the same (fused, on SM90) path as moeq.GroupedExperts.
            return routed_swiglu_experts(
                hidden_states, top_k_index, top_k_weights, _local(module.gate_up_proj), _local(module.down_proj),
                qtype, module.moeq_kernel, weight_cache=module_weight_cache(module),
            )
        align = module.group_alignment
        grouped, counts, layout = _padding.permute_and_pad(hidden_states, top_k_index, module.num_experts, align)
        out = self.expert_math(module, grouped, counts, align)
        # Padding and slack rows may hold bias/activation values: the combine reads real rows only.
        out = _padding.combine_token_groups(out, layout, top_k_weights)
        # Cast only on a real change: a no-op .to() on an autograd.Function output is
        # miscompiled by torch 2.11's torch.compile (zero gradients).
        return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)

    def expert_math(self, module: nn.Module, grouped: Tensor, counts: Tensor, align: Optional[int]) -> Tensor:
        """The module's math on an expert-major layout, per GEMM (any flags).

        Works on the local shard under expert parallelism (E_l experts, DTensor weights).

        Args:
            grouped: (M, D) rows in expert order; with ``align`` each group starts at a
                multiple of it (the padded layout), rows past the last group are slack.
            counts: (E_l,) integer tokens per expert. align: None or the recipe's alignment.
        Returns:
            (M, D); padding and slack rows hold arbitrary values (never combined).
        """
        qtype = module.moeq_recipe
        kernel = per_gemm_kernel(qtype, module.moeq_kernel, grouped.device) if align else None
        offs = group_end_offsets(counts, align)
        num_experts = offs.shape[0]
        # Expert of each row, for the per-expert bias (slack rows borrow the last expert's).
        expert_ids = row_group_ids(offs, grouped.shape[0]).clamp(max=num_experts - 1) if module.has_bias else None

        def linear(inp, weight, bias):
            w = _local(weight)
            w = w.transpose(-2, -1) if module.is_transposed else w  # -> (E, N, K)
            if qtype is QuantizationType.BF16:
                out = torch._grouped_mm(inp, w.transpose(-2, -1), offs=offs)
            else:
                out = quantized_grouped_mm(inp, w, offs, qtype=qtype, kernel=kernel)
            if bias is not None:
                out = out + _local(bias)[expert_ids].to(out.dtype)
            return out

        if module.has_gate:
            h = module._apply_gate(linear(grouped, module.gate_up_proj, getattr(module, "gate_up_proj_bias", None)))
        else:
            h = module.act_fn(linear(grouped, module.up_proj, getattr(module, "up_proj_bias", None)))
        out = linear(h, module.down_proj, getattr(module, "down_proj_bias", None))
        if getattr(module, "has_post_expert_norm", False):
            out = module.post_expert_norm(out)
        return out

    def local_experts(self, module: nn.Module, x: Tensor, counts: Tensor, align: Optional[int]) -> Tensor:
        """The converted forward's expert math on rows the EP dispatcher laid out (see
        :class:`HFLocalExperts`): plain SwiGLU experts take the SwiGLU path, the others
        :meth:`expert_math`."""
        if align != module.group_alignment:
            raise RuntimeError(
                f"expert-parallel tokens arrive aligned to {align}, but {type(module).__name__}'s recipe "
                f"{module.moeq_recipe.value} needs {module.group_alignment}: the recipe changed after the dispatch "
                f"was planned"
            )
        if not self.is_plain_swiglu(module):
            return self.expert_math(module, x, counts, align)
        w13, w2 = _local(module.gate_up_proj), _local(module.down_proj)
        qtype = module.moeq_recipe
        if qtype is QuantizationType.BF16:
            return swiglu_experts(x, w13, w2, counts, group_alignment=align)
        return swiglu_experts_quantized(x, w13, w2, group_end_offsets(counts, align), qtype, module.moeq_kernel)


class HFLocalExperts:
    """The EP dispatcher's experts interface over a converted transformers experts module.

    ``ExpertParallelDispatcher`` calls ``experts(x, num_tokens_per_expert,
    group_alignment=a)`` (moeq.GroupedExperts' contract) and reads ``moeq_recipe``;
    this wrapper answers both for ``module``, computing on its local expert shard.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def moeq_recipe(self) -> QuantizationType:
        return self.module.moeq_recipe

    def __call__(self, x: Tensor, num_tokens_per_expert: Tensor, *, group_alignment: Optional[int] = None) -> Tensor:
        """Local experts on rows the dispatcher laid out.

        Args:
            x: (P, D) rows in local-expert order, group j starting at a multiple of
                ``group_alignment`` (zero padding rows between groups).
            num_tokens_per_expert: (E_l,) int64 real rows per local expert.
            group_alignment: the alignment the dispatcher padded to (the recipe's).
        Returns:
            (P, D); padding rows hold arbitrary values (the combine never reads them).
        """
        module = self.module
        return module.moeq_adapter.local_experts(module, x, num_tokens_per_expert, group_alignment)


TRANSFORMERS_EXPERTS = TransformersExpertsAdapter()
