"""Routed SwiGLU experts, functional form, in plain torch: three compute backends.

The module form (``moeq.GroupedExperts``) is in moeq/nn/experts.py."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moeq.ops.bf16_grouped_mm import grouped_mm
from moeq.numerics.validation import check_counts, check_counts_values, check_int, check_tensor

# The one place backend names live.
COMPUTE_BACKENDS = ("grouped_mm", "batched_mm_padded", "for_loop")


def check_compute_backend(compute_backend: str) -> str:
    """Return ``compute_backend`` if it is one of COMPUTE_BACKENDS, else raise ValueError."""
    if compute_backend not in COMPUTE_BACKENDS:
        raise ValueError(
            f"unknown compute_backend {compute_backend!r}: use one of {', '.join(map(repr, COMPUTE_BACKENDS))}"
        )
    return compute_backend


def round_up(x, multiple: int):
    """Smallest multiple of ``multiple`` >= x (ints or integer tensors)."""
    return (x + multiple - 1) // multiple * multiple


def group_end_offsets(num_tokens_per_expert: torch.Tensor, group_alignment: Optional[int] = None) -> torch.Tensor:
    """(E,) counts -> (E,) int32 cumulative end offsets for ``torch._grouped_mm``.

    With ``group_alignment=a`` each group occupies ``round_up(count, a)`` rows (the
    padded layout of moeq.ops.padding), so every group starts at a multiple of ``a``.
    """
    counts = num_tokens_per_expert
    if group_alignment is not None and group_alignment > 1:
        counts = round_up(counts, group_alignment)
    return torch.cumsum(counts, 0, dtype=torch.int32)


def _check_grouped_mm_operand(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(
            f"compute_backend='grouped_mm' needs float32/bfloat16/float16 {name}, got {t.dtype}: "
            f"use compute_backend='for_loop' for other dtypes"
        )
    multiple = 16 // t.element_size()
    if t.shape[-1] % multiple:
        raise ValueError(
            f"compute_backend='grouped_mm' needs the last dim of {name} to be a multiple of {multiple} for "
            f"{t.dtype} (16-byte aligned rows), got {t.shape[-1]}: pad the model dim / hidden dim, or use "
            f"compute_backend='for_loop'"
        )


def _expert_row_index(offs: torch.Tensor, num_rows: int):
    """For grouped rows, the expert id of each row and its position inside the group.

    Rows in no group (slack past ``offs[-1]``) get expert id E (out of range)."""
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    expert = torch.searchsorted(offs, rows, right=True)
    padded_starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    pos = rows - padded_starts.gather(0, expert.clamp(max=offs.numel() - 1))
    return expert, pos


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(M, 2H) gate|up -> (M, H) ``silu(gate) * up``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _check_alignment(group_alignment) -> Optional[int]:
    if group_alignment is None:
        return None
    check_int("group_alignment", group_alignment, minimum=1,
              fix="pass None or a power of two (moeq.group_alignment(recipe))")
    if group_alignment & (group_alignment - 1):
        raise ValueError(
            f"group_alignment must be None or a power of two, got {group_alignment}: use "
            f"moeq.group_alignment(recipe) or the alignment passed to moeq.pad_token_groups"
        )
    return group_alignment


def check_experts_inputs(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    group_alignment: Optional[int] = None,
) -> None:
    """Host-only checks of :func:`swiglu_experts`' arguments (shapes, dtypes, devices).

    Raises TypeError/ValueError naming the argument and the fix; reads no device data."""
    check_tensor("x", x, dim=2, layout="(tokens, dim)")
    check_tensor("gate_up_proj", gate_up_proj, dim=3, layout="(experts, 2 * hidden, dim)")
    check_tensor("down_proj", down_proj, dim=3, layout="(experts, dim, hidden)")
    num_experts, two_h, dim = gate_up_proj.shape
    if two_h % 2 or tuple(down_proj.shape) != (num_experts, dim, two_h // 2):
        raise ValueError(
            f"expert weights do not fit together: gate_up_proj is {tuple(gate_up_proj.shape)} (E, 2H, D) and "
            f"down_proj {tuple(down_proj.shape)}, expected ({num_experts}, {dim}, {two_h // 2}) (E, D, H)"
        )
    if x.shape[1] != dim:
        raise ValueError(
            f"x has {x.shape[1]} features per token but the experts' dim is {dim}: pass (tokens, {dim}) "
            f"tokens, or build the experts with dim={x.shape[1]}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}: cast the tokens (x.float())")
    if gate_up_proj.dtype != down_proj.dtype:
        raise TypeError(
            f"gate_up_proj is {gate_up_proj.dtype} but down_proj is {down_proj.dtype}: keep the expert weights "
            f"in one dtype (experts.to(dtype))"
        )
    if x.dtype != gate_up_proj.dtype:
        raise TypeError(
            f"x is {x.dtype} but the expert weights are {gate_up_proj.dtype}: cast the tokens to the weights' "
            f"dtype (x.to({gate_up_proj.dtype})) or the module (experts.to({x.dtype}))"
        )
    if x.device != gate_up_proj.device or x.device != down_proj.device:
        raise ValueError(
            f"x is on {x.device} but the expert weights are on {gate_up_proj.device}: move the tokens or the "
            f"module to one device"
        )
    check_counts("num_tokens_per_expert", num_tokens_per_expert, num_experts, x)
    _check_alignment(group_alignment)


def swiglu_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    *,
    compute_backend: str = "grouped_mm",
    group_alignment: Optional[int] = None,
    validate_counts: bool = True,
) -> torch.Tensor:
    """Routed SwiGLU experts, functional form.

    Args:
        x: (M, D) tokens grouped in expert order, float32/bfloat16/float16 (float64
            with the fallback backends), the weights' dtype. Without ``group_alignment``
            the counts sum to M. With ``group_alignment=a`` the tokens are in the padded
            layout of :func:`moeq.pad_token_groups` (group e starts at a multiple of a,
            padding rows are zero) and rows past the last group are slack.
        gate_up_proj: (E, 2H, D); rows [0, H) gate, [H, 2H) up.
        down_proj: (E, D, H).
        num_tokens_per_expert: (E,) integer counts of real (unpadded) tokens, on x's device.
        compute_backend: one of COMPUTE_BACKENDS. ``grouped_mm`` is sync-free;
            ``batched_mm_padded`` and ``for_loop`` read the counts on the host once.
        validate_counts: check the counts' values (non-negative; summing to M, or with
            ``group_alignment`` their padded groups fitting in M): at once on CPU, with
            ``torch._assert_async`` on CUDA and under torch.compile (no sync). False
            skips only these value checks, for callers whose counts are right by
            construction (moeq's own routing); shapes, dtypes and devices are always checked.
    Returns:
        (M, D) in x.dtype; padding and slack rows are zero, and so is the gradient of
        slack rows of x.
    Raises:
        TypeError/ValueError naming the argument: x not 2-D, features != D, dtype not
        the weights', counts not an (E,) integer tensor on x's device, bad alignment,
        and (eager CPU, or any fallback backend) counts with wrong values.
    """
    check_compute_backend(compute_backend)
    check_experts_inputs(x, gate_up_proj, down_proj, num_tokens_per_expert, group_alignment)
    num_rows, num_experts = x.shape[0], gate_up_proj.shape[0]
    padded = group_alignment is not None and group_alignment > 1
    if validate_counts:
        # the fallbacks read the counts on the host anyway: check that copy (raises at once)
        counts = num_tokens_per_expert if compute_backend == "grouped_mm" else num_tokens_per_expert.cpu()
        check_counts_values("num_tokens_per_expert", counts, num_rows, group_alignment)
    if num_experts == 0 or num_rows == 0:
        # No expert or no token: an empty graph would drop the weights from autograd,
        # so multiply by zero to keep gradients (all zero) defined for every parameter.
        keep = x.sum() + (gate_up_proj.sum() + down_proj.sum()).to(x.dtype)
        return x.new_zeros(num_rows, down_proj.shape[1]) + 0 * keep

    offs = group_end_offsets(num_tokens_per_expert, group_alignment)
    if compute_backend == "grouped_mm":
        for name, t in (("x", x), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            _check_grouped_mm_operand(name, t)
        if padded:
            # Slack rows are in no group: torch._grouped_mm leaves their output and input
            # gradient unwritten. Select them to zero on both sides (a select: NaN never leaks).
            in_group = (torch.arange(num_rows, device=x.device) < offs[-1])[:, None]
            x = torch.where(in_group, x, 0)
        h = swiglu(grouped_mm(x, gate_up_proj, offs))
        out = grouped_mm(h, down_proj, offs)
        return torch.where(in_group, out, 0) if padded else out

    if compute_backend == "for_loop":
        return _for_loop(x, gate_up_proj, down_proj, num_tokens_per_expert, offs)
    return _batched_mm_padded(x, gate_up_proj, down_proj, num_tokens_per_expert, offs)


def _for_loop(x, gate_up_proj, down_proj, counts, offs):
    ends = offs.tolist()  # host read: the portable fallback trades one sync for simplicity
    counts_h = counts.tolist()
    pieces, start = [], 0
    for e, (end, n) in enumerate(zip(ends, counts_h)):
        if n > 0:
            pieces.append(swiglu(x[start : start + n] @ gate_up_proj[e].t()) @ down_proj[e].t())
        if end - start - n > 0:
            pieces.append(x.new_zeros(end - start - n, down_proj.shape[1]))
        start = end
    pieces.append(x.new_zeros(x.shape[0] - start, down_proj.shape[1]))
    # The zero-weighted sum keeps every parameter in the graph when some experts get no tokens.
    return torch.cat(pieces) + 0 * (gate_up_proj.sum() + down_proj.sum()).to(x.dtype)


def _batched_mm_padded(x, gate_up_proj, down_proj, counts, offs):
    num_rows, num_experts = x.shape[0], gate_up_proj.shape[0]
    capacity = int(counts.max())  # host read: the batch dim of bmm is the largest group
    expert, pos = _expert_row_index(offs, num_rows)
    real = (expert < num_experts) & (pos < counts.gather(0, expert.clamp(max=num_experts - 1)).to(pos.dtype))
    # Padding and slack rows scatter into a dump slot (expert E) that bmm never sees.
    e_idx = torch.where(real, expert, num_experts).long()
    p_idx = torch.where(real, pos, 0).long()
    batch = x.new_zeros(num_experts + 1, max(capacity, 1), x.shape[1])
    batch = batch.index_put((e_idx, p_idx), x)[:num_experts]
    h = swiglu(torch.bmm(batch, gate_up_proj.transpose(-2, -1)))
    y = torch.bmm(h, down_proj.transpose(-2, -1))
    y = torch.cat([y, y.new_zeros(1, *y.shape[1:])])  # zeros for padding/slack rows
    return y[e_idx, p_idx]
