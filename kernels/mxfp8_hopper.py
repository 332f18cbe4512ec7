"""MXFP8 fake-quantization kernels for the Hopper (SM90) MXFP8 experts path.

Hopper has no MX block-scaled tensor-core instruction, but MXFP8 numerics need none:
an e4m3 value times a power of two is exact in bf16, and the product of two such values
is exact in fp32. So "fake-quantize each operand along its GEMM's contraction dim (to the
MXFP8 grid, stored as bf16), then a BF16 grouped GEMM with fp32 accumulation" computes the
MXFP8 GEMM exactly, up to accumulation order (moeq/numerics/mxfp8.py states the one
underflow caveat). The GEMMs then run at BF16 tensor-core speed; what MXFP8 adds is the
fake-quant passes here, which are memory-bound and fused so each byte moves once:

* ``mxfp8_fake_quant_2d``: a grouped (M, K) activation / gradient read once, written twice:
  the **row** copy, blocks of 32 along K (forward and input-gradient GEMMs), and the
  **column** copy, blocks of 32 rows along M (the weight-gradient GEMM, whose contraction
  dim is each group's tokens). Groups start at multiples of 32
  (``GROUP_ALIGNMENT[MXFP8]``), so 32-row blocks counted from row 0 never straddle two
  groups; rows at or past ``offs[-1]`` (slack) read as zero, so the last group's final
  block sees zeros past its end and both copies are zero there.
* ``mxfp8_fake_quant_weight``: a 3D weight (E, N, K) read once, written along K (forward)
  and along N (input gradient). It is the 2D kernel on the (E*N, K) view: N is a
  multiple of 32, so column blocks never straddle two experts.
* ``mxfp8_swiglu_fake_quant``: ``h = silu(gate) * up`` from the gate_up GEMM output
  (M, 2H), computed in fp32, rounded once to bf16, never written unquantized: only its
  row and column copies are written.
* ``mxfp8_swiglu_backward_fake_quant``: ``d gate_up`` (M, 2H) from ``grad_h`` (M, H) and
  gate_up, computed in fp32, rounded once to bf16, written as row and column copies.
(Zeroing a grouped GEMM output's slack rows is ``moeq.ops.slack_rows.zero_slack_rows_``,
one kernel shared with the FP8 path: ``moeq.kernels.common``.)

Numerics (torchao ``to_mx(..., ScaleCalculationMode.RCEIL)``, the contract of
moeq/numerics/mxfp8.py, which the references below call): ``descale = fp32(amax / 448)``,
``exponent = clamp(ceil(log2(descale)), -127, 127) + 127``, NaN in a block -> exponent
255 (the block turns NaN), Inf amax -> 254. The kernels take the exponent straight from
amax's bits (``f - 8``, plus one when amax's significand exceeds 1.75 = 448 / 2**8): the
fp32 quotient rounds across a power of two only when it is subnormal, i.e. for blocks
with amax within one fp32 ulp above ``1.75 * 2**-119``, which no bf16 value is. So the
kernels match the reference bitwise on bf16 inputs (every operand in this path is bf16)
and on fp32 inputs except such ~1e-36 blocks. Data: ``q = e4m3(clamp(x * 2**(127 -
exponent), -448, 448))`` (``rcp = 1`` for exponent 0), round to nearest even; the stored
value is ``q * 2**(exponent - 127)`` in bf16, exact. On the GPU the rounding is the
hardware's ``cvt.rn.satfinite.e4m3x2.f32`` (and ``cvt.rn.bf16`` for the SwiGLU outputs);
under ``TRITON_INTERPRET=1``, whose casts truncate, the kernels round by hand on the bits
(an fp32 add of ``2**(e+20)`` lands on the e4m3 grid), so CPU tests can check the
kernels bitwise; a GPU test checks the hardware path against the same references.

Every launch goes through a ``torch.library`` custom op, so torch.compile traces the
kernels as opaque ops (see ``_fq_op``).

Every public kernel wrapper has a plain-torch ``*_reference`` beside it; tests compare
them bitwise (tests/test_mxfp8_hopper.py, under the interpreter on CPU).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from moeq.kernels.common import INTERPRET as _INTERPRET
from moeq.numerics.groups import pad_rows, zero_slack_rows
from moeq.numerics.mxfp8 import MX_BLOCK_SIZE, mxfp8_fake_quantize
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType

import triton
import triton.language as tl

# Token-group starts are multiples of this, so a 32-row block counted from row 0 lies in one group.
assert GROUP_ALIGNMENT[QuantizationType.MXFP8] % MX_BLOCK_SIZE == 0

_BF16 = torch.bfloat16

MODE_PLAIN = 0  # the source itself
MODE_SWIGLU = 1  # h = silu(gate) * up from gate_up (M, 2H)
MODE_SWIGLU_BWD = 2  # [d gate | d up] from gate_up (M, 2H) and grad_h (M, H)




def _interpreting() -> bool:
    return _INTERPRET


# --------------------------------------------------------------------------------------
# Plain-torch references (the numerics contract; the kernels match them bitwise)
# --------------------------------------------------------------------------------------


def round_to_bf16_reference(v: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, round-to-nearest-even (what ``.to(torch.bfloat16)`` does)."""
    return v.to(_BF16)


