"""GroupedExperts: every backend against a float64 reference, forward and backward."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeq
from moeq.experts.swiglu import COMPUTE_BACKENDS, swiglu_experts
from tests.reference import experts_reference, rel_err

# bf16 operands round each GEMM input to 8 bits: a few 1e-3 relative error per GEMM.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}


@st.composite
def routings(draw):
    """(E, counts) reaching the edges: empty experts, all-zero counts, one expert taking all."""
    num_experts = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["random", "all_zero", "one_takes_all", "some_empty"]))
    if kind == "all_zero":
        counts = [0] * num_experts
    elif kind == "one_takes_all":
        counts = [0] * num_experts
        counts[draw(st.integers(0, num_experts - 1))] = draw(st.integers(1, 40))
    else:
        counts = draw(st.lists(st.integers(0, 24), min_size=num_experts, max_size=num_experts))
        if kind == "some_empty":
            counts[draw(st.integers(0, num_experts - 1))] = 0
    return num_experts, torch.tensor(counts, dtype=torch.int64)


def _make(num_experts, dim, hidden, dtype, counts, seed):
    g = torch.Generator().manual_seed(seed)
    experts = moeq.GroupedExperts(dim, hidden, num_experts)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.3)
    experts = experts.to(dtype)
    x = torch.randn(int(counts.sum()), dim, generator=g).to(dtype).requires_grad_()
    return experts, x


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=12, deadline=None)
@given(routing=routings(), seed=st.integers(0, 2**16))
def test_backend_matches_float64_reference(backend, dtype, routing, seed):
    num_experts, counts = routing
    dim, hidden = 16, 24
    experts, x = _make(num_experts, dim, hidden, dtype, counts, seed)
    experts.compute_backend = backend
    out = experts(x, counts)
    assert out.shape == x.shape and out.dtype == dtype

    x64 = x.detach().double().requires_grad_()
    w13 = experts.gate_up_proj.detach().double().requires_grad_()
    w2 = experts.down_proj.detach().double().requires_grad_()
    ref = experts_reference(x64, w13, w2, counts)
    assert rel_err(out, ref) <= TOL[dtype]

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    out.backward(grad.to(dtype))
    ref.backward(grad.double())
    assert experts.gate_up_proj.grad is not None and experts.down_proj.grad is not None
    for got, want in ((x.grad, x64.grad), (experts.gate_up_proj.grad, w13.grad), (experts.down_proj.grad, w2.grad)):
        assert got.dtype == dtype
        assert torch.isfinite(got).all()
        assert rel_err(got, want) <= TOL[dtype]
    # Experts that got no tokens get exactly zero weight gradient.
    empty = counts == 0
    assert experts.gate_up_proj.grad[empty].abs().sum() == 0
    assert experts.down_proj.grad[empty].abs().sum() == 0


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
def test_backends_agree_on_padded_layout_with_slack(backend):
    """Tokens in the padded layout (group starts multiple of 8, zero padding, slack rows):
    real rows match the unpadded result, padding and slack rows come out zero."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 8, 5])
    align = 8
    experts = moeq.GroupedExperts(16, 24, 4, compute_backend=backend)
    x = torch.randn(int(counts.sum()), 16)
    padded_counts = (counts + align - 1) // align * align
    rows = int(padded_counts.sum()) + 11  # 11 slack rows at the end
    xp = torch.zeros(rows, 16)
    starts = torch.cumsum(padded_counts, 0) - padded_counts
    src = 0
    real_rows = []
    for e in range(4):
        n = int(counts[e])
        xp[starts[e] : starts[e] + n] = x[src : src + n]
        real_rows += list(range(int(starts[e]), int(starts[e]) + n))
        src += n
    xp[-11:] = float("nan")  # slack content must never leak into real rows
    out = experts(xp, counts, group_alignment=align)
    want = experts(x, counts)
    torch.testing.assert_close(out[real_rows], want, rtol=1e-5, atol=1e-6)
    pad_rows = [r for r in range(rows - 11) if r not in real_rows]
    assert out[pad_rows].abs().sum() == 0


def test_zero_experts_and_zero_tokens():
    for backend in COMPUTE_BACKENDS:
        experts = moeq.GroupedExperts(8, 8, 0, compute_backend=backend)
        out = experts(torch.zeros(0, 8, requires_grad=True), torch.zeros(0, dtype=torch.int64))
        assert out.shape == (0, 8)
        out.sum().backward()
        experts = moeq.GroupedExperts(8, 8, 3, compute_backend=backend)
        x = torch.zeros(0, 8, requires_grad=True)
        out = experts(x, torch.zeros(3, dtype=torch.int64))
        out.sum().backward()
        assert experts.gate_up_proj.grad.abs().sum() == 0


def test_unknown_backend_and_bad_dims_raise():
    with pytest.raises(ValueError, match="unknown compute_backend 'cutlass'.*grouped_mm"):
        moeq.GroupedExperts(8, 8, 2, compute_backend="cutlass")
    experts = moeq.GroupedExperts(9, 8, 2)  # 9 floats = 36 bytes: not 16-byte aligned rows
    with pytest.raises(ValueError, match="multiple of 4.*for_loop"):
        experts(torch.randn(4, 9), torch.tensor([2, 2]))
    experts.compute_backend = "for_loop"
    assert experts(torch.randn(4, 9), torch.tensor([2, 2])).shape == (4, 9)


def test_functional_form_matches_module():
    torch.manual_seed(1)
    experts = moeq.GroupedExperts(16, 8, 3)
    counts = torch.tensor([4, 0, 5])
    x = torch.randn(9, 16)
    torch.testing.assert_close(
        swiglu_experts(x, experts.gate_up_proj, experts.down_proj, counts), experts(x, counts)
    )


def test_grouped_mm_custom_op_passes_opcheck():
    """The op that float32/float16 grouped GEMMs compile through (torch._grouped_mm's meta
    kernel takes bf16 only): fake tensor, autograd and schema checks."""
    from moeq.ops.bf16_grouped_mm import _grouped_mm_op  # noqa: F401 - registers torch.ops.moeq.grouped_mm

    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 16, generator=g, requires_grad=True)
    w = torch.randn(3, 8, 16, generator=g, requires_grad=True)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    torch.library.opcheck(torch.ops.moeq.grouped_mm.default, (a, w.transpose(-2, -1), offs))
    out = torch.ops.moeq.grouped_mm(a, w.transpose(-2, -1), offs)
    ref = torch.cat([a[:3] @ w[0].t(), a[3:3] @ w[1].t(), a[3:] @ w[2].t()])
    torch.testing.assert_close(out, ref)
