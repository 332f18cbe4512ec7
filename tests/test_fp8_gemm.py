"""moeq's own FP8 grouped GEMMs (kernels/fp8_gemm.py) against their plain-torch references.

CPU: the Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess on small shapes
(several row / column / contraction tiles, empty experts, slack rows, a partial last
token step) and must match the float32 references to fp32 summation order; bf16 outputs
must be the reference's round-to-nearest. GPU (``-m gpu``, Hopper): the compiled kernels
against ``torch._scaled_grouped_mm`` on the same FP8 operands and against the references.
"""
from __future__ import annotations


import pytest
import torch

from tests.interpreted import run_interpreted

FP8 = torch.float8_e4m3fn


def _run_interpreted(check: str) -> None:
    run_interpreted("test_fp8_gemm", check)


def _pow2(shape, gen, lo=-4, hi=4):
    return torch.exp2(torch.randint(lo, hi, shape, generator=gen).float())


def _fp8(shape, gen, scale=4.0):
    return (torch.randn(*shape, generator=gen) * scale).to(FP8)


def _mx_operands(gen, rows, k):
    # per-32 factors that differ between slices, so a kernel applying one factor per row
    # (or the wrong slice's) cannot pass
    return _fp8((rows, k), gen), _pow2((rows, k // 32), gen, -6, 6)


def _check_close(got, want, what, rtol=1e-5):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))
    assert err < rtol, f"{what}: rel err {err:.3g}"


def _layouts():
    # (counts per expert, slack rows): empty experts, a group spanning several row tiles,
    # groups smaller than a tile, slack rows past the last group
    return [([16, 0, 96, 32], 21), ([0, 0, 48, 0], 0), ([64, 16, 0, 0, 16], 16), ([160], 3)]