def fake_quant_rows_reference(x: torch.Tensor, offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(M, K) -> (M, K) bf16 fake-quantized in blocks of 32 along K; slack rows zero if ``offs``."""
    if offs is not None:
        x = zero_slack_rows(x, offs)
    return mxfp8_fake_quantize(x, dim=-1, out_dtype=_BF16)


def fake_quant_cols_reference(x: torch.Tensor, offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(M, K) -> (M, K) bf16 fake-quantized in blocks of 32 rows counted from row 0.

    With ``offs`` (groups starting at multiples of 32) these are per-group blocks along the
    tokens; slack rows read as zero and come out zero. Rows past the last multiple of 32
    form a short block padded with zeros.
    """
    m = x.shape[0]
    if offs is not None:
        x = zero_slack_rows(x, offs)
    return mxfp8_fake_quantize(pad_rows(x, MX_BLOCK_SIZE), dim=0, out_dtype=_BF16)[:m]


def fake_quant_2d_reference(x: torch.Tensor, offs: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`mxfp8_fake_quant_2d`: ``(row copy, column copy)``."""
    return fake_quant_rows_reference(x, offs), fake_quant_cols_reference(x, offs)


def permute_fake_quant_reference(
    x: torch.Tensor, source_rows: torch.Tensor, top_k: int, offs: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`mxfp8_permute_fake_quant`: the padded expert-major rows
    ``x[source_rows // top_k]`` (zero where ``source_rows`` is -1), then both copies."""
    s = source_rows.to(torch.int64)
    ext = torch.cat([x, x.new_zeros(1, x.shape[1])])
    gathered = ext[torch.where(s >= 0, s // top_k, x.shape[0])]
    return fake_quant_2d_reference(gathered, offs)


def fake_quant_weight_reference(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`mxfp8_fake_quant_weight`: (E, N, K) -> (along K, along N), bf16."""
    return mxfp8_fake_quantize(w, dim=-1, out_dtype=_BF16), mxfp8_fake_quantize(w, dim=-2, out_dtype=_BF16)


def _sigmoid_reference(g: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-g))


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """bf16 ``silu(gate) * up`` of (M, 2H) gate_up, computed in fp32 in the kernels' formula."""
    h = gate_up.shape[-1] // 2
    g, u = gate_up[..., :h].float(), gate_up[..., h:].float()
    return round_to_bf16_reference((g * _sigmoid_reference(g)) * u)


def swiglu_backward_reference(grad_h: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """bf16 (M, 2H) gradient of ``silu(gate) * up`` wrt gate_up, given grad_h (M, H); fp32 math."""
    h = gate_up.shape[-1] // 2
    g, u, dh = gate_up[..., :h].float(), gate_up[..., h:].float(), grad_h.float()
    s = _sigmoid_reference(g)
    dgate = (dh * u) * (s * (1.0 + g * (1.0 - s)))
    dup = dh * (g * s)
    return round_to_bf16_reference(torch.cat([dgate, dup], -1))


class SwiGLUReference(torch.autograd.Function):
    """Differentiable :func:`swiglu_reference` (moeq's SwiGLU numerics: fp32 math, one
    bf16 rounding), to compose with other libraries' GEMMs in tests and benchmarks."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return swiglu_reference(gate_up)

    @staticmethod
    def backward(ctx, grad_h):
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward_reference(grad_h.contiguous(), gate_up)


def swiglu_fake_quant_reference(gate_up: torch.Tensor, offs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`mxfp8_swiglu_fake_quant`: row and column copies of h (M, H)."""
    return fake_quant_2d_reference(swiglu_reference(gate_up), offs)


def swiglu_backward_fake_quant_reference(
    grad_h: torch.Tensor, gate_up: torch.Tensor, offs: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`mxfp8_swiglu_backward_fake_quant`: row and column copies of d gate_up."""
    return fake_quant_2d_reference(swiglu_backward_reference(grad_h, gate_up), offs)


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _round_bf16(v, HW: tl.constexpr):
    """fp32 -> fp32 holding the round-to-nearest-even bf16 value; NaN stays NaN."""
    if HW:
        return v.to(tl.bfloat16).to(tl.float32)  # cvt.rn.bf16x2.f32
    # the interpreter's fp32 -> bf16 cast truncates: round on the bits
    b = v.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, r.to(tl.float32, bitcast=True))


@triton.jit
def _mx_fake_quant(x, AXIS: tl.constexpr, HW: tl.constexpr):
    """x: 3D fp32 whose dim AXIS (size 32) is one MX block -> its fake-quantized values (fp32)."""
    # amax on the magnitude bits as integers: one max per element, and NaN (bits above
    # +inf's) wins the max, so a block holding NaN is seen without a second reduction
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=AXIS, keep_dims=True)
    # RCEIL exponent ceil(log2(amax / 448)) + 127 straight from amax's bits, no division:
    # amax = m * 2**(f - 127) with m in [1, 2) and 448 = 1.75 * 2**8, so the exponent is
    # f - 8, plus one when m > 1.75 (mantissa field above 0x600000). fp32(amax / 448)
    # never rounds across a power of two while it is normal, so this equals the
    # reference's bits-of-the-quotient formula for every bf16 input (see module doc).
    field = amax_bits >> 23
    k = tl.minimum(tl.maximum(field - 8 + ((amax_bits & 0x7FFFFF) > 0x600000).to(tl.int32), 0), 254)
    k = tl.where(field == 0, 0, k)  # subnormal amax
    k = tl.where(amax_bits == 0x7F800000, 254, tl.where(amax_bits > 0x7F800000, 255, k))
    # rcp = 2**(127 - k): 1 for k == 0, 2**-127 (subnormal bits) for k == 254, NaN for 255
    rcp_bits = tl.where(k == 0, 127 << 23, tl.where(k == 254, 0x400000, (254 - tl.minimum(k, 253)) << 23))
    rcp = tl.where(k == 255, 0x7FC00000, rcp_bits).to(tl.float32, bitcast=True)
    # dequantize: 2**(k - 127); k == 0 blocks hold only zeros, k == 255 gives inf (NaN out)
    scale = (k << 23).to(tl.float32, bitcast=True)
    if HW:
        # cvt.rn.satfinite.e4m3x2.f32: round to nearest even, clamp to +-448, NaN stays NaN
        q = (x * rcp).to(tl.float8e4nv).to(tl.float32)
    else:
        # the interpreter's float8 cast does not round ties to even: round by hand.
        y = x * rcp
        y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))  # keeps NaN
        # round |y| to the e4m3 grid (ulp 2**(e-3), subnormal ulp 2**-9), ties to even:
        # adding 2**(e+20) leaves exactly that ulp in fp32
        yb = y.to(tl.int32, bitcast=True)
        e = tl.maximum(((yb >> 23) & 0xFF) - 127, -6)
        c = ((e + 147) << 23).to(tl.float32, bitcast=True)
        r = (tl.abs(y) + c) - c
        # copy y's sign bit onto r by hand: Triton's unary minus is 0 - r, which loses -0
        q = (r.to(tl.int32, bitcast=True) | ((yb >> 31) << 31)).to(tl.float32, bitcast=True)
    return q * scale


@triton.jit
def _fq_rows(v, BM: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr, HW: tl.constexpr):
    """(BM, BK) fp32 tile -> fake-quantized in blocks of BLOCK along its columns, bf16."""
    return tl.reshape(_mx_fake_quant(tl.reshape(v, (BM, BK // BLOCK, BLOCK)), 2, HW), (BM, BK)).to(tl.bfloat16)


@triton.jit
def _fq_cols(v, BM: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr, HW: tl.constexpr):
    """(BM, BK) fp32 tile -> fake-quantized in blocks of BLOCK along its rows, bf16."""
    return tl.reshape(_mx_fake_quant(tl.reshape(v, (BM // BLOCK, BLOCK, BK)), 1, HW), (BM, BK)).to(tl.bfloat16)


@triton.jit
def _mx_fq_kernel(src_ptr, aux_ptr, row_ptr, col_ptr, offs_ptr, index_ptr,
                  M, K, stride_s, stride_a, stride_o, num_groups,
                  MODE: tl.constexpr, HAS_OFFS: tl.constexpr, HAS_INDEX: tl.constexpr, TOP_K: tl.constexpr,
                  WRITE_ROW: tl.constexpr, WRITE_COL: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr, HW: tl.constexpr):
    """One (BM, BK) tile of the logical (M, K) source -> its row and column fake-quant copies.

    MODE_PLAIN: source src (M, K). MODE_SWIGLU: src is gate_up (M, 2K), source
    silu(gate) * up. MODE_SWIGLU_BWD: src is gate_up (M, 2K), aux is grad_h (M, K); the
    source is [d gate | d up] (M, 2K): this tile writes columns [c, c+BK) and [K+c, K+c+BK).
    HAS_INDEX (MODE_PLAIN): output row r reads source row ``index[r] // TOP_K`` (zeros where
    ``index[r]`` is -1): the permute-and-pad gather fused into the fake-quant pass.
    (Stores stay in this body, not in helpers: torch.compile's mutation analysis of user
    Triton kernels reads them here.)
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    in_bounds = (rows[:, None] < M) & (cols[None, :] < K)
    if HAS_OFFS:
        end = tl.load(offs_ptr + num_groups - 1)
        load_mask = in_bounds & (rows[:, None] < end)
    else:
        load_mask = in_bounds
    if HAS_INDEX:
        routed = tl.load(index_ptr + rows, mask=rows < M, other=-1)
        load_mask = load_mask & (routed >= 0)[:, None]
        src_rows = tl.where(routed >= 0, routed // TOP_K, 0)
    else:
        src_rows = rows
    src = src_ptr + src_rows[:, None].to(tl.int64) * stride_s + cols[None, :]
    out = rows[:, None].to(tl.int64) * stride_o + cols[None, :]
    if MODE == 0:
        v = tl.load(src, mask=load_mask, other=0.0).to(tl.float32)
        if WRITE_ROW:
            tl.store(row_ptr + out, _fq_rows(v, BM, BK, BLOCK, HW), mask=in_bounds)
        if WRITE_COL:
            tl.store(col_ptr + out, _fq_cols(v, BM, BK, BLOCK, HW), mask=in_bounds)
    elif MODE == 1:
        g = tl.load(src, mask=load_mask, other=0.0).to(tl.float32)
        u = tl.load(src + K, mask=load_mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        v = _round_bf16((g * s) * u, HW)
        if WRITE_ROW:
            tl.store(row_ptr + out, _fq_rows(v, BM, BK, BLOCK, HW), mask=in_bounds)
        if WRITE_COL:
            tl.store(col_ptr + out, _fq_cols(v, BM, BK, BLOCK, HW), mask=in_bounds)
    else:
        g = tl.load(src, mask=load_mask, other=0.0).to(tl.float32)
        u = tl.load(src + K, mask=load_mask, other=0.0).to(tl.float32)
        dh_ptr = aux_ptr + rows[:, None].to(tl.int64) * stride_a + cols[None, :]
        dh = tl.load(dh_ptr, mask=load_mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        dgate = _round_bf16((dh * u) * (s * (1.0 + g * (1.0 - s))), HW)
        dup = _round_bf16(dh * (g * s), HW)
        if WRITE_ROW:
            tl.store(row_ptr + out, _fq_rows(dgate, BM, BK, BLOCK, HW), mask=in_bounds)
            tl.store(row_ptr + out + K, _fq_rows(dup, BM, BK, BLOCK, HW), mask=in_bounds)
        if WRITE_COL:
            tl.store(col_ptr + out, _fq_cols(dgate, BM, BK, BLOCK, HW), mask=in_bounds)
            tl.store(col_ptr + out + K, _fq_cols(dup, BM, BK, BLOCK, HW), mask=in_bounds)


# Tile shapes (rows, cols, warps) per mode on the GPU; tiny tiles under the interpreter.
# Chosen by the sweep in benchmarks/mxfp8_hopper.py (see docs/mxfp8_hopper.md).
GPU_TILES = {MODE_PLAIN: (32, 128, 4), MODE_SWIGLU: (32, 128, 4), MODE_SWIGLU_BWD: (32, 128, 4)}
_INTERPRETER_TILE = (32, 64, 1)


def _tile(mode: int, tiles: Optional[dict]):
    if _interpreting():
        return _INTERPRETER_TILE
    return (tiles or GPU_TILES)[mode]


def _check_offs(offs: torch.Tensor, src: torch.Tensor) -> None:
    if offs.dtype != torch.int32 or offs.dim() != 1 or offs.numel() == 0:
        raise ValueError(f"offs must be a non-empty 1D int32 tensor of cumulative group ends, got {offs.dtype} {tuple(offs.shape)}")
    if offs.device != src.device:
        raise ValueError(f"offs is on {offs.device} but the tensor is on {src.device}: move offs to the tensor's device")


def _check_2d(name: str, x: torch.Tensor, k_multiple: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2D, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be bfloat16 or float32, got {x.dtype}")
    if x.shape[1] % k_multiple:
        raise ValueError(
            f"{name} has {x.shape[1]} columns, not a multiple of {k_multiple} (the MX block size): pad that dim"
        )
    if x.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim; call .contiguous()")


def _launch_eager(mode, src, aux, offs, m, k, out_cols, write_row, write_col, tiles, index=None, top_k=1):
    bm, bk, warps = _tile(mode, tiles)
    row = torch.empty((m, out_cols) if write_row else (0,), dtype=_BF16, device=src.device)
    col = torch.empty((m, out_cols) if write_col else (0,), dtype=_BF16, device=src.device)
    if m > 0 and k > 0:
        _mx_fq_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
            src if src.numel() else src.new_empty(1), aux if aux is not None else src, row, col,
            offs if offs is not None else src, index if index is not None else src,
            m, k, src.stride(0), aux.stride(0) if aux is not None else 0, out_cols,
            offs.numel() if offs is not None else 0,
            MODE=mode, HAS_OFFS=offs is not None, HAS_INDEX=index is not None, TOP_K=top_k,
            WRITE_ROW=write_row, WRITE_COL=write_col,
            BM=bm, BK=bk, BLOCK=MX_BLOCK_SIZE, HW=not _INTERPRET, num_warps=warps,
        )
    return row, col


# Every launch goes through a custom op, eager included: opaque to torch.compile, so no
# tracer (Dynamo, AOTAutograd tracing the backward, make_fx) ever sees the raw Triton call.
# (Branching on torch.compiler.is_compiling() is not enough: torch 2.11 reports False while
# AOTAutograd traces an autograd.Function's backward, and the kernels then ran on fake
# tensors, leaving the compiled backward's outputs unwritten.)
@torch.library.custom_op("moeq::mxfp8_hopper_fake_quant", mutates_args=())
def _fq_op(
    src: torch.Tensor, aux: Optional[torch.Tensor], offs: Optional[torch.Tensor], index: Optional[torch.Tensor],
    top_k: int, mode: int, m: int, k: int, out_cols: int, write_row: bool, write_col: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_eager(mode, src, aux, offs, m, k, out_cols, write_row, write_col, None, index, top_k)


@_fq_op.register_fake
def _(src, aux, offs, index, top_k, mode, m, k, out_cols, write_row, write_col):
    return (
        src.new_empty((m, out_cols) if write_row else (0,), dtype=_BF16),
        src.new_empty((m, out_cols) if write_col else (0,), dtype=_BF16),
    )


def _launch(mode, src, aux, offs, m, k, out_cols, write_row, write_col, tiles, index=None, top_k=1):
    if tiles is None:
        row, col = _fq_op(src, aux, offs, index, top_k, mode, m, k, out_cols, write_row, write_col)
    else:  # explicit tiles: the tuning sweep of benchmarks/mxfp8_hopper.py, eager only
        row, col = _launch_eager(mode, src, aux, offs, m, k, out_cols, write_row, write_col, tiles, index, top_k)
    return (row if write_row else None, col if write_col else None)


def mxfp8_fake_quant_2d(
    x: torch.Tensor,
    offs: Optional[torch.Tensor] = None,
    *,
    rows: bool = True,
    cols: bool = True,
    tiles: Optional[dict] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Row and column MXFP8 fake-quant copies of a grouped 2D tensor in one read.

    Args:
        x: (M, K) bf16/fp32, unit stride along K, K a multiple of 32. Rows grouped by
            ``offs`` (groups start at multiples of 32).
        offs: optional (E,) int32 cumulative group ends; rows at or past ``offs[-1]``
            read as zero (both copies are zero there). None: every row is real.
        rows / cols: which copies to write.
        tiles: {mode: (rows, cols, warps)} tile override for tuning sweeps (eager only).
    Returns:
        ``(row, col)``, each (M, K) bf16 or None: ``row`` in blocks of 32 along K,
        ``col`` in blocks of 32 rows along M counted from row 0.
    """
    _check_2d("x", x, MX_BLOCK_SIZE)
    if offs is not None:
        _check_offs(offs, x)
    return _launch(MODE_PLAIN, x, None, offs, x.shape[0], x.shape[1], x.shape[1], rows, cols, tiles)


def mxfp8_permute_fake_quant(
    x: torch.Tensor,
    source_rows: torch.Tensor,
    top_k: int,
    offs: torch.Tensor,
    *,
    rows: bool = True,
    cols: bool = True,
    tiles: Optional[dict] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Permute-and-pad fused with both MXFP8 fake-quant copies: tokens read once.

    Equals ``mxfp8_fake_quant_2d(permute_and_pad(x, ...)[0], offs)`` bitwise, without
    writing and re-reading the padded bf16 rows.

    Args:
        x: (T, K) bf16/fp32 tokens, K a multiple of 32.
        source_rows: (R,) int32 from moeq's padded layout: routed copy ``t*top_k + j`` of
            each padded row, -1 on padding and slack rows.
        top_k: copies per token.
        offs: (E,) int32 padded group ends (groups start at multiples of 32).
    Returns:
        ``(row, col)``, each (R, K) bf16 or None.
    """
    _check_2d("x", x, MX_BLOCK_SIZE)
    _check_offs(offs, x)
    if source_rows.dtype != torch.int32 or source_rows.dim() != 1 or source_rows.device != x.device:
        raise ValueError(
            f"source_rows must be a 1D int32 tensor on {x.device} (PaddedLayout.source_rows), got "
            f"{source_rows.dtype} {tuple(source_rows.shape)} on {source_rows.device}"
        )
    r = source_rows.shape[0]
    return _launch(MODE_PLAIN, x, None, offs, r, x.shape[1], x.shape[1], rows, cols, tiles, source_rows, top_k)


def mxfp8_fake_quant_weight(
    w: torch.Tensor, *, along_k: bool = True, along_n: bool = True, tiles: Optional[dict] = None
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Both MXFP8 fake-quant copies of a 3D expert weight in one read.

    Args:
        w: (E, N, K) bf16/fp32 contiguous, N and K multiples of 32.
    Returns:
        ``(wk, wn)``, each (E, N, K) bf16 or None: ``wk`` in blocks of 32 along K (the
        forward GEMM's contraction dim), ``wn`` in blocks of 32 along N (the input-gradient
        GEMM's).
    """
    if w.dim() != 3:
        raise ValueError(f"expert weight must be 3D (E, N, K), got shape {tuple(w.shape)}")
    e, n, k = w.shape
    if n % MX_BLOCK_SIZE:
        raise ValueError(f"expert weight dim 1 ({n}) is not a multiple of {MX_BLOCK_SIZE} (the MX block size)")
    flat = w.contiguous().view(e * n, k)
    _check_2d("expert weight", flat, MX_BLOCK_SIZE)
    wk, wn = _launch(MODE_PLAIN, flat, None, None, e * n, k, k, along_k, along_n, tiles)
    return (wk.view(e, n, k) if wk is not None else None, wn.view(e, n, k) if wn is not None else None)


def mxfp8_swiglu_fake_quant(
    gate_up: torch.Tensor, offs: torch.Tensor, *, rows: bool = True, cols: bool = True, tiles: Optional[dict] = None
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``h = silu(gate) * up`` fused with its row and column MXFP8 fake-quant copies.

    Args:
        gate_up: (M, 2H) bf16, gate columns [0, H), up [H, 2H); H a multiple of 32.
        offs: (E,) int32 cumulative group ends; slack rows come out zero.
    Returns:
        ``(h_row, h_col)``, each (M, H) bf16 or None.
    """
    _check_2d("gate_up", gate_up, 2 * MX_BLOCK_SIZE)
    _check_offs(offs, gate_up)
    m, h = gate_up.shape[0], gate_up.shape[1] // 2
    return _launch(MODE_SWIGLU, gate_up, None, offs, m, h, h, rows, cols, tiles)


def mxfp8_swiglu_backward_fake_quant(
    grad_h: torch.Tensor,
    gate_up: torch.Tensor,
    offs: torch.Tensor,
    *,
    rows: bool = True,
    cols: bool = True,
    tiles: Optional[dict] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """SwiGLU backward fused with the row and column MXFP8 fake-quant copies of its output.

    Args:
        grad_h: (M, H) bf16 gradient of ``h = silu(gate) * up``.
        gate_up: (M, 2H) bf16 saved forward input of the SwiGLU.
        offs: (E,) int32 cumulative group ends; slack rows come out zero.
    Returns:
        ``(d_row, d_col)``, each (M, 2H) bf16 or None: copies of ``[d gate | d up]``.
    """
    _check_2d("gate_up", gate_up, 2 * MX_BLOCK_SIZE)
    _check_2d("grad_h", grad_h, MX_BLOCK_SIZE)
    _check_offs(offs, gate_up)
    m, h = gate_up.shape[0], gate_up.shape[1] // 2
    if grad_h.shape != (m, h):
        raise ValueError(f"grad_h has shape {tuple(grad_h.shape)}, expected {(m, h)} for gate_up {tuple(gate_up.shape)}")
    return _launch(MODE_SWIGLU_BWD, gate_up, grad_h, offs, m, h, 2 * h, rows, cols, tiles)
