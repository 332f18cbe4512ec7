"""The building blocks the transformers adapters share: one grouped linear layer, a gated
experts MLP and the routed block around it, each in a recipe's numerics.

Families whose math moeq.experts.gemms' SwiGLU does not cover (biases, other
activations, per-expert module lists, zero-compute experts) compose these; plain SwiGLU
experts go straight to ``moeq.experts.gemms`` (its fused Hopper paths included).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from moeq.ops import padding as _padding
from moeq.experts.gemms import swiglu_experts_quantized
from moeq.experts.plan import ExpertsPlan
from moeq.experts.swiglu import group_end_offsets
from moeq.ops.bf16_grouped_mm import grouped_mm
from moeq.integrations.base import is_silu
from moeq.numerics.groups import row_group_ids
from moeq.numerics.recipes import QuantizationType
from moeq.ops.grouped_mm import planned_grouped_mm


def grouped_linear(
    x: Tensor,
    weight: Tensor,
    offs: Tensor,
    plan: ExpertsPlan,
    *,
    bias: Optional[Tensor] = None,
    expert_ids: Optional[Tensor] = None,
) -> Tensor:
    """``x[group e] @ weight[e].T (+ bias[e])`` per expert group, in the recipe.

    Args:
        x: (M, K) rows in expert order; for FP8/MXFP8 every group starts at a multiple
            of the recipe's alignment. Rows at or past ``offs[-1]`` are slack.
        weight: (E, N, K) local tensor, any strides (a transposed view is fine).
        offs: (E,) int32 cumulative group end offsets.
        plan: the module's ExpertsPlan (recipe and per-GEMM kernel; BF16 runs
            ``torch._grouped_mm``).
        bias: (E, N) or None; expert_ids: (M,) int64 expert of every row (needed with a
            bias: :func:`row_experts`).
    Returns:
        (M, N) in x.dtype. Slack rows hold arbitrary values (callers never read them).
    """
    if plan.recipe is QuantizationType.BF16:
        out = grouped_mm(x, weight, offs)
    else:
        out = planned_grouped_mm(x, weight, offs, plan.recipe, plan.per_gemm)
    if bias is not None:
        out = out + bias[expert_ids].to(out.dtype)
    return out


def row_experts(offs: Tensor, num_rows: int) -> Tensor:
    """(num_rows,) int64 expert of every grouped row, for per-expert biases; slack rows
    get the last expert (their values are never read)."""
    return row_group_ids(offs, num_rows).clamp(max=offs.shape[0] - 1)


def gated_experts(
    x: Tensor,
    offs: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act_fn: Callable[[Tensor], Tensor],
    plan: ExpertsPlan,
    *,
    weight_cache=None,
) -> Tensor:
    """``act(x W_gate) * (x W_up) W_down`` per expert group, in the recipe.

    Args:
        x: (M, D) rows in expert order, groups aligned for the recipe; rows at or past
            ``offs[-1]`` are slack.
        offs: (E,) int32 cumulative group end offsets.
        gate_up_proj: (E, 2I, D), gate rows [0, I), up rows [I, 2I). down_proj: (E, D, I).
        act_fn: the gate activation; SiLU in any form takes moeq's SwiGLU experts (fused
            on SM90: then the weights must be contiguous), anything else two grouped GEMMs.
        plan: the module's ExpertsPlan.
        weight_cache: the module's ``ExpertWeightCache`` for the fused SwiGLU path, or
            None (always None for weights made per call: a copy's address changes).
    Returns:
        (M, D) in x.dtype; slack rows are zero on the SwiGLU path, arbitrary otherwise.
    """
    if is_silu(act_fn):
        return swiglu_experts_quantized(x, gate_up_proj, down_proj, offs, plan, weight_cache=weight_cache)
    gate, up = grouped_linear(x, gate_up_proj, offs, plan).chunk(2, dim=-1)
    return grouped_linear(act_fn(gate) * up, down_proj, offs, plan)


def routed_experts(
    tokens: Tensor,
    expert_indices: Tensor,
    expert_weights: Optional[Tensor],
    num_experts: int,
    plan: ExpertsPlan,
    expert_math: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """A routed experts block: permute-and-pad to the recipe's layout (one pass, so the
    GEMMs never pad again), ``expert_math``, weighted combine.

    Args:
        tokens: (T, D). expert_indices: (T, k) ids in [0, E). expert_weights: (T, k) or
            None (a plain sum of the k outputs).
        num_experts: E. plan: the module's ExpertsPlan (its alignment lays out the groups).
        expert_math: ``f(grouped (M, D), offs (E,) int32) -> (M, N)``; padding and slack
            rows of its output are never read.
    Returns:
        (T, N) in tokens.dtype.
    """
    align = plan.alignment
    grouped, counts, layout = _padding.permute_and_pad(tokens, expert_indices, num_experts, align)
    out = expert_math(grouped, group_end_offsets(counts, align))
    out = _padding.combine_token_groups(out, layout, expert_weights)
    # Cast only on a real change: a no-op .to() on an autograd.Function output is
    # miscompiled by torch 2.11's torch.compile (zero gradients).
    return out if out.dtype == tokens.dtype else out.to(tokens.dtype)
