"""FP8 rowwise routed SwiGLU experts for Hopper (SM90): forward and backward in one Function.

``fp8_swiglu_experts(x, gate_up_proj, down_proj, offs)`` computes, per expert ``e`` over its
token group ``g``,

    gate_up = x[g] @ gate_up_proj[e].T        (M_g, 2H)   one GEMM for gate and up
    h       = silu(gate_up[:, :H]) * gate_up[:, H:]
    y[g]    = h @ down_proj[e].T               (M_g, D)

with all six GEMMs (two forward, two dgrad, two wgrad) in FP8 e4m3 with one power-of-two
float32 scale per row along each GEMM's contraction dim (the numerics of
moeq/numerics/fp8_rowwise.py, bitwise). The forward and input-gradient GEMMs are moeq's own
M-grouped FP8 GEMM (kernels/fp8_gemm.py: device-side tile schedule, TMA loads, slack rows
written as zeros in the same launch); the two weight-gradient GEMMs are
``torch._scaled_grouped_mm`` (faster than moeq's K-grouped kernel on these shapes, measured:
docs/fp8_gemm.md). Operands are quantized by the single-read strip passes of
kernels/fp8_strips.py:

=========================  ======================================  ========================
source                     row copy (scale along ...) -> GEMM        column copy -> GEMM
=========================  ======================================  ========================
x (M, D)                   D -> gate_up forward                      tokens/group -> wgrad gate_up
gate_up_proj (E, 2H, D)    D -> gate_up forward (made in forward)    2H -> dgrad x (made in backward)
h (never in bf16)          H -> down forward                         tokens/group -> wgrad down
down_proj (E, D, H)        H -> down forward (made in forward)       D -> dgrad h (made in backward)
grad_y (M, D)              D -> dgrad h                              tokens/group -> wgrad down
d gate_up (never in bf16)  2H -> dgrad x                             tokens/group -> wgrad gate_up
=========================  ======================================  ========================

Saved for backward: ``gate_up`` (bf16, as the BF16 path saves), the FP8 column copies of x
and h with their scales: 1 + 2*2 + 1 bytes per (row, D / 2H / H) element, against BF16's
bf16 x, gate_up and h. The weights' input-gradient copies are made in the backward from
the weights themselves (the same bytes as making them in the forward, one read each), so
nothing weight-sized is kept between forward and backward; ``moeq.quantized_weight_cache``
(gradient accumulation) makes both copies once per step instead.

**The routed block** ``fp8_routed_swiglu_experts(tokens, expert_indices, expert_weights, ...)``
folds the routing weights into the experts: the down GEMM's epilogue multiplies each row
by its routing weight (its per-row scale factor becomes ``1/scale * w``), the combine is an
unweighted sum, and the routing-weight gradient ``dw[row] = sum_n grad_h[row, n] * h[row, n]``
(grad_h of the unweighted output, h recomputed from gate_up) comes out of the SwiGLU
backward pass that already reads both. So the (M, D) bf16 expert output, which a weighted
combine must keep for that gradient, is never saved. The grad_y copies: the row copy (for
grad_h) quantizes the unweighted gradient rows, the column copy (for the down weight's
gradient) the weighted ones, ``w * grad``.

Layout contract: ``offs`` (E,) int32 cumulative group ends, every group starting at a
multiple of ``GROUP_ALIGNMENT[FP8]`` (16) and ``offs[-1] <= M``; rows at or past
``offs[-1]`` (slack) are in no group, and their rows of ``y`` and ``grad_x`` are zero. The
layout is checked on device (``torch._assert_async``), never read on the host. A NaN or
Inf in a group's data turns that row's / column's dequantization scale into NaN, so the
outputs it touches are NaN rather than silently finite.

No host syncs; ``torch.compile(fullgraph=True)`` traces it (the Triton launches are custom
ops under compile).

Weight quantization once per optimizer step: ``quantize_fp8_expert_weights`` makes both
FP8 copies of both weights with the same passes the Function runs; passing its result as
``quantized_weights=`` skips those passes and gives bitwise the same results. Under
gradient accumulation ``moeq.quantized_weight_cache`` (moeq/experts/weight_cache.py) does this for
converted models, with a check that the weights did not change.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moeq.kernels import fp8_gemm as _g
from moeq.kernels import fp8_rowwise as _k
from moeq.kernels import fp8_strips as _s
from moeq.numerics.validation import assert_on_device

_OUT_DTYPE = torch.bfloat16  # torch._scaled_grouped_mm's only output dtype
# Hopper's FP8 tensor cores without periodic fp32 promotion, as torchao runs them: the
# accumulation error stays far under the e4m3 rounding error (measured in
# benchmarks/fp8_hopper.py against float64).
_FAST_ACCUM = True

# The grouped GEMM. A module attribute so CPU tests can substitute an emulation (there is
# no CPU kernel of torch._scaled_grouped_mm).
_scaled_grouped_mm = torch._scaled_grouped_mm


def _mm(a, b, scale_a, scale_b, offs):
    return _scaled_grouped_mm(a, b, scale_a, scale_b, offs=offs, out_dtype=_OUT_DTYPE, use_fast_accum=_FAST_ACCUM)


def _gemm(a, b, scale_a, scale_b, offs):
    """moeq's M-grouped FP8 GEMM: a (M, K) e4m3, b (E, N, K) e4m3 -> (M, N) bf16, slack rows zero."""
    return _g.grouped_mm(a, b, scale_a, scale_b, offs, out_dtype=_OUT_DTYPE)


