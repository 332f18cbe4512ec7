"""FP8 (e4m3) rowwise quantization kernels for the Hopper FP8 experts path.

Every GEMM of ``moeq.ops.fp8_hopper`` runs through ``torch._scaled_grouped_mm`` with one
float32 scale per row of each operand along the contraction dim. The operands come from four
sources, each quantized in two directions at once ("dual" quantization):

* a 2D activation ``x`` (M, K) grouped in expert order by ``offs``: the **row** copy (M, K),
  one scale per row (contraction over K: forward / dgrad GEMMs), and the **column** copy
  stored transposed (K, M), one scale per (group, column) along the group's tokens
  (contraction over tokens: the 2D x 2D weight-gradient GEMM);
* a 3D weight ``w`` (E, N, K): the row copy (E, N, K) with scales (E, N) along K and the
  transposed copy (E, K, N) with scales (E, K) along N: the same math with uniform groups of
  N rows, so it shares the kernels;
* SwiGLU forward: ``h = silu(g) * u`` computed on the fly from ``gate_up`` (M, 2H), never
  written in bf16;
* SwiGLU backward: ``d(gate_up)`` computed on the fly from ``gate_up`` and ``grad_h``.

Numerics (shared by the kernels and the plain-torch references, tested bitwise):
``amax`` in float32 (NaN counts as +inf so it is caught, never silently dropped), clamped
below at ``EPS``; ``scale = 2**floor(log2(448 / amax))`` (a power of two, so dequantizing is
exact); ``q = e4m3(clamp(v * scale, -448, 448))`` rounded to nearest-even; the GEMM gets the
reciprocal ``1 / scale``. The kernels round to the e4m3 grid by hand before the cast so that
Triton's interpreter (whose float8 cast does not round ties to even) and the GPU agree.

Each dual quantization is two passes over the source. Pass A reads (BM, BK) tiles and merges
the row amax and the per-group column amax with integer atomic max on the float bits
(amax >= 0, so integer order is float order; max is order-independent, so results are
deterministic). Groups start at multiples of ``GROUP_ALIGNMENT[FP8]``, so every 16-row
sub-block lies in one group. Pass B reads the source again and writes both quantized copies
(128-bit stores; the column copy transposed through shared memory) and the 1/scale vectors.
Bytes: 2 + 2 read, 1 + 1 written per element of a bf16 source.

Rows past ``offs[-1]`` (slack) are in no group: their row copy is quantized like any row and
their entries of the column copy are +0. The column copy of an activation has
round_up(M, 16) token columns (the 2D x 2D GEMM wants the token dim a multiple of 16);
columns >= M are unspecified and never read.

Every public function has a ``*_reference`` twin in plain torch; tests/test_fp8_hopper.py
checks them bitwise (the SwiGLU modes up to exp() ulps) and against moeq/numerics/fp8_rowwise.py.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moeq.kernels.common import EPS, FP8_MAX, HAS_TRITON, pow2_scale_reference  # noqa: F401 (re-exported)
from moeq.kernels.common import next_pow2 as _next_pow2
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType

FP8_DTYPE = torch.float8_e4m3fn
ALIGN = GROUP_ALIGNMENT[QuantizationType.FP8]

# Source modes of the two passes.
MODE_PLAIN = 0  # the source itself
MODE_SWIGLU = 1  # h = silu(gate) * up from gate_up (M, 2H)
MODE_SWIGLU_BWD = 2  # [d gate | d up] from gate_up (M, 2H) and grad_h (M, H)


class Fp8Dual(NamedTuple):
    """Both quantized copies of one operand (unused ones are empty tensors).

    row: (M, K) e4m3, row-major; row_inv: (M,) float32, ``1 / scale`` per row.
    col: activations: (K, M16) e4m3 contiguous, M16 = M rounded up to ``ALIGN`` (the 2D x 2D
        GEMM wants the token dim itself a multiple of 16); columns >= M are unspecified and
        never read (they are past ``offs[-1]``). ``col.t()`` is the (M16, K) column-major
        operand of the weight-gradient GEMM. For a 3D weight (E, N, K): (E, K, N)
        contiguous, and ``col.transpose(-2, -1)`` is the column-major (E, N, K) dgrad operand.
    col_inv: (E, K) float32, ``1 / scale`` per (group, column).
    offs_ok: (1,) int32, 1 when ``offs`` was a valid layout (non-decreasing, multiples of
        ``GROUP_ALIGNMENT[FP8]``, last <= M), else 0; checked on device by the caller with
        ``torch._assert_async``. None for weights and references.
    """

    row: torch.Tensor
    row_inv: torch.Tensor
    col: torch.Tensor
    col_inv: torch.Tensor
    offs_ok: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------
# Plain-torch references (the numerics contract; the kernels match them bitwise)
# --------------------------------------------------------------------------------------


def _cast_reference(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (v.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _amax(v: torch.Tensor, dim) -> torch.Tensor:
    a = v.float().abs()
    a = torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a)
    return a.amax(dim=dim) if a.numel() else a.sum(dim=dim)


def quantize_rowwise_reference(v: torch.Tensor):
    """(..., K) -> (e4m3 (..., K), inv_scale (...,) float32): one scale per row along K."""
    scale, inv = pow2_scale_reference(_amax(v, -1))
    return _cast_reference(v, scale[..., None]), inv


def group_ids_reference(offs: torch.Tensor, m: int) -> torch.Tensor:
    """(E,) int32 cumulative ends -> (m,) int64 group of each row; E for slack rows."""
    rows = torch.arange(m, device=offs.device)
    return (offs.long()[None, :] <= rows[:, None]).sum(1)


def quantize_colwise_grouped_reference(v: torch.Tensor, offs: torch.Tensor):
    """(M, K) grouped by ``offs`` -> (col (K, M) e4m3, col_inv (E, K) float32).

    One scale per (group, column) along the group's rows; slack rows are zero in ``col``.
    An empty group gets the scale of amax 0.
    """
    m, k = v.shape
    e = offs.numel()
    gid = group_ids_reference(offs, m)
    a = v.float().abs()
    a = torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a)
    amax = torch.zeros(e + 1, k, dtype=torch.float32, device=v.device)
    amax = amax.scatter_reduce(0, gid[:, None].expand(m, k), a, "amax", include_self=True)[:e]
    scale, inv = pow2_scale_reference(amax)
    scale_rows = torch.cat([scale, torch.ones_like(scale[:1])])[gid]
    col = _cast_reference(torch.where((gid < e)[:, None], v.float(), 0.0), scale_rows)  # slack rows -> +0
    return col.t().contiguous(), inv


def quantize_dual_reference(v: torch.Tensor, offs: torch.Tensor) -> Fp8Dual:
    """Both copies of a 2D grouped activation: see ``Fp8Dual``."""
    row, row_inv = quantize_rowwise_reference(v)
    col, col_inv = quantize_colwise_grouped_reference(v, offs)
    return Fp8Dual(row, row_inv, col, col_inv)


def quantize_weight_reference(w: torch.Tensor) -> Fp8Dual:
    """(E, N, K) weight -> row (E, N, K) + row_inv (E, N) along K, col (E, K, N) + col_inv (E, K) along N."""
    row, row_inv = quantize_rowwise_reference(w)
    colt, col_inv = quantize_rowwise_reference(w.transpose(-2, -1))
    return Fp8Dual(row, row_inv, colt.contiguous(), col_inv)


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """float32 ``silu(gate) * up`` of (M, 2H) gate_up, in the kernels' formula."""
    h = gate_up.shape[-1] // 2
    g, u = gate_up[..., :h].float(), gate_up[..., h:].float()
    return g * (1.0 / (1.0 + torch.exp(-g))) * u


