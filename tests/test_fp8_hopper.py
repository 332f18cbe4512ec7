"""Hopper FP8 experts: Triton quantization kernels and the ``fp8_swiglu_experts`` Function.

CPU: the Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess (the variable must
be set before triton is imported) on tiny sizes and are compared **bitwise** with their
plain-torch references in moeq/kernels/fp8_rowwise.py and with moeq/numerics/fp8_rowwise.py's
numerics; the autograd Function runs there too, its GEMMs replaced by a float64 emulation
of ``torch._scaled_grouped_mm`` (no CPU kernel exists) that also checks the operand layouts
through the op's meta function. GPU (``-m gpu``): the real GEMMs against float64, bitwise
kernels, torch.compile(fullgraph=True), no host syncs, the on-device layout check.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn
# The FP8 recipe's documented error bound for the whole SwiGLU experts (two chained e4m3
# GEMMs) vs float64, as in tests/test_convert.py ERROR_BOUND["fp8"] (measured 0.066-0.069
# here on the benchmark shapes, the same as torchao's FP8 rowwise).
FP8_SWIGLU_ERROR_BOUND = 0.1


def _run_interpreted(check: str, timeout: int = 600) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import tests.test_fp8_hopper as t; t.{check}()"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{check} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


# ------------------------------------------------------------------ shared helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_bitwise(got, want, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = _bits(got.contiguous()), _bits(want.contiguous())
    bad = (g != w).sum().item()
    assert bad == 0, f"{what}: {bad} of {g.numel()} elements differ bitwise"


def _valid_col(col: torch.Tensor, m: int) -> torch.Tensor:
    # an activation's column copy is (K, round_up(M, 16)); columns >= M are unspecified
    return col[:, :m] if col.dim() == 2 else col


def _assert_dual_bitwise(q, ref, what: str) -> None:
    for name in ("row", "row_inv", "col", "col_inv"):
        got, want = getattr(q, name), getattr(ref, name)
        if name == "col":
            got = _valid_col(got, want.shape[-1])
        _assert_bitwise(got, want, f"{what}.{name}")


def _assert_close_codes(got, want, what: str, max_frac: float = 5e-3) -> None:
    """e4m3 codes equal except a few adjacent ones (an exp() differing by an ulp)."""
    g, w = got.contiguous().view(torch.uint8).int(), want.contiguous().view(torch.uint8).int()
    diff = (g - w).abs()
    assert int(diff.max()) <= 1, f"{what}: codes differ by up to {int(diff.max())}"
    frac = (diff != 0).float().mean().item()
    assert frac <= max_frac, f"{what}: {frac:.2%} of codes differ"


def _random_layout(gen, num_groups: int, max_blocks: int, slack: int, align: int = 16):
    counts = torch.randint(0, max_blocks + 1, (num_groups,), generator=gen) * align
    if num_groups > 1:
        counts[int(torch.randint(0, num_groups, (1,), generator=gen))] = 0  # an empty group
    offs = counts.cumsum(0).to(torch.int32)
    return offs, int(offs[-1]) + slack


# ------------------------------------------------------------------ interpreted checks (subprocess)


def _check_scales_and_rounding() -> None:
    from moeq.kernels import fp8_rowwise as k
    from moeq.numerics.groups import zero_slack_rows
    from moeq.ops.slack_rows import zero_slack_rows_

    # 1) power-of-two scales on edge amax values, vs the reference and moeq.ops's numerics
    specials = [0.0, 1e-30, 1e-12, 1.1754944e-38, 2.0**-20, 1.0, 1.75, 1.7500001, 2.0, 3.4999998, 3.5, 447.99997,
                448.0, 448.00003, 449.0, 896.0, 1e6, 3.0e38]
    gen = torch.Generator().manual_seed(0)
    rand = torch.exp2(torch.rand(200, generator=gen) * 120 - 60) * (1 + torch.rand(200, generator=gen))
    pows = torch.exp2(torch.arange(-40, 41, dtype=torch.float32))
    amax = torch.cat([torch.tensor(specials), rand, pows, pows * 1.75, pows * 1.7500001]).float()
    x = torch.zeros(amax.numel(), 16, dtype=torch.float32)
    x[:, 3] = -amax
    x[:, 7] = amax * 0.37
    offs = torch.tensor([x.shape[0] // 16 * 16], dtype=torch.int32)
    q = k.quantize_dual(x, offs, colwise=False)
    ref_row, ref_inv = k.quantize_rowwise_reference(x)
    _assert_bitwise(q.row_inv, ref_inv, "row_inv on edge amax")
    _assert_bitwise(q.row, ref_row, "row data on edge amax")
    from moeq.numerics.fp8_rowwise import fp8_pow2_scale, fp8_rowwise_quantize

    _assert_bitwise(ref_inv, fp8_pow2_scale(amax), "reference vs moeq.ops fp8_pow2_scale")
    data, scale = fp8_rowwise_quantize(x, -1)
    _assert_bitwise(q.row, data, "kernel vs moeq.ops fp8_rowwise_quantize data")
    _assert_bitwise(q.row_inv, scale.squeeze(-1), "kernel vs moeq.ops fp8_rowwise_quantize scale")
    # 2) round-to-nearest-even onto the e4m3 grid: every code, every midpoint (ties), random
    # values, subnormals; one row with amax 448 so the scale is exactly 1
    codes = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()  # +0 .. 448
    mids = (codes[:-1] + codes[1:]) / 2
    vals = torch.cat([codes, mids, -codes, -mids, torch.randn(1000, generator=gen) * 30,
                      torch.rand(200, generator=gen) * 2.0**-6, torch.rand(64, generator=gen) * 2.0**-9])
    vals = vals.clamp(-448, 448)
    n = (vals.numel() + 15) // 16 * 16
    row = torch.zeros(n, dtype=torch.float32)
    row[: vals.numel()] = vals
    row[-1] = 448.0
    x = row.view(1, n).repeat(16, 1)
    q = k.quantize_dual(x, torch.tensor([16], dtype=torch.int32), colwise=False)
    _assert_bitwise(q.row_inv, torch.ones(16), "scale for amax 448")
    _assert_bitwise(q.row, x.to(FP8), "e4m3 rounding (ties to even, subnormals)")
    # 3) NaN / Inf poison the dequantization scale (never a silently finite result)
    x = torch.randn(32, 32, generator=gen)
    x[3, 5] = float("nan")
    x[20, 1] = float("inf")
    q = k.quantize_dual(x, torch.tensor([16, 32], dtype=torch.int32))
    assert torch.isnan(q.row_inv[3]) and torch.isnan(q.row_inv[20]), "NaN/Inf rows must get a NaN scale"
    assert torch.isfinite(q.row_inv[torch.arange(32) != 3][:19]).all()
    assert torch.isnan(q.col_inv[0, 5]) and torch.isnan(q.col_inv[1, 1]), "NaN/Inf columns must get a NaN scale"
    assert torch.isfinite(q.col_inv[0, :5]).all()
    # 4) the offs layout flag
    x = torch.randn(64, 16, generator=gen).bfloat16()
    for offs, ok in (([16, 48, 64], 1), ([0, 0, 64], 1), ([16, 40, 64], 0), ([32, 16, 64], 0), ([16, 48, 80], 0)):
        got = int(k.quantize_dual(x, torch.tensor(offs, dtype=torch.int32)).offs_ok)
        assert got == ok, f"offs_ok for {offs}: {got}, want {ok}"
    # 5) zero_slack_rows_
    y = torch.randn(70, 48, generator=gen).bfloat16()
    for end in (0, 16, 64, 70):
        offs = torch.tensor([min(end, 16), end], dtype=torch.int32)
        _assert_bitwise(zero_slack_rows_(y.clone(), offs), zero_slack_rows(y, offs), f"zero slack, end {end}")


def _check_dual_quant_random() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from moeq.kernels import fp8_rowwise as k
    from moeq.numerics.fp8_rowwise import fp8_per_group_colwise_quantize, fp8_rowwise_quantize

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(
        seed=st.integers(0, 2**31 - 1),
        num_groups=st.integers(1, 5),
        max_blocks=st.integers(0, 5),
        slack=st.sampled_from([0, 5, 16, 37]),
        width=st.sampled_from([16, 48, 160]),
        log_scale=st.floats(-20, 12),
        fp32=st.booleans(),
    )
    def check(seed, num_groups, max_blocks, slack, width, log_scale, fp32):
        gen = torch.Generator().manual_seed(seed)
        offs, m = _random_layout(gen, num_groups, max_blocks, slack)
        x = torch.randn(m, width, generator=gen) * 2.0**log_scale
        x = x * torch.exp2(torch.randint(-8, 8, (m, 1), generator=gen).float())  # rows of varied magnitude
        x = x if fp32 else x.bfloat16()
        q = k.quantize_dual(x, offs)
        _assert_dual_bitwise(q, k.quantize_dual_reference(x, offs), "quantize_dual")
        assert int(q.offs_ok) == 1
        data, scale = fp8_rowwise_quantize(x, -1)
        _assert_bitwise(q.row, data, "row vs moeq.ops")
        _assert_bitwise(q.row_inv, scale.squeeze(-1), "row scale vs moeq.ops")
        assert q.col.shape == (width, -(-m // 16) * 16), "token dim of the column copy padded to 16"
        data, scale = fp8_per_group_colwise_quantize(x, offs)
        _assert_bitwise(_valid_col(q.col, m), data.t(), "col vs moeq.ops")
        _assert_bitwise(q.col_inv, scale, "col scale vs moeq.ops")
        only_row = k.quantize_dual(x, offs, colwise=False)
        _assert_bitwise(only_row.row, q.row, "row without col")
        only_col = k.quantize_dual(x, offs, rowwise=False)
        _assert_bitwise(_valid_col(only_col.col, m), _valid_col(q.col, m), "col without row")

    check()

    # other tile configs (K-chunks per pass-A program, float32 transpose in pass B) are
    # bitwise the same function
    gen = torch.Generator().manual_seed(11)
    offs, m = _random_layout(gen, 3, 4, 21)
    x = torch.randn(m, 160, generator=gen).bfloat16()
    gate_up = torch.randn(m, 96, generator=gen).bfloat16()
    grad_h = torch.randn(m, 48, generator=gen).bfloat16()
    for tiles in (((16, 32, 4, 4), (32, 32, 4, 1)), ((32, 64, 4, 2), (16, 64, 4, 0))):
        for mode, src, aux in ((k.MODE_PLAIN, x, None), (k.MODE_SWIGLU, gate_up, None),
                               (k.MODE_SWIGLU_BWD, gate_up, grad_h)):
            want = k.dual_quantize_impl(mode, src, aux, offs, 3, True, True)
            got = k.dual_quantize_impl(mode, src, aux, offs, 3, True, True, tiles=tiles)
            for i, name in enumerate(("row", "row_inv", "col", "col_inv")):
                g, w = (got[i][:, :m], want[i][:, :m]) if name == "col" else (got[i], want[i])  # storage padding
                _assert_bitwise(g, w, f"mode {mode} tiles {tiles} {name}")
        w = torch.randn(2 * 48, 160, generator=gen).bfloat16()
        want = k.dual_quantize_impl(k.MODE_PLAIN, w, None, None, 2, True, True)
        got = k.dual_quantize_impl(k.MODE_PLAIN, w, None, None, 2, True, True, tiles=tiles)
        for i in range(4):
            _assert_bitwise(got[i], want[i], f"weight tiles {tiles} output {i}")

    @settings(max_examples=6, deadline=None, derandomize=True)
    @given(seed=st.integers(0, 2**31 - 1), e=st.integers(1, 3), n=st.sampled_from([16, 32, 80]),
           kdim=st.sampled_from([16, 144]))
    def check_weight(seed, e, n, kdim):
        gen = torch.Generator().manual_seed(seed)
        w = (torch.randn(e, n, kdim, generator=gen) * 0.02).bfloat16()
        q = k.quantize_weight(w)
        _assert_dual_bitwise(q, k.quantize_weight_reference(w), "quantize_weight")
        data, scale = fp8_rowwise_quantize(w, -2)
        _assert_bitwise(q.col.transpose(-2, -1), data, "weight col vs moeq.ops")
        _assert_bitwise(q.col_inv, scale.squeeze(-2), "weight col scale vs moeq.ops")

    check_weight()


def _check_swiglu_quant() -> None:
    from moeq.kernels import fp8_rowwise as k

    gen = torch.Generator().manual_seed(3)
    for hdim, slack in ((16, 0), (48, 21), (160, 16)):
        offs, m = _random_layout(gen, 3, 4, slack)
        gate_up = (torch.randn(m, 2 * hdim, generator=gen) * 3).bfloat16()
        grad_h = torch.randn(m, hdim, generator=gen).bfloat16()
        for what, q, ref in (
            ("swiglu", k.swiglu_quantize(gate_up, offs), k.swiglu_quantize_reference(gate_up, offs)),
            ("swiglu_bwd", k.swiglu_backward_quantize(gate_up, grad_h, offs),
             k.swiglu_backward_quantize_reference(gate_up, grad_h, offs)),
        ):
            # exp() may differ by an ulp between Triton and torch: scales equal, codes close
            _assert_bitwise(q.row_inv, ref.row_inv, f"{what}.row_inv")
            _assert_bitwise(q.col_inv, ref.col_inv, f"{what}.col_inv")
            _assert_close_codes(q.row, ref.row, f"{what}.row")
            _assert_close_codes(_valid_col(q.col, m), ref.col, f"{what}.col")
        only_row = k.swiglu_quantize(gate_up, offs, colwise=False)
        _assert_bitwise(only_row.row, k.swiglu_quantize(gate_up, offs).row, "swiglu row without col")


def emulated_scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, out_dtype=torch.bfloat16, use_fast_accum=False):
    """float64 emulation of ``torch._scaled_grouped_mm`` (2D x 3D and 2D x 2D) for CPU tests.

    The operands first go through the real op's meta function (dtypes, row-/column-major
    layouts, 16-byte strides, scale shapes) and the CUDA op's extra check that the
    contraction dims are multiples of 16. Rows of a 2D x 3D output outside every group
    are NaN, as uninitialized memory might be.
    """
    meta = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")  # noqa: E731
    torch._scaled_grouped_mm(meta(a), meta(b), meta(scale_a), meta(scale_b), offs=meta(offs),
                             out_dtype=out_dtype, use_fast_accum=use_fast_accum)
    # checks the CUDA op makes beyond its meta function (seen on an H100, torch 2.11)
    if a.shape[-1] % 16:
        raise ValueError(f"Expected trailing dimension of mat_a to be divisible by 16 but got mat1 shape: {tuple(a.shape)}")
    if b.shape[-2] % 16:
        raise ValueError(f"contraction dim of mat_b must be divisible by 16, got {tuple(b.shape)}")
    A, B = a.double(), b.double()
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        out = torch.full((a.shape[0], b.shape[-1]), float("nan"), dtype=torch.float64)
        for e, (s, t) in enumerate(zip(starts, ends)):
            out[s:t] = (A[s:t] * scale_a[s:t, None].double()) @ (B[e] * scale_b[e][None, :].double())
        return out.to(out_dtype)
    na, kb = a.shape[0], b.shape[1]
    out = torch.empty((len(ends), na, kb), dtype=torch.float64)
    for e, (s, t) in enumerate(zip(starts, ends)):
        sa = scale_a[e * na:(e + 1) * na, None].double()
        sb = scale_b[e * kb:(e + 1) * kb][None, :].double()
        out[e] = (A[:, s:t] * sa) @ (B[s:t] * sb)
    return out.to(out_dtype)


def _fake_quant_pipeline(x, gate_up, down, offs, gy):
    """float64 GEMMs on operands quantized with moeq.numerics.fp8_rowwise (bf16 GEMM outputs)."""
    from moeq.kernels.fp8_rowwise import swiglu_backward_reference, swiglu_reference
    from moeq.numerics.fp8_rowwise import fp8_per_group_colwise_fake_quantize as fqc
    from moeq.numerics.fp8_rowwise import fp8_rowwise_fake_quantize as fq

    ends = offs.tolist()
    starts = [0] + ends[:-1]

    def gmm(a, w):  # (M, K) x (E, N, K) -> (M, N)
        out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64)
        for e, (s, t) in enumerate(zip(starts, ends)):
            out[s:t] = a[s:t].double() @ w[e].double().t()
        return out

    def wg(g, a):
        return torch.stack([g[s:t].double().t() @ a[s:t].double() for s, t in zip(starts, ends)])

    rows = torch.arange(x.shape[0])[:, None] < ends[-1]
    xs, gys = torch.where(rows, x.float(), 0.0), torch.where(rows, gy.float(), 0.0)
    gu = gmm(fq(xs, -1), fq(gate_up.float(), -1)).to(torch.bfloat16)
    h = swiglu_reference(gu)
    y = gmm(fq(h, -1), fq(down.float(), -1))
    gh = gmm(fq(gys, -1), fq(down.float(), -2).transpose(-2, -1)).to(torch.bfloat16)
    dgu = swiglu_backward_reference(gu, gh)
    gx = gmm(fq(dgu, -1), fq(gate_up.float(), -2).transpose(-2, -1))
    return y, gx, wg(fqc(dgu, offs), fqc(xs, offs)), wg(fqc(gys, offs), fqc(h, offs))


def _float64_reference(x, gate_up, down, offs, gy):
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    hdim = down.shape[-1]
    x64 = x[: ends[-1]].double().requires_grad_()
    w1 = gate_up.detach().double().requires_grad_()
    w2 = down.detach().double().requires_grad_()
    ys = []
    for e, (s, t) in enumerate(zip(starts, ends)):
        gu = x64[s:t] @ w1[e].t()
        ys.append((F.silu(gu[:, :hdim]) * gu[:, hdim:]) @ w2[e].t())
    y = torch.cat(ys)
    y.backward(gy[: ends[-1]].double())
    return y.detach(), x64.grad, w1.grad, w2.grad


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check_function_emulated() -> None:
    from moeq.ops import fp8_hopper as fh

    fh._scaled_grouped_mm = emulated_scaled_grouped_mm
    gen = torch.Generator().manual_seed(5)
    num_groups, d, hdim = 4, 32, 48
    offs = torch.tensor([48, 48, 80, 128], dtype=torch.int32)  # expert 1 empty
    m = 141  # 13 slack rows
    x = torch.randn(m, d, generator=gen).bfloat16()
    x[128:] = float("nan")  # slack rows may hold anything
    gate_up = (torch.randn(num_groups, 2 * hdim, d, generator=gen) * 0.2).bfloat16().requires_grad_()
    down = (torch.randn(num_groups, d, hdim, generator=gen) * 0.2).bfloat16().requires_grad_()
    gy = torch.randn(m, d, generator=gen).bfloat16()
    xr = x.clone().requires_grad_()
    y = fh.fp8_swiglu_experts(xr, gate_up, down, offs)
    y.backward(gy)
    assert y.dtype == torch.bfloat16 and y.shape == (m, d)
    assert (y[128:] == 0).all() and (xr.grad[128:] == 0).all(), "slack rows of y / grad x must be zero"
    assert (gate_up.grad[1] == 0).all() and (down.grad[1] == 0).all(), "an empty expert gets zero weight grads"
    n = 128
    # same quantized operands as moeq.ops's numerics, float64 GEMMs: only bf16 output rounding differs
    fy, fgx, fgu, fgd = _fake_quant_pipeline(x, gate_up.detach(), down.detach(), offs, gy)
    for what, got, want in (("y", y[:n], fy[:n]), ("grad_x", xr.grad[:n], fgx[:n]),
                            ("grad_gate_up", gate_up.grad, fgu), ("grad_down", down.grad, fgd)):
        err = _rel(got, want)
        assert err < 1e-2, f"{what}: rel err {err:.3g} vs the fake-quant float64 pipeline"
    # and the quantization error itself vs the unquantized float64 math
    ry, rgx, rgu, rgd = _float64_reference(x, gate_up.detach(), down.detach(), offs, gy)
    for what, got, want in (("y", y[:n], ry), ("grad_x", xr.grad[:n], rgx), ("grad_gate_up", gate_up.grad, rgu),
                            ("grad_down", down.grad, rgd)):
        err = _rel(got, want)
        assert err < FP8_SWIGLU_ERROR_BOUND, f"{what}: rel err {err:.3g} vs float64"
    # only the gradients asked for; float32 master weights get float32 grads
    w32 = gate_up.detach().float().requires_grad_()
    y2 = fh.fp8_swiglu_experts(x, w32, down.detach(), offs)
    y2.backward(gy)
    assert w32.grad is not None and w32.grad.dtype == torch.float32
    assert _rel(w32.grad, gate_up.grad.float()) < 1e-2
    with torch.no_grad():
        y3 = fh.fp8_swiglu_experts(x, gate_up, down, offs)
    assert torch.equal(y3, y.detach())


def _routed_fake_quant_pipeline(tokens, ids, weights, gate_up, down, gout):
    """float64 GEMMs on moeq.numerics.fp8_rowwise-quantized operands with the routed block's
    numerics (routing weight on the down GEMM's rows, routing-weight gradient = grad_h . h).
    Returns (out, grad_tokens, grad_weights, grad_gate_up, grad_down)."""
    from moeq.kernels.fp8_rowwise import swiglu_backward_reference, swiglu_reference
    from moeq.ops.padding import permute_and_pad
    from moeq.numerics.fp8_rowwise import fp8_per_group_colwise_fake_quantize as fqc
    from moeq.numerics.fp8_rowwise import fp8_rowwise_fake_quantize as fq

    e = gate_up.shape[0]
    x, _, layout = permute_and_pad(tokens, ids, e, 16)
    offs = layout.padded_offsets
    src = layout.source_rows.long()
    w = torch.where(src >= 0, weights.reshape(-1).float()[src.clamp(min=0)], 0.0)
    g = torch.where((src >= 0)[:, None], gout.float()[(src // ids.shape[1]).clamp(min=0)], 0.0)
    ends = offs.tolist()
    starts = [0] + ends[:-1]

    def gmm(a, wt):
        out = torch.zeros(a.shape[0], wt.shape[1], dtype=torch.float64)
        for ex, (s0, t0) in enumerate(zip(starts, ends)):
            out[s0:t0] = a[s0:t0].double() @ wt[ex].double().t()
        return out

    def wg(a, b):
        return torch.stack([a[s0:t0].double().t() @ b[s0:t0].double() for s0, t0 in zip(starts, ends)])

    xs = x.float()
    gu = gmm(fq(xs, -1), fq(gate_up.float(), -1)).to(torch.bfloat16)
    h = swiglu_reference(gu)
    y = (w[:, None].double() * gmm(fq(h, -1), fq(down.float(), -1))).to(torch.bfloat16)
    gh = gmm(fq(g, -1), fq(down.float(), -2).transpose(-2, -1)).to(torch.bfloat16)
    dw_rows = (gh.double() * h.double()).sum(-1)
    dgu = swiglu_backward_reference(gu, gh.float() * w[:, None])
    gx = gmm(fq(dgu, -1), fq(gate_up.float(), -2).transpose(-2, -1))
    dest = layout.dest_rows.long().view(ids.shape)
    out = y.double()[dest].sum(1)
    return (out, gx[dest].sum(1), dw_rows[dest], wg(fqc(dgu, offs), fqc(xs, offs)),
            wg(fqc(g * w[:, None], offs), fqc(h, offs)))


def _routed_float64_reference(tokens, ids, weights, gate_up, down, gout):
    t64 = tokens.double().requires_grad_()
    w64 = weights.double().requires_grad_()
    w1, w2 = gate_up.double().requires_grad_(), down.double().requires_grad_()
    hdim = down.shape[-1]
    out = torch.zeros_like(t64)
    for ex in range(gate_up.shape[0]):
        tt, jj = (ids == ex).nonzero(as_tuple=True)
        if tt.numel():
            gu = t64[tt] @ w1[ex].t()
            yy = (F.silu(gu[:, :hdim]) * gu[:, hdim:]) @ w2[ex].t()
            out = out.index_add(0, tt, yy * w64[tt, jj, None])
    out.backward(gout.double())
    return out.detach(), t64.grad, w64.grad, w1.grad, w2.grad


def _check_routed_emulated() -> None:
    from moeq.ops import fp8_hopper as fh

    fh._scaled_grouped_mm = emulated_scaled_grouped_mm
    gen = torch.Generator().manual_seed(7)
    num_experts, d, hdim, tokens_n, k = 4, 32, 48, 40, 2
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens_n)])
    ids[ids == 1] = 2  # expert 1 gets no token
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], (ids[:, 0] + 1) % num_experts, ids[:, 1])
    ids[ids == 1] = 3
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], 0, ids[:, 1])
    weights = torch.softmax(torch.randn(tokens_n, k, generator=gen), -1).requires_grad_()
    tokens = torch.randn(tokens_n, d, generator=gen).bfloat16().requires_grad_()
    gate_up = (torch.randn(num_experts, 2 * hdim, d, generator=gen) * 0.2).bfloat16().requires_grad_()
    down = (torch.randn(num_experts, d, hdim, generator=gen) * 0.2).bfloat16().requires_grad_()
    gout = torch.randn(tokens_n, d, generator=gen).bfloat16()
    out = fh.fp8_routed_swiglu_experts(tokens, ids, weights, gate_up, down)
    out.backward(gout)
    got = (out.detach(), tokens.grad, weights.grad, gate_up.grad, down.grad)
    assert out.dtype == torch.bfloat16 and weights.grad.dtype == weights.dtype
    assert (gate_up.grad[1] == 0).all() and (down.grad[1] == 0).all(), "an expert without tokens gets zero grads"
    names = ("out", "grad_tokens", "grad_routing_weights", "grad_gate_up", "grad_down")
    fake = _routed_fake_quant_pipeline(tokens.detach(), ids, weights.detach(), gate_up.detach(), down.detach(), gout)
    for what, a, b in zip(names, got, fake):
        err = _rel(a, b)
        assert err < 1e-2, f"{what}: rel err {err:.3g} vs the routed fake-quant float64 pipeline"
    exact = _routed_float64_reference(tokens.detach(), ids, weights.detach(), gate_up.detach(), down.detach(), gout)
    for what, a, b in zip(names, got, exact):
        err = _rel(a, b)
        assert err < FP8_SWIGLU_ERROR_BOUND, f"{what}: rel err {err:.3g} vs float64"
    # what is kept for backward: no (M, D) bf16 tensor (the weighted combine's expert output)
    from moeq.ops.padding import padded_rows

    m_rows = padded_rows(tokens_n * k, num_experts, 16)
    kept = []
    leaves = {t.untyped_storage().data_ptr() for t in (tokens, weights, gate_up, down)}

    def pack(t):
        if t.untyped_storage().data_ptr() not in leaves:
            kept.append((tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fh.fp8_routed_swiglu_experts(tokens, ids, weights, gate_up, down)
    big = [k_ for k_ in kept if k_[:2] == ((m_rows, d), torch.bfloat16) and k_[2] >= m_rows * d * 2]
    assert not big, f"the routed block keeps an (M, D) bf16 tensor: {kept}"


# ------------------------------------------------------------------ CPU tests


def test_scales_rounding_nan_and_layout_flag_interpreted():
    _run_interpreted("_check_scales_and_rounding")


def test_dual_and_weight_quant_bitwise_interpreted():
    _run_interpreted("_check_dual_quant_random")


def test_swiglu_quant_interpreted():
    _run_interpreted("_check_swiglu_quant")


def test_routed_block_vs_references_interpreted():
    _run_interpreted("_check_routed_emulated")


def test_function_vs_references_emulated_gemm_interpreted():
    _run_interpreted("_check_function_emulated")


def _inputs(e=2, d=32, hdim=16, m=32, dtype=torch.bfloat16):
    x = torch.randn(m, d, dtype=dtype)
    return x, torch.randn(e, 2 * hdim, d, dtype=torch.bfloat16), torch.randn(e, d, hdim, dtype=torch.bfloat16), \
        torch.tensor([16, m], dtype=torch.int32)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: (a[0].float(), *a[1:]), TypeError, "bfloat16"),
        (lambda a: (a[0][:, :24].contiguous(), a[1][..., :24].contiguous(), a[2][:, :24].contiguous(), a[3]), ValueError,
         "multiples of 16"),
        (lambda a: (a[0], a[1], a[2][..., :8], a[3]), ValueError, "shapes do not match"),
        (lambda a: (a[0], a[1], a[2], a[3].long()), ValueError, "int32"),
        (lambda a: (a[0], a[1], a[2], a[3][:1]), ValueError, "int32"),
        (lambda a: (a[0][None], *a[1:]), ValueError, "2D"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, exc, match):
    from moeq.ops.fp8_hopper import fp8_swiglu_experts

    with pytest.raises(exc, match=match):
        fp8_swiglu_experts(*mutate(_inputs()))


# ------------------------------------------------------------------ GPU tests

_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper (SM90) GPU"
)


def _gpu_case(seed=0, e=8, d=512, hdim=256, blocks=24, slack=40):
    gen = torch.Generator().manual_seed(seed)
    offs, m = _random_layout(gen, e, blocks, slack)
    x = torch.randn(m, d, generator=gen).bfloat16()
    gate_up = (torch.randn(e, 2 * hdim, d, generator=gen) * 0.05).bfloat16()
    down = (torch.randn(e, d, hdim, generator=gen) * 0.05).bfloat16()
    gy = torch.randn(m, d, generator=gen).bfloat16()
    return x, gate_up, down, offs, gy


def _run_gpu(fn, x, gate_up, down, offs, gy):
    xr = x.cuda().requires_grad_()
    w1 = gate_up.cuda().requires_grad_()
    w2 = down.cuda().requires_grad_()
    y = fn(xr, w1, w2, offs.cuda())
    y.backward(gy.cuda())
    return [t.detach().cpu() for t in (y, xr.grad, w1.grad, w2.grad)]


@pytest.mark.gpu
@_hopper
def test_gpu_kernels_match_references():
    from moeq.kernels import fp8_rowwise as k

    x, gate_up, down, offs, gy = _gpu_case(1)
    xc, oc = x.cuda(), offs.cuda()
    _assert_dual_bitwise(k.Fp8Dual(*[t.cpu() for t in k.quantize_dual(xc, oc)[:4]]),
                         k.quantize_dual_reference(x, offs), "quantize_dual (GPU)")
    _assert_dual_bitwise(k.Fp8Dual(*[t.cpu() for t in k.quantize_weight(gate_up.cuda())[:4]]),
                         k.quantize_weight_reference(gate_up), "quantize_weight (GPU)")
    gu = (torch.randn(x.shape[0], gate_up.shape[1]) * 2).bfloat16()
    gh = torch.randn(x.shape[0], gate_up.shape[1] // 2).bfloat16()
    for what, q, ref in (
        ("swiglu", k.swiglu_quantize(gu.cuda(), oc), k.swiglu_quantize_reference(gu, offs)),
        ("swiglu_bwd", k.swiglu_backward_quantize(gu.cuda(), gh.cuda(), oc),
         k.swiglu_backward_quantize_reference(gu, gh, offs)),
    ):
        q = k.Fp8Dual(*[t.cpu() for t in q[:4]])
        # Triton's exp is not torch's: allow adjacent codes on a few elements, scales off by
        # at most one power of two where an amax sits on a boundary
        _assert_close_codes(q.row, ref.row, f"{what}.row (GPU)", max_frac=1e-2)
        _assert_close_codes(_valid_col(q.col, x.shape[0]), ref.col, f"{what}.col (GPU)", max_frac=1e-2)
        for name in ("row_inv", "col_inv"):
            ratio = getattr(q, name) / getattr(ref, name)
            assert ((ratio == 1) | (ratio == 2) | (ratio == 0.5)).all(), f"{what}.{name}"
            assert (ratio == 1).float().mean() > 0.99, f"{what}.{name}"


@pytest.mark.gpu
@_hopper
def test_gpu_matches_fake_quant_and_float64():
    from moeq.ops.fp8_hopper import fp8_swiglu_experts

    x, gate_up, down, offs, gy = _gpu_case(2)
    x[int(offs[-1]):] = float("nan")
    y, gx, ggu, gd = _run_gpu(fp8_swiglu_experts, x, gate_up, down, offs, gy)
    n = int(offs[-1])
    assert (y[n:] == 0).all() and (gx[n:] == 0).all()
    fy, fgx, fgu, fgd = _fake_quant_pipeline(x, gate_up, down, offs, gy)
    ry, rgx, rgu, rgd = _float64_reference(x, gate_up, down, offs, gy)
    for what, got, fake, ref in (("y", y[:n], fy[:n], ry), ("grad_x", gx[:n], fgx[:n], rgx),
                                 ("grad_gate_up", ggu, fgu, rgu), ("grad_down", gd, fgd, rgd)):
        assert _rel(got, fake) < 2e-2, f"{what}: {_rel(got, fake):.3g} vs fake-quant float64"
        assert _rel(got, ref) < FP8_SWIGLU_ERROR_BOUND, f"{what}: {_rel(got, ref):.3g} vs float64"


@pytest.mark.gpu
@_hopper
def test_gpu_compile_fullgraph_matches_eager():
    from moeq.ops.fp8_hopper import fp8_swiglu_experts

    x, gate_up, down, offs, gy = _gpu_case(3)
    eager = _run_gpu(fp8_swiglu_experts, x, gate_up, down, offs, gy)
    torch._dynamo.reset()
    compiled = _run_gpu(torch.compile(fp8_swiglu_experts, fullgraph=True), x, gate_up, down, offs, gy)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.gpu
@_hopper
def test_gpu_no_host_sync():
    from moeq.ops.fp8_hopper import fp8_swiglu_experts

    x, gate_up, down, offs, gy = _gpu_case(4)
    _run_gpu(fp8_swiglu_experts, x, gate_up, down, offs, gy)  # warm up (compiles kernels)
    xr = x.cuda().requires_grad_()
    w1, w2, oc, gyc = gate_up.cuda().requires_grad_(), down.cuda().requires_grad_(), offs.cuda(), gy.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp8_swiglu_experts(xr, w1, w2, oc).backward(gyc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@_hopper
def test_gpu_bad_offsets_fail_on_device():
    code = (
        "import torch; from moeq.ops.fp8_hopper import fp8_swiglu_experts\n"
        "x = torch.randn(64, 32, device='cuda', dtype=torch.bfloat16)\n"
        "gu = torch.randn(2, 32, 32, device='cuda', dtype=torch.bfloat16)\n"
        "dn = torch.randn(2, 32, 16, device='cuda', dtype=torch.bfloat16)\n"
        "y = fp8_swiglu_experts(x, gu, dn, torch.tensor([24, 64], device='cuda', dtype=torch.int32))\n"
        "torch.cuda.synchronize()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, "misaligned offs must fail"
    assert "assert" in (r.stderr + r.stdout).lower()


@pytest.mark.gpu
@_hopper
def test_gpu_routed_block():
    """The routed FP8 block on the GPU: vs the routed fake-quant pipeline and float64,
    torch.compile(fullgraph=True) equal to eager, no host sync."""
    from moeq.ops.fp8_hopper import fp8_routed_swiglu_experts

    gen = torch.Generator().manual_seed(11)
    num_experts, d, hdim, tokens_n, k = 8, 256, 128, 512, 2
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens_n)])
    weights = torch.softmax(torch.randn(tokens_n, k, generator=gen), -1)
    tokens = torch.randn(tokens_n, d, generator=gen).bfloat16()
    gate_up = (torch.randn(num_experts, 2 * hdim, d, generator=gen) / d**0.5).bfloat16()
    down = (torch.randn(num_experts, d, hdim, generator=gen) / hdim**0.5).bfloat16()
    gout = torch.randn(tokens_n, d, generator=gen).bfloat16()

    def run(fn):
        leaves = [t.cuda().requires_grad_() for t in (tokens, weights, gate_up, down)]
        out = fn(leaves[0], ids.cuda(), leaves[1], leaves[2], leaves[3])
        out.backward(gout.cuda())
        return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]

    got = run(fp8_routed_swiglu_experts)
    fake = _routed_fake_quant_pipeline(tokens, ids, weights, gate_up, down, gout)
    exact = _routed_float64_reference(tokens, ids, weights, gate_up, down, gout)
    for what, a, f, r in zip(("out", "tokens", "weights", "gate_up", "down"), got, fake, exact):
        assert _rel(a, f) < 2e-2, f"{what}: {_rel(a, f):.3g} vs routed fake-quant float64"
        assert _rel(a, r) < FP8_SWIGLU_ERROR_BOUND, f"{what}: {_rel(a, r):.3g} vs float64"
    torch._dynamo.reset()
    compiled = run(torch.compile(fp8_routed_swiglu_experts, fullgraph=True))
    for a, b in zip(got, compiled):
        assert torch.equal(a, b)
    leaves = [t.cuda().requires_grad_() for t in (tokens, weights, gate_up, down)]
    idc, gc = ids.cuda(), gout.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp8_routed_swiglu_experts(leaves[0], idc, leaves[1], leaves[2], leaves[3]).backward(gc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
