"""Quantized expert-parallel dispatch: pack rows as FP8/MXFP8 + scales, unpack into the padded layout.

Under expert parallelism (moeq/parallel) the routed rows cross an all-to-all. With
quantized dispatch the sender quantizes each row along D with the experts' recipe and
packs data and scales into ONE uint8 row, so one ``all_to_all_single`` moves both; the
receiver gathers the packed rows straight into the experts' padded, expert-major layout
and dequantizes them to bf16 in the same pass.

Packed row (``packed_row_bytes(D, recipe)`` bytes, a multiple of ``PACKED_ROW_ALIGN_BYTES``
so every row starts 16-byte aligned for vector loads):

* ``fp8``:   D bytes of e4m3, then the row's float32 dequantization scale (4 bytes,
  little-endian, a power of two), then zero padding: ``round_up(D + 4, 16)`` bytes;
* ``mxfp8``: D bytes of e4m3, then D/32 e8m0 scale bytes (one per 32-element block along
  D), then zero padding: ``round_up(D + D/32, 16)`` bytes.

Numerics: exactly the experts' own quantization of activations along D, bitwise:
``moeq.numerics.fp8_rowwise.fp8_rowwise_quantize`` (power-of-two scale per row, computed from
amax's bits) and ``moeq.numerics.mxfp8.mxfp8_quantize`` (RCEIL e8m0 per 32, torchao
``to_mx`` RCEIL). The references below are those functions; the Triton kernels match them
bitwise on bf16 inputs (tests: finite rows, and rows holding NaN/Inf). FP8: an Inf element
is packed as the e4m3 NaN code on every device (torch's own float8 cast saturates Inf to 448
on CPU and gives NaN on CUDA; the dispatch pins NaN so a non-finite token is never passed on
as a finite value). Dequantization ``e4m3 * 2**k`` is exact in
bf16 (MXFP8: except blocks with amax below ~2**-118, which underflow bf16's subnormals).

Kernels run on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (tests). The interpreter's
float casts do not round to nearest even (fp32 -> e4m3, fp32 -> bf16) and it decodes the
e4m3 NaN code as 480, so with ``HW=False`` the kernels round and decode by hand on the bits;
on the GPU the hardware casts (``cvt.rn``) do the same thing.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from moeq.kernels.common import HAS_TRITON
from moeq.kernels.common import INTERPRET as _INTERPRET
from moeq.kernels.common import next_pow2 as _next_pow2
from moeq.kernels.padding import _gather_rows_or_zero
from moeq.numerics.fp8_rowwise import AMAX_EPS, fp8_dequantize, fp8_rowwise_quantize
from moeq.numerics.mxfp8 import MX_BLOCK_SIZE, mxfp8_dequantize, mxfp8_quantize
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType, parse_recipe

if HAS_TRITON:
    import triton
    import triton.language as tl

    from moeq.kernels.padding import _f32_to_bf16_rne_bits

__all__ = [
    "PACKED_ROW_ALIGN_BYTES",
    "QUANTIZED_RECIPES",
    "quantized_recipe",
    "packed_row_bytes",
    "scale_bytes",
    "decode_packed",
    "pack_rows_reference",
    "pack_rows_triton",
    "unpack_to_padded_reference",
    "unpack_to_padded_triton",
]

# Row stride of a packed buffer: 16 bytes keeps every row's start aligned for 128-bit loads.
PACKED_ROW_ALIGN_BYTES = 16
QUANTIZED_RECIPES = (QuantizationType.FP8, QuantizationType.MXFP8)
_FP8_SCALE_BYTES = 4  # one float32 per row

_E4M3 = torch.float8_e4m3fn
_BF16 = torch.bfloat16

_AMAX_EPS_BITS = int(torch.tensor(AMAX_EPS, dtype=torch.float32).view(torch.int32))


def quantized_recipe(recipe) -> QuantizationType:
    """The QuantizationType of an "fp8"/"mxfp8" recipe; ValueError for any other (bf16, unknown)."""
    q = parse_recipe(recipe)
    if q not in QUANTIZED_RECIPES:
        raise ValueError(
            f"quantized dispatch packs FP8/MXFP8 rows, got recipe {q.value!r}: use 'fp8' or 'mxfp8' "
            f"(BF16 experts dispatch in bf16)"
        )
    return q


def scale_bytes(dim: int, recipe) -> int:
    """Scale bytes of one packed row: 4 (FP8, one float32) or dim / 32 (MXFP8, e8m0 per block)."""
    q = quantized_recipe(recipe)
    return _FP8_SCALE_BYTES if q is QuantizationType.FP8 else dim // MX_BLOCK_SIZE


def packed_row_bytes(dim: int, recipe) -> int:
    """Bytes of one packed row: ``round_up(dim + scale_bytes, 16)`` (see module doc)."""
    a = PACKED_ROW_ALIGN_BYTES
    return (dim + scale_bytes(dim, recipe) + a - 1) // a * a


def check_dim(dim: int, recipe) -> QuantizationType:
    """Raise ValueError unless ``dim`` (D) is a multiple of the recipe's GROUP_ALIGNMENT."""
    q = quantized_recipe(recipe)
    a = GROUP_ALIGNMENT[q]
    if dim % a:
        raise ValueError(
            f"quantized {q.value} dispatch needs the model dim D to be a multiple of {a} "
            f"(GROUP_ALIGNMENT[{q.name}]), got D={dim}: pad D or dispatch in bf16 (quantize_dispatch=False)"
        )
    return q


