"""``zero_slack_rows_``: zero a grouped GEMM output's slack rows in place, as an op.

Grouped GEMMs leave the rows at or past ``offs[-1]`` uninitialized. The Triton kernel is
``moeq.kernels.common.zero_slack_rows_triton``; the plain-torch reference (out of place)
is ``moeq.numerics.groups.zero_slack_rows``. The custom op keeps the launch opaque to
torch.compile (it mutates ``out``).
"""
from __future__ import annotations

import torch

from moeq.kernels.common import zero_slack_rows_triton


@torch.library.custom_op("moeq::zero_slack_rows_", mutates_args=("out",))
def _zero_slack_rows_op(out: torch.Tensor, offs: torch.Tensor) -> None:
    zero_slack_rows_triton(out, offs)


@_zero_slack_rows_op.register_fake
def _(out, offs):
    return None


def zero_slack_rows_(out: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Zero rows at or past ``offs[-1]`` of a 2D grouped tensor, in place, without a host sync.

    Args:
        out: (M, N), unit stride along N (a grouped GEMM output), on CUDA (or any device
            under ``TRITON_INTERPRET=1``).
        offs: (E,) int32 cumulative group ends on ``out``'s device.
    Returns:
        ``out``.
    """
    if out.dim() != 2 or out.stride(-1) != 1:
        raise ValueError(f"zero_slack_rows_ needs a 2D tensor with unit last stride, got {tuple(out.shape)} {out.stride()}")
    if offs.dim() != 1 or offs.dtype != torch.int32 or offs.numel() == 0:
        raise ValueError(f"offs must be a non-empty 1D int32 tensor of group ends, got {tuple(offs.shape)} {offs.dtype}")
    if offs.device != out.device:
        raise ValueError(f"offs is on {offs.device} but out on {out.device}: pass them on one device")
    _zero_slack_rows_op(out, offs)
    return out