def _wgrad(a_col, b_col, a_inv, b_inv, offs, dtype):
    """(N, L) x (K, L) token-contiguous column copies -> (E, N, K) weight gradient in ``dtype``."""
    out = _mm(a_col, b_col.t(), a_inv.reshape(-1), b_inv.reshape(-1), offs)
    return out if out.dtype == dtype else out.to(dtype)


def _check_inputs(x, gate_up_proj, down_proj, offs) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2D (M, D) routed rows, got shape {tuple(x.shape)}")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"x must be bfloat16 (the FP8 GEMMs return bf16), got {x.dtype}: cast the activations")
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            f"gate_up_proj must be (E, 2H, D) and down_proj (E, D, H), got {tuple(gate_up_proj.shape)} "
            f"and {tuple(down_proj.shape)}"
        )
    e, h2, d = gate_up_proj.shape
    if h2 % 2 or down_proj.shape != (e, d, h2 // 2) or x.shape[1] != d:
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, gate_up_proj {tuple(gate_up_proj.shape)}, "
            f"down_proj {tuple(down_proj.shape)}; want x (M, D), gate_up_proj (E, 2H, D), down_proj (E, D, H)"
        )
    h = h2 // 2
    if d % 16 or h % 16:
        raise ValueError(
            f"FP8 grouped GEMMs need the model dim D={d} and the expert hidden dim H={h} to be multiples of 16 "
            f"(16-byte aligned FP8 rows): pad the weights"
        )
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be bfloat16 or float32, got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device}, x on {x.device}: put them on one device")
    if offs.dim() != 1 or offs.dtype != torch.int32 or offs.numel() != e:
        raise ValueError(f"offs must be an ({e},) int32 tensor of cumulative group ends, got {offs.dtype} {tuple(offs.shape)}")
    if offs.device != x.device:
        raise ValueError(f"offs is on {offs.device}, x on {x.device}: move offs to {x.device}")
    if x.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(x.device)
        if major != 9:
            raise RuntimeError(
                f"fp8_swiglu_experts targets Hopper (SM90); this device is sm_{major}{minor}: "
                f"use moeq's kernel='torch' or 'emulated' FP8 path"
            )


class Fp8ExpertWeights(NamedTuple):
    """Precomputed FP8 copies of both expert weights (see ``quantize_fp8_expert_weights``).

    gate_up: Fp8Dual of gate_up_proj (E, 2H, D): row (E, 2H, D) e4m3 + row_inv (E, 2H)
        scaled along D (forward); col (E, D, 2H) + col_inv (E, D) scaled along 2H (dgrad x),
        empty when made with ``need_dgrad=False``.
    down: Fp8Dual of down_proj (E, D, H): row scaled along H, col (E, H, D) along D.
    """

    gate_up: _k.Fp8Dual
    down: _k.Fp8Dual

    @property
    def has_dgrad(self) -> bool:
        return self.gate_up.col.numel() > 0 and self.down.col.numel() > 0


def quantize_fp8_expert_weights(
    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, need_dgrad: bool = True
) -> Fp8ExpertWeights:
    """FP8 rowwise copies of both expert weights, exactly as ``fp8_swiglu_experts`` makes them.

    Args:
        gate_up_proj: (E, 2H, D) bfloat16/float32.
        down_proj: (E, D, H) bfloat16/float32.
        need_dgrad: also make the column (dgrad) copies, needed whenever x or a weight
            requires grad.
    Returns:
        Fp8ExpertWeights of e4m3 data and float32 inverse scales (no autograd history).
    """
    with torch.no_grad():
        return Fp8ExpertWeights(_weight_copies(gate_up_proj, need_dgrad), _weight_copies(down_proj, need_dgrad))


def _weight_copies(w: torch.Tensor, need_dgrad: bool) -> _k.Fp8Dual:
    row, row_inv = _s.quantize_weight_rows(w)
    if need_dgrad:
        col, col_inv = _s.quantize_weight_cols(w)
    else:
        col, col_inv = row.new_empty((0,)), row_inv.new_empty((0,))
    return _k.Fp8Dual(row, row_inv, col, col_inv)