# ----------------------------------------------------------------------------------
# plain-torch references (the numerics contract)
# ----------------------------------------------------------------------------------


def decode_packed(packed: Tensor, dim: int, recipe) -> Tuple[Tensor, Tensor]:
    """Split packed rows (N, R) uint8 into ``(data (N, D) float8_e4m3fn, scale)``.

    ``scale``: FP8 (N, 1) float32 dequantization scales; MXFP8 (N, D/32) float8_e8m0fnu.
    Views of ``packed``'s bytes (copies where a view is impossible).
    """
    q = quantized_recipe(recipe)
    sb = scale_bytes(dim, q)
    data = packed[:, :dim].view(_E4M3)
    raw = packed[:, dim: dim + sb].contiguous()
    if q is QuantizationType.FP8:
        return data, raw.view(torch.float32)
    return data, raw.view(torch.float8_e8m0fnu)


def pack_rows_reference(x: Tensor, recipe) -> Tensor:
    """Quantize rows of ``x`` (N, D) bf16/fp32 along D and pack them: (N, R) uint8.

    FP8: ``fp8_rowwise_quantize(x, -1)``; MXFP8: ``mxfp8_quantize(x, -1)``; layout in the
    module doc, padding bytes zero.
    """
    q = check_dim(x.shape[1], recipe)
    n, d = x.shape
    out = torch.zeros((n, packed_row_bytes(d, q)), dtype=torch.uint8, device=x.device)
    if n == 0:
        return out
    if q is QuantizationType.FP8:
        data, scale = fp8_rowwise_quantize(x, -1)
        # torch's float8 cast of +-Inf is NaN on CUDA but saturates to +-448 on CPU: pin the
        # device-independent answer, NaN (an Inf token poisons its outputs, never silently finite)
        data = torch.where(x.isinf(), torch.full_like(data, float("nan")), data)
        sbytes = scale.contiguous().view(torch.uint8)  # (N, 4), little-endian float32
    else:
        data, scale = mxfp8_quantize(x, -1)
        sbytes = scale.contiguous().view(torch.uint8)  # (N, D/32)
    out[:, :d] = data.contiguous().view(torch.uint8)
    out[:, d: d + sbytes.shape[1]] = sbytes
    return out