def _check_m_grouped() -> None:
    from moeq.kernels import fp8_gemm as g

    gen = torch.Generator().manual_seed(0)
    n, k = 96, 96  # 2 column tiles of 64, 3 contraction steps of 32
    for counts, slack in _layouts():
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        e, m = len(counts), int(offs[-1]) + slack
        a, b = _fp8((m, k), gen), _fp8((e, n, k), gen)
        sa, sb = _pow2((m,), gen), _pow2((e, n), gen)
        for tma in (False, True):
            cfg = g.GemmConfig(32, 64, 32, 1, 1, tma)
            for dt in (torch.float32, torch.bfloat16):
                got = g.grouped_mm(a, b, sa, sb, offs, out_dtype=dt, config=cfg)
                want = g.grouped_mm_reference(a, b, sa, sb, offs, out_dtype=torch.float32)
                end = int(offs[-1])
                assert (got[end:] == 0).all(), f"slack rows must be zero ({counts}, tma={tma})"
                if dt == torch.float32:
                    _check_close(got[:end], want[:end], f"rowwise fp32 {counts} tma={tma}")
                else:
                    # round-to-nearest of (nearly) the same fp32 values: at most one bf16 ulp apart
                    ulp = torch.where(want == 0, 0, 2.0 ** (torch.floor(torch.log2(want.abs().clamp(min=1e-30))) - 7))
                    assert ((got.float() - want).abs() <= ulp + 1e-30).all(), f"bf16 rounding {counts} tma={tma}"
            # MX32: one product per 32-wide slice, each with its own pair of factors
            am, sam = _mx_operands(gen, m, k)
            bm = _fp8((e, n, k), gen)
            sbm = _pow2((e, n, k // 32), gen, -6, 6)
            got = g.grouped_mm(am, bm, sam, sbm, offs, scale_mode=g.SCALE_MX32, out_dtype=torch.float32,
                               config=g.GemmConfig(32, 64, 32, 1, 1, tma))
            want = g.grouped_mm_reference(am, bm, sam, sbm, offs, scale_mode=g.SCALE_MX32, out_dtype=torch.float32)
            _check_close(got[: int(offs[-1])], want[: int(offs[-1])], f"mx32 {counts} tma={tma}")


def _check_k_grouped() -> None:
    from moeq.kernels import fp8_gemm as g

    gen = torch.Generator().manual_seed(1)
    n, ko = 80, 48
    for counts, slack in _layouts():
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        e = len(counts)
        length = -(-(int(offs[-1]) + slack) // 16) * 16
        a, b = _fp8((n, length), gen), _fp8((ko, length), gen)
        sa, sb = _pow2((e, n), gen), _pow2((e, ko), gen)
        for cfg in (g.GemmConfig(32, 32, 32, 1, 1, False), g.GemmConfig(32, 32, 64, 1, 1, True)):
            got = g.grouped_mm_wgrad(a, b, sa, sb, offs, out_dtype=torch.float32, config=cfg)
            want = g.grouped_mm_wgrad_reference(a, b, sa, sb, offs, out_dtype=torch.float32)
            _check_close(got, want, f"wgrad {counts} {cfg}")
            for ex, c in enumerate(counts):
                if c == 0:
                    assert (got[ex] == 0).all(), "an expert without tokens gets a zero gradient"
        if e > 1 and counts[0] and counts[1]:
            # a non-finite value in the next group's tokens must not reach this expert
            a2 = a.clone()
            a2[:, int(offs[0])] = float("nan")
            got = g.grouped_mm_wgrad(a2, b, sa, sb, offs, out_dtype=torch.float32, config=g.GemmConfig(32, 32, 64, 1, 1, True))
            assert torch.isfinite(got[0]).all(), "NaN leaked from expert 1's tokens into expert 0"
        # MX32 along tokens (groups at multiples of 32)
        offs32 = torch.tensor([32, 32, 96], dtype=torch.int32)
        a3, b3 = _fp8((n, 96), gen), _fp8((ko, 96), gen)
        s3a, s3b = _pow2((n, 3), gen, -6, 6), _pow2((ko, 3), gen, -6, 6)
        got = g.grouped_mm_wgrad(a3, b3, s3a, s3b, offs32, scale_mode=g.SCALE_MX32, out_dtype=torch.float32,
                                 config=g.GemmConfig(32, 32, 32, 1, 1, False))
        want = g.grouped_mm_wgrad_reference(a3, b3, s3a, s3b, offs32, scale_mode=g.SCALE_MX32, out_dtype=torch.float32)
        _check_close(got, want, "wgrad mx32")


def test_m_grouped_gemm_matches_reference_interpreted():
    _run_interpreted("_check_m_grouped")


def test_k_grouped_gemm_matches_reference_interpreted():
    _run_interpreted("_check_k_grouped")


def test_shape_mismatch_raises():
    from moeq.kernels import fp8_gemm as g

    a = torch.zeros(16, 32, dtype=FP8)
    with pytest.raises(ValueError, match="contraction dims differ"):
        g.grouped_mm(a, torch.zeros(2, 16, 48, dtype=FP8), torch.ones(16), torch.ones(2, 16),
                     torch.tensor([8, 16], dtype=torch.int32))
    with pytest.raises(ValueError, match="token dims differ"):
        g.grouped_mm_wgrad(torch.zeros(16, 32, dtype=FP8), torch.zeros(8, 48, dtype=FP8), torch.ones(2, 16),
                           torch.ones(2, 8), torch.tensor([16, 32], dtype=torch.int32))


_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper (SM90) GPU"
)


@pytest.mark.gpu
@_hopper
def test_gpu_gemms_match_torch_scaled_grouped_mm():
    from moeq.kernels import fp8_gemm as g

    gen = torch.Generator().manual_seed(2)
    counts = torch.tensor([256, 0, 512, 48, 1024, 16])
    offs = counts.cumsum(0).to(torch.int32).cuda()
    e, m, n, k = 6, int(counts.sum()) + 40, 512, 384
    a, b = _fp8((m, k), gen).cuda(), _fp8((e, n, k), gen).cuda()
    sa, sb = _pow2((m,), gen).cuda(), _pow2((e, n), gen).cuda()
    end = int(offs[-1])
    want = torch._scaled_grouped_mm(a, b.transpose(-2, -1), sa, sb, offs=offs, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)
    for tma in (False, True):
        got = g.grouped_mm(a, b, sa, sb, offs, config=g.GemmConfig(128, 256, 128, 8, 3, tma))
        _check_close(got[:end], want[:end], f"vs torch tma={tma}", rtol=2e-3)
        assert (got[end:] == 0).all()
    # Hopper's FP8 tensor cores add each 32-wide product with fewer fraction bits than an
    # fp32 add (the fast accumulation torch's kernel also uses: moeq's output equals it
    # bitwise above); against an fp32 reference that is a few 1e-4 relative.
    ref = g.grouped_mm_reference(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), offs.cpu(), out_dtype=torch.float32)
    _check_close(g.grouped_mm(a, b, sa, sb, offs, out_dtype=torch.float32)[:end].cpu(), ref[:end], "vs reference",
                 rtol=2e-3)
    # weight gradient
    length = -(-m // 16) * 16
    ac, bc = _fp8((n, length), gen).cuda(), _fp8((k, length), gen).cuda()
    sae, sbe = _pow2((e, n), gen).cuda(), _pow2((e, k), gen).cuda()
    got = g.grouped_mm_wgrad(ac, bc, sae, sbe, offs, out_dtype=torch.float32)
    ref = g.grouped_mm_wgrad_reference(ac.cpu(), bc.cpu(), sae.cpu(), sbe.cpu(), offs.cpu(), out_dtype=torch.float32)
    _check_close(got.cpu(), ref, "wgrad vs reference", rtol=2e-3)
