"""Token-group padding for grouped GEMMs: pad/unpad, permute-and-pad, combine.

FP8 and MXFP8 grouped GEMMs need each expert's token group to start at a multiple of
``moeq.GROUP_ALIGNMENT[recipe]`` rows. These functions lay tokens out that way without
reading device data on the host: the padded buffer has a static row count
(:func:`padded_rows`, an upper bound), every padding row is written as zeros, and the
layout's tensors stay on the device. See docs/padding.md.

On CUDA the work runs in Triton kernels (``moeq.kernels.padding``); elsewhere in their
plain-torch references, which give bitwise-identical results. Each public function is
differentiable; the ops are ``torch.library`` custom ops, so ``torch.compile`` traces
them (opaque to the compiler) and ``torch.cuda.set_sync_debug_mode("error")`` holds.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from moeq.ops.eager import eager_fast_op
from moeq.numerics.validation import assert_on_device, check_int
from moeq.kernels import padding as _k

__all__ = [
    "PaddedLayout",
    "padded_rows",
    "pad_token_groups",
    "unpad_token_groups",
    "permute_and_pad",
    "route_tokens",
    "combine_token_groups",
]


class PaddedLayout(NamedTuple):
    """Where each original row lives in a padded, expert-major buffer.

    Attributes:
        padded_offsets: (E,) int32 cumulative END offsets of the padded groups, ready as
            ``offs`` of ``torch._grouped_mm`` / ``torch._scaled_grouped_mm``. The last
            entry is the true padded total (<= the buffer's static row count).
        group_starts: (E,) int32 first row of each padded group (a multiple of alignment).
        num_tokens_per_group: (E,) integer, the true (unpadded) group sizes.
        dest_rows: (num_rows,) int32 padded row of each original row, in original order
            (row ``t*k + j`` is token ``t``'s ``j``-th routed copy), or None for
            :func:`pad_token_groups` layouts, where it follows from the counts.
        source_rows: (padded rows,) int32 original row of each padded row, -1 on padding
            and slack rows; None for :func:`pad_token_groups` layouts.
        num_rows: M, rows before padding (T*k for :func:`permute_and_pad`).
        alignment: group alignment in rows (1: none).
        top_k: copies per token (1 for :func:`pad_token_groups`).
    """

    padded_offsets: Tensor
    group_starts: Tensor
    num_tokens_per_group: Tensor
    dest_rows: Optional[Tensor]
    source_rows: Optional[Tensor]
    num_rows: int
    alignment: int
    top_k: int = 1


# ----------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------

_COUNTS_MSG = (
    "num_tokens_per_group must be non-negative and sum to the number of rows of x; "
    "pass the per-expert token counts of the rows of x, in expert order"
)
_INDICES_MSG = "expert_indices must all lie in [0, num_experts): check the router's top-k indices and num_experts"


def _alignment(alignment: Optional[int]) -> int:
    if alignment is None:
        return 1
    if isinstance(alignment, bool) or not isinstance(alignment, int):
        raise TypeError(
            f"alignment must be None or a positive power-of-two int, got {alignment!r} "
            f"({type(alignment).__name__}); for a recipe use moeq.group_alignment(recipe)"
        )
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(
            f"alignment must be a power of two (1, 2, ..., 16, 32, 128), got {alignment}; "
            f"for a recipe use moeq.group_alignment(recipe)"
        )
    return alignment


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_rows(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2D (rows, features) tensor, got {shape}; flatten leading dims first")
    if x.dtype.is_complex or x.element_size() not in (1, 2, 4, 8):
        raise TypeError(f"{name} has unsupported dtype {x.dtype}")


def _check_counts(counts: Tensor, x: Tensor) -> None:
    if not isinstance(counts, Tensor):
        raise TypeError(
            f"num_tokens_per_group must be a tensor on x's device, got {type(counts).__name__}; "
            f"a Python list would need a host-side copy on every call"
        )
    if not _is_int_dtype(counts.dtype):
        raise TypeError(f"num_tokens_per_group must have an integer dtype (int32/int64), got {counts.dtype}")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"num_tokens_per_group must be 1D with one entry per group (E >= 1), got shape {tuple(counts.shape)}")
    if counts.device != x.device:
        raise ValueError(
            f"num_tokens_per_group is on {counts.device} but x is on {x.device}: keep the counts on x's "
            f"device (moving them to the host would sync every step)"
        )


def _assert_counts_host(counts: Tensor, num_rows) -> None:
    # reference path: specific messages; torch._assert_async raises at once off CUDA
    assert_on_device((counts >= 0).all(), "num_tokens_per_group has a negative count; " + _COUNTS_MSG)
    assert_on_device(
        counts.sum() == num_rows,
        "num_tokens_per_group does not sum to the number of rows of x; " + _COUNTS_MSG,
    )


def _use_triton(t: Tensor) -> bool:
    return t.device.type == "cuda" and _k.HAS_TRITON


def padded_rows(num_rows: int, num_groups: int, alignment: Optional[int]) -> int:
    """Static row count of a padded buffer: an upper bound that needs no device data.

    ``round_up(num_rows + num_groups * (alignment - 1), alignment)``; ``num_rows`` when
    ``alignment`` is None or 1. ``num_rows`` (M) and ``num_groups`` (E) are ints >= 0.
    """
    check_int("num_rows", num_rows, minimum=0, fix="pass M, the row count of the unpadded tokens")
    check_int("num_groups", num_groups, minimum=0, fix="pass E, the number of token groups (experts)")
    a = _alignment(alignment)
    if a == 1:
        return num_rows
    return (num_rows + num_groups * (a - 1) + a - 1) // a * a


# ----------------------------------------------------------------------------------
# custom ops (opaque to torch.compile; Triton on CUDA, reference elsewhere)
# ----------------------------------------------------------------------------------


def _pad_impl(x: Tensor, counts: Tensor, alignment: int, num_out_rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    if _use_triton(x):
        padded, offs, starts, ok = _k.pad_triton(x, counts, alignment, num_out_rows)
        assert_on_device(ok, _COUNTS_MSG)
        return padded, offs, starts
    _assert_counts_host(counts, x.shape[0])
    return _k.pad_reference(x, counts, alignment, num_out_rows)


_pad_op = torch.library.custom_op("moeq::pad_token_groups", _pad_impl, mutates_args=())


@_pad_op.register_fake
def _(x, counts, alignment, num_out_rows):
    E = counts.shape[0]
    return (
        x.new_empty((num_out_rows, x.shape[1])),
        counts.new_empty((E,), dtype=torch.int32),
        counts.new_empty((E,), dtype=torch.int32),
    )


def _pad_rows_impl(
    x: Tensor, counts: Tensor, source_rows: Optional[Tensor], alignment: int, num_out_rows: int, top_k: int
) -> Tensor:
    if _use_triton(x):
        return _k.pad_rows_triton(x, counts, alignment, num_out_rows, source_rows, top_k)
    return _k.pad_rows_reference(x, counts, alignment, num_out_rows, source_rows, top_k)


_pad_rows_op = torch.library.custom_op("moeq::pad_rows", _pad_rows_impl, mutates_args=())


@_pad_rows_op.register_fake
def _(x, counts, source_rows, alignment, num_out_rows, top_k):
    return x.new_empty((num_out_rows, x.shape[1]))


def _unpad_impl(
    padded: Tensor,
    counts: Tensor,
    dest_rows: Optional[Tensor],
    source_rows: Optional[Tensor],
    alignment: int,
    num_rows: int,
) -> Tensor:
    if _use_triton(padded):
        return _k.unpad_triton(padded, counts, alignment, num_rows, dest_rows)
    return _k.unpad_reference(padded, counts, alignment, num_rows, dest_rows)


_unpad_op = torch.library.custom_op("moeq::unpad_token_groups", _unpad_impl, mutates_args=())


@_unpad_op.register_fake
def _(padded, counts, dest_rows, source_rows, alignment, num_rows):
    return padded.new_empty((num_rows, padded.shape[1]))


def _permute_impl(
    x: Tensor, expert_indices: Tensor, num_experts: int, alignment: int, num_out_rows: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _permute_any(x, expert_indices, num_experts, alignment, num_out_rows, False)


def _permute_eager_impl(x, expert_indices, num_experts, alignment, num_out_rows):
    # outside the custom op the index outputs may share one allocation
    return _permute_any(x, expert_indices, num_experts, alignment, num_out_rows, True)


def _permute_any(x, expert_indices, num_experts, alignment, num_out_rows, share_buffers):
    if _use_triton(x):
        *out, ok = _k.permute_and_pad_triton(
            x, expert_indices, num_experts, alignment, num_out_rows, share_buffers=share_buffers
        )
        assert_on_device(ok, _INDICES_MSG)
        return tuple(out)
    assert_on_device(((expert_indices >= 0) & (expert_indices < num_experts)).all(), _INDICES_MSG)
    return _k.permute_and_pad_reference(x, expert_indices, num_experts, alignment, num_out_rows)


_permute_op = torch.library.custom_op("moeq::permute_and_pad", _permute_impl, mutates_args=())


@_permute_op.register_fake
def _(x, expert_indices, num_experts, alignment, num_out_rows):
    n = expert_indices.shape[0] * expert_indices.shape[1]
    i32 = dict(dtype=torch.int32)
    return (
        x.new_empty((num_out_rows, x.shape[1])),
        x.new_empty((num_experts,), dtype=torch.int64),
        x.new_empty((num_experts,), **i32),
        x.new_empty((num_experts,), **i32),
        x.new_empty((n,), **i32),
        x.new_empty((num_out_rows,), **i32),
    )


def _combine_impl(y: Tensor, dest_rows: Tensor, source_rows: Tensor, weights: Optional[Tensor], top_k: int) -> Tensor:
    if _use_triton(y):
        return _k.combine_triton(y, dest_rows, weights, top_k)
    return _k.combine_reference(y, dest_rows, weights, top_k)


_combine_op = torch.library.custom_op("moeq::combine_token_groups", _combine_impl, mutates_args=())


def _route_impl(
    expert_indices: Tensor, num_experts: int, alignment: int, num_out_rows: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if expert_indices.device.type == "cuda" and _k.HAS_TRITON:
        *out, ok = _k.route_triton(expert_indices, num_experts, alignment, num_out_rows)
        assert_on_device(ok, _INDICES_MSG)
        return tuple(out)
    assert_on_device(((expert_indices >= 0) & (expert_indices < num_experts)).all(), _INDICES_MSG)
    return _k.route_reference(expert_indices, num_experts, alignment, num_out_rows)


_route_op = torch.library.custom_op("moeq::route_tokens", _route_impl, mutates_args=())


@_route_op.register_fake
def _(expert_indices, num_experts, alignment, num_out_rows):
    n = expert_indices.shape[0] * expert_indices.shape[1]
    i32 = dict(dtype=torch.int32)
    return (
        expert_indices.new_empty((num_experts,), dtype=torch.int64),
        expert_indices.new_empty((num_experts,), **i32),
        expert_indices.new_empty((num_experts,), **i32),
        expert_indices.new_empty((n,), **i32),
        expert_indices.new_empty((num_out_rows,), **i32),
    )


@_combine_op.register_fake
def _(y, dest_rows, source_rows, weights, top_k):
    return y.new_empty((dest_rows.shape[0] // top_k, y.shape[1]))


def _combine_bwd_impl(
    grad_out: Tensor,
    y: Tensor,
    dest_rows: Tensor,
    source_rows: Tensor,
    weights: Optional[Tensor],
    top_k: int,
    need_grad_y: bool,
    need_grad_w: bool,
) -> Tuple[Tensor, Tensor]:
    fn = _k.combine_backward_triton if _use_triton(y) else _k.combine_backward_reference
    return fn(grad_out, y, dest_rows, source_rows, weights, top_k, need_grad_y, need_grad_w)


_combine_bwd_op = torch.library.custom_op(
    "moeq::combine_token_groups_backward", _combine_bwd_impl, mutates_args=()
)


@_combine_bwd_op.register_fake
def _(grad_out, y, dest_rows, source_rows, weights, top_k, need_grad_y, need_grad_w):
    gy = y.new_empty(tuple(y.shape) if need_grad_y else (0,))
    if weights is None:
        return gy, y.new_empty((0,))
    return gy, weights.new_empty(tuple(weights.shape) if need_grad_w else (0,))


# autograd: pad <-> unpad are each other's gradient; permute's is an unweighted combine


def _pad_setup(ctx, inputs, output):
    x, counts, alignment, _ = inputs
    ctx.save_for_backward(counts)
    ctx.alignment, ctx.num_rows = alignment, x.shape[0]


def _pad_backward(ctx, grad_padded, _g_offs, _g_starts):
    (counts,) = ctx.saved_tensors
    grad_x = _unpad(grad_padded, counts, None, None, ctx.alignment, ctx.num_rows)
    return grad_x, None, None, None


_pad_op.register_autograd(_pad_backward, setup_context=_pad_setup)


def _unpad_setup(ctx, inputs, output):
    padded, counts, dest_rows, source_rows, alignment, _ = inputs
    ctx.save_for_backward(counts, source_rows)
    ctx.alignment, ctx.num_padded = alignment, padded.shape[0]


def _unpad_backward(ctx, grad_out):
    counts, source_rows = ctx.saved_tensors
    grad_padded = _pad_rows(grad_out, counts, source_rows, ctx.alignment, ctx.num_padded, 1)
    return grad_padded, None, None, None, None, None


_unpad_op.register_autograd(_unpad_backward, setup_context=_unpad_setup)


def _permute_setup(ctx, inputs, output):
    _, expert_indices, _, _, _ = inputs
    _, _, _, _, dest_rows, source_rows = output
    ctx.save_for_backward(dest_rows, source_rows)
    ctx.top_k = expert_indices.shape[1]


def _permute_backward(ctx, grad_padded, *_):
    dest_rows, source_rows = ctx.saved_tensors
    grad_x = _combine(grad_padded, dest_rows, source_rows, None, ctx.top_k)  # sum over the k copies
    return grad_x, None, None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


def _combine_setup(ctx, inputs, output):
    y, dest_rows, source_rows, weights, top_k = inputs
    # y's values only feed the weights' gradient: without it keep a one-element stand-in
    # of y's shape and dtype (an unweighted combine keeps no (M, N) tensor for backward)
    keep_y = weights is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(y if keep_y else y.new_zeros(()).expand(y.shape), dest_rows, source_rows, weights)
    ctx.top_k = top_k


def _combine_backward(ctx, grad_out):
    y, dest_rows, source_rows, weights = ctx.saved_tensors
    need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_y, grad_w = _combine_bwd(grad_out, y, dest_rows, source_rows, weights, ctx.top_k, need_y, need_w)
    return (grad_y if need_y else None), None, None, (grad_w if need_w else None), None


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)

# What the public functions and the backward functions call: the ops' implementations
# directly in plain eager mode (see moeq.ops.eager), the custom ops otherwise.
_pad = eager_fast_op(_pad_op, _pad_impl, _pad_backward, _pad_setup)
_pad_rows = eager_fast_op(_pad_rows_op, _pad_rows_impl)
_unpad = eager_fast_op(_unpad_op, _unpad_impl, _unpad_backward, _unpad_setup)
_permute = eager_fast_op(_permute_op, _permute_eager_impl, _permute_backward, _permute_setup)
_route = eager_fast_op(_route_op, _route_impl)
_combine = eager_fast_op(_combine_op, _combine_impl, _combine_backward, _combine_setup)
_combine_bwd = eager_fast_op(_combine_bwd_op, _combine_bwd_impl)



# ----------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------


def pad_token_groups(
    x: Tensor, num_tokens_per_group: Tensor, alignment: Optional[int]
) -> Tuple[Tensor, PaddedLayout]:
    """Pad each token group of ``x`` to start at a multiple of ``alignment`` rows.

    Args:
        x: (M, D) tokens already grouped in expert order, any dtype (float32, bfloat16,
            float8, ...); rows are copied bit for bit.
        num_tokens_per_group: (E,) integer tensor on x's device, summing to M.
        alignment: a power of two, or None/1 for no padding (then ``x`` itself is
            returned, nothing is copied).

    Returns:
        ``padded`` (padded_rows(M, E, alignment), D) x.dtype: group ``e`` at rows
        ``[group_starts[e], group_starts[e] + counts[e])``, every other row zero; and its
        :class:`PaddedLayout`. Differentiable: the gradient is :func:`unpad_token_groups`.

    Raises ValueError/TypeError for bad shapes, dtypes, devices or alignment; counts
    that are negative or don't sum to M fail ``torch._assert_async`` (at once off CUDA,
    as a device-side assert on CUDA: no host sync).
    """
    a = _alignment(alignment)
    _check_rows(x, "x")
    _check_counts(num_tokens_per_group, x)
    M, E = x.shape[0], num_tokens_per_group.shape[0]
    if a == 1:
        _assert_counts_host(num_tokens_per_group, M)
        offs = torch.cumsum(num_tokens_per_group, 0, dtype=torch.int32)
        starts = offs - num_tokens_per_group.to(torch.int32)
        return x, PaddedLayout(offs, starts, num_tokens_per_group, None, None, M, 1, 1)
    padded, offs, starts = _pad(x, num_tokens_per_group, a, padded_rows(M, E, a))
    return padded, PaddedLayout(offs, starts, num_tokens_per_group, None, None, M, a, 1)


def _check_padded(y: Tensor, layout: PaddedLayout, fn: str) -> None:
    _check_rows(y, "padded_y")
    if not isinstance(layout, PaddedLayout):
        raise TypeError(f"{fn} needs the PaddedLayout returned with the padded tensor, got {type(layout).__name__}")
    expected = padded_rows(layout.num_rows, layout.padded_offsets.shape[0], layout.alignment)
    if y.shape[0] != expected:
        raise ValueError(
            f"padded_y has {y.shape[0]} rows but its layout describes {expected} "
            f"(padded_rows({layout.num_rows}, {layout.padded_offsets.shape[0]}, {layout.alignment})): "
            f"pass the full padded buffer, slack rows included"
        )
    if y.device != layout.padded_offsets.device:
        raise ValueError(f"padded_y is on {y.device} but the layout is on {layout.padded_offsets.device}")


def unpad_token_groups(padded_y: Tensor, layout: PaddedLayout) -> Tensor:
    """Rows of a padded buffer back in the original order, padding dropped.

    Args:
        padded_y: (padded_rows(M, E, a), N) any dtype, e.g. the experts' output on the
            padded tokens; padding and slack rows are never read.
        layout: from :func:`pad_token_groups` or :func:`permute_and_pad`.

    Returns:
        (M, N) padded_y.dtype. For a :func:`permute_and_pad` layout, row ``t*k + j`` is
        token ``t``'s ``j``-th routed copy (no weighting: see :func:`combine_token_groups`).
        With alignment 1 and a :func:`pad_token_groups` layout, ``padded_y`` itself.
        Differentiable: the gradient is the padding (zeros on padding rows).
    """
    _check_padded(padded_y, layout, "unpad_token_groups")
    if layout.alignment == 1 and layout.dest_rows is None:
        return padded_y
    return _unpad(
        padded_y,
        layout.num_tokens_per_group,
        layout.dest_rows,
        layout.source_rows,
        layout.alignment,
        layout.num_rows,
    )


def _check_routing(expert_indices: Tensor, num_experts: int) -> None:
    if not isinstance(expert_indices, Tensor) or expert_indices.dim() != 2:
        raise ValueError("expert_indices must be a (T, k) integer tensor of each token's experts")
    if not _is_int_dtype(expert_indices.dtype):
        raise TypeError(f"expert_indices must have an integer dtype, got {expert_indices.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def route_tokens(expert_indices: Tensor, num_experts: int, alignment: Optional[int]) -> PaddedLayout:
    """The :class:`PaddedLayout` that :func:`permute_and_pad` would build, without moving rows.

    For kernels that gather tokens into the padded layout themselves (e.g. fused with
    quantization: ``moeq.ops.mxfp8_hopper.mxfp8_routed_swiglu_experts``).

    Args:
        expert_indices: (T, k) integer routing, entries in [0, num_experts).
        num_experts: E. alignment: a power of two, or None/1.
    Returns:
        the layout, every tensor on expert_indices' device (no host sync); its padded
        buffer has ``padded_rows(T*k, E, alignment)`` rows. Not differentiable (indices only).
    """
    a = _alignment(alignment)
    _check_routing(expert_indices, num_experts)
    T, k = expert_indices.shape
    rows = padded_rows(T * k, num_experts, a)
    counts, offs, starts, dest_rows, source_rows = _route(expert_indices, num_experts, a, rows)
    return PaddedLayout(offs, starts, counts, dest_rows, source_rows, T * k, a, k)


def permute_and_pad(
    x: Tensor, expert_indices: Tensor, num_experts: int, alignment: Optional[int]
) -> Tuple[Tensor, Tensor, PaddedLayout]:
    """Route tokens straight to the expert-major padded layout, in one pass over x.

    Args:
        x: (T, D) tokens, any dtype.
        expert_indices: (T, k) integer routing (token -> its k experts), on x's device.
        num_experts: E.
        alignment: a power of two, or None/1 for a plain permute (T*k rows).

    Returns:
        ``padded`` (padded_rows(T*k, E, alignment), D) x.dtype, expert-major, copies of an
        expert kept in (token, slot) order, padding and slack rows zero;
        ``num_tokens_per_expert`` (E,) int64 true counts; the :class:`PaddedLayout`
        (``dest_rows``/``source_rows`` map copies to rows). Differentiable w.r.t. ``x``:
        the gradient sums over the k copies of each token. Counts and rows are computed
        on the device with fixed-size buffers (no sync). Indices outside [0, E) fail
        ``torch._assert_async``.
    """
    a = _alignment(alignment)
    _check_rows(x, "x")
    _check_routing(expert_indices, num_experts)
    if expert_indices.shape[0] != x.shape[0]:
        raise ValueError(f"expert_indices has {expert_indices.shape[0]} rows but x has {x.shape[0]} tokens")
    if expert_indices.device != x.device:
        raise ValueError(f"expert_indices is on {expert_indices.device} but x is on {x.device}")
    T, k = expert_indices.shape
    rows = padded_rows(T * k, num_experts, a)
    padded, counts, offs, starts, dest_rows, source_rows = _permute(x, expert_indices, num_experts, a, rows)
    return padded, counts, PaddedLayout(offs, starts, counts, dest_rows, source_rows, T * k, a, k)


def combine_token_groups(padded_y: Tensor, layout: PaddedLayout, weights: Optional[Tensor] = None) -> Tensor:
    """Unpad, unpermute and sum each token's k expert outputs, weighted, in one pass.

    Args:
        padded_y: (padded_rows(T*k, E, a), N) float32/bfloat16/float16/float64 expert outputs on
            the layout of :func:`permute_and_pad`; padding and slack rows are never read.
        layout: the :class:`PaddedLayout` from :func:`permute_and_pad`.
        weights: (T, k) routing scores (any float dtype), or None for a plain sum.

    Returns:
        (T, N) padded_y.dtype: ``out[t] = sum_j weights[t, j] * padded_y[row(t, j)]``,
        accumulated in float32 (float64 for float64 data) in slot order. Differentiable w.r.t. ``padded_y`` and
        ``weights``.
    """
    _check_padded(padded_y, layout, "combine_token_groups")
    if layout.dest_rows is None or layout.source_rows is None:
        raise ValueError(
            "combine_token_groups needs a layout from permute_and_pad; for pad_token_groups "
            "layouts use unpad_token_groups"
        )
    if padded_y.dtype not in _k._COMBINE_DTYPES:
        raise TypeError(
            f"combine_token_groups sums in float32 and returns padded_y.dtype; got {padded_y.dtype}, "
            f"use one of {', '.join(map(str, _k._COMBINE_DTYPES))}"
        )
    T = layout.num_rows // layout.top_k
    if weights is not None:
        if not isinstance(weights, Tensor) or not weights.dtype.is_floating_point:
            raise TypeError("weights must be a floating-point (T, k) tensor of routing scores")
        if tuple(weights.shape) != (T, layout.top_k):
            raise ValueError(f"weights must have shape (T, k) = {(T, layout.top_k)}, got {tuple(weights.shape)}")
        if weights.device != padded_y.device:
            raise ValueError(f"weights are on {weights.device} but padded_y is on {padded_y.device}")
    return _combine(padded_y, layout.dest_rows, layout.source_rows, weights, layout.top_k)
