"""Expert parallelism for transformers 5.x experts modules converted by ``moeq.convert_model``.

A transformers experts module (``@use_experts_implementation``: Qwen3-MoE, Mixtral,
OLMoE, DeepSeek-V3, GPT-OSS, ...) receives each layer's routing from its MoE block:
``forward(hidden_states (T, D), top_k_index (T, k), top_k_weights (T, k))``. Under
``moeq.apply_expert_parallel`` its per-expert weights (and biases) become DTensors
sharded ``Shard(0)`` over ``mesh["ep"]``, it gets an
:class:`~moeq.parallel.expert_parallel.ExpertParallelDispatcher` in
``moeq_expert_dispatcher``, and the converted forward (``moeq.convert.hf_experts_forward``)
hands its tokens to the dispatcher, which runs :class:`HFLocalExperts` on the tokens it
laid out for this rank's experts. The router stays replicated, as for ``moeq.MoE``.

The module must be converted first (any recipe, ``"bf16"`` included): the recipe fixes
the padded layout the dispatcher writes, and the converted forward is what consults the
dispatcher. An unconverted module is refused with an error naming the call to make.
"""
from __future__ import annotations

from typing import List, Optional

from torch import Tensor, nn

from moeq.experts import group_end_offsets, swiglu_experts
from moeq.padding_policy import local_tensor as _local
from moeq.recipes import QuantizationType

# Per-expert tensors of a transformers experts module (leading dim E): what EP shards.
EXPERT_PARAMETERS = (
    "gate_up_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj_bias",
    "up_proj_bias",
    "down_proj_bias",
)


class HFLocalExperts:
    """The dispatcher's experts interface over a converted transformers experts module.

    ``ExpertParallelDispatcher`` calls ``experts(x, num_tokens_per_expert,
    group_alignment=a)`` (moeq.GroupedExperts' contract) and reads ``moeq_recipe``;
    this adapter answers both for ``module``, computing on its local expert shard.
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
                ``group_alignment`` (zero padding rows between groups, no slack).
            num_tokens_per_expert: (E_l,) int64 real rows per local expert.
            group_alignment: the alignment the dispatcher padded to (the recipe's).
        Returns:
            (P, D); padding rows hold arbitrary values (the combine never reads them).
        """
        return hf_local_experts(self.module, x, num_tokens_per_expert, group_alignment)


def hf_local_experts(module: nn.Module, x: Tensor, counts: Tensor, align: Optional[int]) -> Tensor:
    """The single-device converted forward's expert math, on the local shard (see HFLocalExperts).

    Plain SwiGLU experts take the path ``hf_experts_forward`` takes for them; the others
    (biases, transposed / interleaved weights, other activations) the per-GEMM path.
    """
    from moeq.convert import _is_plain_swiglu, _swiglu_experts_quantized, hf_generic_experts

    if align != module.group_alignment:
        raise RuntimeError(
            f"expert-parallel tokens arrive aligned to {align}, but {type(module).__name__}'s recipe "
            f"{module.moeq_recipe.value} needs {module.group_alignment}: the recipe changed after the dispatch "
            f"was planned"
        )
    if not _is_plain_swiglu(module):
        return hf_generic_experts(module, x, counts, align)
    w13, w2 = _local(module.gate_up_proj), _local(module.down_proj)
    qtype = module.moeq_recipe
    if qtype is QuantizationType.BF16:
        return swiglu_experts(x, w13, w2, counts, group_alignment=align)
    return _swiglu_experts_quantized(x, w13, w2, group_end_offsets(counts, align), qtype, module.moeq_kernel)


def hf_expert_parallel_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor):
    """``hf_experts_forward`` under expert parallelism.

    Args:
        hidden_states: (T, D) this rank's tokens. top_k_index: (T, k) global expert ids.
        top_k_weights: (T, k) routing weights.
    Returns:
        (T, D) in hidden_states.dtype: each token's k expert outputs, weighted and summed.
    """
    out = module.moeq_expert_dispatcher(hidden_states, top_k_index, top_k_weights, HFLocalExperts(module))
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def find_hf_experts(model: nn.Module):
    """(fqn, module) of every transformers experts module in ``model``, converted or not."""
    from moeq.convert import _is_hf_experts

    return [(fqn, m) for fqn, m in model.named_modules() if _is_hf_experts(m)]


def check_hf_experts(fqn: str, module: nn.Module, ep: int) -> List[str]:
    """Validate one transformers experts module for EP; return the names of its tensors to shard.

    Raises:
        ValueError: not converted by moeq.convert_model, E not divisible by ``ep``,
            transformers' own expert parallelism on it, or moeq EP already applied.
        NotImplementedError: a direct parameter EP does not know how to shard.
    """
    from moeq.convert import ConvertedExperts

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
