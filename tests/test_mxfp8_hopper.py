"""MXFP8 on Hopper: fake-quant kernels vs their references, and the experts' autograd
function vs torchao's emulated MXFP8 grouped GEMM.

The Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be
set before triton is imported, and must not leak into other tests).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeq.kernels import mxfp8_hopper as K
from moeq.ops import mxfp8_hopper as Q
from moeq.numerics.mxfp8 import mxfp8_fake_quantize
from moeq.ops.mxfp8_hopper import mxfp8_swiglu_experts
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType

ALIGN = GROUP_ALIGNMENT[QuantizationType.MXFP8]
REPO = Path(__file__).resolve().parents[1]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, treating any NaN as equal to any NaN (payloads may differ)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    ia = a.masked_fill(na, 0).view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.masked_fill(nb, 0).view(torch.int16 if b.element_size() == 2 else torch.int32)
    return torch.equal(ia, ib)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess)
# --------------------------------------------------------------------------------------

_INTERPRETER_SCRIPT = r"""
import json, torch
from moeq.kernels import mxfp8_hopper as K
from moeq.ops import mxfp8_hopper as Q
from tests.test_mxfp8_hopper import _same_bits

torch.manual_seed(0)
out = {}

def spread(shape, dtype=torch.bfloat16):
    # values over ~40 binades, so blocks see subnormal e4m3 results and varied scales
    return (torch.randn(shape) * torch.exp2(torch.randint(-20, 20, shape).float())).to(dtype)

# 2D with groups: empty group, last group ends off a multiple of 32, slack rows with NaN
x = spread((100, 96))
x[3, 5] = float("nan"); x[40, 70] = float("inf"); x[64:96, 32:64] = 0; x[70, 0:32] = 1e-37
x[90:] = float("nan")
offs = torch.tensor([32, 32, 64, 90], dtype=torch.int32)
r, c = K.mxfp8_fake_quant_2d(x, offs)
rr, cr = K.fake_quant_2d_reference(x, offs)
out["2d_offs_rows"], out["2d_offs_cols"] = _same_bits(r, rr), _same_bits(c, cr)
out["2d_slack_zero"] = bool((r[90:] == 0).all() and (c[90:] == 0).all())
r1, c1 = K.mxfp8_fake_quant_2d(x, offs, cols=False)
r2, c2 = K.mxfp8_fake_quant_2d(x, offs, rows=False)
out["2d_one_copy"] = c1 is None and r2 is None and _same_bits(r1, rr) and _same_bits(c2, cr)

# 2D, no offsets, fp32 input, row count not a multiple of 32 or of the tile
xf = spread((70, 160), torch.float32)
r, c = K.mxfp8_fake_quant_2d(xf)
rr, cr = K.fake_quant_2d_reference(xf)
out["2d_fp32_rows"], out["2d_fp32_cols"] = _same_bits(r, rr), _same_bits(c, cr)

# 3D weight along K and N
w = spread((3, 64, 96))
a, b = K.mxfp8_fake_quant_weight(w)
ar, br = K.fake_quant_weight_reference(w)
out["weight_k"], out["weight_n"] = _same_bits(a, ar), _same_bits(b, br)

# SwiGLU forward / backward fused with fake-quant
gu = (torch.randn(100, 192) * 4).to(torch.bfloat16)
gu[95:] = float("nan")
h = K.mxfp8_swiglu_fake_quant(gu, offs)
hr = K.swiglu_fake_quant_reference(gu, offs)
out["swiglu_rows"], out["swiglu_cols"] = _same_bits(h[0], hr[0]), _same_bits(h[1], hr[1])
dh = spread((100, 96))
d = K.mxfp8_swiglu_backward_fake_quant(dh, gu, offs)
dr = K.swiglu_backward_fake_quant_reference(dh, gu, offs)
out["swiglu_bwd_rows"], out["swiglu_bwd_cols"] = _same_bits(d[0], dr[0]), _same_bits(d[1], dr[1])
out["swiglu_slack_zero"] = bool((h[0][90:] == 0).all() and (d[1][90:] == 0).all())