def swiglu_backward_reference(gate_up: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
    """float32 (M, 2H) gradient of ``silu(gate) * up`` wrt gate_up given grad_h (M, H)."""
    h = gate_up.shape[-1] // 2
    g, u, gh = gate_up[..., :h].float(), gate_up[..., h:].float(), grad_h.float()
    sig = 1.0 / (1.0 + torch.exp(-g))
    dgate = gh * u * (sig * (1.0 + g * (1.0 - sig)))
    dup = gh * (g * sig)
    return torch.cat([dgate, dup], -1)


def swiglu_quantize_reference(gate_up: torch.Tensor, offs: torch.Tensor) -> Fp8Dual:
    """Both copies of ``h = silu(gate) * up`` (M, H), h computed in float32."""
    return quantize_dual_reference(swiglu_reference(gate_up), offs)


def swiglu_backward_quantize_reference(gate_up: torch.Tensor, grad_h: torch.Tensor, offs: torch.Tensor) -> Fp8Dual:
    """Both copies of d(gate_up) (M, 2H), computed in float32."""
    return quantize_dual_reference(swiglu_backward_reference(gate_up, grad_h), offs)


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    # the power-of-two scale and the e4m3 cast, shared with the strip passes
    from moeq.kernels.common import abs_nan_inf as _abs_nan_inf
    from moeq.kernels.common import exp2_from_biased as _exp2_from_biased  # noqa: F401
    from moeq.kernels.common import inv_scale as _inv_scale
    from moeq.kernels.common import scale_exponent as _scale_exponent  # noqa: F401
    from moeq.kernels.common import to_e4m3 as _to_e4m3


    @triton.jit
    def load_source_w(src_ptr, aux_ptr, w, rows, cols, mask, stride_src, stride_aux,
                       H: tl.constexpr, MODE: tl.constexpr, HAS_W: tl.constexpr):
        # (BM, BK) float32 tiles of the source at source columns ``cols``; the second tile
        # is the "up" half of the output in MODE_SWIGLU_BWD (a copy of the first otherwise).
        # HAS_W: ``w`` (BM,) float32 per-row routing weights multiply the plain source
        # (MODE_PLAIN) or grad_h (MODE_SWIGLU_BWD) first. The third result is
        # grad_h * h per element in MODE_SWIGLU_BWD (unweighted grad_h: the routing-weight
        # gradient's terms), zeros otherwise.
        r = rows.to(tl.int64)[:, None]
        c = cols[None, :]
        if MODE == 0:
            v0 = tl.load(src_ptr + r * stride_src + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v0 = v0 * w[:, None]
            v1 = v0
            hd = tl.zeros_like(v0)
        else:
            g = tl.load(src_ptr + r * stride_src + c, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(src_ptr + r * stride_src + H + c, mask=mask, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-g))
            if MODE == 1:
                v0 = g * sig * u
                v1 = v0
                hd = tl.zeros_like(v0)
            else:
                gh = tl.load(aux_ptr + r * stride_aux + c, mask=mask, other=0.0).to(tl.float32)
                hd = gh * (g * sig * u)
                if HAS_W:
                    gh = gh * w[:, None]
                v0 = gh * u * (sig * (1.0 + g * (1.0 - sig)))
                v1 = gh * (g * sig)
        return v0, v1, hd

    @triton.jit
    def _load_source(src_ptr, aux_ptr, rows, cols, mask, stride_src, stride_aux, H: tl.constexpr, MODE: tl.constexpr):
        v0, v1, _ = load_source_w(src_ptr, aux_ptr, rows, rows, cols, mask, stride_src, stride_aux, H, MODE, False)
        return v0, v1

    @triton.jit
    def _group_of_row(offs_ptr, r, E: tl.constexpr, GROUP_ROWS, EB: tl.constexpr, UNIFORM: tl.constexpr):
        # Group id (E for slack) of the scalar row r.
        if UNIFORM:
            g = r // GROUP_ROWS
        else:
            eo = tl.arange(0, EB)
            ends = tl.load(offs_ptr + eo, mask=eo < E, other=2147483647)
            g = tl.sum((ends <= r).to(tl.int32), axis=0)
        return g

    @triton.jit
    def _group_of_rows(offs_ptr, rows, E: tl.constexpr, GROUP_ROWS, EB: tl.constexpr, UNIFORM: tl.constexpr):
        # Group id (E for slack) of each row of the vector ``rows``.
        if UNIFORM:
            g = rows // GROUP_ROWS
        else:
            eo = tl.arange(0, EB)
            ends = tl.load(offs_ptr + eo, mask=eo < E, other=2147483647)
            g = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)
        return g

    @triton.jit
    def _col_amax_atomics(col_amax_ptr, offs_ptr, a, cols, cmask, rows, r0, g_first, g_last,
                          E: tl.constexpr, GROUP_ROWS, KO: tl.constexpr, BM: tl.constexpr, SUB: tl.constexpr,
                          EB: tl.constexpr, UNIFORM: tl.constexpr):
        # atomic max of the tile's per-group column maxima into col_amax (int32 view of
        # float32 amax >= 0: integer order is float order, one atomic per element)
        if g_first == g_last:
            # common case: the whole tile is in one group (or all slack)
            if g_first < E:
                tl.atomic_max(col_amax_ptr + g_first.to(tl.int64) * KO + cols,
                              tl.max(a, axis=0).to(tl.int32, bitcast=True), mask=cmask, sem="relaxed")
        else:
            # the tile straddles groups; groups start at multiples of SUB, so each SUB-row
            # sub-block lies in one group
            for j in tl.static_range(0, BM // SUB):
                gj = _group_of_row(offs_ptr, r0 + j * SUB, E, GROUP_ROWS, EB, UNIFORM)
                if gj < E:
                    sel = ((rows >= r0 + j * SUB) & (rows < r0 + (j + 1) * SUB))[:, None]
                    tl.atomic_max(col_amax_ptr + gj.to(tl.int64) * KO + cols,
                                  tl.max(tl.where(sel, a, 0.0), axis=0).to(tl.int32, bitcast=True),
                                  mask=cmask, sem="relaxed")

    @triton.jit
    def _amax_kernel(
        src_ptr, aux_ptr, offs_ptr, row_amax_ptr, col_amax_ptr, ok_ptr,
        M, GROUP_ROWS, stride_src, stride_aux,
        KC: tl.constexpr, E: tl.constexpr, H: tl.constexpr, KO: tl.constexpr,
        MODE: tl.constexpr, UNIFORM: tl.constexpr, WANT_ROW: tl.constexpr, WANT_COL: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, SUB: tl.constexpr, EB: tl.constexpr, NKB: tl.constexpr,
    ):
        """Pass A, one (BM, NKB*BK) tile per program: atomic max into the row amax (M,) and the
        per-group column amax (E, KO), both zero-initialized and passed as int32 views.

        Program (0, 0) also writes ok_ptr[0] = 1 if ``offs`` is a valid layout
        (non-decreasing, multiples of SUB, last <= M), else 0 (grouped mode only).
        """
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        if not UNIFORM:
            if pid_m + pid_k == 0:
                eo = tl.arange(0, EB)
                ends = tl.load(offs_ptr + eo, mask=eo < E, other=0)
                prev = tl.load(offs_ptr + eo - 1, mask=(eo > 0) & (eo < E), other=0)
                last = tl.max(tl.where(eo < E, ends, 0), axis=0)
                bad = tl.sum(((ends < prev) | ((ends % SUB) != 0)).to(tl.int32), axis=0)
                good = (bad == 0) & (last <= M)
                tl.store(ok_ptr, good.to(tl.int32))
        r0 = pid_m * BM
        rows = r0 + tl.arange(0, BM)
        rmask = rows < M
        g_first = _group_of_row(offs_ptr, r0, E, GROUP_ROWS, EB, UNIFORM)
        g_last = _group_of_row(offs_ptr, tl.minimum(r0 + BM, M) - 1, E, GROUP_ROWS, EB, UNIFORM)
        acc = tl.zeros((BM, BK), dtype=tl.float32)  # running elementwise max: one row reduction at the end
        for kk in tl.static_range(0, NKB):
            cols = (pid_k * NKB + kk) * BK + tl.arange(0, BK)
            cmask = cols < KC
            mask = rmask[:, None] & cmask[None, :]
            v0, v1 = _load_source(src_ptr, aux_ptr, rows, cols, mask, stride_src, stride_aux, H, MODE)
            a0 = _abs_nan_inf(v0)
            acc = tl.maximum(acc, a0)
            if WANT_COL:
                _col_amax_atomics(col_amax_ptr, offs_ptr, a0, cols, cmask, rows, r0, g_first, g_last,
                                  E, GROUP_ROWS, KO, BM, SUB, EB, UNIFORM)
            if MODE == 2:
                a1 = _abs_nan_inf(v1)
                acc = tl.maximum(acc, a1)
                if WANT_COL:
                    _col_amax_atomics(col_amax_ptr + H, offs_ptr, a1, cols, cmask, rows, r0, g_first, g_last,
                                      E, GROUP_ROWS, KO, BM, SUB, EB, UNIFORM)
        if WANT_ROW:
            tl.atomic_max(row_amax_ptr + rows, tl.max(acc, axis=1).to(tl.int32, bitcast=True), mask=rmask,
                          sem="relaxed")

    @triton.jit
    def _col_values(v, col_amax_ptr, offs_ptr, rows, cols, cmask, g_first, g_last, M,
                    E: tl.constexpr, GROUP_ROWS, KO: tl.constexpr, EB: tl.constexpr, UNIFORM: tl.constexpr):
        # v scaled by its (group, column) scale, slack rows +0 (float32, ready for _to_e4m3)
        # (branch-local names: Triton wants variables assigned in both branches to agree in type)
        if g_first == g_last:
            a_vec = tl.load(col_amax_ptr + g_first.to(tl.int64) * KO + cols, mask=cmask & (g_first < E), other=0.0)
            s_vec = _exp2_from_biased(_scale_exponent(a_vec))
            out = tl.where(g_first < E, v * s_vec[None, :], 0.0)
        else:
            g = _group_of_rows(offs_ptr, rows, E, GROUP_ROWS, EB, UNIFORM)
            ing = g < E
            a_tile = tl.load(col_amax_ptr + g.to(tl.int64)[:, None] * KO + cols[None, :],
                             mask=ing[:, None] & cmask[None, :], other=0.0)
            s_tile = _exp2_from_biased(_scale_exponent(a_tile))
            out = tl.where(ing[:, None], v * s_tile, 0.0)
        return out

    @triton.jit
    def _cast_kernel(
        src_ptr, aux_ptr, offs_ptr, row_amax_ptr, col_amax_ptr,
        row_ptr, row_inv_ptr, col_ptr, col_inv_ptr,
        M, GROUP_ROWS, stride_src, stride_aux, stride_row, stride_cg, stride_ck,
        KC: tl.constexpr, E: tl.constexpr, H: tl.constexpr, KO: tl.constexpr,
        MODE: tl.constexpr, UNIFORM: tl.constexpr, WANT_ROW: tl.constexpr, WANT_COL: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, SUB: tl.constexpr, EB: tl.constexpr, TRANS_F32: tl.constexpr,
    ):
        """Pass B: write the row copy (M, KO) and/or the transposed column copy, plus 1/scale.

        Column copy element (row r, column k): activations ``col[k, r]`` at ``k*stride_ck + r``;
        weights (UNIFORM, tiles never straddle experts since BM divides GROUP_ROWS = N)
        ``colT[g, k, r - g*N]`` at ``g*stride_cg + k*stride_ck + r - g*N``.
        """
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        r0 = pid_m * BM
        rows = r0 + tl.arange(0, BM)
        rmask = rows < M
        cols = pid_k * BK + tl.arange(0, BK)
        cmask = cols < KC
        mask = rmask[:, None] & cmask[None, :]
        v0, v1 = _load_source(src_ptr, aux_ptr, rows, cols, mask, stride_src, stride_aux, H, MODE)
        if WANT_ROW:
            ra = tl.load(row_amax_ptr + rows, mask=rmask, other=0.0)
            s = _exp2_from_biased(_scale_exponent(ra))[:, None]
            rp = row_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
            tl.store(rp, _to_e4m3(v0 * s), mask=mask)
            if MODE == 2:
                tl.store(rp + H, _to_e4m3(v1 * s), mask=mask)
            if pid_k == 0:
                tl.store(row_inv_ptr + rows, _inv_scale(ra), mask=rmask)
        if WANT_COL:
            g_first = _group_of_row(offs_ptr, r0, E, GROUP_ROWS, EB, UNIFORM)
            g_last = _group_of_row(offs_ptr, tl.minimum(r0 + BM, M) - 1, E, GROUP_ROWS, EB, UNIFORM)
            if UNIFORM:
                base = col_ptr + g_first.to(tl.int64) * stride_cg - g_first.to(tl.int64) * GROUP_ROWS
            else:
                base = col_ptr
            cp = base + cols.to(tl.int64)[:, None] * stride_ck + rows[None, :]
            tmask = cmask[:, None] & rmask[None, :]
            q0 = _col_values(v0, col_amax_ptr, offs_ptr, rows, cols, cmask, g_first, g_last, M, E, GROUP_ROWS, KO, EB,
                             UNIFORM)
            # transpose through shared memory as float32 (TRANS_F32) or as e4m3 bytes
            if TRANS_F32:
                tl.store(cp, _to_e4m3(tl.trans(q0)), mask=tmask)
            else:
                tl.store(cp, tl.trans(_to_e4m3(q0)), mask=tmask)
            if MODE == 2:
                q1 = _col_values(v1, col_amax_ptr + H, offs_ptr, rows, cols, cmask, g_first, g_last, M, E, GROUP_ROWS,
                                 KO, EB, UNIFORM)
                if TRANS_F32:
                    tl.store(cp + H * stride_ck, _to_e4m3(tl.trans(q1)), mask=tmask)
                else:
                    tl.store(cp + H * stride_ck, tl.trans(_to_e4m3(q1)), mask=tmask)
            if pid_m == 0:
                # every group's 1/scale, empty groups included (amax 0 -> finite scale)
                for e in range(0, E):
                    a = tl.load(col_amax_ptr + e * KO + cols, mask=cmask, other=0.0)
                    tl.store(col_inv_ptr + e * KO + cols, _inv_scale(a), mask=cmask)
                    if MODE == 2:
                        a = tl.load(col_amax_ptr + e * KO + H + cols, mask=cmask, other=0.0)
                        tl.store(col_inv_ptr + e * KO + H + cols, _inv_scale(a), mask=cmask)


# Tile configs per source kind: pass A (BM, BK, num_warps, K-chunks per program), pass B
# (BM, BK, num_warps, transpose as float32). BM is a multiple of ALIGN; BK is clipped to the
# width; a weight's pass-B BM is halved until it divides N. Chosen by measurement on an H100 (benchmarks/fp8_hopper.py --sweep, see
# docs/fp8_hopper.md).
TILE_CONFIGS = {
    "plain": ((64, 128, 4, 4), (64, 64, 4, 1)),
    "weight": ((128, 128, 8, 1), (64, 64, 4, 1)),
    "swiglu": ((32, 256, 4, 1), (64, 64, 4, 0)),
    "swiglu_bwd": ((32, 128, 4, 1), (64, 64, 8, 0)),
}


def tile_key(mode: int, weight: bool) -> str:
    if mode == MODE_PLAIN:
        return "weight" if weight else "plain"
    return "swiglu" if mode == MODE_SWIGLU else "swiglu_bwd"


def _tiles(key: str, kc: int, group_rows: int, tiles=None):
    (bma, bka, wa, nkb), (bmb, bkb, wb, tf32) = tiles or TILE_CONFIGS[key]
    bka = min(bka, max(16, _next_pow2(kc)))
    nkb = max(1, min(nkb, -(-kc // bka)))
    bkb = min(bkb, max(16, _next_pow2(kc)))
    if group_rows:  # weights: a pass-B tile must not straddle two experts
        while group_rows % bmb:
            bmb //= 2
    return (bma, bka, wa, nkb), (bmb, bkb, wb, tf32)


def alloc_dual_outputs(m: int, ko: int, e: int, weight: bool, want_row: bool, want_col: bool, dev):
    """The (uninitialized) outputs of a dual quantization and the column copy's layout.

    Returns (row, row_inv, col, col_inv, (group_rows, stride_cg, stride_ck)): a weight's
    column copy is (E, KO, N) with groups of N rows; an activation's (KO, round_up(M, 16)).
    A copy not wanted is an empty (0,) tensor."""
    f32 = torch.float32
    row = torch.empty((m, ko) if want_row else (0,), dtype=FP8_DTYPE, device=dev)
    row_inv = torch.empty((m,) if want_row else (0,), dtype=f32, device=dev)
    col_inv = torch.empty((e, ko) if want_col else (0,), dtype=f32, device=dev)
    if weight:
        n = m // e
        col = torch.empty((e, ko, n) if want_col else (0,), dtype=FP8_DTYPE, device=dev)
        return row, row_inv, col, col_inv, (n, ko * n, n)
    ldm = -(-m // ALIGN) * ALIGN
    col = torch.empty((ko, ldm) if want_col else (0,), dtype=FP8_DTYPE, device=dev)
    return row, row_inv, col, col_inv, (0, 0, ldm)


def dual_quantize_impl(mode: int, src: torch.Tensor, aux: Optional[torch.Tensor], offs: Optional[torch.Tensor],
                        num_groups: int, want_row: bool, want_col: bool, *, tiles=None, run_b: bool = True):
    """Pass A + pass B. Returns (row, row_inv, col_storage, col_inv, offs_ok).

    ``tiles`` overrides TILE_CONFIGS and ``run_b=False`` skips pass B (tile sweeps only).

    ``offs is None`` means weight mode: ``src`` is a 3D weight flattened to (E*N, K) and the
    groups are its E experts (uniform, N rows each); the column copy is (E, K, N). Otherwise
    the column copy's storage is (KO, round_up(M, ALIGN)).
    """
    dev = src.device
    m, width = src.shape
    kc = width if mode == MODE_PLAIN else width // 2  # source columns walked
    ko = 2 * kc if mode == MODE_SWIGLU_BWD else kc  # output columns
    h = 0 if mode == MODE_PLAIN else kc  # offset of "up" in gate_up, and of d(up) in the output
    e = num_groups
    weight = offs is None
    f32 = torch.float32
    row, row_inv, col, col_inv, (group_rows, stride_cg, stride_ck) = alloc_dual_outputs(m, ko, e, weight, want_row,
                                                                                       want_col, dev)
    # one zero-filled buffer (one memset) for both atomic-max targets
    amax = torch.zeros((m + (e * ko if want_col else 0),), dtype=f32, device=dev)
    row_amax = amax[:m]
    col_amax = amax[m:].view(e, ko) if want_col else amax[m:]
    ok = torch.ones((1,), dtype=torch.int32, device=dev) if m == 0 or weight else torch.empty((1,), dtype=torch.int32, device=dev)
    if m == 0 or kc == 0:
        if want_col:
            col.zero_()
            col_inv.copy_(pow2_scale_reference(torch.zeros((e, ko), dtype=f32, device=dev))[1])
        if not weight:
            ok.copy_(((offs % ALIGN == 0).all() & (offs.diff() >= 0).all() & (offs <= m).all()).to(torch.int32).reshape(1))
        return row, row_inv, col, col_inv, ok
    (bma, bka, wa, nkb), (bmb, bkb, wb, tf32) = _tiles(tile_key(mode, weight), kc, group_rows, tiles)
    offs_arg = row_amax if weight else offs  # unused pointer in weight mode
    aux_arg = src if aux is None else aux
    stride_aux = 0 if aux is None else aux.stride(0)
    eb = max(16, _next_pow2(e))
    dummy = row_amax
    # amax >= 0: the atomic max runs on the int32 view of the float32 buffers
    _amax_kernel[(triton.cdiv(m, bma), triton.cdiv(kc, bka * nkb))](
        src, aux_arg, offs_arg, row_amax.view(torch.int32), (col_amax if want_col else dummy).view(torch.int32), ok,
        m, group_rows, src.stride(0), stride_aux,
        KC=kc, E=e, H=h, KO=ko,
        MODE=mode, UNIFORM=weight, WANT_ROW=True, WANT_COL=want_col,
        BM=bma, BK=bka, SUB=ALIGN, EB=eb, NKB=nkb, num_warps=wa,
    )
    if not run_b:
        return row, row_inv, col, col_inv, ok
    _cast_kernel[(triton.cdiv(m, bmb), triton.cdiv(kc, bkb))](
        src, aux_arg, offs_arg, row_amax, col_amax if want_col else dummy,
        row if want_row else dummy, row_inv if want_row else dummy,
        col if want_col else dummy, col_inv if want_col else dummy,
        m, group_rows, src.stride(0), stride_aux, ko, stride_cg, stride_ck,
        KC=kc, E=e, H=h, KO=ko,
        MODE=mode, UNIFORM=weight, WANT_ROW=want_row, WANT_COL=want_col,
        BM=bmb, BK=bkb, SUB=ALIGN, EB=eb, TRANS_F32=bool(tf32), num_warps=wb,
    )
    return row, row_inv, col, col_inv, ok


@torch.library.custom_op("moeq::fp8_dual_quantize", mutates_args=())
def _dual_quantize_op(mode: int, src: torch.Tensor, aux: Optional[torch.Tensor], offs: Optional[torch.Tensor],
                      num_groups: int, want_row: bool, want_col: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dual_quantize_impl(mode, src, aux, offs, num_groups, want_row, want_col)


def dual_outputs_like(mode, src, offs, num_groups, want_row, want_col):
    """Empty tensors shaped like a dual quantization's (row, row_inv, col, col_inv, offs_ok)
    (the fake implementations of the custom ops)."""
    m, width = src.shape
    kc = width if mode == MODE_PLAIN else width // 2
    ko = 2 * kc if mode == MODE_SWIGLU_BWD else kc
    e = num_groups
    f32 = torch.float32
    row = src.new_empty((m, ko) if want_row else (0,), dtype=FP8_DTYPE)
    row_inv = src.new_empty((m,) if want_row else (0,), dtype=f32)
    if offs is None:
        col = src.new_empty((e, ko, m // e) if want_col else (0,), dtype=FP8_DTYPE)
    else:
        col = src.new_empty((ko, (m + ALIGN - 1) // ALIGN * ALIGN) if want_col else (0,), dtype=FP8_DTYPE)
    col_inv = src.new_empty((e, ko) if want_col else (0,), dtype=f32)
    return row, row_inv, col, col_inv, src.new_empty((1,), dtype=torch.int32)


@_dual_quantize_op.register_fake
def _(mode, src, aux, offs, num_groups, want_row, want_col):
    return dual_outputs_like(mode, src, offs, num_groups, want_row, want_col)


def _dual_quantize(mode, src, aux, offs, num_groups, want_row, want_col):
    # Eager calls skip the custom-op dispatcher (tens of microseconds a call); under
    # torch.compile the op keeps the Triton launches opaque to the tracer.
    if torch.compiler.is_compiling():
        return torch.ops.moeq.fp8_dual_quantize(mode, src, aux, offs, num_groups, want_row, want_col)
    return dual_quantize_impl(mode, src, aux, offs, num_groups, want_row, want_col)


def check_2d(name: str, t: torch.Tensor, width_multiple: int) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise TypeError(f"{name} must be bfloat16/float16/float32, got {t.dtype}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit last stride (call .contiguous()), got strides {t.stride()}")
    if t.shape[-1] % width_multiple:
        raise ValueError(f"{name}'s last dim {t.shape[-1]} must be a multiple of {width_multiple}")


def check_offs(offs: torch.Tensor, device) -> None:
    if offs.dim() != 1 or offs.dtype != torch.int32:
        raise ValueError(f"offs must be a 1D int32 tensor of cumulative group ends, got {offs.dtype} {tuple(offs.shape)}")
    if offs.device != device:
        raise ValueError(f"offs is on {offs.device} but the data is on {device}: move offs to {device}")


def _as_dual(out, weight_shape=None) -> Fp8Dual:
    row, row_inv, col, col_inv, ok = out
    if weight_shape is not None:
        e, n, k = weight_shape
        if row.numel():
            row, row_inv = row.view(e, n, k), row_inv.view(e, n)
        return Fp8Dual(row, row_inv, col, col_inv)
    return Fp8Dual(row, row_inv, col, col_inv, ok)


def quantize_dual(x: torch.Tensor, offs: torch.Tensor, *, rowwise: bool = True, colwise: bool = True) -> Fp8Dual:
    """Both FP8 copies of a grouped activation in two passes over it.

    Args:
        x: (M, K) bfloat16/float32, rows grouped in expert order, K % 16 == 0.
        offs: (E,) int32 cumulative group ends, each a multiple of ``GROUP_ALIGNMENT[FP8]``
            (not checked here: the caller asserts it on device).
        rowwise / colwise: which copies to produce (the other fields are empty).
    Returns:
        Fp8Dual: row (M, K) + row_inv (M,); col (K, M16) + col_inv (E, K).
    """
    check_2d("x", x, 16)
    check_offs(offs, x.device)
    out = _dual_quantize(MODE_PLAIN, x, None, offs, offs.numel(), rowwise, colwise)
    return _as_dual(out)


def quantize_weight(w: torch.Tensor, *, colwise: bool = True) -> Fp8Dual:
    """FP8 copies of a 3D expert weight for the forward and the dgrad GEMM, one pass pair.

    Args:
        w: (E, N, K) bfloat16/float32 contiguous, N and K multiples of 16.
    Returns:
        Fp8Dual: row (E, N, K) + row_inv (E, N) scaled along K; col (E, K, N) contiguous +
        col_inv (E, K) scaled along N (empty when ``colwise=False``).
    """
    if w.dim() != 3:
        raise ValueError(f"weight must be 3D (E, N, K), got shape {tuple(w.shape)}")
    e, n, k = w.shape
    if n % ALIGN or k % 16:
        raise ValueError(f"weight dims N={n}, K={k} must be multiples of {ALIGN} and 16 for FP8 grouped GEMMs")
    w2 = w.contiguous().view(e * n, k)
    check_2d("weight", w2, 16)
    out = _dual_quantize(MODE_PLAIN, w2, None, None, e, True, colwise)
    return _as_dual(out, weight_shape=(e, n, k))


def swiglu_quantize(gate_up: torch.Tensor, offs: torch.Tensor, *, colwise: bool = True) -> Fp8Dual:
    """FP8 copies of ``h = silu(gate) * up`` (M, H), computed in float32, never stored in bf16.

    Args:
        gate_up: (M, 2H) bfloat16, gate columns [0, H), up columns [H, 2H); H % 16 == 0.
        offs: (E,) int32 group ends (see ``quantize_dual``).
    """
    check_2d("gate_up", gate_up, 32)
    check_offs(offs, gate_up.device)
    out = _dual_quantize(MODE_SWIGLU, gate_up, None, offs, offs.numel(), True, colwise)
    return _as_dual(out)


def swiglu_backward_quantize(gate_up: torch.Tensor, grad_h: torch.Tensor, offs: torch.Tensor) -> Fp8Dual:
    """FP8 copies of d(gate_up) (M, 2H) = SwiGLU backward of ``grad_h`` (M, H), in float32.

    Returns both copies: row (M, 2H) for the dgrad GEMM, col (2H, M16) for the wgrad GEMM.
    """
    check_2d("gate_up", gate_up, 32)
    check_2d("grad_h", grad_h, 16)
    if grad_h.shape[0] != gate_up.shape[0] or 2 * grad_h.shape[1] != gate_up.shape[1]:
        raise ValueError(f"grad_h {tuple(grad_h.shape)} does not match gate_up {tuple(gate_up.shape)}: want (M, H) and (M, 2H)")
    check_offs(offs, gate_up.device)
    out = _dual_quantize(MODE_SWIGLU_BWD, gate_up, grad_h, offs, offs.numel(), True, True)
    return _as_dual(out)
