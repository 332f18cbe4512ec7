"""FP8 rowwise routed SwiGLU experts for Hopper (SM90): forward and backward in one Function.

``fp8_swiglu_experts(x, gate_up_proj, down_proj, offs)`` computes, per expert ``e`` over its
token group ``g``,

    gate_up = x[g] @ gate_up_proj[e].T        (M_g, 2H)   one GEMM for gate and up
    h       = silu(gate_up[:, :H]) * gate_up[:, H:]
    y[g]    = h @ down_proj[e].T               (M_g, D)

with all six GEMMs (two forward, two dgrad, two wgrad) in ``torch._scaled_grouped_mm``
FP8 e4m3 with one power-of-two float32 scale per row along each GEMM's contraction dim
(the numerics of moeq/quant/fp8_rowwise.py, bitwise). Every operand is quantized once by
the Triton passes of ``moeq.kernels.fp8_rowwise``, each producing both layouts an operand
needs in two reads of its source:

=========================  ======================================  ========================
source                     row copy (scale along ...) -> GEMM        column copy -> GEMM
=========================  ======================================  ========================
x (M, D)                   D -> gate_up forward                      tokens/group -> wgrad gate_up
gate_up_proj (E, 2H, D)    D -> gate_up forward                      2H -> dgrad x
h (never in bf16)          H -> down forward                         tokens/group -> wgrad down
down_proj (E, D, H)        H -> down forward                         D -> dgrad h
grad_y (M, D)              D -> dgrad h                              tokens/group -> wgrad down
d gate_up (never in bf16)  2H -> dgrad x                             tokens/group -> wgrad gate_up
=========================  ======================================  ========================

Saved for backward: ``gate_up`` (bf16, as the BF16 path saves), the FP8 column copies of x
and h, and the FP8 dgrad copies of both weights (1 byte per weight element: re-quantizing
them in backward would read the bf16 weights again).

Layout contract: ``offs`` (E,) int32 cumulative group ends, every group starting at a
multiple of ``GROUP_ALIGNMENT[FP8]`` (16) and ``offs[-1] <= M``; rows at or past
``offs[-1]`` (slack) are in no group, and their rows of ``y`` and ``grad_x`` are zero. The
layout is checked on device (``torch._assert_async``), never read on the host. A NaN or
Inf in a group's data turns that row's / column's dequantization scale into NaN, so the
outputs it touches are NaN rather than silently finite.

No host syncs; ``torch.compile(fullgraph=True)`` traces it (the Triton passes are custom
ops under compile).

Weight quantization once per optimizer step: ``quantize_fp8_expert_weights`` makes both
FP8 copies of both weights with the same passes the Function runs; passing its result as
``quantized_weights=`` skips those passes and gives bitwise the same results. Under
gradient accumulation ``moeq.quantized_weight_cache`` (moeq/weight_cache.py) does this for
converted models, with a check that the weights did not change.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moeq.kernels import fp8_rowwise as _k

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
        return Fp8ExpertWeights(
            _k.quantize_weight(gate_up_proj, colwise=need_dgrad), _k.quantize_weight(down_proj, colwise=need_dgrad)
        )


class _Fp8SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, offs, need_x, need_gu, need_down, qweights=None):
        m = x.shape[0]
        need_h = need_x or need_gu  # grad of h feeds both of these
        x = x.contiguous()
        if qweights is None:
            wgu = _k.quantize_weight(gate_up_proj, colwise=need_x)
            wd = _k.quantize_weight(down_proj, colwise=need_h)
        else:  # precomputed by quantize_fp8_expert_weights: the same passes, run earlier
            wgu, wd = qweights
        xq = _k.quantize_dual(x, offs, rowwise=True, colwise=need_gu)
        torch._assert_async(
            xq.offs_ok,
            "fp8_swiglu_experts: offs must be non-decreasing int32 group ends, each a multiple of "
            "GROUP_ALIGNMENT[FP8] and <= x.shape[0]: pad token groups (moeq.padding) first",
        )
        gate_up = _mm(xq.row, wgu.row.transpose(-2, -1), xq.row_inv, wgu.row_inv, offs)  # (M, 2H)
        hq = _k.swiglu_quantize(gate_up, offs, colwise=need_down)
        y = _mm(hq.row, wd.row.transpose(-2, -1), hq.row_inv, wd.row_inv, offs)  # (M, D)
        _k.zero_slack_rows_(y, offs)
        ctx.flags = (need_x, need_gu, need_down)
        ctx.weight_dtypes = (gate_up_proj.dtype, down_proj.dtype)
        ctx.m = m
        ctx.save_for_backward(
            offs, gate_up, xq.col, xq.col_inv, hq.col, hq.col_inv, wgu.col, wgu.col_inv, wd.col, wd.col_inv
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        offs, gate_up, x_col, x_col_inv, h_col, h_col_inv, wgu_col, wgu_col_inv, wd_col, wd_col_inv = ctx.saved_tensors
        need_x, need_gu, need_down = ctx.flags
        need_h = need_x or need_gu
        grad_y = grad_y.to(torch.bfloat16).contiguous()
        gq = _k.quantize_dual(grad_y, offs, rowwise=need_h, colwise=need_down)
        grad_x = grad_gu = grad_down = None
        if need_down:
            # (D, M) x (M, H) per group -> (E, D, H)
            grad_down = _mm(gq.col, h_col.t(), gq.col_inv.reshape(-1), h_col_inv.reshape(-1), offs)
            grad_down = grad_down.to(ctx.weight_dtypes[1])
        if need_h:
            grad_h = _mm(gq.row, wd_col.transpose(-2, -1), gq.row_inv, wd_col_inv, offs)  # (M, H)
            ggq = _k.swiglu_backward_quantize(gate_up, grad_h, offs)
            if need_x:
                grad_x = _mm(ggq.row, wgu_col.transpose(-2, -1), ggq.row_inv, wgu_col_inv, offs)  # (M, D)
                _k.zero_slack_rows_(grad_x, offs)
            if need_gu:
                # (2H, M) x (M, D) per group -> (E, 2H, D)
                grad_gu = _mm(ggq.col, x_col.t(), ggq.col_inv.reshape(-1), x_col_inv.reshape(-1), offs)
                grad_gu = grad_gu.to(ctx.weight_dtypes[0])
        return grad_x, grad_gu, grad_down, None, None, None, None, None


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
    _check_inputs(x, gate_up_proj, down_proj, offs)
    grad = torch.is_grad_enabled()
    need_x, need_gu, need_down = (
        grad and x.requires_grad, grad and gate_up_proj.requires_grad, grad and down_proj.requires_grad
    )
    if quantized_weights is not None:
        _check_quantized_weights(quantized_weights, gate_up_proj, down_proj, need_x or need_gu)
    return _Fp8SwiGLUExperts.apply(
        x, gate_up_proj, down_proj, offs, need_x, need_gu, need_down, quantized_weights,
    )
