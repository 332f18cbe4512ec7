"""Numerics of moeq.ops: FP8 rowwise, MXFP8, quantized_grouped_mm and its kernel dispatch.

CPU tests check the quantizers bitwise against torchao's references, the exactness that the
emulated GEMM relies on, quantized_grouped_mm's outputs and gradients against float64 with
error bounds measured first (docs/recipes.md), and the error paths. GPU tests (marked
``gpu``) check the "torch" kernel (torch._scaled_grouped_mm) against the emulated one.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeq.ops import registry as dispatch
from moeq.numerics.fp8_rowwise import (
    AMAX_EPS,
    FP8_MAX,
    fp8_per_group_colwise_fake_quantize,
    fp8_per_group_colwise_quantize,
    fp8_pow2_scale,
    fp8_rowwise_fake_quantize,
    fp8_rowwise_quantize,
)
from moeq.ops.grouped_mm import quantized_grouped_mm
from moeq.numerics.mxfp8 import (
    MX_BLOCK_SIZE,
    mxfp8_dequantize,
    mxfp8_fake_quantize,
    mxfp8_fake_quantize_token_groups,
    mxfp8_quantize,
)
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType

FP8, MXFP8, BF16 = QuantizationType.FP8, QuantizationType.MXFP8, QuantizationType.BF16
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Relative Frobenius error of quantized_grouped_mm vs a float64 reference. Measured over
# 6 seeds x {bf16, fp32} inputs x {forward, input grad, weight grad}, identical for FP8 and
# MXFP8 (see docs/recipes.md): Gaussian worst 0.0383, heavy-tailed worst 0.0570.
REL_ERR_BOUND = {"gauss": 0.05, "heavy": 0.08}
BF16_REL_ERR_BOUND = 0.004  # measured worst 0.0023 (bf16 inputs, bf16 output rounding)


# --------------------------------------------------------------------------- helpers

def _torchao():
    pytest.importorskip("torchao")
    import warnings

    warnings.filterwarnings("ignore", module="torchao")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    return to_mx, ScaleCalculationMode.RCEIL


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _wide_range(shape, gen, lo=-140, hi=120, dtype=torch.bfloat16) -> torch.Tensor:
    """Gaussian values with per-32-block magnitudes 2**U[lo, hi), zero blocks, subnormals."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    nblocks = x.numel() // MX_BLOCK_SIZE
    exps = torch.randint(lo, hi, (nblocks, 1), generator=gen).double()
    x = (x.reshape(nblocks, MX_BLOCK_SIZE) * torch.exp2(exps)).reshape(shape)
    x.view(-1)[: 2 * MX_BLOCK_SIZE] = 0.0  # two all-zero blocks
    x.view(-1)[2 * MX_BLOCK_SIZE: 3 * MX_BLOCK_SIZE] = -0.0
    return x.clamp(-3e38, 3e38).to(dtype)


def _edge_blocks(dtype) -> torch.Tensor:
    """Blocks whose amax sits on RCEIL / pow2-scale boundaries, plus bf16 subnormals."""
    rows = []
    for amax in [448.0, 448.0 * 2**-10, 448.0 * 2**20, 448.0 * 2**-126, 448.0 * 2**-127, 448.0 * 2**-128,
                 2.0**-133, 2.0**-126, 1.0, 1.75, 1.7578125, 3.0e38, 7.0, 2.0**-20]:
        row = torch.linspace(-1.0, 1.0, MX_BLOCK_SIZE, dtype=torch.float64) * amax
        row[3] = amax
        rows.append(row)
    return torch.stack(rows).to(dtype)


