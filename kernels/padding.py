"""Token-group padding kernels (Triton) and their plain-torch references.

Every operation has two twins with the same signature and bitwise-identical results:
``<op>_triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) and ``<op>_reference``
(plain torch, any device). :mod:`moeq.ops.padding` wraps them in differentiable, validated
ops and picks the Triton twin on CUDA.

Padded layout (see docs/padding.md): tokens come grouped in expert order, group ``e``
holds ``counts[e]`` rows. Padded group ``e`` holds ``round_up(counts[e], a)`` rows and
starts at ``group_starts[e] = sum_{i<e} round_up(counts[i], a)``; its first
``counts[e]`` rows are the tokens, the rest are zeros. ``padded_offsets`` are the
cumulative end offsets (int32, ``torch._grouped_mm``'s ``offs``). The buffer has a
static number of rows (an upper bound); rows past ``padded_offsets[-1]`` are zeros.

Data movement only copies bits (float8, bfloat16 and float32 alike are moved as
same-width integers), so the pad/unpad/permute results are exact. The combine
(weighted sum over top-k) accumulates in float32 (float64 for float64 data) in slot order ``j = 0..k-1`` with
separate multiply and add (no FMA contraction), which the reference reproduces.

No kernel or launcher here reads device data on the host: counts, offsets and
destination rows are computed on the device, inside the kernels where that saves
launches. Nothing here validates values; :mod:`moeq.ops.padding` does (the Triton twins
return an ``ok`` flag for ``torch._assert_async``).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from moeq.kernels.launch import CachedLauncher

from moeq.kernels.common import HAS_TRITON, tl, triton
from moeq.kernels.common import next_pow2 as _next_pow2

__all__ = [
    "HAS_TRITON",
    "pad_reference",
    "pad_triton",
    "pad_rows_reference",
    "pad_rows_triton",
    "unpad_reference",
    "unpad_triton",
    "route_reference",
    "route_triton",
    "permute_and_pad_reference",
    "permute_and_pad_triton",
    "combine_reference",
    "combine_triton",
    "combine_backward_reference",
    "combine_backward_triton",
]

# Data movement is done on the raw bits: exact for every dtype (NaN payloads, -0.0).
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_COMBINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 accumulation, float64 for float64 data (gradcheck)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_bits(t: Tensor) -> Tensor:
    return t.view(_BITS_DTYPE[t.element_size()])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------
# plain-torch references
# ----------------------------------------------------------------------------------


def _layout_reference(counts: Tensor, alignment: int):
    """(counts, padded ends, padded starts, source ends, source starts), all int64 (E,)."""
    c = counts.to(torch.int64)
    sizes = (c + (alignment - 1)) // alignment * alignment
    ends = torch.cumsum(sizes, 0)
    src_ends = torch.cumsum(c, 0)
    return c, ends, ends - sizes, src_ends, src_ends - c


def _gather_rows_or_zero(x: Tensor, index: Tensor) -> Tensor:
    """rows ``x[index]``; ``index == x.shape[0]`` gives a zero row. Bits, so exact."""
    bits = _as_bits(x)
    ext = torch.cat([bits, bits.new_zeros(1, bits.shape[1])])
    return ext[index].view(x.dtype)


def _source_of_padded_rows(counts: Tensor, alignment: int, num_out_rows: int, num_src_rows: int) -> Tensor:
    """(num_out_rows,) int64 source row of each padded row; ``num_src_rows`` on padding rows."""
    c, ends, starts, _, src_starts = _layout_reference(counts, alignment)
    num_groups = c.numel()
    r = torch.arange(num_out_rows, device=c.device)
    g = torch.searchsorted(ends, r, right=True)  # groups ending at or before r = r's group
    gc = g.clamp(max=num_groups - 1)
    local = r - starts[gc]
    src = src_starts[gc] + local
    valid = (g < num_groups) & (local < c[gc]) & (src >= 0) & (src < num_src_rows)
    return torch.where(valid, src, num_src_rows)


def pad_reference(x: Tensor, counts: Tensor, alignment: int, num_out_rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Pad token groups of ``x`` (M, D) to multiples of ``alignment`` rows.

    Returns ``padded`` (num_out_rows, D) x.dtype, ``padded_offsets`` (E,) int32 cumulative
    padded group ends, ``group_starts`` (E,) int32.
    """
    _, ends, starts, _, _ = _layout_reference(counts, alignment)
    src = _source_of_padded_rows(counts, alignment, num_out_rows, x.shape[0])
    return _gather_rows_or_zero(x, src), ends.to(torch.int32), starts.to(torch.int32)


