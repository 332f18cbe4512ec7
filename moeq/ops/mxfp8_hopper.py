"""MXFP8 routed SwiGLU experts on Hopper: fused fake-quant kernels + BF16 grouped GEMMs.

``mxfp8_swiglu_experts`` computes the experts' forward and backward with every GEMM in
MXFP8 numerics (e4m3 data, e8m0 RCEIL scales per 32 elements along the contraction dim,
fp32 accumulation): each operand is fake-quantized along its GEMM's contraction dim and
the GEMM runs as a BF16 ``torch._grouped_mm``. That is exact, not an approximation: an
e4m3 value times a power of two is a bf16 value and the product of two is exact in fp32
(moeq/numerics/mxfp8.py), so only the fp32 accumulation order differs from an MXFP8 tensor-
core GEMM; it is the same math as torchao's ``KernelPreference.EMULATED`` mode, at BF16
GEMM speed, plus the memory-bound passes of moeq/kernels/mxfp8_hopper.py.

Where each operand is quantized (the recipe of torchao's ``_to_mxfp8_then_scaled_grouped_mm``):

=========================  ==============================  ===============================
GEMM                        operand A                       operand B
=========================  ==============================  ===============================
forward ``x @ W[e].T``      x along D (rows, 1x32)          W along D (its K)
input grad ``g @ W[e]``     g along N (rows, 1x32)          W along N (its dim 1)
weight grad ``g[e].T @ a``  g along tokens (32x1 per group)  a along tokens (32x1 per group)
=========================  ==============================  ===============================

Fusion: x is read once for its forward (row) and weight-gradient (column) copies; each
weight once for both its copies; ``h = silu(gate) * up`` is never written unquantized,
only its two copies; the SwiGLU backward writes the two copies of ``d gate_up`` directly;
``grad_y`` is read once for both its copies. The forward's column copies and the weights'
input-gradient copies are saved for backward, not recomputed.

On CUDA (and under ``TRITON_INTERPRET=1``) the fake-quant passes are the Triton kernels; on
CPU they are the plain-torch references, which the kernels match bitwise.

Weight quantization once per optimizer step: ``quantize_mxfp8_expert_weights`` makes both
copies of both weights with the same pass the Function runs; passing its result as
``quantized_weights=`` skips that pass and gives bitwise the same results. Under gradient
accumulation ``moeq.quantized_weight_cache`` (moeq/experts/weight_cache.py) does this for converted
models, with a check that the weights did not change.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moeq.kernels import mxfp8_hopper as _k
from moeq.kernels.common import INTERPRET as _INTERPRET
from moeq.ops.slack_rows import zero_slack_rows_
from moeq.ops.padding import combine_token_groups, route_tokens
from moeq.numerics.groups import zero_slack_rows
from moeq.numerics.mxfp8 import MX_BLOCK_SIZE, mxfp8_fake_quantize
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType
from moeq.numerics.validation import assert_on_device

_ALIGN = GROUP_ALIGNMENT[QuantizationType.MXFP8]


def _ops(device: torch.device):
    """The fake-quant implementation for ``device``: Triton kernels, or their references on CPU."""
    if device.type == "cuda" or _INTERPRET:
        return (
            _k.mxfp8_fake_quant_2d,
            _k.mxfp8_fake_quant_weight,
            _k.mxfp8_swiglu_fake_quant,
            _k.mxfp8_swiglu_backward_fake_quant,
            zero_slack_rows_,
        )
    return (_ref_2d, _ref_weight, _ref_swiglu, _ref_swiglu_bwd, _ref_zero_slack)


def _ref_2d(x, offs=None, *, rows=True, cols=True):
    return (
        _k.fake_quant_rows_reference(x, offs) if rows else None,
        _k.fake_quant_cols_reference(x, offs) if cols else None,
    )


def _ref_weight(w, *, along_k=True, along_n=True):
    return (
        mxfp8_fake_quantize(w, -1, out_dtype=torch.bfloat16) if along_k else None,
        mxfp8_fake_quantize(w, -2, out_dtype=torch.bfloat16) if along_n else None,
    )


def _ref_swiglu(gate_up, offs, *, rows=True, cols=True):
    return _ref_2d(_k.swiglu_reference(gate_up), offs, rows=rows, cols=cols)


def _ref_swiglu_bwd(grad_h, gate_up, offs, *, rows=True, cols=True):
    return _ref_2d(_k.swiglu_backward_reference(grad_h, gate_up), offs, rows=rows, cols=cols)


def _ref_zero_slack(out, offs):
    return out.copy_(zero_slack_rows(out, offs))


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A no-op .to() here makes torch 2.11's compiled autograd return zero gradients.
    return t if t.dtype == dtype else t.to(dtype)


class MXFP8ExpertWeights(NamedTuple):
    """Precomputed MXFP8 fake-quant copies of both expert weights (bf16, each (E, N, K) as
    its weight); see ``quantize_mxfp8_expert_weights``.

    gate_up_k / down_k: blocks of 32 along K (forward GEMMs). gate_up_n / down_n: blocks of
    32 along N (input-gradient GEMMs); None when made with ``need_dgrad=False``.
    """

    gate_up_k: torch.Tensor
    gate_up_n: Optional[torch.Tensor]
    down_k: torch.Tensor
    down_n: Optional[torch.Tensor]

    @property
    def has_dgrad(self) -> bool:
        return self.gate_up_n is not None and self.down_n is not None


def quantize_mxfp8_expert_weights(
    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, need_dgrad: bool = True
) -> MXFP8ExpertWeights:
    """MXFP8 fake-quant copies of both expert weights, exactly as ``mxfp8_swiglu_experts`` makes them.

    Args:
        gate_up_proj: (E, 2H, D) bf16/fp32.
        down_proj: (E, D, H) bf16/fp32.
        need_dgrad: also make the copies along N, needed whenever x or a weight requires grad.
    Returns:
        MXFP8ExpertWeights of bf16 tensors (no autograd history).
    """
    fq_weight = _ops(gate_up_proj.device)[1]
    with torch.no_grad():
        w1_k, w1_n = fq_weight(gate_up_proj, along_k=True, along_n=need_dgrad)
        w2_k, w2_n = fq_weight(down_proj, along_k=True, along_n=need_dgrad)
    return MXFP8ExpertWeights(w1_k, w1_n, w2_k, w2_n)


class _MXFP8SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, offs, need_grad: bool, x_col, qweights=None):
        fq_2d, fq_weight, fq_swiglu, _, zero_slack_ = _ops(x.device)
        if x_col is None:
            x_row, x_col = fq_2d(x.contiguous(), offs, rows=True, cols=need_grad)
        else:  # x is already its row copy (mxfp8_routed_swiglu_experts's fused gather)
            x_row = x
        if qweights is None:
            w1_k, w1_n = fq_weight(gate_up_proj, along_k=True, along_n=need_grad)
            w2_k, w2_n = fq_weight(down_proj, along_k=True, along_n=need_grad)
        else:  # precomputed by quantize_mxfp8_expert_weights: the same pass, run earlier
            w1_k, w1_n, w2_k, w2_n = qweights
        gate_up = _gmm(x_row, w1_k.transpose(-2, -1), offs)  # (M, 2H)
        del x_row, w1_k
        h_row, h_col = fq_swiglu(gate_up, offs, rows=True, cols=need_grad)
        y = zero_slack_(_gmm(h_row, w2_k.transpose(-2, -1), offs), offs)  # (M, D)
        if need_grad:
            ctx.save_for_backward(x_col, w1_n, w2_n, gate_up, h_col, offs)
        ctx.dtypes = (x.dtype, gate_up_proj.dtype, down_proj.dtype)
        return _cast(y, x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x_col, w1_n, w2_n, gate_up, h_col, offs = ctx.saved_tensors
        fq_2d, _, _, fq_swiglu_bwd, zero_slack_ = _ops(grad_y.device)
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()
        gy_row, gy_col = fq_2d(grad_y, offs, rows=need_x or need_w1, cols=need_w2)
        grad_w1 = grad_w2 = grad_x = None
        if need_w2:
            grad_w2 = _cast(_gmm(gy_col.t(), h_col, offs), ctx.dtypes[2])  # (E, D, H)
        if need_x or need_w1:
            grad_h = _gmm(gy_row, w2_n, offs)  # (M, H); slack rows unwritten, ignored below
            del gy_row
            g_row, g_col = fq_swiglu_bwd(grad_h, gate_up, offs, rows=need_x, cols=need_w1)
            del grad_h
            if need_w1:
                grad_w1 = _cast(_gmm(g_col.t(), x_col, offs), ctx.dtypes[1])  # (E, 2H, D)
            if need_x:
                grad_x = _cast(zero_slack_(_gmm(g_row, w1_n, offs), offs), ctx.dtypes[0])  # (M, D)
        return grad_x, grad_w1, grad_w2, None, None, None, None


def _check_inputs(x, gate_up_proj, down_proj, offs) -> None:
    _check_shapes(x, gate_up_proj, down_proj)
    e = gate_up_proj.shape[0]
    if offs.dtype != torch.int32 or tuple(offs.shape) != (e,):
        raise ValueError(f"offs must be ({e},) int32 cumulative group ends, got {offs.dtype} {tuple(offs.shape)}")
    if offs.device != x.device:
        raise ValueError("x, gate_up_proj, down_proj and offs must be on one device")


def _check_shapes(x, gate_up_proj, down_proj) -> None:
    for name, t in (("x", x), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"mxfp8_swiglu_experts needs bfloat16/float32 {name}, got {t.dtype}")
    if x.dim() != 2 or gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            "mxfp8_swiglu_experts needs x (M, D), gate_up_proj (E, 2H, D), down_proj (E, D, H); got "
            f"{tuple(x.shape)}, {tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}"
        )
    m, d = x.shape
    e, h2, d1 = gate_up_proj.shape
    h = h2 // 2
    if d1 != d or h2 % 2 or tuple(down_proj.shape) != (e, d, h):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, gate_up_proj {tuple(gate_up_proj.shape)} (want (E, 2H, {d})), "
            f"down_proj {tuple(down_proj.shape)} (want ({e}, {d}, H))"
        )
    for name, size in (("model dim D", d), ("expert hidden dim H", h)):
        if size % MX_BLOCK_SIZE:
            raise ValueError(
                f"MXFP8 needs the {name} ({size}) to be a multiple of the MX block size {MX_BLOCK_SIZE}: pad it"
            )
    if gate_up_proj.device != x.device or down_proj.device != x.device:
        raise ValueError("x, gate_up_proj, down_proj and offs must be on one device")


def _check_quantized_weights(qw, gate_up_proj, down_proj, need_grad: bool) -> None:
    if not isinstance(qw, MXFP8ExpertWeights):
        raise TypeError(
            f"quantized_weights must be the MXFP8ExpertWeights of quantize_mxfp8_expert_weights, got {type(qw).__name__}"
        )
    for name, q, w in (("gate_up_proj", qw.gate_up_k, gate_up_proj), ("down_proj", qw.down_k, down_proj)):
        if tuple(q.shape) != tuple(w.shape) or q.device != w.device:
            raise ValueError(
                f"quantized_weights were made from a {name} of shape {tuple(q.shape)} on {q.device}, "
                f"but {name} is {tuple(w.shape)} on {w.device}: quantize the weights passed here"
            )
    if need_grad and not qw.has_dgrad:
        raise ValueError(
            "quantized_weights lack the input-gradient copies but gradients are needed: "
            "make them with quantize_mxfp8_expert_weights(..., need_dgrad=True)"
        )


def _assert_offsets(offs: torch.Tensor, num_rows: int) -> None:
    # Device-side checks (no host sync): non-empty groups start at multiples of the MXFP8
    # alignment (an empty group has no blocks to straddle), ends non-decreasing and in range.
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    ok = ((starts % _ALIGN == 0) | (offs == starts)).all() & (offs >= starts).all() & (offs[-1] <= num_rows)
    assert_on_device(
        ok,
        f"mxfp8_swiglu_experts: offs must be non-decreasing, end at <= {num_rows} rows, and every non-empty group "
        f"must start at a multiple of {_ALIGN} (GROUP_ALIGNMENT[MXFP8]); pad the token groups with moeq.pad_token_groups",
    )


def mxfp8_swiglu_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    offs: torch.Tensor,
    *,
    check_offsets: bool = True,
    x_col: Optional[torch.Tensor] = None,
    quantized_weights: Optional[MXFP8ExpertWeights] = None,
) -> torch.Tensor:
    """Routed SwiGLU experts with MXFP8 forward and backward GEMMs (Hopper-friendly).

    ``y[g_e] = (silu(x[g_e] @ gate[e].T) * (x[g_e] @ up[e].T)) @ down[e].T`` for each
    group ``g_e``, every GEMM (forward, input gradient, weight gradient) in MXFP8 numerics.

    Args:
        x: (M, D) bf16/fp32 tokens grouped in expert order; group e is rows
            ``[offs[e-1], offs[e])`` and, unless empty, starts at a multiple of 32
            (``GROUP_ALIGNMENT[MXFP8]``); rows at or past
            ``offs[-1]`` are slack (ignored, their output and gradient are zero).
        gate_up_proj: (E, 2H, D), gate rows [0, H), up rows [H, 2H).
        down_proj: (E, D, H).
        offs: (E,) int32 cumulative group end offsets on x's device.
        check_offsets: validate ``offs`` on the device with ``torch._assert_async``.
        x_col: optional (M, D) bf16 column copy of x (blocks of 32 rows per group). When
            given, ``x`` must already be its row copy (both from
            ``moeq.kernels.mxfp8_hopper.mxfp8_permute_fake_quant``) and is not quantized
            again; the gradient w.r.t. ``x`` passes straight through, as for any operand.
        quantized_weights: optional ``quantize_mxfp8_expert_weights(gate_up_proj, down_proj)``
            of these very weights, reused instead of quantizing them again (results are
            bitwise the same; weight gradients still come back for the bf16/fp32 weights).
            The caller guarantees they are current: ``moeq.quantized_weight_cache`` checks it.
    Returns:
        (M, D) in x.dtype; slack rows zero. Gradients come back in the inputs' dtypes.
    """
    _check_inputs(x, gate_up_proj, down_proj, offs)
    if check_offsets:
        _assert_offsets(offs, x.shape[0])
    need_grad = torch.is_grad_enabled() and (x.requires_grad or gate_up_proj.requires_grad or down_proj.requires_grad)
    if x_col is not None and (x_col.shape != x.shape or x_col.dtype != torch.bfloat16):
        raise ValueError(f"x_col must be x's bf16 column copy of shape {tuple(x.shape)}, got {x_col.dtype} {tuple(x_col.shape)}")
    if quantized_weights is not None:
        _check_quantized_weights(quantized_weights, gate_up_proj, down_proj, need_grad)
    return _MXFP8SwiGLUExperts.apply(x, gate_up_proj, down_proj, offs, need_grad, x_col, quantized_weights)


class _PermuteFakeQuant(torch.autograd.Function):
    """Tokens -> the padded layout's row and column fake-quant copies, in one pass.

    Backward: the row copy's gradient goes straight through the fake-quant to the padded
    rows, then sums over each token's k copies (the gradient of permute-and-pad)."""

    @staticmethod
    def forward(ctx, tokens, source_rows, dest_rows, offs, top_k: int, need_col: bool):
        if tokens.device.type == "cuda" or _INTERPRET:
            x_row, x_col = _k.mxfp8_permute_fake_quant(tokens.contiguous(), source_rows, top_k, offs, cols=need_col)
        else:
            x_row, x_col = _k.permute_fake_quant_reference(tokens, source_rows, top_k, offs)
            x_col = x_col if need_col else None
        ctx.save_for_backward(dest_rows, source_rows)
        ctx.top_k = top_k
        if x_col is None:
            return x_row, None
        ctx.mark_non_differentiable(x_col)
        return x_row, x_col

    @staticmethod
    def backward(ctx, grad_row, _grad_col):
        dest_rows, source_rows = ctx.saved_tensors
        grad_tokens = torch.ops.moeq.combine_token_groups(grad_row.contiguous(), dest_rows, source_rows, None, ctx.top_k)
        return grad_tokens, None, None, None, None, None


