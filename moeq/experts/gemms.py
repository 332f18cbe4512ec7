"""SwiGLU experts through a recipe's grouped GEMMs: what every converted experts module runs.

The adapters (moeq/integrations/) bring each family's weights to moeq's layout
(``gate_up_proj`` (E, 2H, D), ``down_proj`` (E, D, H), local shards) and call these.
Which kernel runs is the module's plan (moeq/experts/plan.py, made once at conversion):
its fused SwiGLU kernel where it has one (``"triton"`` on SM90), else two grouped GEMMs
with its per-GEMM kernel (``"emulated"`` on CPU).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from moeq.ops import padding as _padding
from moeq.experts.swiglu import group_end_offsets, swiglu, swiglu_experts
from moeq.experts.padding_policy import pads_for
from moeq.experts.plan import ExpertsPlan
from moeq.numerics.recipes import QuantizationType
from moeq.ops.grouped_mm import planned_grouped_mm
from moeq.numerics.validation import assert_on_device


def cached_weights(weight_cache, qtype, x, gate_up_proj, down_proj):
    """The fused path's quantized weights from the module's cache, or None (no cache)."""
    if weight_cache is None:
        return None
    need_dgrad = torch.is_grad_enabled() and (x.requires_grad or gate_up_proj.requires_grad or down_proj.requires_grad)
    return weight_cache.lookup(qtype, gate_up_proj, down_proj, need_dgrad)


def swiglu_experts_quantized(x, gate_up_proj, down_proj, offs, plan: ExpertsPlan, *, weight_cache=None):
    """SwiGLU experts through the recipe's GEMMs on an already aligned layout.

    Args:
        x: (M, D) rows grouped by expert, group e starting at a multiple of the recipe's
            alignment; rows at or past ``offs[-1]`` are slack.
        gate_up_proj: (E, 2H, D). down_proj: (E, D, H). Local tensors.
        offs: (E,) int32 cumulative group end offsets.
        plan: the module's ExpertsPlan (its recipe and kernels; BF16 runs
            ``torch._grouped_mm`` under the same slack-row contract).
        weight_cache: the module's ``moeq.experts.weight_cache.ExpertWeightCache`` (inside
            ``moeq.quantized_weight_cache``, eager only); the fused path takes its
            weights' quantized copies from it, the per-GEMM kernels ignore it.
    Returns:
        (M, D) in x.dtype; slack rows (and their input gradient) are zero.
    """
    qtype = plan.recipe
    if plan.fused is not None and x.dtype in plan.fused.dtypes:
        qw = cached_weights(weight_cache, qtype, x, gate_up_proj, down_proj)
        return plan.fused.swiglu_experts(x, gate_up_proj, down_proj, offs, qtype, quantized_weights=qw)
    h = swiglu(planned_grouped_mm(x, gate_up_proj, offs, qtype, plan.per_gemm))
    return planned_grouped_mm(h, down_proj, offs, qtype, plan.per_gemm)


def routed_swiglu_experts(
    tokens, expert_indices, expert_weights, gate_up_proj, down_proj, plan: ExpertsPlan, *, weight_cache=None
):
    """A routed SwiGLU experts block (permute-and-pad, experts, weighted combine) in qtype.

    Args:
        tokens: (T, D). expert_indices: (T, k) ids in [0, E). expert_weights: (T, k).
        gate_up_proj: (E, 2H, D) local tensor. down_proj: (E, D, H) local tensor.
        plan: the module's ExpertsPlan.
        weight_cache: the module's ``ExpertWeightCache`` or None (see swiglu_experts_quantized).
    Returns:
        (T, D) in tokens.dtype.
    Where a fused kernel can take the tokens straight from the routing (SM90: MXFP8 fuses
    the gather into the fake-quant pass; FP8 folds the routing weights into the down
    GEMM's epilogue), it does; otherwise tokens are permuted and padded to the recipe's
    alignment in one pass.
    """
    num_experts = gate_up_proj.shape[0]
    qtype, align = plan.recipe, plan.alignment
    if plan.fused is not None and tokens.dtype in plan.fused.dtypes:
        # straight from the routing: MXFP8 fuses the gather into its fake-quant pass, FP8
        # folds the routing weights into the down GEMM's epilogue
        qw = cached_weights(weight_cache, qtype, tokens, gate_up_proj, down_proj)
        return plan.fused.routed_swiglu_experts(
            tokens, expert_indices, expert_weights, gate_up_proj, down_proj, qtype, quantized_weights=qw
        )
    grouped, counts, layout = _padding.permute_and_pad(tokens, expert_indices, num_experts, align)
    if qtype is QuantizationType.BF16:
        out = swiglu_experts(grouped, gate_up_proj, down_proj, counts)
    else:
        offs = group_end_offsets(counts, align)
        out = swiglu_experts_quantized(grouped, gate_up_proj, down_proj, offs, plan, weight_cache=weight_cache)
    out = _padding.combine_token_groups(out, layout, expert_weights)
    # Cast only on a real change: a no-op .to() on an autograd.Function output is
    # miscompiled by torch 2.11's torch.compile (zero gradients).
    return out if out.dtype == tokens.dtype else out.to(tokens.dtype)


class AlignedGroups(NamedTuple):
    """Token groups laid out for a recipe's GEMMs by :func:`align_token_groups`.

    Attributes:
        x: rows for the GEMMs, group e starting at a multiple of the recipe's alignment.
        offs: (E,) int32 cumulative group end offsets for the GEMMs; rows at or past
            ``offs[-1]`` are slack.
        layout: the ``PaddedLayout`` of the padding this call ran, or None when the
            incoming groups were already aligned (nothing copied).
    """

    x: Tensor
    offs: Tensor
    layout: Optional[_padding.PaddedLayout]


def align_token_groups(
    x: Tensor,
    num_tokens_per_expert: Tensor,
    plan: ExpertsPlan,
    incoming_alignment: Optional[int],
    *,
    tail_slack: bool = False,
) -> AlignedGroups:
    """Apply the padding policy (moeq.experts.padding_policy) to incoming token groups.

    Args:
        x: (M, D) rows in expert order; every group starts at a multiple of
            ``incoming_alignment`` (None: groups packed back to back).
        num_tokens_per_expert: (E,) integer rows per group as the caller counts them (a
            padding dispatcher counts its padding rows in).
        plan: the module's ExpertsPlan (its alignment). incoming_alignment: what the
            caller guarantees (the plan's, or one passed per call).
        tail_slack: False: the groups cover x (``moeq.GroupedExperts``' contract). True:
            rows past the last group are slack (torchtitan's dispatchers hand fixed-size
            buffers): they join no group, come out zero and get zero gradient. Counts
            summing past M fail ``torch._assert_async`` (at once off CUDA).
    Returns:
        :class:`AlignedGroups`. Pads (one pass, ``pad_token_groups``) only when the
        recipe needs an alignment the caller does not guarantee; then
        :func:`restore_token_groups` unpads the GEMMs' output.
    """
    if not pads_for(plan.alignment, incoming_alignment):
        return AlignedGroups(x, group_end_offsets(num_tokens_per_expert, incoming_alignment), None)
    counts = num_tokens_per_expert
    num_experts = counts.shape[0]
    if tail_slack:
        # The slack rows become one more group after the last expert: padding keeps them
        # (zeros for the GEMMs, which see only the first E groups) and unpadding puts
        # them back in place, so no shape depends on how many there are.
        slack = x.shape[0] - counts.sum()
        assert_on_device(
            slack >= 0,
            "num_tokens_per_expert sums to more rows than x has: pass the per-expert row counts of x",
        )
        counts = torch.cat([counts, slack.reshape(1).to(counts.dtype)])
    padded, layout = _padding.pad_token_groups(x, counts, plan.alignment)
    return AlignedGroups(padded, layout.padded_offsets[:num_experts], layout)


def restore_token_groups(y: Tensor, aligned: AlignedGroups) -> Tensor:
    """The GEMMs' output (rows of ``aligned.x``) back on the rows of the incoming x."""
    return y if aligned.layout is None else _padding.unpad_token_groups(y, aligned.layout)


def grouped_swiglu_experts(
    x: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    num_tokens_per_expert: Tensor,
    plan: ExpertsPlan,
    *,
    incoming_alignment: Optional[int] = None,
    tail_slack: bool = False,
    weight_cache=None,
) -> Tensor:
    """SwiGLU experts on grouped tokens in the recipe, padding only when needed.

    Args:
        x: (M, D) rows in expert order (see :func:`align_token_groups` for
            ``incoming_alignment`` and ``tail_slack``).
        gate_up_proj: (E, 2H, D) local. down_proj: (E, D, H) local.
        num_tokens_per_expert: (E,) integer. plan: the module's ExpertsPlan.
        weight_cache: see :func:`swiglu_experts_quantized`.
    Returns:
        (M, D) in x.dtype; padding rows inside groups hold the experts' values on zeros,
        slack rows are zero.
    """
    aligned = align_token_groups(x, num_tokens_per_expert, plan, incoming_alignment, tail_slack=tail_slack)
    y = swiglu_experts_quantized(aligned.x, gate_up_proj, down_proj, aligned.offs, plan, weight_cache=weight_cache)
    return restore_token_groups(y, aligned)
