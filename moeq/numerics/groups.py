"""Token-group bookkeeping shared by the quantizers and grouped GEMMs, sync-free.

Rows of a (M, ...) tensor are grouped by expert through ``offs``: (E,) int32 cumulative
end offsets (group ``e`` is rows ``[offs[e-1], offs[e])``, ``offs[-1] <= M``). Rows at or
past ``offs[-1]`` are *slack*: in no group. Everything here is computed on the tensors'
device from ``offs`` with tensor ops only (no ``.item()``, no data-dependent shapes).
"""
from __future__ import annotations

import torch


def row_group_ids(offs: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Group index of every row: (num_rows,) int64 in ``[0, E]``; ``E`` marks slack rows.

    Args:
        offs: (E,) int32 cumulative end offsets.
        num_rows: M, the row count of the grouped tensor.
    """
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    return torch.searchsorted(offs, rows, right=True)


def in_group_rows(offs: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows, 1) bool mask, True for rows inside some group (row < offs[-1])."""
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    return (rows < offs[-1:]).unsqueeze(-1)


def zero_slack_rows(x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x`` (M, ...) with rows at or past ``offs[-1]`` set to zero (a new tensor).

    Grouped GEMM kernels leave those rows of their output uninitialized; inputs may carry
    anything there. Zeroing is a select, so NaN/Inf in slack rows do not leak.
    """
    mask = in_group_rows(offs, x.shape[0]).reshape(x.shape[0], *([1] * (x.dim() - 1)))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` (M, ...) padded with zero rows at the end to a multiple of ``multiple`` rows.

    The padded row count depends on the shape only, so it is static under torch.compile.
    """
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], dim=0)


def round_up_last_offset(offs: torch.Tensor, multiple: int) -> torch.Tensor:
    """``offs`` with its last entry rounded up to a multiple of ``multiple`` (new tensor).

    When every group *starts* at a multiple of ``multiple`` and the rows between the true
    and the rounded end are zeros (slack zeroed, see ``zero_slack_rows``/``pad_rows``),
    this makes every group size a multiple of ``multiple`` without changing any product:
    the FP8 2D x 2D weight-gradient GEMM requires that.
    """
    last = offs[-1:]
    rounded = torch.div(last + (multiple - 1), multiple, rounding_mode="floor") * multiple
    return torch.cat([offs[:-1], rounded.to(offs.dtype)])


def group_sizes(offs: torch.Tensor) -> torch.Tensor:
    """(E,) group sizes ``offs[e] - offs[e-1]`` (same dtype as offs)."""
    return torch.diff(offs, prepend=offs.new_zeros(1))