def mxfp8_routed_swiglu_experts(
    tokens: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    quantized_weights: Optional[MXFP8ExpertWeights] = None,
) -> torch.Tensor:
    """A whole routed MoE experts block in MXFP8: permute-and-pad, experts, weighted combine.

    Same result as ``permute_and_pad`` (alignment ``GROUP_ALIGNMENT[MXFP8]``) ->
    :func:`mxfp8_swiglu_experts` -> ``combine_token_groups``, bitwise, but the padded bf16
    tokens are never written: one kernel gathers each padded row from ``tokens`` and
    writes its two fake-quant copies (the forward GEMM's and the weight gradient's).

    Args:
        tokens: (T, D) bf16/fp32. expert_indices: (T, k) integer expert ids in [0, E).
        expert_weights: (T, k) routing scores.
        gate_up_proj: (E, 2H, D). down_proj: (E, D, H).
        quantized_weights: as for :func:`mxfp8_swiglu_experts`.
    Returns:
        (T, D) in tokens.dtype. Differentiable w.r.t. tokens, expert_weights and weights.
    """
    if tokens.dtype != torch.bfloat16:
        raise TypeError(
            f"mxfp8_routed_swiglu_experts needs bfloat16 tokens, got {tokens.dtype}: use permute_and_pad + "
            f"mxfp8_swiglu_experts for other dtypes"
        )
    _check_shapes(tokens, gate_up_proj, down_proj)
    layout = route_tokens(expert_indices, gate_up_proj.shape[0], _ALIGN)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (tokens, gate_up_proj, down_proj))
    x_row, x_col = _PermuteFakeQuant.apply(
        tokens, layout.source_rows, layout.dest_rows, layout.padded_offsets, layout.top_k, need_grad
    )
    y = mxfp8_swiglu_experts(
        x_row, gate_up_proj, down_proj, layout.padded_offsets, check_offsets=False, x_col=x_col,
        quantized_weights=quantized_weights,
    )
    return combine_token_groups(_cast(y, tokens.dtype), layout, expert_weights)