def unpack_to_padded_reference(packed: Tensor, source_rows: Tensor, dim: int, recipe) -> Tensor:
    """Dequantize packed rows into the padded layout: (P, D) bf16.

    Row ``r`` of the result is the dequantized packed row ``source_rows[r]`` (P,) int32, or
    zeros where ``source_rows[r] < 0`` (padding rows).
    """
    q = quantized_recipe(recipe)
    data, scale = decode_packed(packed, dim, q)
    if q is QuantizationType.FP8:
        rows = fp8_dequantize(data, scale, _BF16)
    else:
        rows = mxfp8_dequantize(data, scale, -1, _BF16)
    s = source_rows.to(torch.int64)
    n = packed.shape[0]
    return _gather_rows_or_zero(rows, torch.where((s >= 0) & (s < n), s, n))


# ----------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------


if HAS_TRITON:

    @triton.jit
    def _e4m3_bits(y, HW: tl.constexpr):
        """fp32 y (|y| <= 448, or NaN) -> uint8 e4m3 bits, round to nearest even; NaN -> 0x7F/0xFF."""
        if HW:
            q = y.to(tl.float8e4nv)  # cvt.rn.satfinite.e4m3x2.f32
        else:
            # the interpreter's float8 cast does not round ties to even: land on the e4m3 grid
            # first (ulp 2**(e-3), subnormal ulp 2**-9): adding 2**(e+20) leaves exactly that
            # ulp in fp32, so the add rounds to the grid; the cast of a grid value is exact
            yb = y.to(tl.int32, bitcast=True)
            e = tl.maximum(tl.minimum(((yb >> 23) & 0xFF) - 127, 8), -6)
            c = ((e + 147) << 23).to(tl.float32, bitcast=True)
            r = (tl.abs(y) + c) - c
            # copy y's sign bit by hand: unary minus is 0 - r, which loses -0
            q = (r.to(tl.int32, bitcast=True) | ((yb >> 31) << 31)).to(tl.float32, bitcast=True).to(tl.float8e4nv)
        b = q.to(tl.uint8, bitcast=True)
        return tl.where(y != y, (b & 0x80) | 0x7F, b)


    @triton.jit
    def _e4m3_to_f32(b):
        """uint8 e4m3 bits -> fp32 (exact); the NaN code 0x7F/0xFF -> NaN (the interpreter says 480)."""
        f = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return tl.where((b & 0x7F) == 0x7F, float("nan"), f)


    @triton.jit
    def _pack_fp8_rows(x_ptr, out_ptr, out32_ptr, rows, rmask, D: tl.constexpr, R: tl.constexpr,
                       BM: tl.constexpr, BD: tl.constexpr, EPS_BITS: tl.constexpr, HW: tl.constexpr):
        # pass 1: row amax as the integer max of |x|'s bits (NaN's bits beat +inf's: a NaN row
        # is never mistaken for a finite one); pass 2 (re-read, mostly from L2): scale and store
        r64 = rows.to(tl.int64)
        amax = tl.zeros([BM], dtype=tl.int32)
        for c0 in tl.static_range(0, D, BD):
            cols = c0 + tl.arange(0, BD)
            m = rmask[:, None] & (cols < D)[None, :]
            v = tl.load(x_ptr + r64[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1))
        # moeq.numerics.fp8_rowwise.fp8_pow2_scale on the bits: dequant scale 2**(f - 8 [+1] - 127)
        a = tl.maximum(amax, EPS_BITS)  # clamp(min=1e-12): integer order is float order for >= 0
        dexp = ((a >> 23) & 0xFF) - 8 + ((a & 0x7FFFFF) > 0x600000).to(tl.int32)
        mult = ((254 - dexp) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exact
        for c0 in tl.static_range(0, D, BD):
            cols = c0 + tl.arange(0, BD)
            m = rmask[:, None] & (cols < D)[None, :]
            v = tl.load(x_ptr + r64[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = v * mult[:, None]
            # |y| <= 448 for finite rows by construction; +-Inf becomes NaN (the reference's
            # device-independent choice: torch's cast saturates on CPU, gives NaN on CUDA)
            y = tl.where(tl.abs(y) > 448.0, float("nan"), y)
            tl.store(out_ptr + r64[:, None] * R + cols[None, :], _e4m3_bits(y, HW), mask=m)
        # tail: [D, D+4) the float32 scale, then zeros up to R (whole int32 words: D % 16 == 0)
        TW: tl.constexpr = (R - D) // 4
        w = tl.arange(0, TW)
        tail = tl.where(w[None, :] == 0, (dexp << 23)[:, None], 0)
        tl.store(out32_ptr + r64[:, None] * (R // 4) + D // 4 + w[None, :], tail, mask=rmask[:, None])


    @triton.jit
    def _pack_mx_rows(x_ptr, out_ptr, rows, rmask, D: tl.constexpr, R: tl.constexpr,
                      BM: tl.constexpr, BD: tl.constexpr, HW: tl.constexpr):
        r64 = rows.to(tl.int64)
        NB: tl.constexpr = BD // 32
        for c0 in tl.static_range(0, D, BD):
            cols = c0 + tl.arange(0, BD)
            m = rmask[:, None] & (cols < D)[None, :]
            v = tl.load(x_ptr + r64[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            vb = tl.reshape(v, (BM, NB, 32))
            amax = tl.max(vb.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=2)  # (BM, NB), NaN wins
            # RCEIL exponent ceil(log2(amax / 448)) + 127 from amax's bits (the derivation is in
            # kernels/mxfp8_hopper.py _mx_fake_quant): f - 8, plus one when the significand
            # exceeds 1.75; 0 for amax <= 448 * 2**-127 (subnormal amax); 254 Inf; 255 NaN
            f = amax >> 23
            k = tl.minimum(tl.maximum(f - 8 + ((amax & 0x7FFFFF) > 0x600000).to(tl.int32), 0), 254)
            k = tl.where(f == 0, 0, k)
            k = tl.where(amax == 0x7F800000, 254, tl.where(amax > 0x7F800000, 255, k))
            # 2**(127 - k): 1 for k == 0, 2**-127 (a subnormal) for k == 254, NaN for 255
            rcp_bits = tl.where(k == 0, 127 << 23, tl.where(k == 254, 0x400000, (254 - tl.minimum(k, 253)) << 23))
            rcp = tl.where(k == 255, 0x7FC00000, rcp_bits).to(tl.float32, bitcast=True)
            y = vb * rcp[:, :, None]
            y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))  # clamp, NaN stays
            q = tl.reshape(_e4m3_bits(y, HW), (BM, BD))
            tl.store(out_ptr + r64[:, None] * R + cols[None, :], q, mask=m)
            bcols = c0 // 32 + tl.arange(0, NB)
            tl.store(out_ptr + r64[:, None] * R + D + bcols[None, :], k.to(tl.uint8),
                     mask=rmask[:, None] & (bcols < D // 32)[None, :])
        # zero padding bytes [D + D/32, R)
        PAD: tl.constexpr = R - D - D // 32
        if PAD > 0:
            p = tl.arange(0, 16)
            tl.store(out_ptr + r64[:, None] * R + (D + D // 32) + p[None, :], tl.zeros([BM, 16], dtype=tl.uint8),
                     mask=rmask[:, None] & (p < PAD)[None, :])


    @triton.jit
    def _pack_kernel(x_ptr, out_ptr, out32_ptr, N, D: tl.constexpr, R: tl.constexpr, MX: tl.constexpr,
                     BM: tl.constexpr, BD: tl.constexpr, EPS_BITS: tl.constexpr, HW: tl.constexpr):
        """BM rows of x (N, D) -> packed rows (N, R) uint8 (out32: the same buffer as int32)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < N
        if MX:
            _pack_mx_rows(x_ptr, out_ptr, rows, rmask, D, R, BM, BD, HW)
        else:
            _pack_fp8_rows(x_ptr, out_ptr, out32_ptr, rows, rmask, D, R, BM, BD, EPS_BITS, HW)


    @triton.jit
    def _unpack_kernel(packed_ptr, packed32_ptr, source_ptr, out_ptr, N, P,
                       D: tl.constexpr, R: tl.constexpr, MX: tl.constexpr,
                       BM: tl.constexpr, BD: tl.constexpr, HW: tl.constexpr):
        """(BM, BD) tile of the padded output (P, D) bf16 (as int16 bits): gather + dequantize."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        row_ok = rows < P
        cmask = (cols < D)[None, :]
        src = tl.load(source_ptr + rows, mask=row_ok, other=-1)
        valid = row_ok & (src >= 0) & (src < N)  # never reads out of bounds
        s64 = src.to(tl.int64)
        m = valid[:, None] & cmask
        b = tl.load(packed_ptr + s64[:, None] * R + cols[None, :], mask=m, other=0)
        if MX:
            e = tl.load(packed_ptr + s64[:, None] * R + D + (cols // 32)[None, :], mask=m, other=0)
            scale = (e.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 0 -> 0.0, 255 -> inf
        else:
            sb = tl.load(packed32_ptr + s64 * (R // 4) + D // 4, mask=valid, other=0)
            scale = sb.to(tl.float32, bitcast=True)[:, None]
        v = _e4m3_to_f32(b) * scale  # exact: e4m3 times a power of two
        if HW:
            bits = v.to(tl.bfloat16).to(tl.int16, bitcast=True)
        else:
            bits = _f32_to_bf16_rne_bits(v)
        bits = tl.where(m, bits, 0)  # padding rows: +0
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], bits, mask=row_ok[:, None] & cmask)



def _tiles(dim: int):
    # interpreter: small tiles (its cost is per element); GPU: (BM, BD) tiles of 8192
    # elements, BD up to 1024 columns (not tuned on a GPU yet: see benchmarks/ep.py)
    bd = max(min(_next_pow2(dim), 64 if _INTERPRET else 1024), MX_BLOCK_SIZE)
    bm = 4 if _INTERPRET else max(1, min(64, 8192 // bd))
    return bm, bd


def _warps(bm: int, bd: int) -> int:
    return 8 if bm * bd >= 8192 else 4


def pack_rows_triton(x: Tensor, recipe) -> Tensor:
    """Triton twin of :func:`pack_rows_reference`: (N, D) bf16/fp32 -> (N, R) uint8. One launch."""
    q = check_dim(x.shape[1], recipe)
    x = x.contiguous()
    n, d = x.shape
    r = packed_row_bytes(d, q)
    out = torch.empty((n, r), dtype=torch.uint8, device=x.device)
    if n == 0:
        return out
    bm, bd = _tiles(d)
    _pack_kernel[(triton.cdiv(n, bm),)](
        x, out, out.view(torch.int32), n, D=d, R=r, MX=q is QuantizationType.MXFP8,
        BM=bm, BD=bd, EPS_BITS=_AMAX_EPS_BITS, HW=not _INTERPRET, num_warps=_warps(bm, bd),
    )
    return out


def unpack_to_padded_triton(packed: Tensor, source_rows: Tensor, dim: int, recipe) -> Tensor:
    """Triton twin of :func:`unpack_to_padded_reference`: (P, D) bf16. One launch."""
    q = check_dim(dim, recipe)
    packed = packed.contiguous()
    source_rows = source_rows.contiguous()
    p = source_rows.shape[0]
    out = torch.empty((p, dim), dtype=_BF16, device=packed.device)
    if p == 0:
        return out
    n = packed.shape[0]
    src = packed if n > 0 else torch.zeros((1, packed.shape[1]), dtype=torch.uint8, device=packed.device)
    bm, bd = _tiles(dim)
    grid = (triton.cdiv(p, bm), triton.cdiv(dim, bd))
    _unpack_kernel[grid](
        src, src.view(torch.int32), source_rows, out.view(torch.int16), n, p,
        D=dim, R=packed.shape[1], MX=q is QuantizationType.MXFP8, BM=bm, BD=bd, HW=not _INTERPRET,
        num_warps=_warps(bm, bd),
    )
    return out