# permute-and-pad fused with fake-quant: == fake-quant of the padded rows
from moeq.kernels import padding as KP
ids = torch.stack([torch.randperm(5)[:2] for _ in range(37)])
ids[:9] = torch.tensor([0, 3])  # a crowded expert; expert 4 may get few or none
toks = spread((37, 64))
prow = 37 * 2 + 5 * 31 + 31
prow = (prow + 31) // 32 * 32
counts_r, offs_r, _, dest_r, src_r = KP.route_reference(ids, 5, 32, prow)
pr, pc = K.mxfp8_permute_fake_quant(toks, src_r, 2, offs_r)
qr, qc = K.permute_fake_quant_reference(toks, src_r, 2, offs_r)
padded_r = KP.pad_rows_reference(toks, counts_r, 32, prow, src_r, 2)
fr, fc = K.fake_quant_2d_reference(padded_r, offs_r)
out["permute_fq_rows"] = _same_bits(pr, qr) and _same_bits(qr, fr)
out["permute_fq_cols"] = _same_bits(pc, qc) and _same_bits(qc, fc)

# zero_slack_rows_
o = torch.randn(100, 80).to(torch.bfloat16)
from moeq.numerics.groups import zero_slack_rows  # noqa: E402
from moeq.ops.slack_rows import zero_slack_rows_  # noqa: E402

ref = zero_slack_rows(o, offs)
out["zero_slack"] = _same_bits(zero_slack_rows_(o.clone(), offs), ref)

# the autograd function: Triton kernels vs the plain-torch references, outputs and grads
E, D, H, M = 4, 64, 96, 200
offs = torch.tensor([64, 64, 128, 170], dtype=torch.int32)
xs = torch.randn(M, D).to(torch.bfloat16)
xs[170:] = float("nan")
w1 = (torch.randn(E, 2 * H, D) * 0.1).to(torch.bfloat16)
w2 = (torch.randn(E, D, H) * 0.1).to(torch.bfloat16)
gy = torch.randn(M, D).to(torch.bfloat16)

def run():
    p = [t.clone().requires_grad_() for t in (xs, w1, w2)]
    y = Q.mxfp8_swiglu_experts(*p, offs)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in p]

tri = run()
# torch.compile(fullgraph=True) traces forward and backward (kernels behind custom ops)
compiled = torch.compile(lambda a, b, c: Q.mxfp8_swiglu_experts(a, b, c, offs), fullgraph=True)
p = [t.clone().requires_grad_() for t in (xs, w1, w2)]
yc = compiled(*p)
yc.backward(gy)
for name, a, b in zip(("y", "dx", "dw1", "dw2"), [yc.detach()] + [t.grad for t in p], tri):
    out["compiled_" + name] = _same_bits(a, b)
# the routed block (gather fused into the fake-quant) == permute_and_pad -> experts -> combine
from tests.test_mxfp8_hopper import routed_pair
for name, ok in routed_pair(seed=1).items():
    out["routed_" + name] = ok
Q._ops = lambda device: (Q._ref_2d, Q._ref_weight, Q._ref_swiglu, Q._ref_swiglu_bwd, Q._ref_zero_slack)
ref = run()
for name, a, b in zip(("y", "dx", "dw1", "dw2"), tri, ref):
    out["function_" + name] = _same_bits(a, b) and bool(torch.isfinite(a).all())
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize(
    "check",
    [
        "2d_offs_rows", "2d_offs_cols", "2d_slack_zero", "2d_one_copy", "2d_fp32_rows", "2d_fp32_cols",
        "weight_k", "weight_n", "swiglu_rows", "swiglu_cols", "swiglu_bwd_rows", "swiglu_bwd_cols",
        "swiglu_slack_zero", "zero_slack", "function_y", "function_dx", "function_dw1", "function_dw2",
        "compiled_y", "compiled_dx", "compiled_dw1", "compiled_dw2", "permute_fq_rows", "permute_fq_cols",
        "routed_y", "routed_dtokens", "routed_dweights", "routed_dw1", "routed_dw2",
    ],
)
def test_triton_kernels_match_references_bitwise(interpreter_results, check):
    assert interpreter_results[check] is True, f"{check}: Triton (interpreter) differs from its reference"


