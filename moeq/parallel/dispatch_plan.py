"""Where every routed row goes under expert parallelism: the count exchange and the plan.

One all-to-all of per-expert counts tells each rank what it will receive; one host read
of those counts (the only host sync of EP, see docs/expert_parallel.md) gives the split
sizes ``all_to_all_single`` needs. Everything else (the receiver's padded layout, the
row index of every received row in it) is computed on the device from the received
counts, with sizes that are already on the host.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moeq.numerics.recipes import RECIPE_NAMES

# Recipe code exchanged with the counts: 0 for unconverted experts, 1 + index otherwise.
UNCONVERTED = "unconverted"
_RECIPE_CODES = (UNCONVERTED,) + RECIPE_NAMES


def recipe_code(recipe_name: Optional[str]) -> int:
    """Integer sent with the counts so ranks can check they run one recipe."""
    return _RECIPE_CODES.index(recipe_name or UNCONVERTED)


def _code_name(code: int) -> str:
    quantized, base = divmod(code, len(_RECIPE_CODES))
    return _RECIPE_CODES[base] + (" (quantized dispatch)" if quantized else "")


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """One step's routing between the ranks of an EP group.

    Attributes:
        send_splits: rows this rank sends to each EP rank (host ints, length ep).
        recv_splits: rows this rank receives from each EP rank (host ints, length ep).
        local_counts: (E_local,) int64 on the device: tokens per local expert, all
            sources together (the experts' ``num_tokens_per_expert``).
        dest_rows: (N_recv,) int32: row of the padded, expert-major buffer that each
            received row (in all-to-all order: source rank, then local expert) lands in.
        source_rows: (num_padded_rows,) int32: received row of each padded row, -1 on
            padding rows.
        num_padded_rows: exact padded total ``sum_j round_up(local_counts[j], a)``.
        alignment: group alignment a of the padded layout (1: none).
        group: the EP process group.
    """

    send_splits: List[int]
    recv_splits: List[int]
    local_counts: Tensor
    dest_rows: Tensor
    source_rows: Tensor
    num_padded_rows: int
    alignment: int
    group: dist.ProcessGroup

    @property
    def num_send(self) -> int:
        return sum(self.send_splits)

    @property
    def num_recv(self) -> int:
        return sum(self.recv_splits)


def _round_up(x, a: int):
    return (x + a - 1) // a * a


def padded_destinations(recv_counts: Tensor, recv_counts_host: List[List[int]], alignment: int):
    """Padded expert-major row of every received row, and its inverse.

    Args:
        recv_counts: (ep, E_local) int64 on the device: rows from source rank s for local
            expert j, in the order they arrive (s-major, then j).
        recv_counts_host: the same numbers on the host (for sizes only).
        alignment: every local expert's group starts at a multiple of it.
    Returns:
        ``(dest_rows (N_recv,) int32, source_rows (P,) int32, local_counts (E_local,)
        int64, P)``. Within an expert, rows keep source-rank order, then arrival order:
        for contiguous per-rank shards of a global batch that is the global token order,
        the same order a single-process MoE uses.
    """
    ep, e_local = recv_counts.shape
    dev = recv_counts.device
    num_recv = sum(map(sum, recv_counts_host))
    local_host = [sum(row[j] for row in recv_counts_host) for j in range(e_local)]
    num_padded = sum(_round_up(c, alignment) for c in local_host)

    local_counts = recv_counts.sum(0)
    padded_sizes = _round_up(local_counts, alignment)
    padded_starts = torch.cumsum(padded_sizes, 0) - padded_sizes  # (E_local,)
    before_in_expert = torch.cumsum(recv_counts, 0) - recv_counts  # rows of earlier sources, (ep, E_local)
    dst_block_start = (padded_starts[None, :] + before_in_expert).reshape(-1)
    flat = recv_counts.reshape(-1)
    src_block_start = torch.cumsum(flat, 0) - flat
    # output_size is known on the host: repeat_interleave does not sync.
    block = torch.repeat_interleave(torch.arange(ep * e_local, device=dev), flat, output_size=num_recv)
    rows = torch.arange(num_recv, device=dev)
    dest = dst_block_start[block] + rows - src_block_start[block]
    source = torch.full((num_padded,), -1, dtype=torch.int64, device=dev)
    source.scatter_(0, dest, rows)
    return dest.to(torch.int32), source.to(torch.int32), local_counts, num_padded


def build_plan(
    num_tokens_per_expert: Tensor,
    group: dist.ProcessGroup,
    alignment: Optional[int],
    recipe_name: Optional[str],
    quantized: bool = False,
) -> DispatchPlan:
    """Exchange per-expert counts over the EP group and lay out the receive side.

    Args:
        num_tokens_per_expert: (E,) integer counts of this rank's routed rows per global
            expert (global expert e lives on EP rank ``e // (E / ep)``).
        group: the EP process group.
        alignment: group alignment the local experts' GEMMs need (None: none).
        recipe_name: this rank's experts recipe (None: unconverted); every rank must
            agree, checked here at no extra cost (the codes ride with the counts).
        quantized: this rank sends quantized rows (quantized dispatch); every rank must
            agree too (the packed rows' width depends on it), checked the same way.
    Returns:
        the :class:`DispatchPlan`. Host sync: exactly one device-to-host read, of
        ``ep + ep * (E / ep + 1)`` integers, after the counts all-to-all.
    Raises:
        RuntimeError naming the ranks' recipes if they differ (on every rank alike).
    """
    ep = dist.get_world_size(group)
    num_experts = num_tokens_per_expert.shape[0]
    e_local = num_experts // ep
    counts = num_tokens_per_expert.to(torch.int64).view(ep, e_local)
    code = recipe_code(recipe_name) + len(_RECIPE_CODES) * bool(quantized)
    header = torch.full((ep, 1), code, dtype=torch.int64, device=counts.device)
    send = torch.cat([counts, header], 1).reshape(-1)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    recv = recv.view(ep, e_local + 1)
    # THE host sync of EP: all_to_all_single takes its split sizes as host ints.
    host = torch.cat([counts.sum(1), recv.reshape(-1)]).tolist()
    send_splits = host[:ep]
    recv_host = [host[ep + s * (e_local + 1): ep + (s + 1) * (e_local + 1)] for s in range(ep)]
    codes = [row[-1] for row in recv_host]
    if any(c != code for c in codes):
        names = ", ".join(f"rank {s}: {_code_name(c)}" for s, c in enumerate(codes))
        raise RuntimeError(
            f"expert-parallel ranks run different expert recipes or dispatch modes ({names}): call "
            f"moeq.convert_model with the same recipe, and apply_expert_parallel with the same "
            f"quantize_dispatch, on every rank"
        )
    recv_counts_host = [row[:-1] for row in recv_host]
    a = alignment or 1
    dest, source, local_counts, num_padded = padded_destinations(recv[:, :-1], recv_counts_host, a)
    return DispatchPlan(
        send_splits=send_splits,
        recv_splits=[sum(r) for r in recv_counts_host],
        local_counts=local_counts,
        dest_rows=dest,
        source_rows=source,
        num_padded_rows=num_padded,
        alignment=a,
        group=group,
    )