class _Fp8SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_weights, gate_up_proj, down_proj, offs, need_x, need_w, need_gu, need_down, qweights=None):
        x = x.contiguous()
        if qweights is None:
            wgu_row, wgu_row_inv = _s.quantize_weight_rows(gate_up_proj)
            wd_row, wd_row_inv = _s.quantize_weight_rows(down_proj)
        else:  # precomputed by quantize_fp8_expert_weights: the same passes, run earlier
            wgu_row, wgu_row_inv = qweights.gate_up.row, qweights.gate_up.row_inv
            wd_row, wd_row_inv = qweights.down.row, qweights.down.row_inv
        xq = _s.quantize_dual_strips(x, offs, rowwise=True, colwise=need_gu)
        assert_on_device(
            xq.offs_ok,
            "fp8_swiglu_experts: offs must be non-decreasing int32 group ends, each a multiple of "
            "GROUP_ALIGNMENT[FP8] and <= x.shape[0]: pad token groups (moeq.ops.padding) first",
        )
        gate_up = _gemm(xq.row, wgu_row, xq.row_inv, wgu_row_inv, offs)  # (M, 2H)
        hq = _s.swiglu_quantize_strips(gate_up, offs, colwise=need_down)
        # the routing weight rides on h's per-row dequantization factor (exact power of two
        # times w): y = w * (h @ down.T), rounded to bf16 once
        h_scale = hq.row_inv if row_weights is None else hq.row_inv * row_weights
        y = _gemm(hq.row, wd_row, h_scale, wd_row_inv, offs)  # (M, D)
        ctx.flags = (need_x, need_w, need_gu, need_down)
        ctx.weight_dtypes = (gate_up_proj.dtype, down_proj.dtype)
        ctx.qweights = qweights if qweights is not None and qweights.has_dgrad else None
        saved_w = row_weights if row_weights is not None else offs.new_empty((0,), dtype=torch.float32)
        ctx.has_row_weights = row_weights is not None
        ctx.save_for_backward(offs, gate_up, xq.col, xq.col_inv, hq.col, hq.col_inv, saved_w, gate_up_proj, down_proj)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        offs, gate_up, x_col, x_col_inv, h_col, h_col_inv, w, gate_up_proj, down_proj = ctx.saved_tensors
        need_x, need_w, need_gu, need_down = ctx.flags
        need_h = need_x or need_gu or need_w  # the gradient of h feeds all three
        w = w if ctx.has_row_weights else None
        qw = ctx.qweights
        grad_y = grad_y.to(torch.bfloat16).contiguous()
        # row copy: the unweighted gradient rows (grad_h of the unweighted output, for dw);
        # column copy: the weighted ones (the down weight's gradient)
        gq = _s.quantize_dual_strips(grad_y, offs, rowwise=need_h, colwise=need_down, row_weights=w,
                                     weight_col_copy=w is not None)
        grad_x = grad_w = grad_gu = grad_down = None
        if need_down:
            grad_down = _wgrad(gq.col, h_col, gq.col_inv, h_col_inv, offs, ctx.weight_dtypes[1])  # (E, D, H)
        if need_h:
            wd_col, wd_col_inv = (qw.down.col, qw.down.col_inv) if qw is not None else _s.quantize_weight_cols(down_proj)
            grad_h = _gemm(gq.row, wd_col, gq.row_inv, wd_col_inv, offs)  # (M, H), unweighted
            ggq, dw = _s.swiglu_backward_quantize_strips(gate_up, grad_h, offs, row_weights=w, colwise=need_gu)
            grad_w = dw if need_w else None
            if need_x:
                wgu_col, wgu_col_inv = (
                    (qw.gate_up.col, qw.gate_up.col_inv) if qw is not None else _s.quantize_weight_cols(gate_up_proj)
                )
                grad_x = _gemm(ggq.row, wgu_col, ggq.row_inv, wgu_col_inv, offs)  # (M, D), slack rows zero
            if need_gu:
                grad_gu = _wgrad(ggq.col, x_col, ggq.col_inv, x_col_inv, offs, ctx.weight_dtypes[0])  # (E, 2H, D)
        return grad_x, grad_w, grad_gu, grad_down, None, None, None, None, None, None


