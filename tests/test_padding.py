"""Token-group padding: pad/unpad, permute-and-pad, combine.

* Property tests (hypothesis, CPU) of the public API against plain-Python oracles
  (loops over the counts, no moeq code): layout, bitwise round trips, zero padding,
  gradients, error messages, torch.compile tracing.
* Triton == reference, bitwise, through the Triton interpreter: ``TRITON_INTERPRET``
  must be set before triton is imported, and other test files import triton without
  it, so :func:`test_triton_interpreter_matches_reference` runs this file as a script
  in a subprocess with the variable set (``python tests/test_padding.py --interpret``).
* GPU tests (``@pytest.mark.gpu``): Triton == reference bitwise on CUDA at larger
  sizes, no host syncs under ``torch.cuda.set_sync_debug_mode("error")``, and
  ``torch.compile(fullgraph=True)`` with Inductor.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from moeq.kernels import padding as kp
from moeq.ops.padding import (
    PaddedLayout,
    combine_token_groups,
    pad_token_groups,
    padded_rows,
    permute_and_pad,
    unpad_token_groups,
)
from moeq.numerics.recipes import GROUP_ALIGNMENT

REPO = Path(__file__).resolve().parents[1]
RECIPE_ALIGNMENTS = sorted({a for a in GROUP_ALIGNMENT.values() if a})
ALIGNMENTS = [None, 1, 2, 4, *RECIPE_ALIGNMENTS, 128]
COPY_DTYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
GRAD_DTYPES = [torch.float32, torch.bfloat16]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------
# oracles: plain Python over the counts
# ----------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def random_rows(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaN payloads, -0.0, infs included): copies must keep them all."""
    raw = torch.randint(0, 256, (rows, cols * dtype.itemsize), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


def random_values(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, cols, generator=gen).to(dtype)


def oracle_layout(counts, alignment):
    a = alignment or 1
    starts, ends, pos = [], [], 0
    for c in counts:
        starts.append(pos)
        pos += -(-c // a) * a
        ends.append(pos)
    return starts, ends


def oracle_pad(x, counts, alignment, rows):
    starts, ends = oracle_layout(counts, alignment)
    out = torch.zeros((rows, x.shape[1]), dtype=bits(x).dtype)
    src = 0
    for e, c in enumerate(counts):
        out[starts[e] : starts[e] + c] = bits(x)[src : src + c]
        src += c
    return out.view(x.dtype), starts, ends


def oracle_route(ids, num_experts, alignment):
    """(counts, starts, ends, dest, source) of a (T, k) routing, (token, slot) order kept."""
    T, k = len(ids), (len(ids[0]) if ids else 0)
    groups = [[] for _ in range(num_experts)]
    for t, row in enumerate(ids):
        for j, e in enumerate(row):
            groups[e].append(t * k + j)
    counts = [len(g) for g in groups]
    starts, ends = oracle_layout(counts, alignment)
    rows = padded_rows(T * k, num_experts, alignment)
    dest, source = [0] * (T * k), [-1] * rows
    for e, g in enumerate(groups):
        for i, f in enumerate(g):
            dest[f] = starts[e] + i
            source[starts[e] + i] = f
    return counts, starts, ends, dest, source


# ----------------------------------------------------------------------------------
# strategies (reach the edges: M = 0, E = 1, empty groups, one group, on/off alignment)
# ----------------------------------------------------------------------------------


@st.composite
def grouped_counts(draw, alignments=ALIGNMENTS, max_groups=6, max_mult=2):
    alignment = draw(st.sampled_from(alignments))
    a = alignment or 1
    E = draw(st.integers(1, max_groups))
    kind = draw(st.sampled_from(["random", "edges", "one_group", "empty"]))
    if kind == "empty":
        counts = [0] * E
    elif kind == "one_group":
        counts = [0] * E
        counts[draw(st.integers(0, E - 1))] = draw(st.integers(0, max_mult * a + 1))
    elif kind == "edges":  # exactly on and one off the alignment
        counts = [draw(st.sampled_from([0, 1, a - 1, a, a + 1, 2 * a])) for _ in range(E)]
    else:
        counts = draw(st.lists(st.integers(0, max_mult * a + 2), min_size=E, max_size=E))
    return alignment, counts


@st.composite
def routings(draw, alignments=ALIGNMENTS, max_tokens=10, max_experts=6):
    alignment = draw(st.sampled_from(alignments))
    E = draw(st.integers(1, max_experts))
    T = draw(st.integers(0, max_tokens))
    k = draw(st.integers(1, min(E, 3) + 1))  # k > E only with repeats
    distinct = k <= E and draw(st.booleans())
    ids = []
    for _ in range(T):
        if distinct:
            ids.append(draw(st.permutations(range(E)))[:k])
        else:
            ids.append(draw(st.lists(st.integers(0, E - 1), min_size=k, max_size=k)))
    skew = draw(st.booleans())  # everything to one expert
    if skew and T:
        ids = [[E - 1] * k for _ in range(T)]
    return alignment, E, T, k, ids


def ids_tensor(ids, T, k):
    return torch.tensor(ids, dtype=torch.int64).reshape(T, k)


# ----------------------------------------------------------------------------------
# pad / unpad
# ----------------------------------------------------------------------------------


def test_padded_rows_is_static_bound():
    for a in RECIPE_ALIGNMENTS + [128]:
        assert padded_rows(0, 1, a) == a
        assert padded_rows(100, 8, a) == -(-(100 + 8 * (a - 1)) // a) * a
        assert padded_rows(100, 8, a) % a == 0
    assert padded_rows(100, 8, None) == padded_rows(100, 8, 1) == 100


@settings(max_examples=60, **SETTINGS)
@given(grouped_counts(), st.sampled_from([1, 3, 8, 17]), st.sampled_from(COPY_DTYPES), st.integers(0, 2**31 - 1))
def test_pad_layout_and_round_trip(case, D, dtype, seed):
    alignment, counts = case
    gen = torch.Generator().manual_seed(seed)
    M, E = sum(counts), len(counts)
    x = random_rows(M, D, dtype, gen)
    padded, layout = pad_token_groups(x, torch.tensor(counts), alignment)
    rows = padded_rows(M, E, alignment)
    want, starts, ends = oracle_pad(x, counts, alignment, rows)
    assert isinstance(layout, PaddedLayout)
    assert padded.shape == (rows, D) and padded.dtype == dtype
    assert same_bits(padded, want)  # tokens in place, every other row (padding, slack) zero
    assert layout.padded_offsets.dtype == torch.int32 and layout.padded_offsets.tolist() == ends
    assert layout.group_starts.tolist() == starts
    assert all(s % (alignment or 1) == 0 for s in starts)
    assert (layout.num_rows, layout.alignment, layout.top_k) == (M, alignment or 1, 1)
    if (alignment or 1) == 1:
        assert padded is x  # no-op: nothing copied
    assert same_bits(unpad_token_groups(padded, layout), x)


@settings(max_examples=25, **SETTINGS)
@given(grouped_counts(), st.sampled_from([1, 5, 16]), st.sampled_from(GRAD_DTYPES), st.integers(0, 2**31 - 1))
def test_pad_unpad_gradients_round_trip(case, D, dtype, seed):
    alignment, counts = case
    gen = torch.Generator().manual_seed(seed)
    M, E = sum(counts), len(counts)
    rows = padded_rows(M, E, alignment)
    x = random_values(M, D, dtype, gen).requires_grad_()
    padded, layout = pad_token_groups(x, torch.tensor(counts), alignment)
    g = random_values(rows, D, dtype, gen)
    padded.backward(g)
    g_tokens = torch.cat([g[s : s + c] for s, c in zip(oracle_layout(counts, alignment)[0], counts)])
    assert same_bits(x.grad, g_tokens)  # d pad = unpad

    p = random_values(rows, D, dtype, gen).requires_grad_()
    y = unpad_token_groups(p, layout)
    gy = random_values(M, D, dtype, gen)
    y.backward(gy)
    assert same_bits(p.grad, oracle_pad(gy, counts, alignment, rows)[0])  # d unpad = pad, zeros elsewhere


def test_zero_token_experts_and_garbage_padding_never_leak_nan():
    """Padding/slack rows of the experts' output may hold anything (NaN here): unpad and
    combine read only real rows; a grouped GEMM over the zero padding rows stays finite."""
    gen = torch.Generator().manual_seed(0)
    a = RECIPE_ALIGNMENTS[-1]
    counts = torch.tensor([0, 5, 0, 3 * a + 1, 0])
    E, M, D, N = 5, int(counts.sum()), 16, 8
    x = random_values(M, D, torch.float32, gen)
    padded, layout = pad_token_groups(x, counts, a)
    w = random_values(E * N, D, torch.float32, gen).view(E, N, D)
    y = torch._grouped_mm(padded, w.transpose(-2, -1), offs=layout.padded_offsets)
    real = torch.zeros(padded.shape[0], dtype=torch.bool)
    for s, c in zip(layout.group_starts.tolist(), counts.tolist()):
        real[s : s + c] = True
    assert torch.isfinite(y[: layout.padded_offsets[-1]]).all()
    y = torch.where(real[:, None], y, float("nan"))
    out = unpad_token_groups(y, layout)
    ref = torch.cat([x[s : s + c] @ w[e].T for e, (s, c) in enumerate(zip(counts.cumsum(0) - counts, counts))])
    torch.testing.assert_close(out, ref)

    ids = torch.tensor([[3, 1], [3, 3], [1, 3]])
    xt = random_values(3, D, torch.float32, gen)
    pp, _, lay = permute_and_pad(xt, ids, E, a)
    yy = torch.where((lay.source_rows >= 0)[:, None], pp, float("nan"))
    assert torch.isfinite(combine_token_groups(yy, lay, torch.rand(3, 2, generator=gen))).all()


# ----------------------------------------------------------------------------------
# permute-and-pad / combine
# ----------------------------------------------------------------------------------


@settings(max_examples=60, **SETTINGS)
@given(routings(), st.sampled_from([1, 3, 8]), st.sampled_from(COPY_DTYPES), st.integers(0, 2**31 - 1))
def test_permute_and_pad_matches_oracle(case, D, dtype, seed):
    alignment, E, T, k, ids = case
    gen = torch.Generator().manual_seed(seed)
    x = random_rows(T, D, dtype, gen)
    padded, counts, layout = permute_and_pad(x, ids_tensor(ids, T, k), E, alignment)
    o_counts, starts, ends, dest, source = oracle_route(ids, E, alignment)
    rows = padded_rows(T * k, E, alignment)
    assert padded.shape == (rows, D)
    assert counts.dtype == torch.int64 and counts.tolist() == o_counts
    assert layout.padded_offsets.dtype == torch.int32 and layout.padded_offsets.tolist() == ends
    assert layout.group_starts.tolist() == starts and all(s % (alignment or 1) == 0 for s in starts)
    assert layout.dest_rows.tolist() == dest and layout.source_rows.tolist() == source
    assert (layout.num_rows, layout.top_k) == (T * k, k)
    want = torch.zeros((rows, D), dtype=bits(x).dtype)
    for r, f in enumerate(source):
        if f >= 0:
            want[r] = bits(x)[f // k]
    assert torch.equal(bits(padded), want)
    # unpad of a permuted layout: the routed copies in (token, slot) order
    copies = unpad_token_groups(padded, layout)
    assert torch.equal(bits(copies), bits(x).repeat_interleave(k, dim=0))


@settings(max_examples=40, **SETTINGS)
@given(routings(), st.sampled_from([1, 4, 9]), st.sampled_from(GRAD_DTYPES), st.booleans(), st.integers(0, 2**31 - 1))
def test_combine_and_gradients_match_float64(case, N, dtype, weighted, seed):
    alignment, E, T, k, ids = case
    gen = torch.Generator().manual_seed(seed)
    x = random_values(T, N, dtype, gen).requires_grad_()
    w = torch.rand(T, k, generator=gen).requires_grad_() if weighted else None
    padded, _, layout = permute_and_pad(x, ids_tensor(ids, T, k), E, alignment)
    scale = random_values(1, N, dtype, gen)
    y = padded * scale  # stands in for the experts
    out = combine_token_groups(y, layout, w)
    assert out.shape == (T, N) and out.dtype == dtype
    go = random_values(T, N, dtype, gen)
    out.backward(go)

    # float64 oracle through plain autograd
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if weighted else None
    copies = x64.repeat_interleave(k, dim=0) * scale.double()
    wts = w64.reshape(-1, 1) if weighted else 1.0
    out64 = (copies * wts).reshape(T, k, N).sum(1)
    out64.backward(go.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), out64, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    if weighted:
        torch.testing.assert_close(w.grad.double(), w64.grad, **tol)


@pytest.mark.parametrize("alignment", [None, RECIPE_ALIGNMENTS[-1]])
def test_gradcheck_float64(alignment):
    """float64 data accumulates in float64, so autograd.gradcheck holds end to end."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.tensor([[0, 2], [2, 1], [1, 0], [2, 0]])
    counts = torch.tensor([3, 0, 2])
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(4, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    xg = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(x, w, xg):
        padded, _, layout = permute_and_pad(x, ids, 3, alignment)
        out = combine_token_groups(padded.sin(), layout, w)
        p2, lay2 = pad_token_groups(xg, counts, alignment)
        return out, unpad_token_groups(p2.cos(), lay2)

    assert torch.autograd.gradcheck(fn, (x, w, xg))


def test_combine_sums_in_slot_order_like_reference():
    """Public combine on CPU is the reference: float32 accumulation in slot order."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[0, 1, 2], [2, 1, 0]])
    x = random_values(2, 7, torch.bfloat16, gen)
    w = torch.rand(2, 3, generator=gen)
    padded, _, layout = permute_and_pad(x, ids, 3, 16)
    out = combine_token_groups(padded, layout, w)
    acc = x.float() * w[:, :1]
    for j in (1, 2):
        acc = acc + x.float() * w[:, j : j + 1]
    assert same_bits(out, acc.to(torch.bfloat16))


# ----------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------


def test_bad_counts_raise_clear_errors():
    x = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="does not sum"):
        pad_token_groups(x, torch.tensor([3, 3]), 16)
    with pytest.raises(RuntimeError, match="does not sum"):
        pad_token_groups(x, torch.tensor([3, 3]), None)
    with pytest.raises(RuntimeError, match="negative"):
        pad_token_groups(x, torch.tensor([12, -2]), 16)
    with pytest.raises(ValueError, match="keep the counts on x's device"):
        pad_token_groups(x, torch.tensor([5, 5], device="meta"), 16)
    with pytest.raises(TypeError, match="integer dtype"):
        pad_token_groups(x, torch.tensor([5.0, 5.0]), 16)
    with pytest.raises(TypeError, match="integer dtype"):
        pad_token_groups(x, torch.tensor([True, False]), 16)
    with pytest.raises(TypeError, match="tensor"):
        pad_token_groups(x, [5, 5], 16)
    with pytest.raises(ValueError, match="1D"):
        pad_token_groups(x, torch.tensor([[5, 5]]), 16)
    with pytest.raises(ValueError, match="2D"):
        pad_token_groups(torch.randn(10), torch.tensor([10]), 16)


@pytest.mark.parametrize("alignment", [0, 3, 24, -16, 48])
def test_alignment_not_power_of_two_raises(alignment):
    with pytest.raises(ValueError, match="power of two"):
        pad_token_groups(torch.randn(4, 2), torch.tensor([4]), alignment)
    with pytest.raises(ValueError, match="power of two"):
        permute_and_pad(torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long), 2, alignment)


@pytest.mark.parametrize("alignment", [16.0, "16", True])
def test_alignment_wrong_type_raises(alignment):
    with pytest.raises(TypeError, match="alignment"):
        padded_rows(4, 1, alignment)


def test_bad_routing_and_layout_raise_clear_errors():
    x = torch.randn(3, 4)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    with pytest.raises(RuntimeError, match=r"\[0, num_experts\)"):
        permute_and_pad(x, torch.tensor([[0, 1], [1, 3], [2, 0]]), 3, 16)
    with pytest.raises(RuntimeError, match=r"\[0, num_experts\)"):
        permute_and_pad(x, torch.tensor([[0, 1], [-1, 2], [2, 0]]), 3, 16)
    with pytest.raises(TypeError, match="integer dtype"):
        permute_and_pad(x, ids.float(), 3, 16)
    with pytest.raises(ValueError, match="rows but x has"):
        permute_and_pad(x[:2], ids, 3, 16)
    with pytest.raises(ValueError, match="num_experts"):
        permute_and_pad(x, ids, 0, 16)
    padded, _, layout = permute_and_pad(x, ids, 3, 16)
    with pytest.raises(ValueError, match="rows but its layout describes"):
        combine_token_groups(padded[:-1], layout, torch.rand(3, 2))
    with pytest.raises(ValueError, match=r"shape \(T, k\)"):
        combine_token_groups(padded, layout, torch.rand(2, 3))
    with pytest.raises(TypeError, match="float32"):
        combine_token_groups(padded.to(torch.float8_e4m3fn), layout, torch.rand(3, 2))
    p2, lay2 = pad_token_groups(x, torch.tensor([1, 2]), 16)
    with pytest.raises(ValueError, match="layout from permute_and_pad"):
        combine_token_groups(p2, lay2, None)
    with pytest.raises(ValueError, match="rows but its layout describes"):
        unpad_token_groups(p2[:5], lay2)


# ----------------------------------------------------------------------------------
# torch.compile / custom-op registration
# ----------------------------------------------------------------------------------


def _all_ops(xg, counts, x, ids, w, E, alignment):
    padded, layout = pad_token_groups(xg, counts, alignment)
    back = unpad_token_groups(padded * 2, layout)
    pp, cnt, lay = permute_and_pad(x, ids, E, alignment)
    out = combine_token_groups(pp * 3, lay, w)
    return back, out, layout.padded_offsets, cnt


@pytest.mark.parametrize("alignment", [None, RECIPE_ALIGNMENTS[0]])
def test_torch_compile_fullgraph_traces_forward_and_backward(alignment):
    gen = torch.Generator().manual_seed(0)
    T, D, E, k = 12, 8, 4, 2
    counts = torch.tensor([5, 0, 7, 0])
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w0 = torch.rand(T, k, generator=gen)
    x0 = random_values(T, D, torch.float32, gen)
    results = []
    for fn in (_all_ops, torch.compile(_all_ops, fullgraph=True, backend="aot_eager")):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        back, out, offs, cnt = fn(x, counts, x, ids, w, E, alignment)
        (back.sum() + (out * out).sum()).backward()
        results.append((back, out, offs, cnt, x.grad, w.grad))
    for a, b in zip(*results):
        assert same_bits(a, b)


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    """Any active mode sends moeq's eager fast route back through the custom ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("alignment", [None, RECIPE_ALIGNMENTS[-1]])
def test_eager_fast_route_matches_custom_ops(alignment):
    # plain eager runs the implementations directly (moeq.ops.eager); under a mode the
    # same calls go through torch.library: outputs and gradients must be bitwise equal
    gen = torch.Generator().manual_seed(3)
    T, D, E, k = 10, 6, 3, 2
    counts = torch.tensor([4, 0, 6])
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w0, x0 = torch.rand(T, k, generator=gen), random_values(T, D, torch.float32, gen)
    results = []
    for mode in (None, _PassThroughMode()):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with mode if mode is not None else torch.enable_grad():
            back, out, offs, cnt = _all_ops(x, counts, x, ids, w, E, alignment)
            (back.sum() + (out * out).sum()).backward()
        results.append((back, out, offs, cnt, x.grad, w.grad))
    for a, b in zip(*results):
        assert same_bits(a, b)
    with torch.no_grad():  # no autograd graph needed: the implementation alone
        assert not _all_ops(x0, counts, x0, ids, w0, E, alignment)[1].requires_grad


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(0)
    x = random_values(6, 4, torch.float32, gen).requires_grad_()
    counts = torch.tensor([2, 0, 4])
    a = RECIPE_ALIGNMENTS[0]
    rows = padded_rows(6, 3, a)
    torch.library.opcheck(torch.ops.moeq.pad_token_groups.default, (x, counts, a, rows))
    padded = random_values(rows, 4, torch.float32, gen).requires_grad_()
    torch.library.opcheck(torch.ops.moeq.unpad_token_groups.default, (padded, counts, None, None, a, 6))
    ids = torch.tensor([[0, 2], [2, 1], [0, 1]])
    prow = padded_rows(6, 3, a)
    torch.library.opcheck(torch.ops.moeq.permute_and_pad.default, (x[:3], ids, 3, a, prow))
    torch.library.opcheck(torch.ops.moeq.route_tokens.default, (ids, 3, a, prow))
    _, _, lay = permute_and_pad(x[:3].detach(), ids, 3, a)
    w = torch.rand(3, 2, generator=gen).requires_grad_()
    torch.library.opcheck(
        torch.ops.moeq.combine_token_groups.default, (padded, lay.dest_rows, lay.source_rows, w, 2)
    )


# ----------------------------------------------------------------------------------
# Triton == reference, through the interpreter (subprocess, see module docstring)
# ----------------------------------------------------------------------------------


@pytest.mark.skipif(not kp.HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--interpret"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "interpreter checks passed" in proc.stdout


def _twin_checks(alignment, counts, ids, E, D, dtype, seed):
    """Run every Triton launcher and its reference on the same inputs; bitwise equal."""
    gen = torch.Generator().manual_seed(seed)
    a = alignment or 1
    counts_t = torch.tensor(counts, dtype=torch.int64)
    M = sum(counts)
    rows = padded_rows(M, len(counts), a)
    x = random_rows(M, D, dtype, gen)
    pt, pr = kp.pad_triton(x, counts_t, a, rows), kp.pad_reference(x, counts_t, a, rows)
    assert same_bits(pt[0], pr[0]) and torch.equal(pt[1], pr[1]) and torch.equal(pt[2], pr[2])
    assert pt[3].tolist() == [1]
    bad = counts_t.clone()
    bad[0] += 1
    assert kp.pad_triton(x, bad, a, rows + a)[3].tolist() == [0]  # flags, never reads out of bounds
    assert same_bits(kp.pad_rows_triton(x, counts_t, a, rows), pr[0])
    assert same_bits(kp.unpad_triton(pt[0], counts_t, a, M), kp.unpad_reference(pr[0], counts_t, a, M))
    assert same_bits(kp.unpad_triton(pt[0], counts_t, a, M), x)

    T, k = len(ids), (len(ids[0]) if ids else 1)
    ids_t = ids_tensor(ids, T, k)
    xt = random_rows(T, D, dtype, gen)
    prow = padded_rows(T * k, E, a)
    rr = kp.permute_and_pad_reference(xt, ids_t, E, a, prow)
    if T:
        bad_ids = ids_t.clone()
        bad_ids[0, 0] = E
    # one launch / route launches + gather; 16-entry blocks so that several take part
    for fused in (True, False):
        tt = kp.permute_and_pad_triton(xt, ids_t, E, a, prow, fused=fused, block_f=16)
        assert same_bits(tt[0], rr[0]), fused
        for i in range(1, 6):
            assert torch.equal(tt[i], rr[i]), (fused, i)
        assert tt[6].tolist() == [1]
        if T:
            assert kp.permute_and_pad_triton(xt, bad_ids, E, a, prow, fused=fused, block_f=16)[6].tolist() == [0]
    # route only, each launch plan, on a small tile so that several blocks take part
    route_ref = kp.route_reference(ids_t, E, a, prow)
    for plan in kp.ROUTE_PLANS:
        got = kp.route_triton(ids_t, E, a, prow, plan=plan, block_f=16)
        for i in range(5):
            assert torch.equal(got[i], route_ref[i]), (plan, i)
        assert got[5].tolist() == [1]
        if T:
            assert kp.route_triton(bad_ids, E, a, prow, plan=plan, block_f=16)[5].tolist() == [0]
    counts_p, dest, source = rr[1], rr[4], rr[5]
    yb = random_rows(prow, D, dtype, gen)
    assert same_bits(kp.unpad_triton(yb, counts_p, a, T * k, dest), kp.unpad_reference(yb, counts_p, a, T * k, dest))
    assert same_bits(
        kp.pad_rows_triton(xt.repeat_interleave(k, 0), counts_p, a, prow, source, 1),
        kp.pad_rows_reference(xt.repeat_interleave(k, 0), counts_p, a, prow, source, 1),
    )
    if dtype in kp._COMBINE_DTYPES:
        y = random_values(prow, D, dtype, gen)
        for w in (torch.rand(T, k, generator=gen), torch.rand(T, k, generator=gen).to(torch.bfloat16), None):
            assert same_bits(kp.combine_triton(y, dest, w, k), kp.combine_reference(y, dest, w, k))
            go = random_values(T, D, dtype, gen)
            need_w = w is not None
            gt = kp.combine_backward_triton(go, y, dest, source, w, k, True, need_w)
            gr = kp.combine_backward_reference(go, y, dest, source, w, k, True, need_w)
            assert same_bits(gt[0], gr[0])
            if need_w:  # a dot product over N: summation order differs, so a tolerance
                torch.testing.assert_close(gt[1].float(), gr[1].float(), rtol=1e-2, atol=1e-3)


def _run_interpreter_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    small = [a for a in ALIGNMENTS if (a or 1) <= 32]

    # no shrinking: in the interpreter it can take many minutes; the failing example is printed anyway
    @settings(max_examples=30, database=None, phases=[Phase.explicit, Phase.generate], **SETTINGS)
    @given(
        grouped_counts(alignments=small, max_groups=5, max_mult=2),
        routings(alignments=small, max_tokens=6, max_experts=5),
        st.sampled_from([1, 3, 16, 40]),
        st.sampled_from(COPY_DTYPES + [torch.float64]),
        st.integers(0, 2**31 - 1),
    )
    def small_cases(case, route, D, dtype, seed):
        alignment, counts = case
        _, E, _, _, ids = route
        _twin_checks(alignment, counts, ids, E, D, dtype, seed)

    # Tall tiles: a quarter of the interpreter's per-program cost; the tiles change no
    # arithmetic, only masks (the fixed cases below and the GPU tests use the defaults)
    default = dict(kp.COPY_CONFIG)
    kp.COPY_CONFIG.update(block_m=32)
    try:
        small_cases()
    finally:
        kp.COPY_CONFIG.clear()
        kp.COPY_CONFIG.update(default)
    # a few larger alignments / expert counts: several row blocks, masked expert lanes
    _twin_checks(128, [0, 129, 1], [[2, 1], [0, 2], [2, 0]], 3, 8, torch.bfloat16, 1)
    _twin_checks(32, [70] + [0] * 19 + [5], [[i % 20, 19 - i % 20] for i in range(40)], 20, 24, torch.float32, 2)
    _twin_checks(16, [0], [], 1, 5, torch.float8_e4m3fn, 3)
    print("interpreter checks passed")


# ----------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------


def _gpu_case(T=300, k=4, E=24, D=200, dtype=torch.bfloat16, alignment=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    ids[: T // 3] = ids[: T // 3] % 3  # skew: some experts heavy, some empty
    x = random_values(T, D, dtype, gen)
    return x.cuda(), ids.cuda()


GPU_CASES = [  # (dtype, alignment, D): every dtype, alignment and D class once, few compiles
    (torch.bfloat16, RECIPE_ALIGNMENTS[0], 2048),
    (torch.bfloat16, RECIPE_ALIGNMENTS[-1], 200),
    (torch.float32, 128, 1),
    (torch.float32, 1, 200),
    (torch.float64, RECIPE_ALIGNMENTS[0], 33),
    (torch.float8_e4m3fn, RECIPE_ALIGNMENTS[-1], 2048),
    (torch.float8_e4m3fn, RECIPE_ALIGNMENTS[0], 7),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,alignment,D", GPU_CASES)
def test_gpu_triton_matches_reference(dtype, alignment, D):
    x, ids = _gpu_case(D=D, dtype=torch.float32)
    x = x.to(dtype)
    T, k = ids.shape
    E = 24
    counts = torch.zeros(E, dtype=torch.int64, device="cuda").scatter_add_(0, ids.view(-1), torch.ones_like(ids.view(-1)))
    xg = x.repeat_interleave(k, 0)[torch.argsort(ids.view(-1), stable=True)]  # grouped copies
    M = xg.shape[0]
    rows = padded_rows(M, E, alignment)
    pt, pr = kp.pad_triton(xg, counts, alignment, rows), kp.pad_reference(xg, counts, alignment, rows)
    assert same_bits(pt[0], pr[0]) and torch.equal(pt[1], pr[1]) and torch.equal(pt[2], pr[2])
    assert same_bits(kp.unpad_triton(pt[0], counts, alignment, M), xg)
    rr = kp.permute_and_pad_reference(x, ids, E, alignment, rows)
    for fused, block_f in ((None, None), (True, 16), (False, None)):
        tt = kp.permute_and_pad_triton(x, ids, E, alignment, rows, fused=fused, block_f=block_f)
        assert same_bits(tt[0], rr[0]), (fused, block_f)
        for i in range(1, 6):
            assert torch.equal(tt[i], rr[i]), (fused, block_f, i)
        assert tt[6].item() == 1
    if dtype in kp._COMBINE_DTYPES:
        gen = torch.Generator().manual_seed(1)
        y = random_values(rows, D, dtype, gen).cuda()
        w = torch.rand(T, k, generator=gen).cuda()
        assert same_bits(kp.combine_triton(y, rr[4], w, k), kp.combine_reference(y, rr[4], w, k))
        go = random_values(T, D, dtype, gen).cuda()
        gt = kp.combine_backward_triton(go, y, rr[4], rr[5], w, k, True, True)
        gr = kp.combine_backward_reference(go, y, rr[4], rr[5], w, k, True, True)
        assert same_bits(gt[0], gr[0])
        torch.testing.assert_close(gt[1], gr[1], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_cached_launches_respect_alignment():
    # kernels.launch.CachedLauncher reuses a compiled kernel only for Triton's own
    # specialization: aligned rows, then rows starting 14 bytes past a 16-byte boundary,
    # then aligned again, each bitwise against the reference
    gen = torch.Generator().manual_seed(5)
    base = random_values(65, 7, torch.bfloat16, gen).cuda()
    counts = torch.tensor([30, 0, 34], device="cuda")
    rows = padded_rows(64, 3, 16)
    for x in (base[:-1], base[1:], base[:-1]):
        pt, pr = kp.pad_triton(x, counts, 16, rows), kp.pad_reference(x, counts, 16, rows)
        assert same_bits(pt[0], pr[0])
        assert same_bits(kp.unpad_triton(pt[0], counts, 16, 64), x)


@pytest.mark.gpu
def test_gpu_one_launch_permute_many_routings():
    # the one-launch kernel hands data between its programs through global memory
    # (tickets, a done counter, a ready flag): many fresh routings and sizes, each
    # bitwise against the reference, to catch ordering races
    gen = torch.Generator(device="cuda").manual_seed(0)
    for it in range(60):
        T, k, E = (4096, 2, 8) if it % 3 else (1024, 8, 32)
        bias = torch.randn(E, device="cuda", generator=gen) * (it % 4)
        ids = (torch.randn(T, E, device="cuda", generator=gen) + bias).topk(k, dim=-1).indices
        x = torch.randn(T, 64 + it, device="cuda", generator=gen).to(torch.bfloat16)
        a = RECIPE_ALIGNMENTS[it % len(RECIPE_ALIGNMENTS)]
        rows = padded_rows(T * k, E, a)
        tt = kp.permute_and_pad_triton(x, ids, E, a, rows, fused=True, share_buffers=bool(it % 2))
        rr = kp.permute_and_pad_reference(x, ids, E, a, rows)
        assert same_bits(tt[0], rr[0]), it
        for i in range(1, 6):
            assert torch.equal(tt[i], rr[i]), (it, i)


@pytest.mark.gpu
def test_gpu_no_host_sync_forward_and_backward():
    x, ids = _gpu_case()
    T, k = ids.shape
    E, a = 24, RECIPE_ALIGNMENTS[-1]
    x.requires_grad_()
    w = torch.rand(T, k, device="cuda", requires_grad=True)
    counts = torch.bincount(ids.view(-1), minlength=E)  # setup, outside the checked region
    xg = torch.randn(T * k, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        padded, layout = pad_token_groups(xg, counts, a)
        back = unpad_token_groups(padded * 2, layout)
        pp, cnt, lay = permute_and_pad(x, ids, E, a)
        out = combine_token_groups(pp * 3, lay, w)
        loss = back.float().sum() + out.float().square().sum()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    assert same_bits(xg.grad, torch.full_like(xg, 2))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_inductor():
    x, ids = _gpu_case(D=64)
    T, k = ids.shape
    E = 24
    counts = torch.bincount(ids.view(-1), minlength=E)
    xg = torch.randn(T * k, 64, device="cuda", dtype=torch.bfloat16)
    w0 = torch.rand(T, k, device="cuda")
    results = []
    for fn in (_all_ops, torch.compile(_all_ops, fullgraph=True)):
        xx, xt, w = xg.clone().requires_grad_(), x.clone().requires_grad_(), w0.clone().requires_grad_()
        back, out, offs, cnt = fn(xx, counts, xt, ids, w, E, RECIPE_ALIGNMENTS[0])
        (back.float().sum() + out.float().square().sum()).backward()
        results.append((back, out, offs, cnt, xx.grad, xt.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


if __name__ == "__main__":
    if "--interpret" in sys.argv:
        _run_interpreter_checks()
