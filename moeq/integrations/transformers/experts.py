"""Adapter for transformers 5.x experts modules (``@use_experts_implementation``).

Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, GPT-OSS, ...: the MoE block routes and calls
``experts(hidden_states (T, D), top_k_index (T, k), top_k_weights (T, k))``; the
module's flags (``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``) and
its ``_apply_gate`` / ``act_fn`` say how its weights compute. The converted forward goes
from the routing straight to the recipe's padded layout (one ``permute_and_pad``), so it
never pads again. Plain SwiGLU experts take the fused SwiGLU path of moeq.GroupedExperts
(moeq.experts.gemms); the rest (biases, transposed or interleaved weights, other
activations, a post-expert norm: GPT-OSS) run per GEMM.

Under ``moeq.apply_expert_parallel`` (setup: moeq/integrations/transformers/expert_parallel.py) the module
holds an ``ExpertParallelDispatcher`` in ``moeq_expert_dispatcher``; the converted forward
hands it the tokens and :class:`HFLocalExperts` (its experts interface), which computes
on this rank's expert shard.

Adding a family whose experts differ from the generic contract: subclass
:class:`TransformersExpertsAdapter`, override ``matches`` (e.g. by class name with
:func:`is_transformers_class`) and the hooks that differ (``is_plain_swiglu``,
``expert_math``, ``dims``, ``forward``), and list an instance in
``moeq.integrations.ADAPTERS`` before the generic one (docs/design.md). The families
without ``@use_experts_implementation`` (Llama 4, DBRX, JetMoE, Switch Transformers,
NLLB-MoE, LongCat-Flash, Step 3.7) have their adapters in the ``transformers_*.py``
modules next to this one; Doge's ``DogeCDMoE`` cannot be converted
(:func:`unsupported_transformers_experts` says why).
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor, nn

from moeq.ops import padding as _padding
from moeq.experts.gemms import routed_swiglu_experts, swiglu_experts_quantized
from moeq.experts.swiglu import group_end_offsets, swiglu_experts
from moeq.integrations.base import ExpertsAdapter, is_silu, local_parameters, original_class
from moeq.experts.plan import module_plan
from moeq.integrations.transformers.grouped_layers import grouped_linear, row_experts
from moeq.experts.padding_policy import local_tensor as _local
from moeq.numerics.recipes import QuantizationType
from moeq.experts.weight_cache import module_weight_cache

# Why moeq.apply_expert_parallel refuses the families without @use_experts_implementation.
EP_ONLY_DECORATED = (
    "moeq.apply_expert_parallel shards transformers' @use_experts_implementation experts (Qwen3-MoE, Mixtral, "
    "DeepSeek-V3, GPT-OSS, ...) only; convert this family without expert parallelism"
)

# Per-expert tensors of a transformers experts module (leading dim E): what EP shards.
EXPERT_PARAMETERS = (
    "gate_up_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj_bias",
    "up_proj_bias",
    "down_proj_bias",
)


def is_transformers_class(module: nn.Module, name: str) -> bool:
    """True if a class named ``name`` from a transformers model module is in module's MRO
    (detection without importing transformers)."""
    return any(c.__name__ == name and c.__module__.startswith("transformers.") for c in type(module).__mro__)


def _flag(module: nn.Module, name: str) -> bool:
    # @use_experts_implementation's defaults: experts classes without the decorator
    # (Step 3.7's, LongCat-Flash's) have none of the flags and this layout.
    defaults = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                "has_post_expert_norm": False}
    return bool(getattr(module, name, defaults[name]))


def _is_decorated_forward(forward) -> bool:
    # @use_experts_implementation replaces forward by a wrapper defined in
    # transformers/integrations/moe.py (functools.wraps keeps the original's name)
    code = getattr(forward, "__code__", None)
    return code is not None and code.co_filename.replace("\\", "/").endswith("transformers/integrations/moe.py")


class TransformersExpertsAdapter(ExpertsAdapter):
    """Generic ``@use_experts_implementation`` experts (transformers 5.x)."""

    family = "transformers experts"
    routes_tokens = True

    def matches(self, module: nn.Module) -> bool:
        return all(hasattr(module, a) for a in ("is_transposed", "has_gate", "has_bias", "config")) and hasattr(
            module, "down_proj"
        )

    def unconvertible(self, module: nn.Module) -> Optional[str]:
        """A subclass whose own ``forward`` wraps the decorated experts forward (Ergo's
        ``ErgoExperts``: one row per route, then a per-expert RMSNorm) does math around the
        GEMMs that moeq's converted forward, which replaces the decorated one, would drop."""
        mro = original_class(module).__mro__
        decorated = next((i for i, k in enumerate(mro) if _is_decorated_forward(k.__dict__.get("forward"))), None)
        if decorated is None:
            return None
        wrapper = next((k for k in mro[:decorated] if "forward" in k.__dict__), None)
        if wrapper is None:
            return None
        return (
            f"{wrapper.__name__}.forward wraps the experts forward that @use_experts_implementation decorates "
            f"({mro[decorated].__name__}) with math of its own, which a converted forward would drop; moeq "
            f"converts experts whose forward is the decorated one"
        )

    def dims(self, module: nn.Module) -> Dict[str, int]:
        down = module.down_proj  # (E, D, I), or (E, I, D) when transposed
        transposed = _flag(module, "is_transposed")
        d, i = (down.shape[-1], down.shape[-2]) if transposed else (down.shape[-2], down.shape[-1])
        return {"dim": d, "hidden_dim": i}

    def local_weights(self, module: nn.Module) -> Dict[str, Tensor]:
        return local_parameters(module, EXPERT_PARAMETERS)

    def plan_weight(self, module: nn.Module) -> Tensor:
        return _local(module.down_proj)

    def swiglu(self, module: nn.Module) -> bool:
        return self.is_plain_swiglu(module)

    def is_plain_swiglu(self, module: nn.Module) -> bool:
        """True for experts computing exactly ``silu(x W_gate) * (x W_up) W_down`` with
        concatenated (E, 2I, D) / (E, D, I) weights and no biases or post-norm. The
        activation may be SiLU in any form (:func:`moeq.integrations.base.is_silu`)."""
        if not _flag(module, "has_gate") or _flag(module, "has_bias") or _flag(module, "is_transposed"):
            return False
        if _flag(module, "has_post_expert_norm") or not _flag(module, "is_concatenated"):
            return False
        if not is_silu(getattr(module, "act_fn", None)):
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
        plan = module_plan(module)
        if self.is_plain_swiglu(module):
            # Exactly moeq's SwiGLU experts: the same (fused, on SM90) path as moeq.GroupedExperts.
            return routed_swiglu_experts(
                hidden_states, top_k_index, top_k_weights, _local(module.gate_up_proj), _local(module.down_proj),
                plan, weight_cache=module_weight_cache(module),
            )
        align = plan.alignment
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
        plan = module_plan(module)
        offs = group_end_offsets(counts, align)
        # Expert of each row, for the per-expert bias (slack rows borrow the last expert's).
        expert_ids = row_experts(offs, grouped.shape[0]) if _flag(module, "has_bias") else None
        transposed = _flag(module, "is_transposed")

        def linear(inp, weight, bias):
            w = _local(weight)
            w = w.transpose(-2, -1) if transposed else w  # -> (E, N, K)
            bias = None if bias is None else _local(bias)
            return grouped_linear(inp, w, offs, plan, bias=bias, expert_ids=expert_ids)

        if _flag(module, "has_gate"):
            h = module._apply_gate(linear(grouped, module.gate_up_proj, getattr(module, "gate_up_proj_bias", None)))
        else:
            h = module.act_fn(linear(grouped, module.up_proj, getattr(module, "up_proj_bias", None)))
        out = linear(h, module.down_proj, getattr(module, "down_proj_bias", None))
        if _flag(module, "has_post_expert_norm"):
            out = module.post_expert_norm(out)
        return out

    def local_experts(self, module: nn.Module, x: Tensor, counts: Tensor, align: Optional[int]) -> Tensor:
        """The converted forward's expert math on rows the EP dispatcher laid out (see
        :class:`HFLocalExperts`): plain SwiGLU experts take the SwiGLU path, the others
        :meth:`expert_math`."""
        plan = module_plan(module)
        if align != plan.alignment:
            raise RuntimeError(
                f"expert-parallel tokens arrive aligned to {align}, but {type(module).__name__}'s recipe "
                f"{plan.recipe.value} needs {plan.alignment}: the recipe changed after the dispatch "
                f"was planned"
            )
        if not self.is_plain_swiglu(module):
            return self.expert_math(module, x, counts, align)
        w13, w2 = _local(module.gate_up_proj), _local(module.down_proj)
        if plan.recipe is QuantizationType.BF16:
            return swiglu_experts(x, w13, w2, counts, group_alignment=align)
        return swiglu_experts_quantized(x, w13, w2, group_end_offsets(counts, align), plan)


class HFLocalExperts:
    """The EP dispatcher's experts interface over a converted transformers experts module.

    ``ExpertParallelDispatcher`` calls ``experts(x, num_tokens_per_expert,
    group_alignment=a)`` (moeq.GroupedExperts' contract) and reads ``moeq_plan``;
    this wrapper answers both for ``module``, computing on its local expert shard.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def moeq_plan(self):
        return module_plan(self.module)

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


def unsupported_transformers_experts(module: nn.Module) -> Optional[str]:
    """Why moeq cannot convert ``module`` if it is a transformers experts module whose
    routing leaves no grouped GEMM to quantize (Doge's ``DogeCDMoE``), else None."""
    if is_transformers_class(module, "DogeCDMoE"):
        return (
            "a Doge DogeCDMoE, whose routed experts are single vectors (rows of down_embed and up_embed, "
            "retrieved per token by product keys): each expert computes one dot product and one scaled vector, "
            "which is no grouped GEMM (moeq's FP8/MXFP8 GEMMs need 16/32 output columns per expert). Its shared "
            "expert (gate_proj/up_proj/down_proj) is a dense MLP, which convert_model leaves alone in every family"
        )
    return None
