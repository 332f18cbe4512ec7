"""SwiGLU experts through a recipe's grouped GEMMs: what every converted experts module runs.

The adapters (moeq/integrations/) bring each family's weights to moeq's layout
(``gate_up_proj`` (E, 2H, D), ``down_proj`` (E, D, H), local shards) and call these.
Which kernel runs: the fused Hopper SwiGLU experts on SM90 (``kernel="auto"`` or
``"triton"``), else two ``quantized_grouped_mm`` calls with the per-GEMM kernel the
choice resolves to (``"emulated"`` on CPU).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from moeq.ops import padding as _padding
from moeq.experts.swiglu import group_end_offsets, swiglu, swiglu_experts
from moeq.experts.padding_policy import needs_padding
from moeq.ops.registry import KERNEL_AUTO, KERNEL_TRITON, select_kernel
from moeq.ops.grouped_mm import quantized_grouped_mm
from moeq.numerics.recipes import QuantizationType, group_alignment


def resolve_kernel(qtype: QuantizationType, kernel: str, device: torch.device) -> str:
    """The concrete per-GEMM kernel name ``kernel`` ("auto" or a name) means for qtype on device."""
    return select_kernel(kernel, qtype, device).name


def fused_experts_kernel(qtype: QuantizationType, kernel: str, device: torch.device) -> Optional[Callable]:
    """The whole-SwiGLU fused Hopper kernel for ``kernel`` ("auto" or "triton"), or None.

    Fused kernels quantize each activation once inside the passes that already touch it
    (see docs/fp8_hopper.md, docs/mxfp8_hopper.md); they exist for SM90. ``"auto"`` takes
    them there; ``"triton"`` insists and raises elsewhere, naming the kernel to use.
    """
    if kernel not in (KERNEL_AUTO, KERNEL_TRITON) or qtype is QuantizationType.BF16:
        return None
    sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    if not sm90:
        if kernel == KERNEL_TRITON:
            raise RuntimeError(
                f"kernel='triton' ({qtype.value} fused Hopper experts) needs an SM90 GPU, got {device}: "
                f"use kernel='auto' or kernel='emulated'"
            )
        return None
    if qtype is QuantizationType.FP8:
        from moeq.ops.fp8_hopper import fp8_swiglu_experts

        return fp8_swiglu_experts
    from moeq.ops.mxfp8_hopper import mxfp8_swiglu_experts

    return mxfp8_swiglu_experts


def per_gemm_kernel(qtype: QuantizationType, kernel: str, device: torch.device) -> str:
    """The per-GEMM kernel for layouts the fused SwiGLU does not cover (biases, other
    activations): ``"triton"`` (a fused-experts choice) falls back to ``"auto"``."""
    return resolve_kernel(qtype, KERNEL_AUTO if kernel == KERNEL_TRITON else kernel, device)


def cached_weights(weight_cache, qtype, x, gate_up_proj, down_proj):
    """The fused path's quantized weights from the module's cache, or None (no cache)."""
    if weight_cache is None:
        return None
    need_dgrad = torch.is_grad_enabled() and (x.requires_grad or gate_up_proj.requires_grad or down_proj.requires_grad)
    return weight_cache.lookup(qtype, gate_up_proj, down_proj, need_dgrad)


def swiglu_experts_quantized(x, gate_up_proj, down_proj, offs, qtype, kernel, *, weight_cache=None):
    """SwiGLU experts through the recipe's GEMMs on an already aligned layout.

    Args:
        x: (M, D) rows grouped by expert, group e starting at a multiple of the recipe's
            alignment; rows at or past ``offs[-1]`` are slack.
        gate_up_proj: (E, 2H, D). down_proj: (E, D, H). Local tensors.
        offs: (E,) int32 cumulative group end offsets.
        qtype: the recipe (BF16 runs ``torch._grouped_mm`` under the same slack-row
            contract). kernel: the user's choice ("auto", "triton", or a per-GEMM
            kernel name).
        weight_cache: the module's ``moeq.experts.weight_cache.ExpertWeightCache`` (inside
            ``moeq.quantized_weight_cache``, eager only); the fused path takes its
            weights' quantized copies from it, the per-GEMM kernels ignore it.
    Returns:
        (M, D) in x.dtype; slack rows (and their input gradient) are zero.
    """
    fused = fused_experts_kernel(qtype, kernel, x.device)
    if fused is not None:
        qw = cached_weights(weight_cache, qtype, x, gate_up_proj, down_proj)
        return fused(x, gate_up_proj, down_proj, offs, quantized_weights=qw)
    kernel = per_gemm_kernel(qtype, kernel, x.device)
    h = swiglu(quantized_grouped_mm(x, gate_up_proj, offs, qtype=qtype, kernel=kernel))
    return quantized_grouped_mm(h, down_proj, offs, qtype=qtype, kernel=kernel)


def routed_swiglu_experts(
    tokens, expert_indices, expert_weights, gate_up_proj, down_proj, qtype, kernel, *, weight_cache=None
):
    """A routed SwiGLU experts block (permute-and-pad, experts, weighted combine) in qtype.

    Args:
        tokens: (T, D). expert_indices: (T, k) ids in [0, E). expert_weights: (T, k).
        gate_up_proj: (E, 2H, D) local tensor. down_proj: (E, D, H) local tensor.
        qtype: the recipe. kernel: the user's kernel choice.
        weight_cache: the module's ``ExpertWeightCache`` or None (see swiglu_experts_quantized).
    Returns:
        (T, D) in tokens.dtype.
    Where a fused kernel can take the tokens straight from the routing (SM90: MXFP8 fuses
    the gather into the fake-quant pass; FP8 folds the routing weights into the down
    GEMM's epilogue), it does; otherwise tokens are permuted and padded to the recipe's
    alignment in one pass.
    """
    num_experts = gate_up_proj.shape[0]
    align = group_alignment(qtype)
    fused = fused_experts_kernel(qtype, kernel, tokens.device)
    if qtype is QuantizationType.MXFP8 and fused is not None and tokens.dtype == torch.bfloat16:
        from moeq.ops.mxfp8_hopper import mxfp8_routed_swiglu_experts

        qw = cached_weights(weight_cache, qtype, tokens, gate_up_proj, down_proj)
        return mxfp8_routed_swiglu_experts(
            tokens, expert_indices, expert_weights, gate_up_proj, down_proj, quantized_weights=qw
        )
    if qtype is QuantizationType.FP8 and fused is not None and tokens.dtype == torch.bfloat16:
        # routing weights folded into the down GEMM's epilogue, their gradient into the
        # SwiGLU backward pass (moeq/ops/fp8_hopper.py)
        from moeq.ops.fp8_hopper import fp8_routed_swiglu_experts

        qw = cached_weights(weight_cache, qtype, tokens, gate_up_proj, down_proj)
        return fp8_routed_swiglu_experts(
            tokens, expert_indices, expert_weights, gate_up_proj, down_proj, quantized_weights=qw
        )
    grouped, counts, layout = _padding.permute_and_pad(tokens, expert_indices, num_experts, align)
    if qtype is QuantizationType.BF16:
        out = swiglu_experts(grouped, gate_up_proj, down_proj, counts)
    else:
        offs = group_end_offsets(counts, align)
        out = swiglu_experts_quantized(grouped, gate_up_proj, down_proj, offs, qtype, kernel, weight_cache=weight_cache)
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
    qtype: QuantizationType,
    incoming_alignment: Optional[int],
    *,
    tail_slack: bool = False,
) -> AlignedGroups:
    """Apply the padding policy (moeq.experts.padding_policy.needs_padding) to incoming token groups.

    Args:
        x: (M, D) rows in expert order; every group starts at a multiple of
            ``incoming_alignment`` (None: groups packed back to back).
        num_tokens_per_expert: (E,) integer rows per group as the caller counts them (a
            padding dispatcher counts its padding rows in).
        qtype: the recipe. incoming_alignment: what the caller guarantees.
        tail_slack: False: the groups cover x (``moeq.GroupedExperts``' contract). True:
            rows past the last group are slack (torchtitan's dispatchers hand fixed-size
            buffers): they join no group, come out zero and get zero gradient. Counts
            summing past M fail ``torch._assert_async`` (at once off CUDA).
    Returns:
        :class:`AlignedGroups`. Pads (one pass, ``pad_token_groups``) only when the
        recipe needs an alignment the caller does not guarantee; then
        :func:`restore_token_groups` unpads the GEMMs' output.
    """
    if not needs_padding(qtype, incoming_alignment):
        return AlignedGroups(x, group_end_offsets(num_tokens_per_expert, incoming_alignment), None)
    counts = num_tokens_per_expert
    num_experts = counts.shape[0]
    if tail_slack:
        # The slack rows become one more group after the last expert: padding keeps them
        # (zeros for the GEMMs, which see only the first E groups) and unpadding puts
        # them back in place, so no shape depends on how many there are.
        slack = x.shape[0] - counts.sum()
        torch._assert_async(
            slack >= 0,
            "num_tokens_per_expert sums to more rows than x has: pass the per-expert row counts of x",
        )
        counts = torch.cat([counts, slack.reshape(1).to(counts.dtype)])
    padded, layout = _padding.pad_token_groups(x, counts, group_alignment(qtype))
    return AlignedGroups(padded, layout.padded_offsets[:num_experts], layout)


def restore_token_groups(y: Tensor, aligned: AlignedGroups) -> Tensor:
    """The GEMMs' output (rows of ``aligned.x``) back on the rows of the incoming x."""
    return y if aligned.layout is None else _padding.unpad_token_groups(y, aligned.layout)


def grouped_swiglu_experts(
    x: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    num_tokens_per_expert: Tensor,
    qtype: QuantizationType,
    kernel: str,
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
        num_tokens_per_expert: (E,) integer. qtype, kernel: the recipe and kernel choice.
        weight_cache: see :func:`swiglu_experts_quantized`.
    Returns:
        (M, D) in x.dtype; padding rows inside groups hold the experts' values on zeros,
        slack rows are zero.
    """
    aligned = align_token_groups(x, num_tokens_per_expert, qtype, incoming_alignment, tail_slack=tail_slack)
    y = swiglu_experts_quantized(
        aligned.x, gate_up_proj, down_proj, aligned.offs, qtype, kernel, weight_cache=weight_cache
    )
    return restore_token_groups(y, aligned)