def routed_pair(
    seed: int, T: int = 45, E: int = 5, k: int = 2, D: int = 64, H: int = 96, device="cpu", compiled=False,
    sync_free=False,
) -> dict:
    """mxfp8_routed_swiglu_experts (eager, and compiled fullgraph if ``compiled``) vs
    permute_and_pad -> mxfp8_swiglu_experts -> combine: {output / gradient name: bitwise
    equal}. Uneven routing, one expert without tokens. ``sync_free``: the eager runs under
    ``torch.cuda.set_sync_debug_mode("error")``."""
    from moeq.ops.padding import combine_token_groups, permute_and_pad

    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])  # expert E-1: none
    ids[: T // 3, 0] = 0
    toks = torch.randn(T, D, generator=g).to(torch.bfloat16)
    wts = torch.rand(T, k, generator=g)
    w1 = (torch.randn(E, 2 * H, D, generator=g) * 0.1).to(torch.bfloat16)
    w2 = (torch.randn(E, D, H, generator=g) * 0.1).to(torch.bfloat16)
    gout = torch.randn(T, D, generator=g).to(torch.bfloat16)
    ids, toks, wts, w1, w2, gout = (t.to(device) for t in (ids, toks, wts, w1, w2, gout))

    def unfused(t, w, a, b):
        padded, counts, layout = permute_and_pad(t, ids, E, ALIGN)
        y = mxfp8_swiglu_experts(padded, a, b, layout.padded_offsets)
        return combine_token_groups(y, layout, w)

    def routed(t, w, a, b):
        return Q.mxfp8_routed_swiglu_experts(t, ids, w, a, b)

    fns = [unfused, routed] + ([torch.compile(routed, fullgraph=True, backend="aot_eager")] if compiled else [])
    results = []
    for fn in fns:
        p = [x.clone().requires_grad_() for x in (toks, wts, w1, w2)]
        if sync_free:
            torch.cuda.set_sync_debug_mode("error")
        try:
            y = fn(*p)
            y.backward(gout)
        finally:
            if sync_free:
                torch.cuda.set_sync_debug_mode(0)
        results.append([y.detach()] + [x.grad for x in p])
    names = ("y", "dtokens", "dweights", "dw1", "dw2")
    out = {n: _same_bits(a, b) and bool(torch.isfinite(a).all()) for n, a, b in zip(names, results[0], results[1])}
    if compiled:
        out.update({"compiled_" + n: _same_bits(a, b) for n, a, b in zip(names, results[1], results[2])})
    return out


_ROUTED = ("y", "dtokens", "dweights", "dw1", "dw2")


def test_routed_block_equals_permute_then_experts_then_combine():
    assert routed_pair(seed=0, compiled=True) == {n: True for n in _ROUTED + tuple("compiled_" + n for n in _ROUTED)}


def test_routed_block_bad_inputs():
    toks = torch.randn(4, 64).to(torch.bfloat16)
    ids = torch.zeros(4, 1, dtype=torch.int64)
    w = torch.ones(4, 1)
    w1, w2 = torch.zeros(2, 64, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 32, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 tokens"):
        Q.mxfp8_routed_swiglu_experts(toks.float(), ids, w, w1, w2)
    with pytest.raises(ValueError, match="shape mismatch"):
        Q.mxfp8_routed_swiglu_experts(toks, ids, w, w1, w2[:, :32])
    with pytest.raises(ValueError, match="expert_indices"):
        Q.mxfp8_routed_swiglu_experts(toks, ids.view(-1), w, w1, w2)


# --------------------------------------------------------------------------------------
# References vs torchao's to_mx (RCEIL), the ground truth
# --------------------------------------------------------------------------------------


def _torchao_fake_quant(t: torch.Tensor) -> torch.Tensor:
    """torchao to_mx along the last dim (RCEIL), dequantized to bf16 as its emulated GEMM does."""
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    scale, data = mx.to_mx(t.contiguous(), torch.float8_e4m3fn, 32, scaling_mode=ScaleCalculationMode.RCEIL)
    blocks = data.reshape(*t.shape[:-1], t.shape[-1] // 32, 32).to(torch.bfloat16)
    return (blocks * scale.unsqueeze(-1).to(torch.bfloat16)).reshape(t.shape)


@pytest.mark.parametrize("seed", [0, 1])
def test_references_match_torchao_to_mx(seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(128, 96, generator=g) * torch.exp2(torch.randint(-12, 12, (128, 96), generator=g).float())).to(torch.bfloat16)
    offs = torch.tensor([32, 32, 96, 128], dtype=torch.int32)  # no slack: torchao's layout
    r, c = K.fake_quant_2d_reference(x, offs)
    assert _same_bits(r, _torchao_fake_quant(x))
    assert _same_bits(c, _torchao_fake_quant(x.t()).t())  # torchao's wgrad: to_mx of the transpose
    w = x[:, :64].reshape(2, 64, 64).contiguous()
    wk, wn = K.fake_quant_weight_reference(w)
    assert _same_bits(wk, _torchao_fake_quant(w))
    assert _same_bits(wn, _torchao_fake_quant(w.transpose(-2, -1)).transpose(-2, -1))
    assert _same_bits(r, mxfp8_fake_quantize(x, -1))


# --------------------------------------------------------------------------------------
# The autograd function vs torchao's emulated MXFP8 grouped GEMM
# --------------------------------------------------------------------------------------


_F32SwiGLU = K.SwiGLUReference


def _torchao_experts(x, w1, w2, offs, swiglu):
    tao = pytest.importorskip("torchao.prototype.moe_training.mxfp8_grouped_mm")
    from torchao.quantization.quantize_.common import KernelPreference

    def mm(a, w):
        return tao._to_mxfp8_then_scaled_grouped_mm(a, w.transpose(-2, -1), offs, kernel_preference=KernelPreference.EMULATED)

    return mm(swiglu(mm(x, w1)), w2)


def _eager_swiglu(gu):
    g, u = gu.chunk(2, -1)
    return F.silu(g) * u


def _fwd_bwd(fn, x, w1, w2, gy):
    p = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    y = fn(*p)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in p]


def _float64_experts(x, w1, w2, gy, offs):
    p = [t.detach().double().requires_grad_() for t in (x, w1, w2)]
    ys, start = [], 0
    for e, end in enumerate(offs.tolist()):
        gu = p[0][start:end] @ p[1][e].t()
        ys.append(_eager_swiglu(gu) @ p[2][e].t())
        start = end
    y = torch.cat(ys + [p[0].new_zeros(x.shape[0] - start, w2.shape[1])])
    y.backward(gy.double())
    return [y.detach()] + [t.grad for t in p]


def _problem(seed, E=4, D=64, H=96, counts=(2 * ALIGN, 0, 3 * ALIGN, 3 * ALIGN)):
    g = torch.Generator().manual_seed(seed)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    M = int(offs[-1])
    x = torch.randn(M, D, generator=g).to(torch.bfloat16)
    w1 = (torch.randn(E, 2 * H, D, generator=g) * 0.1).to(torch.bfloat16)
    w2 = (torch.randn(E, D, H, generator=g) * 0.1).to(torch.bfloat16)
    gy = torch.randn(M, D, generator=g).to(torch.bfloat16)
    return x, w1, w2, gy, offs


@pytest.mark.parametrize("seed", [0, 1])
def test_function_matches_torchao_emulated(seed):
    x, w1, w2, gy, offs = _problem(seed)
    ours = _fwd_bwd(lambda a, b, c: mxfp8_swiglu_experts(a, b, c, offs), x, w1, w2, gy)
    # Same SwiGLU numerics: only the GEMMs' accumulation order may differ.
    tao = _fwd_bwd(lambda a, b, c: _torchao_experts(a, b, c, offs, _F32SwiGLU.apply), x, w1, w2, gy)
    for name, a, b in zip(("y", "dx", "dw1", "dw2"), ours, tao):
        assert _rel(a, b) < 1e-3, f"{name}: {_rel(a, b):.2e} vs torchao emulated"
    # torchao with eager bf16 SwiGLU: intermediate roundings differ, so some e4m3 values
    # flip; both must be as far from float64 as MXFP8 makes them, no further.
    eager = _fwd_bwd(lambda a, b, c: _torchao_experts(a, b, c, offs, _eager_swiglu), x, w1, w2, gy)
    exact = _float64_experts(x, w1, w2, gy, offs)
    for name, a, b, r in zip(("y", "dx", "dw1", "dw2"), ours, eager, exact):
        assert _rel(a, b) < 3e-2, name
        assert 0.01 < _rel(a, r) < 0.1, f"{name}: error vs float64 {_rel(a, r):.3f} is not MXFP8-sized"
        assert _rel(a, r) < 1.1 * _rel(b, r), f"{name}: moeq {_rel(a, r):.4f} vs torchao {_rel(b, r):.4f} (float64)"


def test_slack_rows_and_empty_experts():
    x, w1, w2, gy, offs = _problem(2, counts=(ALIGN, 0, 2 * ALIGN, ALIGN))
    pad = 40  # slack rows past offs[-1], holding garbage that must not leak
    xs = torch.cat([x, torch.full((pad, x.shape[1]), float("nan"), dtype=x.dtype)])
    gys = torch.cat([gy, torch.full((pad, gy.shape[1]), float("inf"), dtype=gy.dtype)])
    short = offs.clone()
    short[-1] -= 7  # the last group ends off a multiple of 32
    ys, dxs, dw1s, dw2s = _fwd_bwd(lambda a, b, c: mxfp8_swiglu_experts(a, b, c, short), xs, w1, w2, gys)
    for t in (ys, dxs, dw1s, dw2s):
        assert torch.isfinite(t).all()
    m = int(short[-1])
    assert (ys[m:] == 0).all() and (dxs[m:] == 0).all()
    assert (dw1s[1] == 0).all() and (dw2s[1] == 0).all()  # expert 1 got no tokens
    # same as the problem with the slack rows and the 7 dropped rows zeroed
    xz, gyz = x.clone(), gy.clone()
    xz[m:], gyz[m:] = 0, 0
    ref = _fwd_bwd(lambda a, b, c: mxfp8_swiglu_experts(a, b, c, offs), xz, w1, w2, gyz)
    assert _same_bits(ys[:m], ref[0][:m]) and _same_bits(dxs[:m], ref[1][:m])
    assert _same_bits(dw1s, ref[2]) and _same_bits(dw2s, ref[3])


def test_no_grad_forward_and_dtypes():
    x, w1, w2, gy, offs = _problem(3)
    with torch.no_grad():
        y0 = mxfp8_swiglu_experts(x, w1, w2, offs)
    y1 = _fwd_bwd(lambda a, b, c: mxfp8_swiglu_experts(a, b, c, offs), x, w1, w2, gy)[0]
    assert _same_bits(y0, y1)
    # fp32 master weights: exact fake-quant into bf16, grads back in fp32
    out = _fwd_bwd(lambda a, b, c: mxfp8_swiglu_experts(a, b, c, offs), x, w1.float(), w2.float(), gy)
    assert out[0].dtype == torch.bfloat16 and out[2].dtype == torch.float32 and out[3].dtype == torch.float32
    assert _same_bits(out[0], y1)


def test_bad_inputs_raise_clear_errors():
    x, w1, w2, gy, offs = _problem(4)
    with pytest.raises(ValueError, match="multiple of the MX block size"):
        mxfp8_swiglu_experts(x[:, :48], w1[:, :, :48], w2[:, :48], offs)
    with pytest.raises(ValueError, match="int32"):
        mxfp8_swiglu_experts(x, w1, w2, offs.long())
    with pytest.raises(ValueError, match="shape mismatch"):
        mxfp8_swiglu_experts(x, w1, w2[:, :, :64], offs)
    with pytest.raises(TypeError, match="bfloat16/float32"):
        mxfp8_swiglu_experts(x.half(), w1, w2, offs)
    bad = torch.tensor([ALIGN + 8, ALIGN + 8, 136, 256], dtype=torch.int32)  # group 2 starts off-alignment
    with pytest.raises(RuntimeError, match=f"multiple of {ALIGN}"):
        mxfp8_swiglu_experts(x, w1, w2, bad)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        mxfp8_swiglu_experts(x, w1, w2, torch.tensor([64, 32, 128, 256], dtype=torch.int32))


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_gpu_kernels_match_references():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(1000, 512, device="cuda", generator=g) * 3).to(torch.bfloat16)
    offs = torch.tensor([256, 256, 640, 990], dtype=torch.int32, device="cuda")
    for a, b in zip(K.mxfp8_fake_quant_2d(x, offs), K.fake_quant_2d_reference(x, offs)):
        assert _same_bits(a, b)
    w = torch.randn(4, 256, 384, device="cuda", generator=g).to(torch.bfloat16)
    for a, b in zip(K.mxfp8_fake_quant_weight(w), K.fake_quant_weight_reference(w)):
        assert _same_bits(a, b)
    # SwiGLU: the GPU's exp() differs from torch's by ulps, so a few bf16 h values round the
    # other way; the fake-quant of identical inputs is bitwise (checked above).
    gu = (torch.randn(1000, 512, device="cuda", generator=g) * 3).to(torch.bfloat16)
    dh = torch.randn(1000, 256, device="cuda", generator=g).to(torch.bfloat16)
    for a, b in list(zip(K.mxfp8_swiglu_fake_quant(gu, offs), K.swiglu_fake_quant_reference(gu, offs))) + list(
        zip(K.mxfp8_swiglu_backward_fake_quant(dh, gu, offs), K.swiglu_backward_fake_quant_reference(dh, gu, offs))
    ):
        assert (a != b).float().mean() < 1e-3 and _rel(a, b) < 1e-3


@pytest.mark.gpu
@gpu
def test_gpu_function_sync_free_and_compiles(monkeypatch):
    x, w1, w2, gy, offs = (t.cuda() for t in _problem(5))
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _fwd_bwd(lambda a, b, c: mxfp8_swiglu_experts(a, b, c, offs), x, w1, w2, gy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    compiled = torch.compile(lambda a, b, c: mxfp8_swiglu_experts(a, b, c, offs), fullgraph=True)
    for a, b in zip(_fwd_bwd(compiled, x, w1, w2, gy), out):
        assert _same_bits(a, b)
    # the plain-torch reference ops on the same GPU: same GEMMs, so only the SwiGLU's exp()
    # (a few bf16 roundings of h, then their e4m3 values) can differ
    monkeypatch.setattr(Q, "_ops", lambda device: (Q._ref_2d, Q._ref_weight, Q._ref_swiglu, Q._ref_swiglu_bwd, Q._ref_zero_slack))
    ref = _fwd_bwd(lambda a, b, c: mxfp8_swiglu_experts(a, b, c, offs), x, w1, w2, gy)
    for a, b in zip(out, ref):
        assert _rel(a, b) < 1e-3


@pytest.mark.gpu
@gpu
def test_gpu_routed_block_bitwise_sync_free_and_compiles():
    eager = routed_pair(seed=2, T=300, E=8, k=4, D=256, H=128, device="cuda", sync_free=True)
    assert eager == {n: True for n in _ROUTED}
    assert all(routed_pair(seed=3, T=100, E=8, k=2, D=128, H=64, device="cuda", compiled=True).values())
