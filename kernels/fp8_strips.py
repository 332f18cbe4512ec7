"""Single-read FP8 rowwise quantization passes ("strips") for the Hopper FP8 experts path.

The same numerics and outputs as the two-pass kernels of kernels/fp8_rowwise.py (their
jit helpers are shared, so results are bitwise interchangeable, tested), organised so that
each operand crosses HBM about once per copy instead of twice:

* **row strips** (the row copy, one scale per row along K): a program owns BR whole rows,
  finds their amax in a first sweep over K and casts in a second sweep that finds the rows
  still in L1/L2;
* **column strips** (the column copy, one scale per (group, column) along the group's
  tokens, stored transposed): a program owns one (group, BC columns) strip, finds its
  column amax in a first sweep over the group's rows and casts in a second sweep. Group
  ``E`` of an activation is the slack: its programs write the zero columns of rows past
  ``offs[-1]``. A weight (E, N, K) is the uniform case (groups of N rows).

No amax buffer, memset or atomic is needed, and the two copies are independent launches:
a weight's forward (row) copy and its input-gradient (column) copy can be made when each
is needed, so the column copy need not be kept from the forward to the backward.

Routed-block extras (``moeq.ops.fp8_routed``): per-row routing weights ``w`` can
multiply the plain source (the weighted column copy of grad_y for the down-projection's
weight gradient) or grad_h (MODE_SWIGLU_BWD: grad_h = w * unweighted grad_h), and the
MODE_SWIGLU_BWD row strip can also return the routing-weight gradient
``dw[row] = sum_n grad_h[row, n] * h[row, n]`` (h recomputed from gate_up, as the
backward's other terms are), summed in a fixed order.

Every public function has a plain-torch reference in this module or in fp8_rowwise.py;
tests/test_fp8_strips.py checks them bitwise (dw to fp32 summation order).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from moeq.kernels.common import HAS_TRITON
from moeq.kernels.common import next_pow2 as _next_pow2
from moeq.kernels.fp8_rowwise import (
    ALIGN,
    MODE_PLAIN,
    MODE_SWIGLU,
    MODE_SWIGLU_BWD,
    Fp8Dual,
    check_2d,
    check_offs,
    dual_quantize_impl,
    tile_key,
    alloc_dual_outputs,
    dual_outputs_like,
    quantize_colwise_grouped_reference,
    quantize_rowwise_reference,
    swiglu_backward_reference,
    swiglu_reference,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from moeq.kernels.common import abs_nan_inf as _abs_nan_inf
    from moeq.kernels.common import exp2_from_biased as _exp2_from_biased
    from moeq.kernels.common import inv_scale as _inv_scale
    from moeq.kernels.common import scale_exponent as _scale_exponent
    from moeq.kernels.common import to_e4m3 as _to_e4m3
    from moeq.kernels.fp8_rowwise import load_source_w

if HAS_TRITON:
    # ----------------------------------------------------------------------------------
    # Single-read strip passes: each program owns whole rows (row copy) or whole group
    # columns (column copy), finds their amax in a first sweep and quantizes in a second
    # sweep that finds the strip still in L2, so the source crosses HBM about once per copy
    # and no amax buffer, memset or atomic is needed. Same numerics as passes A/B above
    # (the same helpers), so they are bitwise interchangeable.
    # ----------------------------------------------------------------------------------

    @triton.jit
    def _offs_ok(offs_ptr, ok_ptr, M, E: tl.constexpr, SUB: tl.constexpr, EB: tl.constexpr):
        eo = tl.arange(0, EB)
        ends = tl.load(offs_ptr + eo, mask=eo < E, other=0)
        prev = tl.load(offs_ptr + eo - 1, mask=(eo > 0) & (eo < E), other=0)
        last = tl.max(tl.where(eo < E, ends, 0), axis=0)
        bad = tl.sum(((ends < prev) | ((ends % SUB) != 0)).to(tl.int32), axis=0)
        tl.store(ok_ptr, ((bad == 0) & (last <= M)).to(tl.int32))

    @triton.jit
    def _row_strip_kernel(
        src_ptr, aux_ptr, offs_ptr, row_ptr, row_inv_ptr, ok_ptr, w_ptr, dw_ptr,
        M, stride_src, stride_aux, stride_row,
        KC: tl.constexpr, E: tl.constexpr, H: tl.constexpr, MODE: tl.constexpr, WRITE_OK: tl.constexpr,
        HAS_W: tl.constexpr, WANT_DW: tl.constexpr,
        BR: tl.constexpr, BK: tl.constexpr, SUB: tl.constexpr, EB: tl.constexpr,
    ):
        """Row copy of BR rows per program: amax over all KC source columns, then the cast.

        WANT_DW (MODE_SWIGLU_BWD): also dw[row] = sum over columns of grad_h * h, in a fixed
        order (deterministic)."""
        pid = tl.program_id(0)
        if WRITE_OK:
            if pid == 0:
                _offs_ok(offs_ptr, ok_ptr, M, E, SUB, EB)
        rows = pid * BR + tl.arange(0, BR)
        rmask = rows < M
        if HAS_W:
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
        else:
            w = tl.zeros((BR,), dtype=tl.float32)
        if BK >= KC:
            # one shot: the rows' whole width is one tile, kept in registers from the amax
            # to the cast (a single read of the source, no second sweep)
            cols = tl.arange(0, BK)
            mask = rmask[:, None] & (cols < KC)[None, :]
            v0, v1, hd = load_source_w(src_ptr, aux_ptr, w, rows, cols, mask, stride_src, stride_aux, H, MODE, HAS_W)
            a = _abs_nan_inf(v0)
            if MODE == 2:
                a = tl.maximum(a, _abs_nan_inf(v1))
            ra = tl.max(a, axis=1)
            if WANT_DW:
                tl.store(dw_ptr + rows, tl.sum(hd, axis=1), mask=rmask)
            s = _exp2_from_biased(_scale_exponent(ra))[:, None]
            rp = row_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
            tl.store(rp, _to_e4m3(v0 * s), mask=mask)
            if MODE == 2:
                tl.store(rp + H, _to_e4m3(v1 * s), mask=mask)
        else:
            acc = tl.zeros((BR, BK), dtype=tl.float32)
            dacc = tl.zeros((BR, BK), dtype=tl.float32)
            for k0 in range(0, KC, BK):
                cols = k0 + tl.arange(0, BK)
                mask = rmask[:, None] & (cols < KC)[None, :]
                v0, v1, hd = load_source_w(src_ptr, aux_ptr, w, rows, cols, mask, stride_src, stride_aux, H, MODE,
                                            HAS_W)
                acc = tl.maximum(acc, _abs_nan_inf(v0))
                if MODE == 2:
                    acc = tl.maximum(acc, _abs_nan_inf(v1))
                if WANT_DW:
                    dacc += hd
            ra = tl.max(acc, axis=1)
            if WANT_DW:
                tl.store(dw_ptr + rows, tl.sum(dacc, axis=1), mask=rmask)
            s = _exp2_from_biased(_scale_exponent(ra))[:, None]
            for k0 in range(0, KC, BK):
                cols = k0 + tl.arange(0, BK)
                mask = rmask[:, None] & (cols < KC)[None, :]
                v0, v1, hd = load_source_w(src_ptr, aux_ptr, w, rows, cols, mask, stride_src, stride_aux, H, MODE,
                                            HAS_W)
                rp = row_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
                tl.store(rp, _to_e4m3(v0 * s), mask=mask)
                if MODE == 2:
                    tl.store(rp + H, _to_e4m3(v1 * s), mask=mask)
        tl.store(row_inv_ptr + rows, _inv_scale(ra), mask=rmask)

    @triton.jit
    def _col_strip_amax(src_ptr, aux_ptr, w_ptr, cmax0, cmax1, r0, lo, end, M, cols, cmask, stride_src, stride_aux,
                        H: tl.constexpr, MODE: tl.constexpr, BR: tl.constexpr, HAS_W: tl.constexpr):
        rows = r0 + tl.arange(0, BR)
        rm = (rows >= lo) & (rows < end) & (rows < M)
        mask = rm[:, None] & cmask[None, :]
        w = tl.load(w_ptr + rows, mask=rm, other=0.0) if HAS_W else tl.zeros((BR,), dtype=tl.float32)
        v0, v1, _ = load_source_w(src_ptr, aux_ptr, w, rows, cols, mask, stride_src, stride_aux, H, MODE, HAS_W)
        cmax0 = tl.maximum(cmax0, tl.max(tl.where(mask, _abs_nan_inf(v0), 0.0), axis=0))
        if MODE == 2:
            cmax1 = tl.maximum(cmax1, tl.max(tl.where(mask, _abs_nan_inf(v1), 0.0), axis=0))
        return cmax0, cmax1

    @triton.jit
    def _col_strip_cast(src_ptr, aux_ptr, w_ptr, base_ptr, s0, s1, r0, lo, end, M, cols, cmask, stride_src, stride_aux,
                        stride_ck, H: tl.constexpr, MODE: tl.constexpr, BR: tl.constexpr, ZERO: tl.constexpr,
                        HAS_W: tl.constexpr, TRANS_F32: tl.constexpr):
        # the (BR, BC) tile, scaled per column, cast, stored transposed: base_ptr[col, row]
        rows = r0 + tl.arange(0, BR)
        rm = (rows >= lo) & (rows < end)
        mask = (rm & (rows < M))[:, None] & cmask[None, :]  # loads: never a row >= M
        tmask = cmask[:, None] & rm[None, :]
        cp = base_ptr + cols.to(tl.int64)[:, None] * stride_ck + rows[None, :]
        if ZERO:
            z = tl.zeros((BR, cols.shape[0]), dtype=tl.float32)
            tl.store(cp, tl.trans(_to_e4m3(z)), mask=tmask)
            if MODE == 2:
                tl.store(cp + H * stride_ck, tl.trans(_to_e4m3(z)), mask=tmask)
        else:
            w = tl.load(w_ptr + rows, mask=rm & (rows < M), other=0.0) if HAS_W else tl.zeros((BR,), dtype=tl.float32)
            v0, v1, _ = load_source_w(src_ptr, aux_ptr, w, rows, cols, mask, stride_src, stride_aux, H, MODE, HAS_W)
            # transpose through shared memory as float32 (TRANS_F32: wide accesses) or as e4m3
            # bytes (a quarter of the bytes, byte-wide shuffles): the faster is measured
            if TRANS_F32:
                tl.store(cp, _to_e4m3(tl.trans(v0 * s0[None, :])), mask=tmask)
                if MODE == 2:
                    tl.store(cp + H * stride_ck, _to_e4m3(tl.trans(v1 * s1[None, :])), mask=tmask)
            else:
                tl.store(cp, tl.trans(_to_e4m3(v0 * s0[None, :])), mask=tmask)
                if MODE == 2:
                    tl.store(cp + H * stride_ck, tl.trans(_to_e4m3(v1 * s1[None, :])), mask=tmask)

    @triton.jit
    def _col_strip_kernel(
        src_ptr, aux_ptr, offs_ptr, col_ptr, col_inv_ptr, ok_ptr, w_ptr,
        M, GROUP_ROWS, stride_src, stride_aux, stride_cg, stride_ck,
        KC: tl.constexpr, E: tl.constexpr, H: tl.constexpr, KO: tl.constexpr, MODE: tl.constexpr,
        UNIFORM: tl.constexpr, WRITE_OK: tl.constexpr, HAS_W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
        TRANS_F32: tl.constexpr,
        SUB: tl.constexpr, EB: tl.constexpr, INTERP: tl.constexpr,
    ):
        """Column copy of one (group, BC columns) strip per program; grid (cdiv(KC, BC), E + 1).

        Group E (grouped mode) is the slack: its programs write zeros for rows in [offs[-1], M).
        Weights (UNIFORM): group g is rows [g*N, (g+1)*N) and its copy is col_ptr[g, col, row - g*N]."""
        pid_c = tl.program_id(0)
        g = tl.program_id(1)
        if WRITE_OK:
            if pid_c + g == 0:
                _offs_ok(offs_ptr, ok_ptr, M, E, SUB, EB)
        cols = pid_c * BC + tl.arange(0, BC)
        cmask = cols < KC
        if UNIFORM:
            start = g * GROUP_ROWS
            end = start + GROUP_ROWS
            base = col_ptr + g.to(tl.int64) * stride_cg - start
        else:
            start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
            # the slack group's rows run to the copy's padded width (columns >= M are
            # unspecified: zeros there are fine); loads never read rows >= M
            end = tl.load(offs_ptr + g, mask=g < E, other=stride_ck)
            # Group bounds are multiples of SUB in a valid layout (checked on device by the
            # offs_ok flag): the hints let the transposed stores, whose masks run along the
            # rows, vectorize to 16 bytes.
            start = tl.multiple_of(start, SUB)
            end = tl.multiple_of(tl.minimum(end, stride_ck), SUB)
            base = col_ptr
        lo = start
        cmax0 = tl.zeros((BC,), dtype=tl.float32)
        cmax1 = tl.zeros((BC,), dtype=tl.float32)
        if g < E:
            if INTERP:  # the interpreter's range() cannot take runtime bounds; a while loop can
                r0 = start
                while r0 < end:
                    cmax0, cmax1 = _col_strip_amax(src_ptr, aux_ptr, w_ptr, cmax0, cmax1, r0, lo, end, M, cols, cmask,
                                                   stride_src, stride_aux, H, MODE, BR, HAS_W)
                    r0 += BR
            else:
                for r0 in range(start, end, BR):
                    cmax0, cmax1 = _col_strip_amax(src_ptr, aux_ptr, w_ptr, cmax0, cmax1, r0, lo, end, M, cols, cmask,
                                                   stride_src, stride_aux, H, MODE, BR, HAS_W)
            tl.store(col_inv_ptr + g * KO + cols, _inv_scale(cmax0), mask=cmask)
            if MODE == 2:
                tl.store(col_inv_ptr + g * KO + H + cols, _inv_scale(cmax1), mask=cmask)
        s0 = _exp2_from_biased(_scale_exponent(cmax0))
        s1 = _exp2_from_biased(_scale_exponent(cmax1))
        if INTERP:
            r0 = start
            while r0 < end:
                _col_strip_cast(src_ptr, aux_ptr, w_ptr, base, s0, s1, r0, lo, end, M, cols, cmask, stride_src, stride_aux,
                                stride_ck, H, MODE, BR, g >= E, HAS_W, TRANS_F32)
                r0 += BR
        else:
            if g < E:
                for r0 in range(start, end, BR):
                    _col_strip_cast(src_ptr, aux_ptr, w_ptr, base, s0, s1, r0, lo, end, M, cols, cmask, stride_src,
                                    stride_aux, stride_ck, H, MODE, BR, False, HAS_W, TRANS_F32)
            else:
                for r0 in range(start, end, BR):
                    _col_strip_cast(src_ptr, aux_ptr, w_ptr, base, s0, s1, r0, lo, end, M, cols, cmask, stride_src,
                                    stride_aux, stride_ck, H, MODE, BR, True, HAS_W, TRANS_F32)


# Strip-pass tiles per source kind: row strip (elements per program, num_warps): the tile
# is as wide as the rows when they fit (one shot, kept in registers; else sweeps of that
# width) and as many rows tall as fill the budget; column strip (BR, BC, num_warps,
# transpose as float32).
# Chosen by measurement (benchmarks/moe_layer.py --tune-fp8-strips; docs/fp8_gemm.md).
STRIP_CONFIGS = {  # H200, Qwen3-30B-A3B shapes (benchmarks/results/moe_layer_h200.json)
    "plain": ((4096, 4), (128, 32, 4, False)),
    "weight": ((4096, 4), (128, 32, 4, False)),
    "swiglu": ((2048, 4), (128, 32, 4, False)),
    "swiglu_bwd": ((2048, 4), (128, 32, 4, False)),
}
_INTERPRETER_STRIPS = ((64, 1), (16, 32, 1, False))


def row_tile(kc: int, budget: int):
    """(BR, BK) of a row strip of ``budget`` elements for rows of ``kc`` columns."""
    bk = min(max(16, _next_pow2(kc)), max(16, budget))
    return max(1, budget // bk), bk


def _dual_quantize_strips_impl(mode: int, src: torch.Tensor, aux: Optional[torch.Tensor], offs: Optional[torch.Tensor],
                               num_groups: int, want_row: bool, want_col: bool, *, tiles=None,
                               row_weights: Optional[torch.Tensor] = None, weight_row_copy: bool = False,
                               weight_col_copy: bool = False, want_dw: bool = False, out=None):
    """The strip passes; same arguments and results as ``dual_quantize_impl``, plus:

    out: optional preallocated (row, row_inv, col, col_inv) written in place (shapes and
    dtypes as allocated here; a weight's copies kept across steps are refreshed this way).

    row_weights: (M,) float32 per-row routing weights; ``weight_row_copy`` /
    ``weight_col_copy`` say which copy sees the source (MODE_PLAIN) or grad_h
    (MODE_SWIGLU_BWD) multiplied by them. want_dw (MODE_SWIGLU_BWD with a row copy): also
    return dw (M,) float32 = sum over columns of grad_h * h, the routing-weight gradient.
    Returns (row, row_inv, col, col_inv, ok, dw); dw is empty unless asked for.
    """
    dev = src.device
    m, width = src.shape
    kc = width if mode == MODE_PLAIN else width // 2
    ko = 2 * kc if mode == MODE_SWIGLU_BWD else kc
    h = 0 if mode == MODE_PLAIN else kc
    e = num_groups
    weight = offs is None
    f32 = torch.float32
    dw = torch.empty((m,) if want_dw else (0,), dtype=f32, device=dev)
    if m == 0 or kc == 0 or not (want_row or want_col) or (row_weights is None and (weight_row_copy or weight_col_copy)):
        if row_weights is not None or want_dw or (weight_row_copy or weight_col_copy):
            raise ValueError("row_weights need rows, columns and a copy to apply to (and want_dw a row copy)")
        return (*dual_quantize_impl(mode, src, aux, offs, num_groups, want_row, want_col), dw)
    if want_dw and not (mode == MODE_SWIGLU_BWD and want_row):
        raise ValueError("want_dw needs MODE_SWIGLU_BWD and the row copy")
    if out is None:
        row, row_inv, col, col_inv, (group_rows, stride_cg, stride_ck) = alloc_dual_outputs(m, ko, e, weight, want_row,
                                                                                           want_col, dev)
    else:
        # the shapes alloc_dual_outputs would give, checked without allocating them
        metas = alloc_dual_outputs(m, ko, e, weight, want_row, want_col, "meta")
        for got, want in zip(out, metas[:4]):
            if got.shape != want.shape or got.dtype != want.dtype or not got.is_contiguous() or got.device != dev:
                raise ValueError(f"out tensor {got.dtype} {tuple(got.shape)} on {got.device} must be a contiguous "
                                 f"{want.dtype} {tuple(want.shape)} on {dev}")
        row, row_inv, col, col_inv = out
        group_rows, stride_cg, stride_ck = metas[4]
    ok = torch.ones((1,), dtype=torch.int32, device=dev) if weight else torch.empty((1,), dtype=torch.int32, device=dev)
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    (budget, wr), col_tiles = tiles or (_INTERPRETER_STRIPS if interp else STRIP_CONFIGS[tile_key(mode, weight)])
    bcr, bc, wc = col_tiles[:3]
    trans_f32 = bool(col_tiles[3]) if len(col_tiles) > 3 else False
    br, bk = row_tile(kc, budget)
    bc = min(bc, max(16, _next_pow2(kc)))
    offs_arg = row_inv if weight else offs
    aux_arg = src if aux is None else aux
    stride_aux = 0 if aux is None else aux.stride(0)
    eb = max(16, _next_pow2(e))
    w_arg = row_inv if row_weights is None else row_weights
    if want_row:
        _row_strip_kernel[(triton.cdiv(m, br),)](
            src, aux_arg, offs_arg, row, row_inv, ok, w_arg, dw if want_dw else row_inv, m, src.stride(0), stride_aux, ko,
            KC=kc, E=e, H=h, MODE=mode, WRITE_OK=not weight, HAS_W=weight_row_copy, WANT_DW=want_dw,
            BR=br, BK=bk, SUB=ALIGN, EB=eb, num_warps=wr,
        )
    if want_col:
        _col_strip_kernel[(triton.cdiv(kc, bc), e + (0 if weight else 1))](
            src, aux_arg, offs_arg, col, col_inv, ok, w_arg,
            m, group_rows, src.stride(0), stride_aux, stride_cg, stride_ck,
            KC=kc, E=e, H=h, KO=ko, MODE=mode, UNIFORM=weight, WRITE_OK=not (weight or want_row),
            HAS_W=weight_col_copy, BR=bcr, BC=bc, TRANS_F32=trans_f32, SUB=ALIGN, EB=eb, INTERP=interp, num_warps=wc,
        )
    return row, row_inv, col, col_inv, ok, dw


@torch.library.custom_op("moeq::fp8_strip_quantize", mutates_args=())
def _strip_op(mode: int, src: torch.Tensor, aux: Optional[torch.Tensor], offs: Optional[torch.Tensor],
              num_groups: int, want_row: bool, want_col: bool, row_weights: Optional[torch.Tensor],
              weight_row_copy: bool, weight_col_copy: bool, want_dw: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _dual_quantize_strips_impl(mode, src, aux, offs, num_groups, want_row, want_col, row_weights=row_weights,
                                      weight_row_copy=weight_row_copy, weight_col_copy=weight_col_copy, want_dw=want_dw)


@_strip_op.register_fake
def _(mode, src, aux, offs, num_groups, want_row, want_col, row_weights, weight_row_copy, weight_col_copy, want_dw):
    dw = src.new_empty((src.shape[0],) if want_dw else (0,), dtype=torch.float32)
    return (*dual_outputs_like(mode, src, offs, num_groups, want_row, want_col), dw)


def _strips(mode, src, aux, offs, num_groups, want_row, want_col, row_weights=None, weight_row_copy=False,
            weight_col_copy=False, want_dw=False):
    # Eager calls skip the custom-op dispatcher; under torch.compile the op keeps the
    # launches opaque to the tracer.
    args = (mode, src, aux, offs, num_groups, want_row, want_col, row_weights, weight_row_copy, weight_col_copy, want_dw)
    if torch.compiler.is_compiling():
        return torch.ops.moeq.fp8_strip_quantize(*args)
    return _dual_quantize_strips_impl(*args[:7], row_weights=row_weights, weight_row_copy=weight_row_copy,
                                      weight_col_copy=weight_col_copy, want_dw=want_dw)


def _check_row_weights(w: Optional[torch.Tensor], m: int, device) -> None:
    if w is None:
        return
    if w.dtype != torch.float32 or w.shape != (m,) or w.device != device or not w.is_contiguous():
        raise ValueError(f"row_weights must be a contiguous ({m},) float32 tensor on {device}, got {w.dtype} "
                         f"{tuple(w.shape)} on {w.device}")


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def quantize_weight_rows(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward copy of a 3D expert weight, one read of it.

    Args:
        w: (E, N, K) bfloat16/float32, N a multiple of 16, K a multiple of 16.
    Returns:
        (row (E, N, K) e4m3, row_inv (E, N) float32), scaled along K: bitwise
        ``quantize_weight(w).row / .row_inv`` of kernels/fp8_rowwise.py.
    """
    e, n, k = _check_weight(w)
    row, row_inv, *_ = _strips(MODE_PLAIN, w.contiguous().view(e * n, k), None, None, e, True, False)
    return row.view(e, n, k), row_inv.view(e, n)


def quantize_weight_cols(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The input-gradient copy of a 3D expert weight, one read of it.

    Args:
        w: (E, N, K) bfloat16/float32.
    Returns:
        (col (E, K, N) e4m3 contiguous, col_inv (E, K) float32), scaled along N: bitwise
        ``quantize_weight(w).col / .col_inv``. ``col`` is the (E, K, N) K-major operand of
        the input-gradient GEMM ``grad[g] @ w[e]``.
    """
    e, n, k = _check_weight(w)
    _, _, col, col_inv, *_ = _strips(MODE_PLAIN, w.contiguous().view(e * n, k), None, None, e, False, True)
    return col, col_inv


def _check_weight(w: torch.Tensor):
    if w.dim() != 3:
        raise ValueError(f"weight must be 3D (E, N, K), got shape {tuple(w.shape)}")
    e, n, k = w.shape
    if n % ALIGN or k % 16:
        raise ValueError(f"weight dims N={n}, K={k} must be multiples of {ALIGN} and 16 for FP8 grouped GEMMs")
    check_2d("weight", w.reshape(e * n, k), 16)
    return e, n, k


def quantize_dual_strips(
    x: torch.Tensor,
    offs: torch.Tensor,
    *,
    rowwise: bool = True,
    colwise: bool = True,
    row_weights: Optional[torch.Tensor] = None,
    weight_col_copy: bool = False,
) -> Fp8Dual:
    """Both FP8 copies of a grouped activation, one read per copy.

    Args:
        x: (M, K) bfloat16/float32 rows grouped by ``offs``, K % 16 == 0.
        offs: (E,) int32 cumulative group ends (multiples of ``GROUP_ALIGNMENT[FP8]``;
            ``offs_ok`` of the result says whether they were, for a device-side assert).
        row_weights, weight_col_copy: when both given, the column copy quantizes
            ``row_weights[:, None] * x`` (in float32) instead of ``x``; the row copy is of x.
    Returns:
        Fp8Dual (row (M, K), row_inv (M,), col (K, M16), col_inv (E, K), offs_ok): bitwise
        ``quantize_dual(x, offs)`` (fp8_rowwise.py) without weights.
    """
    check_2d("x", x, 16)
    check_offs(offs, x.device)
    _check_row_weights(row_weights, x.shape[0], x.device)
    wc = bool(weight_col_copy and row_weights is not None)
    row, row_inv, col, col_inv, ok, _ = _strips(MODE_PLAIN, x, None, offs, offs.numel(), rowwise, colwise,
                                                row_weights if wc else None, False, wc)
    return Fp8Dual(row, row_inv, col, col_inv, ok)


def swiglu_quantize_strips(gate_up: torch.Tensor, offs: torch.Tensor, *, colwise: bool = True) -> Fp8Dual:
    """FP8 copies of ``h = silu(gate) * up`` (M, H) from gate_up (M, 2H) bf16, h in float32.

    Bitwise ``swiglu_quantize(gate_up, offs)`` of fp8_rowwise.py.
    """
    check_2d("gate_up", gate_up, 32)
    check_offs(offs, gate_up.device)
    row, row_inv, col, col_inv, ok, _ = _strips(MODE_SWIGLU, gate_up, None, offs, offs.numel(), True, colwise)
    return Fp8Dual(row, row_inv, col, col_inv, ok)


def swiglu_backward_quantize_strips(
    gate_up: torch.Tensor,
    grad_h: torch.Tensor,
    offs: torch.Tensor,
    *,
    row_weights: Optional[torch.Tensor] = None,
    colwise: bool = True,
) -> Tuple[Fp8Dual, Optional[torch.Tensor]]:
    """FP8 copies of d(gate_up) (M, 2H), the SwiGLU backward computed in float32.

    Args:
        gate_up: (M, 2H) bfloat16 forward GEMM output. grad_h: (M, H) bfloat16.
        offs: (E,) int32 group ends.
        row_weights: optional (M,) float32 routing weight of each row: the gradient of h
            is then ``row_weights[:, None] * grad_h`` (grad_h being the gradient of the
            unweighted expert output), and the routing-weight gradient is returned too.
    Returns:
        (Fp8Dual of d(gate_up): row (M, 2H) + row_inv, col (2H, M16) + col_inv;
        dw (M,) float32 ``sum_n grad_h * h`` per row, or None without row_weights).
    """
    check_2d("gate_up", gate_up, 32)
    check_2d("grad_h", grad_h, 16)
    if grad_h.shape[0] != gate_up.shape[0] or 2 * grad_h.shape[1] != gate_up.shape[1]:
        raise ValueError(f"grad_h {tuple(grad_h.shape)} does not match gate_up {tuple(gate_up.shape)}: want (M, H) and (M, 2H)")
    check_offs(offs, gate_up.device)
    _check_row_weights(row_weights, gate_up.shape[0], gate_up.device)
    has_w = row_weights is not None
    row, row_inv, col, col_inv, ok, dw = _strips(MODE_SWIGLU_BWD, gate_up, grad_h, offs, offs.numel(), True, colwise,
                                                 row_weights, has_w, has_w, has_w)
    return Fp8Dual(row, row_inv, col, col_inv, ok), (dw if has_w else None)


# --------------------------------------------------------------------------------------
# References of the routed-block extras
# --------------------------------------------------------------------------------------


def quantize_dual_weighted_reference(x: torch.Tensor, offs: torch.Tensor, row_weights: torch.Tensor) -> Fp8Dual:
    """Row copy of x, column copy of ``row_weights[:, None] * x`` (float32): see quantize_dual_strips."""
    row, row_inv = quantize_rowwise_reference(x)
    col, col_inv = quantize_colwise_grouped_reference(x.float() * row_weights[:, None], offs)
    return Fp8Dual(row, row_inv, col, col_inv)


def swiglu_backward_weighted_reference(gate_up: torch.Tensor, grad_h: torch.Tensor, offs: torch.Tensor,
                                       row_weights: torch.Tensor) -> Tuple[Fp8Dual, torch.Tensor]:
    """Reference of ``swiglu_backward_quantize_strips`` with row weights: (copies, dw)."""
    d = swiglu_backward_reference(gate_up, grad_h.float() * row_weights[:, None])
    row, row_inv = quantize_rowwise_reference(d)
    col, col_inv = quantize_colwise_grouped_reference(d, offs)
    dw = (grad_h.float() * swiglu_reference(gate_up)).sum(-1)
    return Fp8Dual(row, row_inv, col, col_inv), dw