def pad_rows_reference(
    x: Tensor,
    counts: Tensor,
    alignment: int,
    num_out_rows: int,
    source_rows: Optional[Tensor] = None,
    top_k: int = 1,
) -> Tensor:
    """Padded buffer (num_out_rows, D) of ``x`` without the layout tensors.

    With ``source_rows`` (num_out_rows,) int32 (-1 on padding rows), padded row ``r``
    is ``x[source_rows[r] // top_k]`` (the permuted layout of :func:`permute_and_pad_reference`);
    without, the rows come from the grouped order implied by ``counts``.
    """
    if source_rows is None:
        src = _source_of_padded_rows(counts, alignment, num_out_rows, x.shape[0])
    else:
        s = source_rows.to(torch.int64)
        src = torch.where(s >= 0, s // top_k, x.shape[0])
    return _gather_rows_or_zero(x, src)


def unpad_reference(
    padded: Tensor, counts: Tensor, alignment: int, num_rows: int, dest_rows: Optional[Tensor] = None
) -> Tensor:
    """Rows of ``padded`` (R, N) back in the original order: (num_rows, N) padded.dtype.

    Row ``i`` comes from padded row ``dest_rows[i]`` if given, else from the grouped
    order implied by ``counts``.
    """
    if dest_rows is None:
        _, _, starts, src_ends, src_starts = _layout_reference(counts, alignment)
        i = torch.arange(num_rows, device=padded.device)
        g = torch.searchsorted(src_ends, i, right=True).clamp(max=counts.numel() - 1)
        dst = i - src_starts[g] + starts[g]
    else:
        dst = dest_rows.to(torch.int64)
    num_padded = padded.shape[0]
    dst = torch.where((dst >= 0) & (dst < num_padded), dst, num_padded)
    return _gather_rows_or_zero(padded, dst)


def route_reference(expert_indices: Tensor, num_experts: int, alignment: int, num_out_rows: int):
    """Where each routed copy goes in the expert-major padded layout, without moving rows.

    Returns ``counts`` (E,) int64, ``padded_offsets`` (E,) int32, ``group_starts`` (E,)
    int32, ``dest_rows`` (T*k,) int32 and ``source_rows`` (num_out_rows,) int32 (-1 on
    padding and slack rows), as :func:`permute_and_pad_reference` returns them.
    """
    flat = expert_indices.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # fixed size (E,): no sync
    _, ends, starts, _, src_starts = _layout_reference(counts, alignment)
    order = torch.argsort(flat, stable=True)  # expert-major, (token, slot) order within
    pos = torch.empty_like(order)
    pos[order] = torch.arange(n, device=dev)
    dest = starts[flat] + pos - src_starts[flat]
    source_rows = torch.full((num_out_rows,), -1, dtype=torch.int32, device=dev)
    source_rows[dest] = torch.arange(n, dtype=torch.int32, device=dev)
    return counts, ends.to(torch.int32), starts.to(torch.int32), dest.to(torch.int32), source_rows


def permute_and_pad_reference(x: Tensor, expert_indices: Tensor, num_experts: int, alignment: int, num_out_rows: int):
    """Permute tokens ``x`` (T, D) to the expert-major padded layout of routing ``expert_indices`` (T, k).

    Returns ``padded`` (num_out_rows, D) x.dtype, ``counts`` (E,) int64,
    ``padded_offsets`` (E,) int32, ``group_starts`` (E,) int32, ``dest_rows`` (T*k,) int32
    (padded row of routed copy ``t*k + j``) and ``source_rows`` (num_out_rows,) int32
    (``t*k + j`` of each padded row, -1 on padding and slack rows). Within an expert the
    copies keep (token, slot) order. Expects valid indices (checked by moeq.ops.padding).
    """
    counts, offs, starts, dest, source_rows = route_reference(expert_indices, num_experts, alignment, num_out_rows)
    padded = pad_rows_reference(x, counts, alignment, num_out_rows, source_rows, expert_indices.shape[1])
    return padded, counts, offs, starts, dest, source_rows


def combine_reference(y: Tensor, dest_rows: Tensor, weights: Optional[Tensor], top_k: int) -> Tensor:
    """``out[t] = sum_j weights[t, j] * y[dest_rows[t*k + j]]``: (T, N) in y.dtype.

    Float32 accumulation in slot order, a separate multiply then add per slot; without
    ``weights`` an unweighted sum (the gradient of permute w.r.t. the tokens).
    """
    num_tokens = dest_rows.numel() // top_k
    d = dest_rows.view(num_tokens, top_k).to(torch.int64)
    acc_dtype = _acc_dtype(y.dtype)
    w = weights.reshape(num_tokens, top_k).to(acc_dtype) if weights is not None else None
    acc = None
    for j in range(top_k):
        term = y[d[:, j]].to(acc_dtype)
        if w is not None:
            term = term * w[:, j, None]
        acc = term if acc is None else acc + term
    return acc.to(y.dtype)


def combine_backward_reference(
    grad_out: Tensor,
    y: Tensor,
    dest_rows: Tensor,
    source_rows: Tensor,
    weights: Optional[Tensor],
    top_k: int,
    need_grad_y: bool,
    need_grad_w: bool,
) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`combine_reference`: ``grad_y`` (R, N) y.dtype, zeros on
    padding rows, and ``grad_w`` (T, k) weights.dtype. One not needed comes back empty (0,)."""
    grad_y = y.new_empty(0)
    grad_w = y.new_empty(0) if weights is None else weights.new_empty(0)
    acc_dtype = _acc_dtype(y.dtype)
    g32 = grad_out.to(acc_dtype)
    if need_grad_y:
        s = source_rows.to(torch.int64)
        valid = s >= 0
        num_tokens, num_copies = grad_out.shape[0], dest_rows.numel()
        # padding rows index an appended zero row / zero weight (also when T == 0)
        g = torch.cat([g32, g32.new_zeros(1, g32.shape[1])])[torch.where(valid, s // top_k, num_tokens)]
        if weights is not None:
            w = torch.cat([weights.reshape(-1).to(acc_dtype), g32.new_zeros(1)])
            g = g * w[torch.where(valid, s, num_copies)][:, None]
        grad_y = torch.where(valid[:, None], g, 0.0).to(y.dtype)
    if need_grad_w:
        d = dest_rows.to(torch.int64)
        tok = torch.arange(d.numel(), device=d.device) // top_k
        dots = (g32[tok] * y[d].to(acc_dtype)).sum(-1)
        grad_w = dots.view(weights.shape).to(weights.dtype)
    return grad_y, grad_w


# ----------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _f32_to_bf16_rne_bits(x):
        # The interpreter truncates float32 -> bfloat16; round to nearest even by hand
        # there (what torch and the GPU's cvt.rn do), NaN -> canonical NaN like torch.
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.int16, bitcast=True)

    @triton.jit
    def _padded_group_bounds(c, ALIGN: tl.constexpr):
        # (E,) counts -> padded group ends and starts (each group rounded up to ALIGN rows)
        sizes = (c + (ALIGN - 1)) // ALIGN * ALIGN
        ends = tl.cumsum(sizes, 0)
        return ends, ends - sizes

    @triton.jit
    def _gather_rows(src_ptr, out_ptr, src_rows, out_rows, valid, row_ok, pid_d, D,
                     BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
        # out[out_rows, cols] = src[src_rows, cols] where valid, 0 elsewhere in row_ok.
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        src_ptrs = src_ptr + src_rows.to(tl.int64)[:, None] * D + cols[None, :]
        out_ptrs = out_ptr + out_rows.to(tl.int64)[:, None] * D + cols[None, :]
        if EVEN_D:
            vals = tl.load(src_ptrs, mask=valid[:, None], other=0)
            tl.store(out_ptrs, vals, mask=row_ok[:, None])
        else:
            cmask = cols[None, :] < D
            vals = tl.load(src_ptrs, mask=valid[:, None] & cmask, other=0)
            tl.store(out_ptrs, vals, mask=row_ok[:, None] & cmask)

    @triton.jit
    def _pad_rows_kernel(
        src_ptr,
        out_ptr,
        counts_ptr,
        index_ptr,
        neg_ptr,
        offs_ptr,
        starts_ptr,
        ok_ptr,
        num_src_rows,
        num_out_rows,
        D,
        E,
        ALIGN: tl.constexpr,
        TOP_K: tl.constexpr,
        HAS_INDEX: tl.constexpr,
        WRITE_LAYOUT: tl.constexpr,
        WRITE_NEG: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_E: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        # Destination-driven: each output row is written exactly once, tokens or zeros.
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        e = tl.arange(0, BLOCK_E)
        c = tl.load(counts_ptr + e, mask=e < E, other=0).to(tl.int32)
        ends, starts = _padded_group_bounds(c, ALIGN)
        if WRITE_LAYOUT:
            first = (pid_m == 0) & (pid_d == 0)
            tl.store(offs_ptr + e, ends, mask=(e < E) & first)
            tl.store(starts_ptr + e, starts, mask=(e < E) & first)
            ok = (tl.sum(c, 0) == num_src_rows) & (tl.min(c, 0) >= 0)
            tl.store(ok_ptr, ok.to(tl.int32), mask=first)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_out_rows
        # group of each row = number of padded groups that end at or before it; rows past
        # the last group land on masked (empty) groups or past BLOCK_E and stay invalid
        g = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)
        sel = e[None, :] == g[:, None]
        local = rows - tl.sum(tl.where(sel, starts[None, :], 0), axis=1)
        valid = row_ok & (local < tl.sum(tl.where(sel, c[None, :], 0), axis=1))
        if HAS_INDEX:
            src = tl.load(index_ptr + rows, mask=valid, other=0) // TOP_K
            if WRITE_NEG:
                neg = tl.full([BLOCK_M], -1, tl.int32)
                tl.store(neg_ptr + rows, neg, mask=row_ok & (valid == 0) & (pid_d == 0))
        else:
            src_starts = tl.cumsum(c, 0) - c
            src = tl.sum(tl.where(sel, src_starts[None, :], 0), axis=1) + local
        valid = valid & (src >= 0) & (src < num_src_rows)  # never read out of bounds
        _gather_rows(src_ptr, out_ptr, src, rows, valid, row_ok, pid_d, D, BLOCK_D, EVEN_D)

    @triton.jit
    def _unpad_rows_kernel(
        padded_ptr,
        out_ptr,
        counts_ptr,
        index_ptr,
        num_rows,
        num_padded_rows,
        D,
        E,
        ALIGN: tl.constexpr,
        HAS_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_E: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        if HAS_INDEX:
            dst = tl.load(index_ptr + rows, mask=row_ok, other=0)
        else:
            e = tl.arange(0, BLOCK_E)
            c = tl.load(counts_ptr + e, mask=e < E, other=0).to(tl.int32)
            _, starts = _padded_group_bounds(c, ALIGN)
            src_ends = tl.cumsum(c, 0)
            g = tl.sum((src_ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)
            sel = e[None, :] == g[:, None]
            shift = tl.where(sel, (starts - (src_ends - c))[None, :], 0)
            dst = rows + tl.sum(shift, axis=1)
        valid = row_ok & (dst >= 0) & (dst < num_padded_rows)
        _gather_rows(padded_ptr, out_ptr, dst, rows, valid, row_ok, pid_d, D, BLOCK_D, EVEN_D)

    @triton.jit
    def _block_histogram(ids_ptr, block, F, e, BLOCK_F: tl.constexpr):
        # experts (lanes e) of routing entries [block * BLOCK_F, +BLOCK_F); ids outside
        # the lanes count nowhere (then the totals miss F and the ok flag fails)
        f = block * BLOCK_F + tl.arange(0, BLOCK_F)
        ids = tl.load(ids_ptr + f, mask=f < F, other=-1).to(tl.int64)
        return tl.sum((ids[:, None] == e[None, :].to(tl.int64)).to(tl.int32), axis=0)

    @triton.jit
    def _route_count_kernel(
        ids_ptr, block_counts_ptr, F, E, num_blocks, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr
    ):
        # per-block histogram of expert ids, stored (E, num_blocks) so that the prefix sum
        # over blocks runs along the contiguous dim (torch's scan over an outer dim walks
        # the blocks one after another); out-of-range ids count nowhere (then the totals
        # miss F and the caller's assert fires)
        pid = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        hist = _block_histogram(ids_ptr, pid, F, e, BLOCK_F)
        tl.store(block_counts_ptr + e * num_blocks + pid, hist, mask=e < E)

    @triton.jit
    def _route_index_kernel(
        ids_ptr,
        block_counts_ptr,
        incl_ptr,
        counts_ptr,
        offs_ptr,
        starts_ptr,
        ok_ptr,
        dest_ptr,
        source_rows_ptr,
        F,
        E,
        num_blocks,
        num_out_rows,
        ALIGN: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_E: tl.constexpr,
        PREFIX_IN_KERNEL: tl.constexpr,
        BLOCK_NB: tl.constexpr,
    ):
        # dest[f] = group_start[e] + (copies of e in earlier blocks) + (earlier copies of
        # e in this block): a stable counting sort without a sort.
        pid = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        emask = e < E
        col = e * num_blocks + pid
        if PREFIX_IN_KERNEL:
            # few blocks: every program sums the (E, num_blocks) histograms itself, which
            # saves the prefix-sum launch (host launch cost dominates small problems)
            b = tl.arange(0, BLOCK_NB)
            hist = tl.load(
                block_counts_ptr + e[:, None] * num_blocks + b[None, :],
                mask=emask[:, None] & (b[None, :] < num_blocks),
                other=0,
            )
            c = tl.sum(hist, 1)
            before = tl.sum(tl.where(b[None, :] < pid, hist, 0), 1)
        else:
            c = tl.load(incl_ptr + e * num_blocks + (num_blocks - 1), mask=emask, other=0)
            before = tl.load(incl_ptr + col, mask=emask, other=0) - tl.load(block_counts_ptr + col, mask=emask, other=0)
        ends, starts = _padded_group_bounds(c, ALIGN)
        first = pid == 0
        tl.store(counts_ptr + e, c.to(tl.int64), mask=emask & first)
        tl.store(offs_ptr + e, ends, mask=emask & first)
        tl.store(starts_ptr + e, starts, mask=emask & first)
        tl.store(ok_ptr, (tl.sum(c, 0) == F).to(tl.int32), mask=first)

        base = starts + before
        f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
        fmask = f < F
        ids = tl.load(ids_ptr + f, mask=fmask, other=-1).to(tl.int64)
        onehot = (ids[:, None] == e[None, :].to(tl.int64)).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - 1 + base[None, :]
        dest = tl.sum(onehot * rank, axis=1)  # 0 for out-of-range ids: never out of bounds
        tl.store(dest_ptr + f, dest, mask=fmask)
        valid = fmask & (tl.sum(onehot, axis=1) > 0) & (dest < num_out_rows)
        tl.store(source_rows_ptr + dest, f, mask=valid)

    @triton.jit
    def _permute_fused_kernel(
        x_ptr,
        ids_ptr,
        out_ptr,
        table_ptr,
        sync_ptr,
        counts_ptr,
        offs_ptr,
        starts_ptr,
        ok_ptr,
        dest_ptr,
        source_rows_ptr,
        F,
        E,
        D,
        num_out_rows,
        NB,
        NS_D,
        NS,
        TOP_K: tl.constexpr,
        ALIGN: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_NB: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_Z: tl.constexpr,
        BLOCK_DZ: tl.constexpr,
    ):
        # Route + permute + pad in one launch. Roles follow a ticket taken at program start
        # (sync[0]), so a program only ever waits for programs that are already running:
        #   tickets [0, NB): histogram one block of BLOCK_F routing entries into table
        #     (E, NB); the last to finish (sync[1]) turns the table into each block's first
        #     destination row per expert, writes counts/offs/starts/ok, then sets sync[2];
        #   [NB, NB + NS): copy BLOCK_M routing entries x BLOCK_D columns of their tokens to
        #     their rows (and write dest / source_rows);
        #   the rest: zero expert (t - NB - NS)'s padding rows, then ALIGN-row chunks of the
        #     slack rows past the last group (source_rows -1).
        v = tl.atomic_add(sync_ptr, 1)
        e = tl.arange(0, BLOCK_E)
        emask = e < E
        if v < NB:
            hist = _block_histogram(ids_ptr, v, F, e, BLOCK_F)
            tl.store(table_ptr + e * NB + v, hist, mask=emask)
            tl.debug_barrier()
            done = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
            if done == NB - 1:
                b = tl.arange(0, BLOCK_NB)
                tmask = emask[:, None] & (b[None, :] < NB)
                tptr = table_ptr + e[:, None] * NB + b[None, :]
                t = tl.load(tptr, mask=tmask, other=0, cache_modifier=".cg")
                c = tl.sum(t, 1)
                ends, starts = _padded_group_bounds(c, ALIGN)
                tl.store(tptr, starts[:, None] + tl.cumsum(t, 1) - t, mask=tmask)
                tl.store(counts_ptr + e, c.to(tl.int64), mask=emask)
                tl.store(offs_ptr + e, ends, mask=emask)
                tl.store(starts_ptr + e, starts, mask=emask)
                tl.store(ok_ptr, (tl.sum(c, 0) == F).to(tl.int32))
                tl.debug_barrier()
                tl.atomic_xchg(sync_ptr + 2, 1, sem="release")
        else:
            ready = tl.atomic_add(sync_ptr + 2, 0, sem="acquire")
            while ready == 0:
                ready = tl.atomic_add(sync_ptr + 2, 0, sem="acquire")
            w = v - NB
            if w < NS:
                pf = w // NS_D
                pd = w % NS_D
                f = pf * BLOCK_M + tl.arange(0, BLOCK_M)
                fmask = f < F
                ids = tl.load(ids_ptr + f, mask=fmask, other=-1).to(tl.int64)
                valid = fmask & (ids >= 0) & (ids < E)
                idc = tl.where(valid, ids, 0)
                # BLOCK_M divides BLOCK_F: all entries of this program share one block
                blk = (pf * BLOCK_M) // BLOCK_F
                base = tl.load(table_ptr + idc * NB + blk, mask=valid, other=0, cache_modifier=".cg")
                g = blk * BLOCK_F + tl.arange(0, BLOCK_F)
                gids = tl.load(ids_ptr + g, mask=g < F, other=-1).to(tl.int64)
                earlier = (gids[None, :] == ids[:, None]) & (g[None, :] < f[:, None])
                dest = tl.where(valid, base + tl.sum(earlier.to(tl.int32), axis=1), 0)
                row_ok = valid & (dest < num_out_rows)
                if pd == 0:
                    tl.store(dest_ptr + f, dest, mask=fmask)
                    tl.store(source_rows_ptr + dest, f.to(tl.int32), mask=row_ok)
                cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
                cmask = cols[None, :] < D
                src = (f // TOP_K).to(tl.int64)
                vals = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=row_ok[:, None] & cmask)
                tl.store(out_ptr + dest.to(tl.int64)[:, None] * D + cols[None, :], vals, mask=row_ok[:, None] & cmask)
            else:
                z = w - NS
                c = tl.load(counts_ptr + e, mask=emask, other=0, cache_modifier=".cg").to(tl.int32)
                ends = tl.load(offs_ptr + e, mask=emask, other=0, cache_modifier=".cg")
                first_rows = tl.load(starts_ptr + e, mask=emask, other=0, cache_modifier=".cg")
                total = tl.max(ends, 0)
                zsel = e == z
                if z < E:  # expert z's padding rows: after its tokens, up to its group end
                    lo = tl.sum(tl.where(zsel, first_rows + c, 0), 0)
                    hi = tl.sum(tl.where(zsel, ends, 0), 0)
                else:  # an ALIGN-row chunk of the slack rows past the last group
                    lo = total + (z - E) * BLOCK_Z
                    hi = tl.minimum(lo + BLOCK_Z, num_out_rows)
                rows = lo + tl.arange(0, BLOCK_Z)
                rmask = rows < hi
                tl.store(source_rows_ptr + rows, tl.full([BLOCK_Z], -1, tl.int32), mask=rmask)
                zeros = tl.zeros([BLOCK_Z, BLOCK_DZ], dtype=out_ptr.dtype.element_ty)
                c0 = 0
                while c0 < D:
                    cols = c0 + tl.arange(0, BLOCK_DZ)
                    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], zeros,
                             mask=rmask[:, None] & (cols[None, :] < D))
                    c0 += BLOCK_DZ

    @triton.jit
    def _combine_kernel(
        y_ptr,
        dest_ptr,
        w_ptr,
        out_ptr,
        T,
        N,
        R,
        TOP_K: tl.constexpr,
        HAS_W: tl.constexpr,
        MANUAL_BF16: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if EVEN_N:
            nmask = n[None, :] >= 0
        else:
            nmask = n[None, :] < N
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
        for j in tl.static_range(TOP_K):
            d = tl.load(dest_ptr + t * TOP_K + j, mask=t_ok, other=0)
            ok = t_ok & (d >= 0) & (d < R)
            v = tl.load(y_ptr + d.to(tl.int64)[:, None] * N + n[None, :], mask=ok[:, None] & nmask, other=0)
            v = v.to(ACC)
            if HAS_W:
                w = tl.load(w_ptr + t * TOP_K + j, mask=t_ok, other=0).to(ACC)
                v = v * w[:, None]
            if j == 0:
                acc = v
            else:
                acc = acc + v
        out_ptrs = out_ptr + t.to(tl.int64)[:, None] * N + n[None, :]
        if MANUAL_BF16:
            tl.store(out_ptrs, _f32_to_bf16_rne_bits(acc), mask=t_ok[:, None] & nmask)
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & nmask)

    @triton.jit
    def _combine_bwd_kernel(
        gout_ptr,
        y_ptr,
        source_rows_ptr,
        w_ptr,
        gy_ptr,
        gw_ptr,
        R,
        N,
        TOP_K: tl.constexpr,
        HAS_W: tl.constexpr,
        NEED_GY: tl.constexpr,
        NEED_GW: tl.constexpr,
        MANUAL_BF16_GY: tl.constexpr,
        MANUAL_BF16_GW: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        N_CHUNKS: tl.constexpr,
    ):
        # Driven by padded rows: every row of grad_y is written once (zeros on padding
        # rows) and every routed copy's weight gradient is one row's dot product, so no
        # atomics and a fixed reduction order.
        pid = tl.program_id(0)
        r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = r < R
        f = tl.load(source_rows_ptr + r, mask=r_ok, other=-1)
        valid = f >= 0
        t = tl.where(valid, f, 0) // TOP_K
        if HAS_W:
            w = tl.load(w_ptr + f, mask=valid, other=0).to(ACC)
        dot = tl.zeros([BLOCK_M], dtype=ACC)
        # constexpr trip count: the interpreter cannot loop to a run-time bound
        for chunk in range(0, N_CHUNKS):
            n = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = n[None, :] < N
            g = tl.load(gout_ptr + t.to(tl.int64)[:, None] * N + n[None, :], mask=valid[:, None] & nmask, other=0)
            g = g.to(ACC)
            if NEED_GY:
                gy = g
                if HAS_W:
                    gy = g * w[:, None]
                gy_ptrs = gy_ptr + r.to(tl.int64)[:, None] * N + n[None, :]
                if MANUAL_BF16_GY:
                    tl.store(gy_ptrs, _f32_to_bf16_rne_bits(gy), mask=r_ok[:, None] & nmask)
                else:
                    tl.store(gy_ptrs, gy.to(gy_ptr.dtype.element_ty), mask=r_ok[:, None] & nmask)
            if NEED_GW:
                yv = tl.load(y_ptr + r.to(tl.int64)[:, None] * N + n[None, :], mask=valid[:, None] & nmask, other=0)
                dot += tl.sum(g * yv.to(ACC), axis=1)
        if NEED_GW:
            if MANUAL_BF16_GW:
                tl.store(gw_ptr + f, _f32_to_bf16_rne_bits(dot.to(tl.float32)), mask=valid)
            else:
                tl.store(gw_ptr + f, dot.to(gw_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------


_LAUNCHERS: dict = {}  # kernel -> CachedLauncher (a cache of compiled kernels, no configuration)


def _launch(kernel, grid, *args, **kwargs) -> None:
    launcher = _LAUNCHERS.get(kernel)
    if launcher is None:
        launcher = _LAUNCHERS[kernel] = CachedLauncher(kernel)
    launcher(grid, *args, **kwargs)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b



def _block_e(num_groups: int) -> int:
    return max(2, _next_pow2(num_groups))


# Tiles of the copy kernels: ROW_BYTES of a row per program column, BLOCK_M rows.
# Tuned on H100 with benchmarks/padding.py (see benchmarks/results/padding_h100.md).
COPY_CONFIG = {"row_bytes": 4096, "block_m": 8, "num_warps": 4}
COMBINE_CONFIG = {"row_bytes": 4096, "block_t": 1, "num_warps": 4}


def _copy_tiles(D: int, elsize: int, num_groups: int, config: Optional[dict]):
    cfg = dict(COPY_CONFIG, **(config or {}))
    block_d = min(_next_pow2(max(D, 1)), max(16, cfg["row_bytes"] // elsize))
    block_m = cfg["block_m"]
    # keep the (rows x groups) lookup tile small when there are many experts
    while block_m > 4 and block_m * _block_e(num_groups) > 8192:
        block_m //= 2
    return block_m, block_d, cfg["num_warps"]


def _nonempty(t: Tensor) -> Tensor:
    # empty tensors may have a null data pointer; kernels never touch them (masked)
    return t if t.numel() > 0 else torch.empty(1, dtype=t.dtype, device=t.device)


def _launch_pad_rows(
    x: Tensor,
    counts: Tensor,
    alignment: int,
    num_out_rows: int,
    *,
    index: Optional[Tensor],
    top_k: int,
    write_neg: bool,
    layout_out: Optional[Tuple[Tensor, Tensor, Tensor]],
    config: Optional[dict],
) -> Tensor:
    xb = _as_bits(x.contiguous())
    M, D = xb.shape
    E = counts.numel()
    out = torch.empty((num_out_rows, D), dtype=xb.dtype, device=x.device)
    block_m, block_d, num_warps = _copy_tiles(D, xb.element_size(), E, config)
    grid = (max(1, _cdiv(num_out_rows, block_m)), max(1, _cdiv(D, block_d)))
    offs, starts, ok = layout_out if layout_out is not None else (counts, counts, counts)
    idx = _nonempty(index) if index is not None else counts
    _launch(_pad_rows_kernel, grid, 
        _nonempty(xb),
        _nonempty(out),
        counts,
        idx,
        idx,
        offs,
        starts,
        ok,
        M,
        num_out_rows,
        D,
        E,
        ALIGN=alignment,
        TOP_K=top_k,
        HAS_INDEX=index is not None,
        WRITE_LAYOUT=layout_out is not None,
        WRITE_NEG=write_neg,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        BLOCK_E=_block_e(E),
        EVEN_D=D > 0 and D % block_d == 0,
        num_warps=num_warps,
    )
    return out.view(x.dtype)


def pad_triton(
    x: Tensor, counts: Tensor, alignment: int, num_out_rows: int, *, config: Optional[dict] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of :func:`pad_reference`, plus ``ok`` (1,) int32: 1 iff the counts are
    non-negative and sum to M. One launch (layout computed in the kernel)."""
    counts = counts.contiguous()
    E = counts.numel()
    offs = torch.empty(E, dtype=torch.int32, device=x.device)
    starts = torch.empty(E, dtype=torch.int32, device=x.device)
    ok = torch.empty(1, dtype=torch.int32, device=x.device)
    padded = _launch_pad_rows(
        x,
        counts,
        alignment,
        num_out_rows,
        index=None,
        top_k=1,
        write_neg=False,
        layout_out=(offs, starts, ok),
        config=config,
    )
    return padded, offs, starts, ok


def pad_rows_triton(
    x: Tensor,
    counts: Tensor,
    alignment: int,
    num_out_rows: int,
    source_rows: Optional[Tensor] = None,
    top_k: int = 1,
    *,
    config: Optional[dict] = None,
) -> Tensor:
    """Triton twin of :func:`pad_rows_reference`."""
    return _launch_pad_rows(
        x,
        counts.contiguous(),
        alignment,
        num_out_rows,
        index=None if source_rows is None else source_rows.contiguous(),
        top_k=top_k,
        write_neg=False,
        layout_out=None,
        config=config,
    )


def unpad_triton(
    padded: Tensor,
    counts: Tensor,
    alignment: int,
    num_rows: int,
    dest_rows: Optional[Tensor] = None,
    *,
    config: Optional[dict] = None,
) -> Tensor:
    """Triton twin of :func:`unpad_reference`. One launch."""
    pb = _as_bits(padded.contiguous())
    R, D = pb.shape
    counts = counts.contiguous()
    E = counts.numel()
    out = torch.empty((num_rows, D), dtype=pb.dtype, device=padded.device)
    if num_rows == 0 or D == 0:
        return out.view(padded.dtype)
    block_m, block_d, num_warps = _copy_tiles(D, pb.element_size(), E, config)
    grid = (_cdiv(num_rows, block_m), _cdiv(D, block_d))
    _launch(_unpad_rows_kernel, grid, 
        _nonempty(pb),
        out,
        counts,
        dest_rows.contiguous() if dest_rows is not None else counts,
        num_rows,
        R,
        D,
        E,
        ALIGN=alignment,
        HAS_INDEX=dest_rows is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        BLOCK_E=_block_e(E),
        EVEN_D=D % block_d == 0,
        num_warps=num_warps,
    )
    return out.view(padded.dtype)


# The index kernel sums the block histograms itself up to this many (expert, block)
# entries; above it a torch.cumsum launch is cheaper than every program re-reading them.
_PREFIX_IN_KERNEL_MAX = 4096
# Launch plans of the route kernels: "prefix_in_kernel" (block histograms, then the
# index kernel sums the (E x blocks) prefix itself: two launches) while that table is
# small, else "cumsum" (block histograms, torch.cumsum, index kernel: three launches).
# A one-launch plan where every program histograms the whole routing itself was measured
# on the H100 and dropped: 15-70 us of device time against 5-8 us for two launches, and
# no better eager time (benchmarks/results/padding_h100.md).
ROUTE_PLANS = ("prefix_in_kernel", "cumsum")
_PREFIX_IN_KERNEL_MAX = 8192
# Entries per program of the route kernels (the one-hot rank tile is BLOCK_F x BLOCK_E;
# 128 was fastest on the Mixtral and DeepSeek-V3 shapes, H100).
ROUTE_BLOCK_F = 128


def _route_plan(num_blocks: int, block_e: int) -> str:
    return "prefix_in_kernel" if block_e * _next_pow2(num_blocks) <= _PREFIX_IN_KERNEL_MAX else "cumsum"


def route_triton(
    expert_indices: Tensor,
    num_experts: int,
    alignment: int,
    num_out_rows: int,
    *,
    fill_source_rows: bool = True,
    plan: Optional[str] = None,
    block_f: Optional[int] = None,
):
    """Triton twin of :func:`route_reference`, plus ``ok`` (1,) int32: 1 iff every index is
    in [0, num_experts).

    ``plan`` (one of ``ROUTE_PLANS``; default: picked from the size) sets the launches:
    two or three. ``fill_source_rows=False`` leaves padding and slack entries of
    ``source_rows`` unwritten, for callers whose next kernel writes them (one launch
    less). ``block_f`` overrides the tile (tests, benchmarks).
    """
    T, k = expert_indices.shape
    F = T * k
    E = num_experts
    dev = expert_indices.device
    ids = expert_indices.contiguous().view(-1)
    block_e = _block_e(E)
    block_f = _route_block_f(F, E, block_f)
    num_blocks = max(1, _cdiv(F, block_f))
    if plan is None:
        plan = _route_plan(num_blocks, block_e)
    if plan not in ROUTE_PLANS:
        raise ValueError(f"plan must be one of {ROUTE_PLANS}, got {plan!r}")
    counts = torch.empty(E, dtype=torch.int64, device=dev)
    # separate buffers: custom ops may not return views of one another
    offs = torch.empty(E, dtype=torch.int32, device=dev)
    starts = torch.empty(E, dtype=torch.int32, device=dev)
    ok = torch.empty(1, dtype=torch.int32, device=dev)
    dest = torch.empty(F, dtype=torch.int32, device=dev)
    if fill_source_rows:
        source_rows = torch.full((num_out_rows,), -1, dtype=torch.int32, device=dev)
    else:
        source_rows = torch.empty(num_out_rows, dtype=torch.int32, device=dev)
    ids_arg = _nonempty(ids)
    block_nb = _next_pow2(num_blocks) if plan == "prefix_in_kernel" else 1
    block_counts = torch.empty((E, num_blocks), dtype=torch.int32, device=dev)
    _launch(_route_count_kernel, (num_blocks,), ids_arg, block_counts, F, E, num_blocks, BLOCK_F=block_f, BLOCK_E=block_e)
    incl = block_counts if plan == "prefix_in_kernel" else torch.cumsum(block_counts, 1, dtype=torch.int32)
    _launch(_route_index_kernel, (num_blocks,), 
        ids_arg,
        block_counts,
        incl,
        counts,
        offs,
        starts,
        ok,
        _nonempty(dest),
        _nonempty(source_rows),
        F,
        E,
        num_blocks,
        num_out_rows,
        ALIGN=alignment,
        BLOCK_F=block_f,
        BLOCK_E=block_e,
        PREFIX_IN_KERNEL=plan == "prefix_in_kernel",
        BLOCK_NB=block_nb,
    )
    return counts, offs, starts, dest, source_rows, ok


# Routings whose (experts x blocks) table fits this many entries permute in one launch
# (_permute_fused_kernel): small routings are bound by host launch cost.
_FUSED_PERMUTE_MAX_TABLE = 8192
FUSED_PERMUTE_ENTRIES = 8  # routing entries per copy program (BLOCK_M; divides ROUTE_BLOCK_F)


def _route_block_f(F: int, E: int, block_f: Optional[int] = None) -> int:
    # the one-hot rank tile (BLOCK_F x BLOCK_E) stays at most 8192 entries
    return max(16, min(block_f or ROUTE_BLOCK_F, 8192 // _block_e(E), _next_pow2(max(F, 1))))


def _use_fused_permute(T: int, k: int, E: int) -> bool:
    block_f = _route_block_f(T * k, E)
    table = _block_e(E) * _next_pow2(max(1, _cdiv(T * k, block_f)))
    return table <= _FUSED_PERMUTE_MAX_TABLE and block_f % FUSED_PERMUTE_ENTRIES == 0


def _permute_fused_triton(x: Tensor, expert_indices: Tensor, num_experts: int, alignment: int, num_out_rows: int, *,
                          block_f: int, config: Optional[dict] = None, share_buffers: bool = False):
    T, k = expert_indices.shape
    F = T * k
    E = num_experts
    dev = x.device
    xb = _as_bits(x.contiguous())
    D = xb.shape[1]
    ids = _nonempty(expert_indices.contiguous().view(-1))
    block_e = _block_e(E)
    num_blocks = max(1, _cdiv(F, block_f))
    _, block_d, num_warps = _copy_tiles(D, xb.element_size(), E, config)
    ns_d = max(1, _cdiv(D, block_d))
    ns = _cdiv(F, FUSED_PERMUTE_ENTRIES) * ns_d
    block_z = max(1, alignment)
    nz = E + _cdiv(max(0, num_out_rows - F), block_z)
    out = torch.empty((num_out_rows, D), dtype=xb.dtype, device=dev)
    if share_buffers:
        # one int32 workspace carved into every small buffer (each piece 16-byte aligned):
        # allocations are a large part of a small routing's host time
        sizes = (2 * E, E, E, 1, 3, E * num_blocks, F, num_out_rows)  # counts as int64 first
        starts_at = [0]
        for n in sizes:
            starts_at.append(starts_at[-1] + (n + 3) // 4 * 4)
        ws = torch.empty(starts_at[-1], dtype=torch.int32, device=dev)
        parts = [ws[a:a + n] for a, n in zip(starts_at, sizes)]
        counts, offs, starts, ok, sync, table, dest, source_rows = parts
        counts = counts.view(torch.int64)
        sync.zero_()
    else:
        table = torch.empty((E, num_blocks), dtype=torch.int32, device=dev)
        sync = torch.zeros(3, dtype=torch.int32, device=dev)
        counts = torch.empty(E, dtype=torch.int64, device=dev)
        offs = torch.empty(E, dtype=torch.int32, device=dev)
        starts = torch.empty(E, dtype=torch.int32, device=dev)
        ok = torch.empty(1, dtype=torch.int32, device=dev)
        dest = torch.empty(F, dtype=torch.int32, device=dev)
        source_rows = torch.empty(num_out_rows, dtype=torch.int32, device=dev)
    _launch(_permute_fused_kernel, (num_blocks + ns + nz,), 
        _nonempty(xb), ids, _nonempty(out), table, sync, counts, offs, starts, ok, _nonempty(dest),
        _nonempty(source_rows), F, E, D, num_out_rows, num_blocks, ns_d, ns,
        TOP_K=k, ALIGN=alignment, BLOCK_F=block_f, BLOCK_E=block_e, BLOCK_NB=_next_pow2(num_blocks),
        BLOCK_M=FUSED_PERMUTE_ENTRIES, BLOCK_D=block_d, BLOCK_Z=block_z,
        BLOCK_DZ=max(16, min(block_d, 8192 // block_z)), num_warps=num_warps,
    )
    return out.view(x.dtype), counts, offs, starts, dest, source_rows, ok


def permute_and_pad_triton(
    x: Tensor,
    expert_indices: Tensor,
    num_experts: int,
    alignment: int,
    num_out_rows: int,
    *,
    config: Optional[dict] = None,
    fused: Optional[bool] = None,
    block_f: Optional[int] = None,
    share_buffers: bool = False,
):
    """Triton twin of :func:`permute_and_pad_reference`, plus ``ok`` (1,) int32: 1 iff
    every index is in [0, num_experts).

    Small routings (an (experts x blocks) table of at most ``_FUSED_PERMUTE_MAX_TABLE``
    entries; ``fused=None``) run in one launch (:func:`_permute_fused_kernel`); larger
    ones, or ``fused=False``, in the launches of :func:`route_triton`, then the padded
    gather, which also writes -1 into ``source_rows`` on padding rows. ``block_f``
    overrides the routing entries per block (tests). ``share_buffers=True`` returns the
    index tensors as views of one workspace (one allocation instead of eight; not for
    custom ops, whose outputs may not alias)."""
    T, k = expert_indices.shape
    block_f = _route_block_f(T * k, num_experts, block_f)
    if fused is None:
        fused = _use_fused_permute(T, k, num_experts)
    if fused:
        return _permute_fused_triton(x, expert_indices, num_experts, alignment, num_out_rows, block_f=block_f,
                                     config=config, share_buffers=share_buffers)
    counts, offs, starts, dest, source_rows, ok = route_triton(
        expert_indices, num_experts, alignment, num_out_rows, fill_source_rows=False, block_f=block_f
    )
    padded = _launch_pad_rows(
        x,
        counts,
        alignment,
        num_out_rows,
        index=source_rows,
        top_k=expert_indices.shape[1],
        write_neg=True,
        layout_out=None,
        config=config,
    )
    return padded, counts, offs, starts, dest, source_rows, ok


def _manual_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreting()


def _fp_kwargs() -> dict:
    # Keep w*y and the running sum as separate roundings, like the reference.
    return {} if _interpreting() else {"enable_fp_fusion": False}


def combine_triton(
    y: Tensor, dest_rows: Tensor, weights: Optional[Tensor], top_k: int, *, config: Optional[dict] = None
) -> Tensor:
    """Triton twin of :func:`combine_reference`. One launch."""
    y = y.contiguous()
    R, N = y.shape
    T = dest_rows.numel() // top_k
    out = torch.empty((T, N), dtype=y.dtype, device=y.device)
    if T == 0 or N == 0:
        return out
    cfg = dict(COMBINE_CONFIG, **(config or {}))
    block_n = min(_next_pow2(N), max(16, cfg["row_bytes"] // y.element_size()))
    block_t = cfg["block_t"]
    manual = _manual_bf16(y.dtype)
    grid = (_cdiv(T, block_t), _cdiv(N, block_n))
    _launch(_combine_kernel, grid, 
        _nonempty(y),
        dest_rows.contiguous(),
        weights.contiguous() if weights is not None else dest_rows,
        out.view(torch.int16) if manual else out,
        T,
        N,
        R,
        TOP_K=top_k,
        HAS_W=weights is not None,
        MANUAL_BF16=manual,
        ACC=tl.float64 if y.dtype == torch.float64 else tl.float32,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        EVEN_N=N % block_n == 0,
        num_warps=cfg["num_warps"],
        **_fp_kwargs(),
    )
    return out


def combine_backward_triton(
    grad_out: Tensor,
    y: Tensor,
    dest_rows: Tensor,
    source_rows: Tensor,
    weights: Optional[Tensor],
    top_k: int,
    need_grad_y: bool,
    need_grad_w: bool,
) -> Tuple[Tensor, Tensor]:
    """Triton twin of :func:`combine_backward_reference` (grad_y bitwise; grad_w is a
    float32 dot product whose summation order differs from torch's). One launch."""
    need_grad_w = need_grad_w and weights is not None
    y = y.contiguous() if need_grad_w else y  # read only for grad_w (else maybe a stand-in)
    grad_out = grad_out.contiguous()
    R, N = y.shape
    grad_y = torch.empty((R, N) if need_grad_y else (0,), dtype=y.dtype, device=y.device)
    grad_w = (
        torch.empty(weights.shape if need_grad_w else (0,), dtype=weights.dtype, device=y.device)
        if weights is not None
        else y.new_empty(0)
    )
    if R == 0 or not (need_grad_y or need_grad_w):
        return grad_y, grad_w
    block_m = 8
    block_n = min(_next_pow2(max(N, 1)), max(16, 2048 // y.element_size()))
    mgy = need_grad_y and _manual_bf16(y.dtype)
    mgw = need_grad_w and _manual_bf16(weights.dtype)
    _launch(_combine_bwd_kernel, (_cdiv(R, block_m),), 
        _nonempty(grad_out),
        _nonempty(y),
        source_rows.contiguous(),
        weights.contiguous() if weights is not None else source_rows,
        _nonempty(grad_y.view(torch.int16) if mgy else grad_y),
        _nonempty(grad_w.view(torch.int16) if mgw else grad_w),
        R,
        N,
        TOP_K=top_k,
        HAS_W=weights is not None,
        NEED_GY=need_grad_y,
        NEED_GW=need_grad_w,
        MANUAL_BF16_GY=mgy,
        MANUAL_BF16_GW=mgw,
        ACC=tl.float64 if y.dtype == torch.float64 else tl.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        N_CHUNKS=_cdiv(N, block_n),
        num_warps=4,
    )
    return grad_y, grad_w