def _offs(counts) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def _grouped_ref(a, b, grad_out, offs):
    """float64 forward, input and weight gradients of the grouped GEMM (loop over groups)."""
    a64, b64, g64 = a.double(), b.double(), grad_out.double()
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    ga = torch.zeros_like(a64)
    gb = torch.zeros_like(b64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = a64[start:end] @ b64[e].T
        ga[start:end] = g64[start:end] @ b64[e]
        gb[e] = g64[start:end].T @ a64[start:end]
        start = end
    return out, ga, gb


def _rel(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _data(kind, shape, gen):
    x = torch.randn(shape, generator=gen)
    if kind == "heavy":
        x = x * torch.exp(1.5 * torch.randn(shape, generator=gen))
    return x


# --------------------------------------------------------------------------- FP8 rowwise

def test_fp8_pow2_scale_is_largest_power_of_two_that_fits():
    gen = torch.Generator().manual_seed(0)
    amax = torch.exp2(torch.empty(4000).uniform_(-45, 126, generator=gen))
    specials = [0.0, 1e-13, AMAX_EPS, 448.0, 1.0, 3.4e38]
    for e in range(-30, 30, 7):  # mantissa exactly 1.75 and one fp32 ulp either side
        specials += [m * 2.0**e for m in (1.75, 1.75 + 2.0**-23, 1.75 - 2.0**-23)]
    amax = torch.cat([amax, torch.tensor(specials)]).float()
    d = fp8_pow2_scale(amax).double()
    s = 1.0 / d
    mant, _ = torch.frexp(d)
    assert torch.all(mant == 0.5), "dequantization scales must be powers of two"
    a = amax.double().clamp(min=AMAX_EPS)
    assert torch.all(a * s <= FP8_MAX), "amax * s must fit in e4m3"
    assert torch.all(a * 2 * s > FP8_MAX), "s must be the largest such power of two"


def _torchao_fp8_rowwise(x, dim):
    """torchao's plain-torch FP8 rowwise reference: tensor_to_scale + to_fp8_saturated."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_utils import ScalingGranularity, tensor_to_scale, to_fp8_saturated

    s = tensor_to_scale(x, torch.float8_e4m3fn, scaling_granularity=ScalingGranularity.AXISWISE,
                        axiswise_dim=dim, round_scales_to_power_of_2=True)
    return to_fp8_saturated(x.float() * s, torch.float8_e4m3fn), s


@pytest.mark.parametrize("shape,dim", [((64, 256), -1), ((3, 64, 96), -1), ((3, 64, 96), -2)])
def test_fp8_rowwise_matches_torchao_bitwise_on_bf16(shape, dim):
    gen = torch.Generator().manual_seed(1)
    x = _wide_range(shape, gen, lo=-100, hi=100)
    data, scale = fp8_rowwise_quantize(x, dim)
    ref_data, ref_s = _torchao_fp8_rowwise(x, dim)
    assert torch.equal(scale, ref_s.reciprocal())
    assert torch.equal(_bits(data), _bits(ref_data))


def test_fp8_rowwise_fp32_differs_from_torchao_only_by_its_log2_rounding():
    # amax with mantissa 1.75 + 1 ulp: 448/amax is just below a power of two. torchao's
    # exp2(floor(log2(fp32))) rounds onto the integer and picks the doubled scale, then
    # saturates amax to 448; moeq's exact floor keeps amax * s <= 448 without clamping.
    amax = (1.75 + 2.0**-23) * 2.0**12  # one fp32 ulp above 1.75 * 2**12
    x = torch.tensor([[amax, 1.0, -3.0, 0.5] * 4], dtype=torch.float32)
    data, scale = fp8_rowwise_quantize(x)
    ref_data, ref_s = _torchao_fp8_rowwise(x, -1)
    assert scale.item() == 2.0 ** (12 - 7)
    assert ref_s.reciprocal().item() == 2.0 ** (12 - 8)  # torchao: one power of two larger s
    assert data.float()[0, 0].item() == 224.0 and ref_data.float()[0, 0].item() == FP8_MAX
    # random fp32 data stays bitwise equal
    gen = torch.Generator().manual_seed(2)
    x = _wide_range((64, 128), gen, lo=-60, hi=60, dtype=torch.float32)
    data, scale = fp8_rowwise_quantize(x)
    ref_data, ref_s = _torchao_fp8_rowwise(x, -1)
    assert torch.equal(scale, ref_s.reciprocal()) and torch.equal(_bits(data), _bits(ref_data))


def test_fp8_rowwise_zero_rows_and_nonfinite_inputs():
    x = torch.zeros(2, 32)
    x[1, 5] = float("nan")
    data, scale = fp8_rowwise_quantize(x)
    assert torch.all(data[0].float() == 0) and torch.isfinite(scale[0]).all()
    assert torch.isnan(data[1, 5].float()), "NaN must stay NaN, never saturate to a finite value"
    y = torch.ones(1, 32)
    y[0, 3] = float("inf")
    # amax = inf gives the scale 2**120: the Inf element dequantizes to Inf (or NaN where
    # the e4m3 cast does not saturate), never to a finite value
    assert not torch.isfinite(fp8_rowwise_fake_quantize(y)[0, 3])


def test_fp8_per_group_colwise_matches_per_group_loop():
    gen = torch.Generator().manual_seed(3)
    counts = [32, 0, 48, 16, 0]
    offs = _offs(counts)
    m = int(offs[-1]) + 9  # 9 slack rows
    x = _wide_range((m, 64), gen, lo=-30, hi=30)
    x[offs[-1]:] = 1e30  # slack garbage must not leak into any scale
    data, scale = fp8_per_group_colwise_quantize(x, offs)
    assert scale.shape == (len(counts), 64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            d_ref, s_ref = fp8_rowwise_quantize(x[start:end], dim=0)
            assert torch.equal(_bits(data[start:end]), _bits(d_ref))
            assert torch.equal(scale[e], s_ref[0])
        else:
            assert torch.equal(scale[e], fp8_pow2_scale(torch.zeros(64)))
        start = end
    assert torch.all(data[offs[-1]:].float() == 0)
    fq = fp8_per_group_colwise_fake_quantize(x, offs)
    assert torch.all(fq[offs[-1]:] == 0)


# --------------------------------------------------------------------------- MXFP8

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,dim", [((64, 512), -1), ((4, 64, 96), -1), ((4, 64, 96), -2), ((96, 64), 0)])
def test_mxfp8_matches_torchao_to_mx_rceil_bitwise(dtype, shape, dim):
    to_mx, rceil = _torchao()
    gen = torch.Generator().manual_seed(4)
    hi = 120 if dtype is torch.bfloat16 else 100
    x = _wide_range(shape, gen, hi=hi, dtype=dtype)
    data, scale = mxfp8_quantize(x, dim)
    ref_scale, ref_data = to_mx(x.movedim(dim, -1).contiguous(), torch.float8_e4m3fn, MX_BLOCK_SIZE, rceil)
    assert torch.equal(_bits(scale.movedim(dim, -1)), _bits(ref_scale))
    assert torch.equal(_bits(data.movedim(dim, -1)), _bits(ref_data))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp8_edge_blocks_match_torchao_bitwise(dtype):
    to_mx, rceil = _torchao()
    x = _edge_blocks(dtype)
    data, scale = mxfp8_quantize(x)
    ref_scale, ref_data = to_mx(x, torch.float8_e4m3fn, MX_BLOCK_SIZE, rceil)
    assert torch.equal(_bits(scale), _bits(ref_scale))
    assert torch.equal(_bits(data), _bits(ref_data))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lo=st.integers(-140, 100),
    span=st.integers(0, 40),
    nblocks=st.integers(1, 8),
)
def test_mxfp8_bf16_bitwise_property(seed, lo, span, nblocks):
    to_mx, rceil = _torchao()
    gen = torch.Generator().manual_seed(seed)
    x = _wide_range((4, nblocks * MX_BLOCK_SIZE + 3 * MX_BLOCK_SIZE), gen, lo=lo, hi=lo + span + 1)
    data, scale = mxfp8_quantize(x)
    ref_scale, ref_data = to_mx(x, torch.float8_e4m3fn, MX_BLOCK_SIZE, rceil)
    assert torch.equal(_bits(scale), _bits(ref_scale)) and torch.equal(_bits(data), _bits(ref_data))


def test_mxfp8_fp32_rceil_is_exact_where_torchao_log2_rounds():
    # descale = amax / 448 = 2**k * (1 + 2**-23): RCEIL is k + 1 (Blackwell's cvt.rp and
    # moeq); torchao's eager ceil(torch.log2(.)) rounds onto k and saturates the block max.
    to_mx, rceil = _torchao()
    k = 10
    amax = torch.tensor(2.0**k * (1 + 2.0**-23)) * 448.0  # fp32 multiply is exact here
    assert (amax / 448.0).item() == 2.0**k * (1 + 2.0**-23)
    x = torch.full((1, MX_BLOCK_SIZE), 1.0)
    x[0, 0] = amax
    data, scale = mxfp8_quantize(x)
    ref_scale, ref_data = to_mx(x, torch.float8_e4m3fn, MX_BLOCK_SIZE, rceil)
    assert scale.view(torch.uint8).item() == 127 + k + 1
    assert ref_scale.view(torch.uint8).item() == 127 + k
    assert data.float()[0, 0].item() == 224.0 and ref_data.float()[0, 0].item() == 448.0


def test_mxfp8_dequantize_and_fake_quant_values_are_exact():
    gen = torch.Generator().manual_seed(5)
    x = _wide_range((32, 256), gen, lo=-100, hi=100, dtype=torch.float32)
    data, scale = mxfp8_quantize(x)
    fq32 = mxfp8_fake_quantize(x)
    assert torch.equal(mxfp8_dequantize(data, scale, dtype=torch.float32), fq32)
    # fake-quant values are e4m3 * 2**k: exact in bf16 (inside bf16's normal range)
    assert torch.equal(fq32.to(torch.bfloat16).float(), fq32)
    assert torch.equal(mxfp8_fake_quantize(x, out_dtype=torch.bfloat16).float(), fq32)
    # and each block divided by its scale is an e4m3 value
    s = scale.view(torch.uint8).to(torch.int32).sub(127).double().exp2().repeat_interleave(MX_BLOCK_SIZE, -1)
    q = fq32.double() / s
    assert torch.equal(q.to(torch.float8_e4m3fn).double(), q)
    # along another dim: same as transposing
    assert torch.equal(mxfp8_fake_quantize(x.T.contiguous(), dim=0), mxfp8_fake_quantize(x, dim=-1).T)


def test_mxfp8_blocks_keep_small_blocks_that_fp8_rowwise_flushes():
    # one row, a loud block and a block 2**-20 quieter: rowwise scaling sends the quiet
    # block below e4m3's subnormals; MX scales it on its own.
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2 * MX_BLOCK_SIZE, generator=gen)
    x[0, MX_BLOCK_SIZE:] *= 2.0**-20
    quiet = x[0, MX_BLOCK_SIZE:]
    err_mx = ((mxfp8_fake_quantize(x)[0, MX_BLOCK_SIZE:] - quiet).norm() / quiet.norm()).item()
    err_fp8 = ((fp8_rowwise_fake_quantize(x)[0, MX_BLOCK_SIZE:] - quiet).norm() / quiet.norm()).item()
    assert err_mx < 2.0**-4 and err_fp8 == 1.0


def test_mxfp8_token_groups_blocks_stay_inside_groups():
    gen = torch.Generator().manual_seed(7)
    offs = _offs([64, 0, 32, 40])  # last group ends off the block grid; 11 slack rows
    m = int(offs[-1]) + 11
    x = _wide_range((m, 64), gen, lo=-30, hi=30)
    x[offs[-1]:] = 3e38
    fq = mxfp8_fake_quantize_token_groups(x, offs)
    assert fq.shape == x.shape and torch.all(fq[offs[-1]:] == 0)
    start = 0
    for end in offs.tolist():
        if end > start:
            pad = (-(end - start)) % MX_BLOCK_SIZE
            g = torch.cat([x[start:end], x.new_zeros(pad, 64)])
            assert torch.equal(fq[start:end], mxfp8_fake_quantize(g, dim=0)[: end - start])
        start = end


# ------------------------------------------------------- exactness of the emulated GEMM

@pytest.mark.parametrize("qtype", [FP8, MXFP8])
def test_emulated_gemm_is_exact_up_to_accumulation(qtype):
    """GEMM of fake-quantized bf16 operands == float64 GEMM of them, within fp32
    accumulation error plus the bf16 output rounding: quantization is the only loss."""
    gen = torch.Generator().manual_seed(8)
    m, k, n = 64, 256, 32
    a = _data("heavy", (m, k), gen).to(torch.bfloat16)
    b = _data("heavy", (1, n, k), gen).to(torch.bfloat16)
    offs = torch.tensor([m], dtype=torch.int32)
    out = quantized_grouped_mm(a, b, offs, qtype=qtype, kernel="emulated")
    fq = fp8_rowwise_fake_quantize if qtype is FP8 else mxfp8_fake_quantize
    aq, bq = fq(a, -1).double(), fq(b[0], -1).double()
    ref = aq @ bq.T
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)  # fp32 summation bound
    bound = gamma * (aq.abs() @ bq.abs().T) + ref.abs() * 2.0**-8  # + half an ulp of bf16
    assert torch.all((out.double() - ref).abs() <= bound)
    # and the operands lost nothing in bf16: fp32 fake-quant values equal the bf16 ones
    assert torch.equal(fq(a.float(), -1).to(torch.bfloat16), fq(a, -1))


# ------------------------------------------------------- quantized_grouped_mm numerics

@pytest.mark.parametrize("qtype", [FP8, MXFP8])
@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_grouped_mm_vs_float64(qtype, kind, dtype):
    gen = torch.Generator().manual_seed(9)
    align = GROUP_ALIGNMENT[qtype]
    counts = [2 * align, 0, 3 * align, align + 5]  # an empty group, an unaligned last end
    offs = _offs(counts)
    m, k, n, e = int(offs[-1]) + 6, 128, 96, len(counts)  # 6 slack rows
    a = _data(kind, (m, k), gen).to(dtype)
    a[offs[-1]:] = float("nan")  # slack rows are never read
    a.requires_grad_()
    b = (_data(kind, (e, n, k), gen) / math.sqrt(k)).to(dtype).requires_grad_()
    out = quantized_grouped_mm(a, b, offs, qtype=qtype, kernel="emulated", check_finite=False)
    grad_out = _data(kind, (m, n), gen).to(dtype)
    ga, gb = torch.autograd.grad(out, (a, b), grad_out)
    assert out.dtype == ga.dtype == gb.dtype == dtype
    assert torch.all(out[offs[-1]:] == 0) and torch.all(ga[offs[-1]:] == 0)
    assert torch.all(gb[1] == 0), "empty group: zero weight gradient"
    ref = _grouped_ref(a.detach().nan_to_num(0.0), b.detach(), grad_out, offs)
    for got, want in zip((out, ga, gb), ref):
        assert _rel(got, want) < REL_ERR_BOUND[kind]


@pytest.mark.parametrize("kernel", ["auto", "emulated", "torch"])
def test_bf16_recipe_is_plain_grouped_mm(kernel):
    gen = torch.Generator().manual_seed(10)
    offs = _offs([16, 0, 24])
    a = torch.randn(48, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    b = torch.randn(3, 32, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    out = quantized_grouped_mm(a, b, offs, qtype="bf16", kernel=kernel)
    grad_out = torch.randn(48, 32, generator=gen).to(torch.bfloat16)
    ga, gb = torch.autograd.grad(out, (a, b), grad_out)
    assert torch.equal(out[:40], torch._grouped_mm(a.detach(), b.detach().transpose(-2, -1), offs=offs)[:40])
    assert torch.all(out[40:] == 0) and torch.all(ga[40:] == 0) and torch.all(gb[1] == 0)
    ref = _grouped_ref(a.detach(), b.detach(), grad_out, offs)
    for got, want in zip((out, ga, gb), ref):
        assert _rel(got, want) < BF16_REL_ERR_BOUND


def test_mxfp8_emulated_matches_torchao_emulated():
    pytest.importorskip("torchao")
    import warnings

    warnings.filterwarnings("ignore", module="torchao")
    from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm
    from torchao.quantization.quantize_.common import KernelPreference

    gen = torch.Generator().manual_seed(11)
    offs = _offs([64, 0, 96, 64])
    m, k, n = 224, 128, 96  # no slack rows: torchao leaves them uninitialized
    a = _data("heavy", (m, k), gen).to(torch.bfloat16)
    b = (_data("heavy", (4, n, k), gen) / math.sqrt(k)).to(torch.bfloat16)
    grad_out = _data("heavy", (m, n), gen).to(torch.bfloat16)
    results = []
    for impl in ("moeq", "torchao"):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        if impl == "moeq":
            out = quantized_grouped_mm(a_, b_, offs, qtype="mxfp8", kernel="emulated")
        else:
            out = _to_mxfp8_then_scaled_grouped_mm(
                a_, b_.transpose(-2, -1), offs, kernel_preference=KernelPreference.EMULATED
            )
        results.append((out, *torch.autograd.grad(out, (a_, b_), grad_out)))
    # same quantized operands, same bf16 grouped GEMM: equal up to accumulation order,
    # i.e. at most one bf16 rounding step apart
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=2.0**-7, atol=1e-3 * theirs.abs().max().item())


@pytest.mark.parametrize("qtype", ["fp8", "mxfp8"])
def test_torch_compile_fullgraph_traces_emulated_path(qtype):
    gen = torch.Generator().manual_seed(12)
    offs = _offs([32, 0, 64])
    a = torch.randn(100, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(3, 32, 64, generator=gen).to(torch.bfloat16)

    def step(a, b, offs):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = quantized_grouped_mm(a, b, offs, qtype=qtype, kernel="emulated")
        return (out, *torch.autograd.grad(out.float().square().sum(), (a, b)))

    def fwd(a, b, offs):
        return quantized_grouped_mm(a, b, offs, qtype=qtype, kernel="emulated")

    compiled = torch.compile(fwd, fullgraph=True)
    a_c, b_c = a.clone().requires_grad_(), b.clone().requires_grad_()
    out_c = compiled(a_c, b_c, offs)
    grads_c = torch.autograd.grad(out_c.float().square().sum(), (a_c, b_c))
    for got, want in zip((out_c, *grads_c), step(a, b, offs)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- dispatch

def test_auto_selection_on_cpu():
    for qtype in ("fp8", "mxfp8"):
        names = dispatch.available_kernels(qtype, "cpu")
        assert "emulated" in names and "torch" not in names
        assert dispatch.select_kernel("auto", qtype, "cpu").name == names[0]
    assert dispatch.select_kernel("auto", "bf16", "cpu").name == "torch"  # plain torch._grouped_mm
    assert set(dispatch.kernel_names()) >= {"auto", "emulated", "torch"}


def test_named_kernel_that_cannot_run_raises_with_the_fix():
    with pytest.raises(RuntimeError, match=r"kernel='torch' cannot run fp8 on cpu.*kernel='emulated'"):
        dispatch.select_kernel("torch", "fp8", "cpu")
    with pytest.raises(ValueError, match=r"unknown grouped-GEMM kernel 'tirton'.*'emulated'"):
        dispatch.select_kernel("tirton", "fp8", "cpu")


@pytest.mark.parametrize("cap,qtype,ok", [((9, 0), "fp8", True), ((10, 0), "fp8", True), ((8, 0), "fp8", False),
                                         ((9, 0), "mxfp8", False), ((10, 0), "mxfp8", False)])
def test_torch_kernel_architecture_guard(cap, qtype, ok):
    dev = dispatch.DeviceInfo("cuda", 0, cap)  # a description: no GPU is touched
    if ok:
        assert dispatch.select_kernel("torch", qtype, dev).name == "torch"
        return
    with pytest.raises(RuntimeError, match=r"kernel='torch' cannot run .* kernel='emulated'") as err:
        dispatch.select_kernel("torch", qtype, dev)
    if qtype == "mxfp8" and cap[0] == 9:
        assert "crashes the CUDA context" in str(err.value)
    assert dispatch.choose_kernel("auto", qtype, dev).name == "emulated"
    with pytest.raises(RuntimeError, match="cannot run fp8 on cuda:0 .ROCm.: torch._scaled_grouped_mm needs an NVIDIA"):
        dispatch.select_kernel("torch", "fp8", dispatch.DeviceInfo("cuda", 0, (9, 4), hip=True))


def test_registered_kernel_wins_auto_by_priority(monkeypatch):
    calls = []

    def fwd(a, b, offs, qtype):
        calls.append("forward")
        return dispatch.get_kernel("emulated").forward(a, b, offs, qtype)

    emulated = dispatch.get_kernel("emulated")
    k = dispatch.GroupedMMKernel(
        name="test_fast", qtypes=frozenset({MXFP8}), forward=fwd, dgrad=emulated.dgrad,
        wgrad=emulated.wgrad, unsupported_reason=lambda q, d: None, priority=100,
    )
    monkeypatch.setitem(dispatch._REGISTRY, "test_fast", k)
    assert dispatch.select_kernel("auto", "mxfp8", "cpu").name == "test_fast"
    assert dispatch.select_kernel("auto", "fp8", "cpu").name == "emulated"
    a = torch.randn(32, 32, dtype=torch.bfloat16)
    b = torch.randn(1, 32, 32, dtype=torch.bfloat16)
    quantized_grouped_mm(a, b, _offs([32]), qtype="mxfp8")
    assert calls == ["forward"]
    with pytest.raises(ValueError, match="already registered"):
        dispatch.register_kernel(k)


# --------------------------------------------------------------------------- bad input

def _ok_inputs(qtype="mxfp8"):
    a = torch.randn(64, 64, dtype=torch.bfloat16)
    b = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    return a, b, _offs([32, 32])


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a, b, o: (a, b, o.long()), TypeError, "offs must be a 1D int32"),
        (lambda a, b, o: (a, b, o[None]), TypeError, "offs must be a 1D int32"),
        (lambda a, b, o: (a, b, o[:1]), ValueError, "offs has 1 entries but b has 2 experts"),
        (lambda a, b, o: (a.double(), b, o), TypeError, "a has dtype torch.float64"),
        (lambda a, b, o: (a[:, :48], b[..., :48], o), ValueError, r"K = a.shape\[1\] = b.shape\[2\] is 48, not a multiple of 32"),
        (lambda a, b, o: (a, b[:, :16], o), ValueError, r"N = b.shape\[1\] is 16, not a multiple of 32"),
        (lambda a, b, o: (a, b[..., :32], o), ValueError, "contraction dims differ"),
        (lambda a, b, o: (a[None], b, o), ValueError, "a must be 2D"),
        (lambda a, b, o: (a, b, _offs([32, 40])), ValueError, r"offs\[-1\] .* exceeds a.shape\[0\] = 64"),
        (lambda a, b, o: (a, b, torch.tensor([40, 32], dtype=torch.int32)), ValueError, "non-decreasing"),
        (lambda a, b, o: (a, b, torch.tensor([-1, 32], dtype=torch.int32)), ValueError, "non-negative"),
        (lambda a, b, o: (a, b, _offs([16, 48])), ValueError, "start at a multiple of 32 rows"),
        (lambda a, b, o: (a.index_fill(0, torch.tensor([3]), float("nan")), b, o), ValueError, "a contains NaN: "),
        (lambda a, b, o: (a, b.index_fill(0, torch.tensor([1]), float("inf")), o), ValueError, r"b contains Inf: a value beyond the range of torch.bfloat16"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, exc, pattern):
    a, b, offs = mutate(*_ok_inputs())
    with pytest.raises(exc, match=pattern):
        quantized_grouped_mm(a, b, offs, qtype="mxfp8")


def test_more_bad_inputs():
    a, b, offs = _ok_inputs()
    with pytest.raises(ValueError, match="unknown recipe 'fp4'"):
        quantized_grouped_mm(a, b, offs, qtype="fp4")
    with pytest.raises(TypeError, match="needs a and b of one dtype"):
        quantized_grouped_mm(a, b.float(), offs, qtype="bf16")
    with pytest.raises(ValueError, match="not a multiple of 16 as fp8 needs"):
        quantized_grouped_mm(a[:, :40], b[..., :40], offs, qtype="fp8")
    # fp8 needs 16-row alignment only; mixed dtypes are fine for quantized recipes
    out = quantized_grouped_mm(a, b.float(), _offs([16, 48]), qtype="fp8")
    assert out.dtype == torch.bfloat16
    # NaN in the incoming gradient is caught in backward
    a.requires_grad_()
    out = quantized_grouped_mm(a, b, offs, qtype="mxfp8")
    with pytest.raises(ValueError, match="grad_out .* contains NaN"):
        out.backward(torch.full_like(out, float("nan")))


# --------------------------------------------------------------------------- GPU

def _cuda_case(qtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    align = GROUP_ALIGNMENT[qtype] or max(v for v in GROUP_ALIGNMENT.values() if v)
    counts = [8 * align, 0, 20 * align, 3 * align, 0, 11 * align + 7]  # unaligned last end
    offs = _offs(counts).cuda()
    m, k, n = int(offs[-1]) + 13, 512, 768
    a = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    b = (torch.randn(len(counts), n, k, device="cuda", generator=gen) / math.sqrt(k)).to(torch.bfloat16)
    grad_out = torch.randn(m, n, device="cuda", generator=gen, dtype=torch.bfloat16)
    return a, b, grad_out, offs


def _fwd_bwd(a, b, grad_out, offs, **kw):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = quantized_grouped_mm(a, b, offs, **kw)
    return (out, *torch.autograd.grad(out, (a, b), grad_out))


@gpu
@needs_cuda
def test_gpu_torch_fp8_kernel_matches_emulated():
    if dispatch.get_kernel("torch").reason_unavailable(FP8, torch.device("cuda")) is not None:
        pytest.skip("torch._scaled_grouped_mm FP8 needs SM90/SM100")
    a, b, grad_out, offs = _cuda_case(FP8)
    got = _fwd_bwd(a, b, grad_out, offs, qtype="fp8", kernel="torch")
    emu = _fwd_bwd(a, b, grad_out, offs, qtype="fp8", kernel="emulated")
    end = int(offs[-1])
    for res in (got, emu):  # slack rows and empty groups (1 and 4) are zero
        assert torch.all(res[0][end:] == 0) and torch.all(res[1][end:] == 0)
        assert torch.all(res[2][1] == 0) and torch.all(res[2][4] == 0)
    ref = _grouped_ref(a.cpu(), b.cpu(), grad_out.cpu(), offs.cpu())
    for name, g, e, r in zip(("out", "grad_a", "grad_b"), got, emu, ref):
        rel_emu, rel_ref, rel_emu_ref = _rel(g.cpu(), e.cpu().double()), _rel(g.cpu(), r), _rel(e.cpu(), r)
        print(f"fp8 torch kernel {name}: vs emulated {rel_emu:.2e}, vs fp64 {rel_ref:.4f} (emulated {rel_emu_ref:.4f})")
        # same quantized operands: only accumulation (fast accum) and bf16 output rounding differ
        assert rel_emu < 5e-3
        assert rel_ref < REL_ERR_BOUND["gauss"]


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype,check_finite", [("bf16", None), ("fp8", None), ("mxfp8", None), ("fp8", True)])
def test_gpu_auto_path_is_sync_free(qtype, check_finite):
    a, b, grad_out, offs = _cuda_case(QuantizationType(qtype))
    kw = dict(qtype=qtype, check_finite=check_finite)
    _fwd_bwd(a, b, grad_out, offs, **kw)  # warm up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _fwd_bwd(a, b, grad_out, offs, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu
@needs_cuda
def test_gpu_mxfp8_torch_kernel_refuses_instead_of_crashing():
    if torch.cuda.get_device_capability()[0] >= 10:
        pytest.skip("the SM90 guard only")
    a, b, _, offs = _cuda_case(MXFP8)
    with pytest.raises(RuntimeError, match="kernel='torch' cannot run mxfp8"):
        quantized_grouped_mm(a, b, offs, qtype="mxfp8", kernel="torch")
    torch.cuda.synchronize()  # the context is still alive


@gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["torch", "emulated"])
def test_gpu_torch_compile_fullgraph(kernel):
    if dispatch.get_kernel(kernel).reason_unavailable(FP8, torch.device("cuda")) is not None:
        pytest.skip(f"{kernel} cannot run fp8 here")
    a, b, grad_out, offs = _cuda_case(FP8, seed=1)
    compiled = torch.compile(lambda a, b, o: quantized_grouped_mm(a, b, o, qtype="fp8", kernel=kernel), fullgraph=True)
    a_c, b_c = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = compiled(a_c, b_c, offs)
    got = (out, *torch.autograd.grad(out, (a_c, b_c), grad_out))
    eager = _fwd_bwd(a, b, grad_out, offs, qtype="fp8", kernel=kernel)
    for g, e in zip(got, eager):
        assert _rel(g.float().cpu(), e.double().cpu()) < 1e-2
