"""Single-read FP8 strip passes (kernels/fp8_strips.py): bitwise against the two-pass kernels
and the plain-torch references.

CPU: under ``TRITON_INTERPRET=1`` in a subprocess, every source mode (plain, SwiGLU,
SwiGLU backward), both copies alone and together, random layouts with empty groups,
slack rows, row counts that are not multiples of 16 and a NaN; weights; the routed-block
extras (routing-weighted column copy, weighted SwiGLU backward and its routing-weight
gradient). GPU (``-m gpu``): the compiled kernels (hardware e4m3 cast) against the same
references.
"""
from __future__ import annotations


import pytest
import torch

from tests.interpreted import run_interpreted

FP8 = torch.float8_e4m3fn


def _run_interpreted(check: str) -> None:
    run_interpreted("test_fp8_strips", check)


def _bits(t):
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == FP8 else t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same(got, want, m_cols, what):
    """Fp8Dual-like tuples bitwise equal; an activation's column copy only in its first M columns."""
    for i, name in enumerate(("row", "row_inv", "col", "col_inv")):
        a, b = got[i], want[i]
        if name == "col" and m_cols is not None and a.dim() == 2:
            a, b = a[:, :m_cols], b[:, :m_cols]
        assert a.shape == b.shape, f"{what}.{name}: {tuple(a.shape)} != {tuple(b.shape)}"
        bad = int((_bits(a) != _bits(b)).sum())
        assert bad == 0, f"{what}.{name}: {bad} of {a.numel()} elements differ"


def _cases(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    for counts, slack in (([16, 0, 48, 32], 21), ([0, 0, 16, 0], 5), ([64, 16, 0, 0], 0)):
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        m = int(offs[-1]) + slack
        yield gen, offs.to(device), m


def check_strips_match_two_pass(device="cpu") -> None:
    from moeq.kernels import fp8_rowwise as k
    from moeq.kernels import fp8_strips as s

    for gen, offs, m in _cases(device):
        for mode, width in ((k.MODE_PLAIN, 96), (k.MODE_SWIGLU, 96), (k.MODE_SWIGLU_BWD, 96)):
            src = (torch.randn(m, width, generator=gen) * 3).bfloat16().to(device)
            if mode == k.MODE_PLAIN and m > 3:
                src[3, 5] = float("nan")
            aux = torch.randn(m, width // 2, generator=gen).bfloat16().to(device) if mode == k.MODE_SWIGLU_BWD else None
            for want_row, want_col in ((True, True), (True, False), (False, True)):
                want = k.dual_quantize_impl(mode, src, aux, offs, offs.numel(), want_row, want_col)
                got = s._dual_quantize_strips_impl(mode, src, aux, offs, offs.numel(), want_row, want_col)
                _assert_same(got, want, m, f"mode {mode} row={want_row} col={want_col} m={m}")
                assert torch.equal(got[4], want[4]), "offs_ok flag"
            if want_col:  # the column copy transposed as float32 instead of as e4m3 bytes
                got = s._dual_quantize_strips_impl(mode, src, aux, offs, offs.numel(), False, True,
                                                   tiles=((64, 1), (16, 32, 1, True)))
                _assert_same(got, want, m, f"mode {mode} float32 transpose")
    w = torch.randn(3, 48, 80, generator=gen).bfloat16().to(device)
    ref = k.quantize_weight_reference(w.cpu())
    row, row_inv = s.quantize_weight_rows(w)
    col, col_inv = s.quantize_weight_cols(w)
    _assert_same((row.cpu(), row_inv.cpu(), col.cpu(), col_inv.cpu()), ref, None, "weight")


def check_routed_extras(device="cpu") -> None:
    from moeq.kernels import fp8_strips as s

    for gen, offs, m in _cases(device):
        w = torch.rand(m, generator=gen).to(device)
        x = (torch.randn(m, 48, generator=gen) * 2).bfloat16().to(device)
        got = s.quantize_dual_strips(x, offs, row_weights=w, weight_col_copy=True)
        want = s.quantize_dual_weighted_reference(x.cpu(), offs.cpu(), w.cpu())
        _assert_same([t.cpu() for t in got[:4]], want, m, "weighted grad_y copies")
        for hdim in (32, 96):  # rows in one tile, and in two sweeps (interpreter tile width 64)
            gu = torch.randn(m, 2 * hdim, generator=gen).bfloat16().to(device)
            gh = torch.randn(m, hdim, generator=gen).bfloat16().to(device)
            got, dw = s.swiglu_backward_quantize_strips(gu, gh, offs, row_weights=w)
            want, want_dw = s.swiglu_backward_weighted_reference(gu.cpu(), gh.cpu(), offs.cpu(), w.cpu())
            _assert_same([t.cpu() for t in got[:4]], want, m, f"weighted SwiGLU backward copies (H={hdim})")
            err = float((dw.cpu() - want_dw).abs().max() / want_dw.abs().max())
            assert err < 1e-5, f"routing-weight gradient (H={hdim}): rel err {err:.3g}"
        # without weights: the plain SwiGLU backward of the two-pass kernels
        plain, none = s.swiglu_backward_quantize_strips(gu, gh, offs)
        assert none is None


def test_strips_bitwise_two_pass_interpreted():
    _run_interpreted("check_strips_match_two_pass")


def test_routed_extras_interpreted():
    _run_interpreted("check_routed_extras")


def test_bad_row_weights_raise():
    from moeq.kernels import fp8_strips as s

    x = torch.zeros(16, 16, dtype=torch.bfloat16)
    offs = torch.tensor([16], dtype=torch.int32)
    with pytest.raises(ValueError, match="row_weights must be a contiguous \\(16,\\) float32"):
        s.quantize_dual_strips(x, offs, row_weights=torch.ones(8), weight_col_copy=True)
    with pytest.raises(ValueError, match="weight must be 3D"):
        s.quantize_weight_rows(torch.zeros(16, 16))


_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper (SM90) GPU"
)


@pytest.mark.gpu
@_hopper
def test_gpu_strips_match_references():
    """The compiled kernels (hardware e4m3 cast, GPU exp) against the two-pass kernels on
    the GPU and, for the plain mode, the CPU references bitwise."""
    from moeq.kernels import fp8_rowwise as k
    from moeq.kernels import fp8_strips as s

    check_strips_match_two_pass("cuda")
    for gen, offs, m in _cases():
        x = (torch.randn(m, 96, generator=gen) * 3).bfloat16()
        got = s.quantize_dual_strips(x.cuda(), offs.cuda())
        _assert_same([t.cpu() for t in got[:4]], k.quantize_dual_reference(x, offs), m, "plain vs CPU reference (GPU)")
    w = torch.randn(4, 64, 96).bfloat16()
    row, row_inv = s.quantize_weight_rows(w.cuda())
    ref = k.quantize_weight_reference(w)
    assert torch.equal(_bits(row.cpu()), _bits(ref.row)) and torch.equal(row_inv.cpu(), ref.row_inv)
