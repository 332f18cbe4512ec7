"""moeq's own FP8 grouped GEMMs for Hopper (SM90), with a plain-torch reference beside each.

Two kernels cover the six GEMMs of routed experts (forward, input gradient, weight
gradient of each of the two projections). Hopper's FP8 tensor cores (``QGMMA``) read both
operands K-major (contiguous along the contraction dim), so every operand arrives that way:

* ``grouped_mm`` (**M-grouped**, forward and input gradient): ``out[g] = a[g] @ b[e].T``
  for each expert ``e``'s rows ``g`` of ``a`` (M, K), ``b`` (E, N, K). The (expert,
  row-tile) schedule is derived on the device from ``offs`` inside each program (a
  prefix sum over the E group sizes), so nothing is read on the host. Rows at or past
  ``offs[-1]`` (slack) are written as zeros by the same launch.
* ``grouped_mm_wgrad`` (**K-grouped**, weight gradient): ``out[e] = a[:, g] @ b[:, g].T``
  with ``a`` (N, L), ``b`` (K, L) token-contiguous (the transposed "column" copies of
  kernels/fp8_rowwise.py, L >= M a multiple of 16) and the contraction over expert ``e``'s
  tokens ``g``. Tokens past a group's end are masked to zero; empty experts get zeros.

Scales (``SCALE`` constexpr):

* ``SCALE_ROWWISE`` (the FP8 recipe): one float32 dequantization factor per row of each
  operand along the contraction dim, applied once in the epilogue:
  ``out = acc * a_inv[row] * b_inv[col]``. The factors are powers of two, so the product
  is exact in any order and the result depends only on the fp32 accumulation.
* ``SCALE_MX32`` (the MXFP8 recipe): one power-of-two factor per 32 elements along the
  contraction dim of each operand. Each 32-wide K slice is one tensor-core product whose
  fp32 result is scaled by ``a_scale[row, slice] * b_scale[col, slice]`` (exact: powers of
  two) and added to the fp32 accumulator.

Accumulation: fp32 on the tensor cores, in K order tile by tile. Relative to an fp32
reference the only difference is summation order (tested on CPU under the interpreter
against the references below, and on the GPU in benchmarks/fp8_gemm.py and the GPU tests).

Under ``TRITON_INTERPRET=1`` the operands are upcast to fp32 before ``tl.dot`` (e4m3
values and their products are exact in fp32), so CPU runs check indexing, masking and
scaling against the references.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moeq.kernels.common import HAS_TRITON
from moeq.kernels.common import INTERPRET as _INTERPRET
from moeq.kernels.common import next_pow2 as _next_pow2

FP8_DTYPE = torch.float8_e4m3fn
SCALE_ROWWISE = 0
SCALE_MX32 = 1
MX_BLOCK = 32



class GemmConfig(NamedTuple):
    """Tile shape and launch options of one GEMM kernel launch.

    bm, bn: output tile (rows of ``a`` / of the weight gradient, columns); bk: contraction
    step. num_warps, num_stages: Triton options. tma: load tiles through host-built tensor
    descriptors (the bulk tensor copy engine) instead of pointer loads. group_m: programs of
    one column tile launched together (L2 reuse of ``a``); 1 = plain row-major order.
    """

    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int
    tma: bool = False


# Chosen by measurement on the device (benchmarks/fp8_gemm.py --sweep); see docs/fp8_gemm.md.
# H200 sweep (benchmarks/results/fp8_gemm_h200.md): (128, 256, 128), 8 warps, 3 stages, TMA
# was the fastest or within 4% of it on 11 of the 12 forward / input-gradient GEMMs.
DEFAULT_CONFIGS = {
    ("m", SCALE_ROWWISE): GemmConfig(128, 256, 128, 8, 3, True),
    ("m", SCALE_MX32): GemmConfig(128, 256, 32, 8, 4, True),
    ("k", SCALE_ROWWISE): GemmConfig(128, 128, 64, 4, 4, True),
    ("k", SCALE_MX32): GemmConfig(128, 128, 32, 4, 4, True),
}
INTERPRETER_CONFIG = GemmConfig(32, 64, 32, 1, 1, False)


# --------------------------------------------------------------------------------------
# Plain-torch references
# --------------------------------------------------------------------------------------


def _expand_mx(scale: torch.Tensor, k: int) -> torch.Tensor:
    """(..., K/32) per-slice factors -> (..., K) per element."""
    return scale.float().repeat_interleave(MX_BLOCK, dim=-1)[..., :k]


def grouped_mm_reference(a, b, a_scale, b_scale, offs, *, scale_mode=SCALE_ROWWISE, out_dtype=torch.bfloat16):
    """float32 reference of ``grouped_mm`` (same arguments); slack rows zero."""
    m, k = a.shape
    out = torch.zeros(m, b.shape[1], dtype=torch.float32, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            av, bv = a[start:end].float(), b[e].float()
            if scale_mode == SCALE_MX32:
                av = av * _expand_mx(a_scale[start:end], k)
                bv = bv * _expand_mx(b_scale[e], k)
                out[start:end] = av @ bv.t()
            else:
                out[start:end] = (av @ bv.t()) * a_scale[start:end].float()[:, None] * b_scale[e].float()[None, :]
        start = max(start, end)
    return out.to(out_dtype)


def grouped_mm_wgrad_reference(a, b, a_scale, b_scale, offs, *, scale_mode=SCALE_ROWWISE, out_dtype=torch.bfloat16):
    """float32 reference of ``grouped_mm_wgrad`` (same arguments); empty experts zero."""
    n, kk = a.shape[0], b.shape[0]
    e_count = offs.numel()
    out = torch.zeros(e_count, n, kk, dtype=torch.float32, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            av, bv = a[:, start:end].float(), b[:, start:end].float()
            if scale_mode == SCALE_MX32:
                ta = a_scale[:, start // MX_BLOCK:(end + MX_BLOCK - 1) // MX_BLOCK]
                tb = b_scale[:, start // MX_BLOCK:(end + MX_BLOCK - 1) // MX_BLOCK]
                out[e] = (av * _expand_mx(ta, end - start)) @ (bv * _expand_mx(tb, end - start)).t()
            else:
                out[e] = (av @ bv.t()) * a_scale[e].float()[:, None] * b_scale[e].float()[None, :]
        start = max(start, end)
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl


    @triton.jit
    def _m_tile_of(offs_ptr, pid_m, E, BM: tl.constexpr, EB: tl.constexpr):
        """(expert, first row, end row, is_slack, slack start) of row-tile ``pid_m``.

        Row tiles are numbered expert by expert (ceil(size / BM) each), then the slack
        tiles covering [offs[-1], M)."""
        eo = tl.arange(0, EB)
        valid = eo < E
        ends = tl.load(offs_ptr + eo, mask=valid, other=0)
        last = tl.max(tl.where(valid, ends, 0), axis=0)
        ends = tl.where(valid, ends, last)
        starts = tl.load(offs_ptr + eo - 1, mask=valid & (eo > 0), other=0)
        starts = tl.where(valid, starts, last)
        ntile = tl.maximum(ends - starts + BM - 1, 0) // BM
        cum = tl.cumsum(ntile, axis=0)
        total = tl.sum(ntile, axis=0)
        e = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
        sel = eo == e
        start_e = tl.sum(tl.where(sel, starts, 0), axis=0)
        end_e = tl.sum(tl.where(sel, ends, 0), axis=0)
        before = tl.sum(tl.where(sel, cum - ntile, 0), axis=0)
        r0 = start_e + (pid_m - before) * BM
        slack = pid_m >= total
        r0 = tl.where(slack, last + (pid_m - total) * BM, r0)
        return e, r0, end_e, slack

    @triton.jit
    def _to_out(acc, out_ptr, UPCAST: tl.constexpr):
        # fp32 -> the output dtype, rounding to nearest even. The interpreter's fp32 -> bf16
        # cast truncates, so there the rounding is done on the bits first (the GPU's cast
        # rounds; NaN stays NaN either way).
        if UPCAST:
            if out_ptr.dtype.element_ty == tl.bfloat16:
                b = acc.to(tl.uint32, bitcast=True)
                r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
                acc = tl.where(acc != acc, acc, r)
        return acc.to(out_ptr.dtype.element_ty)

    @triton.jit
    def _mx_factor(scale_ptr, idx, mask):
        return tl.load(scale_ptr + idx, mask=mask, other=0.0)

    @triton.jit
    def _m_step(a_ptr, b_ptr, sa_ptr, sb_ptr, acc, rows, cols, r0, n0, e, k0, M, N, K,
                stride_am, stride_be, stride_bn, stride_sam, stride_sbe, stride_sbn,
                SCALE: tl.constexpr, BK: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr):
        # one BK step of the M-grouped GEMM's main loop
        ks = tl.arange(0, BK)
        rmask = rows < M
        cmask = cols < N
        if USE_TMA:
            a = a_ptr.load([r0, k0])
            b = b_ptr.load([e * N + n0, k0])
        else:
            kmask = (k0 + ks) < K
            a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_am + (k0 + ks)[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptr + e.to(tl.int64) * stride_be + cols.to(tl.int64)[:, None] * stride_bn
                        + (k0 + ks)[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SCALE == 1:
            # one tensor-core product per 32-wide slice, promoted with its two factors
            kb = k0 // 32
            ta = _mx_factor(sa_ptr, rows.to(tl.int64) * stride_sam + kb, rmask)
            tb = _mx_factor(sb_ptr, e.to(tl.int64) * stride_sbe + cols * stride_sbn + kb, cmask)
            acc += tl.dot(a, tl.trans(b)) * (ta[:, None] * tb[None, :])
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        return acc

    @triton.jit
    def _grouped_mm_kernel(
        a_ptr, b_ptr, sa_ptr, sb_ptr, out_ptr, offs_ptr,
        M, N, K, E, stride_am, stride_be, stride_bn, stride_om, stride_sam, stride_sbe, stride_sbn,
        SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EB: tl.constexpr,
        USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """M-grouped FP8 GEMM; grid (cdiv(N, BN), cdiv(M, BM) + E + 1)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        e, r0, end_e, slack = _m_tile_of(offs_ptr, pid_m, E, BM, EB)
        rows = r0 + tl.arange(0, BM)
        n0 = pid_n * BN
        cols = n0 + tl.arange(0, BN)
        cmask = cols < N
        if slack:
            z = tl.zeros((BM, BN), dtype=out_ptr.dtype.element_ty)
            smask = (rows < M)[:, None] & cmask[None, :]
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], z, mask=smask)
        elif r0 < M:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            if UPCAST:  # interpreter: its range() cannot take runtime bounds, a while loop can
                k0 = 0
                while k0 < K:
                    acc = _m_step(a_ptr, b_ptr, sa_ptr, sb_ptr, acc, rows, cols, r0, n0, e, k0, M, N, K,
                                  stride_am, stride_be, stride_bn, stride_sam, stride_sbe, stride_sbn,
                                  SCALE, BK, USE_TMA, UPCAST)
                    k0 += BK
            else:
                for k0 in range(0, K, BK):
                    acc = _m_step(a_ptr, b_ptr, sa_ptr, sb_ptr, acc, rows, cols, r0, n0, e, k0, M, N, K,
                                  stride_am, stride_be, stride_bn, stride_sam, stride_sbe, stride_sbn,
                                  SCALE, BK, USE_TMA, UPCAST)
            rmask = rows < M
            if SCALE == 0:
                ta = tl.load(sa_ptr + rows, mask=rmask, other=0.0)
                tb = tl.load(sb_ptr + e.to(tl.int64) * stride_sbe + cols, mask=cmask, other=0.0)
                acc = acc * ta[:, None] * tb[None, :]
            omask = (rows < end_e)[:, None] & cmask[None, :] & rmask[:, None]
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
                     _to_out(acc, out_ptr, UPCAST), mask=omask)

    @triton.jit
    def _k_step(a_ptr, b_ptr, sa_ptr, sb_ptr, acc, rn, rj, pid_n, pid_j, t0, end, N, KO,
                stride_a, stride_b, stride_sa, stride_sb,
                SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                USE_TMA: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr):
        # one BK-token step of the weight-gradient GEMM. MASK (the group's last, partial
        # step): tokens past the group's end are zeroed in both operands, so nothing of the
        # next group (not even a non-finite value) reaches this expert
        ts = tl.arange(0, BK)
        nmask = rn < N
        jmask = rj < KO
        tmask = (t0 + ts) < end
        if USE_TMA:
            a = a_ptr.load([pid_n * BM, t0])
            b = b_ptr.load([pid_j * BN, t0])
            if MASK:
                a = tl.where(tmask[None, :], a, tl.zeros_like(a))
                b = tl.where(tmask[None, :], b, tl.zeros_like(b))
        else:
            amask = nmask[:, None] & tmask[None, :] if MASK else nmask[:, None]
            a = tl.load(a_ptr + rn.to(tl.int64)[:, None] * stride_a + (t0 + ts)[None, :], mask=amask, other=0.0)
            b = tl.load(b_ptr + rj.to(tl.int64)[:, None] * stride_b + (t0 + ts)[None, :],
                        mask=jmask[:, None] & (tmask[None, :] if MASK else True), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SCALE == 1:
            tb_idx = t0 // 32
            ta = tl.load(sa_ptr + rn.to(tl.int64) * stride_sa + tb_idx, mask=nmask, other=0.0)
            tbv = tl.load(sb_ptr + rj.to(tl.int64) * stride_sb + tb_idx, mask=jmask, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * (ta[:, None] * tbv[None, :])
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        return acc

    @triton.jit
    def _grouped_mm_wgrad_kernel(
        a_ptr, b_ptr, sa_ptr, sb_ptr, out_ptr, offs_ptr,
        N, KO, E, stride_a, stride_b, stride_sa, stride_sb, stride_oe, stride_on,
        SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """K-grouped FP8 GEMM (weight gradient); grid (cdiv(KO, BN), cdiv(N, BM), E).

        out[e, n, j] = sum over tokens t of expert e of a[n, t] * b[j, t] (scaled).
        Rowwise: sa (E, N), sb (E, KO). MX32: sa (N, L/32), sb (KO, L/32) per 32 tokens."""
        pid_j = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.program_id(2)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offs_ptr + e)
        rn = pid_n * BM + tl.arange(0, BM)
        rj = pid_j * BN + tl.arange(0, BN)
        nmask = rn < N
        jmask = rj < KO
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        start = tl.multiple_of(start, 16)  # groups start at multiples of 16 (32 for MX32)
        full_end = start + (end - start) // BK * BK
        if UPCAST:  # interpreter: see _grouped_mm_kernel
            t0 = start
            while t0 < full_end:
                acc = _k_step(a_ptr, b_ptr, sa_ptr, sb_ptr, acc, rn, rj, pid_n, pid_j, t0, end, N, KO,
                              stride_a, stride_b, stride_sa, stride_sb, SCALE, BM, BN, BK, USE_TMA, UPCAST, False)
                t0 += BK
        else:
            for t0 in range(start, full_end, BK):
                acc = _k_step(a_ptr, b_ptr, sa_ptr, sb_ptr, acc, rn, rj, pid_n, pid_j, t0, end, N, KO,
                              stride_a, stride_b, stride_sa, stride_sb, SCALE, BM, BN, BK, USE_TMA, UPCAST, False)
        if full_end < end:
            acc = _k_step(a_ptr, b_ptr, sa_ptr, sb_ptr, acc, rn, rj, pid_n, pid_j, full_end, end, N, KO,
                          stride_a, stride_b, stride_sa, stride_sb, SCALE, BM, BN, BK, USE_TMA, UPCAST, True)
        if SCALE == 0:
            ta = tl.load(sa_ptr + e * N + rn, mask=nmask, other=0.0)
            tbv = tl.load(sb_ptr + e * KO + rj, mask=jmask, other=0.0)
            acc = acc * ta[:, None] * tbv[None, :]
        optr = out_ptr + e.to(tl.int64) * stride_oe + rn.to(tl.int64)[:, None] * stride_on + rj[None, :]
        tl.store(optr, _to_out(acc, out_ptr, UPCAST), mask=nmask[:, None] & jmask[None, :])



def _config(kind: str, scale_mode: int, config: Optional[GemmConfig]) -> GemmConfig:
    if config is not None:
        return config
    return INTERPRETER_CONFIG if _INTERPRET else DEFAULT_CONFIGS[(kind, scale_mode)]


def _descriptor(t: torch.Tensor, block):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block_shape=list(block))


def _grouped_mm_impl(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    offs: torch.Tensor,
    *,
    scale_mode: int = SCALE_ROWWISE,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """The launch behind :func:`grouped_mm` (same arguments)."""
    m, k = a.shape
    e, n, kb = b.shape
    if kb != k:
        raise ValueError(f"a is (M, {k}) but b is (E, N, {kb}): the contraction dims differ")
    cfg = _config("m", scale_mode, config)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if scale_mode == SCALE_MX32:
        bk = MX_BLOCK
        stride_sam, stride_sbe, stride_sbn = a_scale.stride(0), b_scale.stride(0), b_scale.stride(1)
    else:
        bk = cfg.bk
        stride_sam, stride_sbe, stride_sbn = 1, b_scale.stride(0), 1
    if cfg.tma:
        a_arg = _descriptor(a, (cfg.bm, bk))
        b_arg = _descriptor(b.view(e * n, k), (cfg.bn, bk))
    else:
        a_arg, b_arg = a, b
    grid = (triton.cdiv(n, cfg.bn), triton.cdiv(m, cfg.bm) + e + 1)
    _grouped_mm_kernel[grid](
        a_arg, b_arg, a_scale, b_scale, out, offs,
        m, n, k, e, a.stride(0), b.stride(0), b.stride(1), out.stride(0), stride_sam, stride_sbe, stride_sbn,
        SCALE=scale_mode, BM=cfg.bm, BN=cfg.bn, BK=bk, EB=max(16, _next_pow2(e)),
        USE_TMA=cfg.tma, UPCAST=_INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _grouped_mm_wgrad_impl(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    offs: torch.Tensor,
    *,
    scale_mode: int = SCALE_ROWWISE,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Optional[GemmConfig] = None,
) -> torch.Tensor:
    """The launch behind :func:`grouped_mm_wgrad` (same arguments)."""
    n, length = a.shape
    ko, lb = b.shape
    if lb != length:
        raise ValueError(f"a is (N, {length}) but b is (KO, {lb}): the token dims differ")
    e = offs.numel()
    cfg = _config("k", scale_mode, config)
    out = torch.empty(e, n, ko, dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    bk = MX_BLOCK if scale_mode == SCALE_MX32 else cfg.bk
    if cfg.tma:
        a_arg, b_arg = _descriptor(a, (cfg.bm, bk)), _descriptor(b, (cfg.bn, bk))
    else:
        a_arg, b_arg = a, b
    stride_sa = a_scale.stride(0) if scale_mode == SCALE_MX32 else 0
    stride_sb = b_scale.stride(0) if scale_mode == SCALE_MX32 else 0
    grid = (triton.cdiv(ko, cfg.bn), triton.cdiv(n, cfg.bm), e)
    _grouped_mm_wgrad_kernel[grid](
        a_arg, b_arg, a_scale, b_scale, out, offs,
        n, ko, e, a.stride(0), b.stride(0), stride_sa, stride_sb, out.stride(0), out.stride(1),
        SCALE=scale_mode, BM=cfg.bm, BN=cfg.bn, BK=bk,
        USE_TMA=cfg.tma, UPCAST=_INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


@torch.library.custom_op("moeq::fp8_grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   offs: torch.Tensor, scale_mode: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _grouped_mm_impl(a, b, a_scale, b_scale, offs, scale_mode=scale_mode, out_dtype=out_dtype)


@_grouped_mm_op.register_fake
def _(a, b, a_scale, b_scale, offs, scale_mode, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@torch.library.custom_op("moeq::fp8_grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                         offs: torch.Tensor, scale_mode: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _grouped_mm_wgrad_impl(a, b, a_scale, b_scale, offs, scale_mode=scale_mode, out_dtype=out_dtype)


@_grouped_mm_wgrad_op.register_fake
def _(a, b, a_scale, b_scale, offs, scale_mode, out_dtype):
    return a.new_empty((offs.shape[0], a.shape[0], b.shape[0]), dtype=out_dtype)


def grouped_mm(a, b, a_scale, b_scale, offs, *, scale_mode=SCALE_ROWWISE, out_dtype=torch.bfloat16, config=None):
    """M-grouped FP8 GEMM ``out[g] = a[g] @ b[e].T``, scaled; slack rows zero.

    Args:
        a: (M, K) float8_e4m3fn, row-major, rows grouped in expert order.
        b: (E, N, K) float8_e4m3fn, K contiguous.
        a_scale, b_scale: rowwise: (M,) and (E, N) float32 dequantization factors;
            MX32: (M, K/32) and (E, N, K/32) float32 powers of two.
        offs: (E,) int32 cumulative group ends on a's device, ``offs[-1] <= M``.
        out_dtype: bfloat16 or float32. config: a GemmConfig (tile sweeps), else the default.
    Returns:
        (M, N) out_dtype; rows at or past ``offs[-1]`` are zero. No host sync; a custom op
        under torch.compile.
    """
    if torch.compiler.is_compiling() and config is None:
        return torch.ops.moeq.fp8_grouped_mm(a, b, a_scale, b_scale, offs, scale_mode, out_dtype)
    return _grouped_mm_impl(a, b, a_scale, b_scale, offs, scale_mode=scale_mode, out_dtype=out_dtype, config=config)


def grouped_mm_wgrad(a, b, a_scale, b_scale, offs, *, scale_mode=SCALE_ROWWISE, out_dtype=torch.bfloat16, config=None):
    """K-grouped FP8 GEMM (weight gradient) ``out[e] = a[:, g] @ b[:, g].T``, scaled.

    Args:
        a: (N, L) float8_e4m3fn, token-contiguous, L >= offs[-1] a multiple of 16.
        b: (KO, L) float8_e4m3fn, token-contiguous.
        a_scale, b_scale: rowwise: (E, N) and (E, KO) float32 per (expert, row);
            MX32: (N, L/32) and (KO, L/32) float32 powers of two per 32 tokens.
        offs: (E,) int32 cumulative group ends; groups start at multiples of 16
            (of 32 for MX32).
        out_dtype: bfloat16 or float32 (the weight's dtype: no separate cast pass).
    Returns:
        (E, N, KO) out_dtype; experts with no tokens get zeros. No host sync.
    """
    if torch.compiler.is_compiling() and config is None:
        return torch.ops.moeq.fp8_grouped_mm_wgrad(a, b, a_scale, b_scale, offs, scale_mode, out_dtype)
    return _grouped_mm_wgrad_impl(a, b, a_scale, b_scale, offs, scale_mode=scale_mode, out_dtype=out_dtype, config=config)