def _check_quantized_weights(qw, gate_up_proj, down_proj, need_dgrad: bool) -> None:
    if not isinstance(qw, Fp8ExpertWeights):
        raise TypeError(
            f"quantized_weights must be the Fp8ExpertWeights of quantize_fp8_expert_weights, got {type(qw).__name__}"
        )
    for name, q, w in (("gate_up_proj", qw.gate_up, gate_up_proj), ("down_proj", qw.down, down_proj)):
        if tuple(q.row.shape) != tuple(w.shape) or q.row.device != w.device:
            raise ValueError(
                f"quantized_weights were made from a {name} of shape {tuple(q.row.shape)} on {q.row.device}, "
                f"but {name} is {tuple(w.shape)} on {w.device}: quantize the weights passed here"
            )
    if need_dgrad and not qw.has_dgrad:
        raise ValueError(
            "quantized_weights lack the dgrad (column) copies but gradients are needed: "
            "make them with quantize_fp8_expert_weights(..., need_dgrad=True)"
        )


def fp8_swiglu_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    offs: torch.Tensor,
    *,
    quantized_weights: Optional[Fp8ExpertWeights] = None,
) -> torch.Tensor:
    """Routed SwiGLU experts with FP8 rowwise GEMMs (Hopper), differentiable.

    Args:
        x: (M, D) bfloat16 routed rows grouped in expert order; rows past ``offs[-1]`` are
            slack (any values).
        gate_up_proj: (E, 2H, D) bfloat16/float32, gate rows [0, H), up rows [H, 2H).
        down_proj: (E, D, H) bfloat16/float32.
        offs: (E,) int32 cumulative group ends on x's device; every group starts at a
            multiple of ``GROUP_ALIGNMENT[FP8]``, ``offs[-1] <= M`` (checked on device).
        quantized_weights: optional ``quantize_fp8_expert_weights(gate_up_proj, down_proj)``
            of these very weights, reused instead of quantizing them again (results are
            bitwise the same; weight gradients still come back for the bf16/fp32 weights).
            The caller guarantees they are current: ``moeq.quantized_weight_cache`` checks it.
    Returns:
        y: (M, D) bfloat16; rows at or past ``offs[-1]`` are zero.

    D and H must be multiples of 16. Gradients: x (bf16), weights (in their dtypes),
    computed only for inputs that require them.
    """
    return _apply(x, None, gate_up_proj, down_proj, offs, quantized_weights)


def _apply(x, row_weights, gate_up_proj, down_proj, offs, quantized_weights):
    _check_inputs(x, gate_up_proj, down_proj, offs)
    grad = torch.is_grad_enabled()
    need_x, need_gu, need_down = (
        grad and x.requires_grad, grad and gate_up_proj.requires_grad, grad and down_proj.requires_grad
    )
    need_w = grad and row_weights is not None and row_weights.requires_grad
    if quantized_weights is not None:
        _check_quantized_weights(quantized_weights, gate_up_proj, down_proj, need_x or need_gu or need_w)
    return _Fp8SwiGLUExperts.apply(
        x, row_weights, gate_up_proj, down_proj, offs, need_x, need_w, need_gu, need_down, quantized_weights,
    )


def fp8_routed_swiglu_experts(
    tokens: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    quantized_weights: Optional[Fp8ExpertWeights] = None,
) -> torch.Tensor:
    """A whole routed MoE experts block in FP8 rowwise: permute-and-pad, experts, combine.

    The routing weights multiply the down GEMM's output rows in its epilogue and their
    gradient comes from the SwiGLU backward pass (module docstring), so the combine is an
    unweighted sum and the bf16 expert outputs are not kept for backward.

    Args:
        tokens: (T, D) bfloat16. expert_indices: (T, k) integer expert ids in [0, E).
        expert_weights: (T, k) routing scores (any float dtype; gradients come back in it).
        gate_up_proj: (E, 2H, D) bfloat16/float32. down_proj: (E, D, H).
        quantized_weights: as for :func:`fp8_swiglu_experts`.
    Returns:
        (T, D) bfloat16. Differentiable w.r.t. tokens, expert_weights and both weights.
    """
    from moeq.ops.padding import combine_token_groups, permute_and_pad

    if tokens.dtype != torch.bfloat16:
        raise TypeError(f"fp8_routed_swiglu_experts needs bfloat16 tokens, got {tokens.dtype}: cast them, or use "
                        f"permute_and_pad + fp8_swiglu_experts")
    if expert_weights.shape != expert_indices.shape:
        raise ValueError(f"expert_weights {tuple(expert_weights.shape)} must match expert_indices "
                         f"{tuple(expert_indices.shape)}: one weight per (token, slot)")
    x, _, layout = permute_and_pad(tokens, expert_indices, gate_up_proj.shape[0], _k.ALIGN)
    src = layout.source_rows.long()
    flat = expert_weights.reshape(-1).float()
    # padding and slack rows (source -1) get weight 0 (their rows are zero anyway)
    row_weights = torch.where(src >= 0, flat[src.clamp(min=0)], flat.new_zeros(()))
    y = _apply(x, row_weights, gate_up_proj, down_proj, layout.padded_offsets, quantized_weights)
    return combine_token_groups(y, layout, None)
