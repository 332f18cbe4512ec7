"""Bad input never gives a silent wrong answer: every public entry point.

Tables of input -> (exception type, regex of its message naming the argument), and the
inputs that are accepted checked against plain torch. CPU eager raises value errors at
once; tests/test_quant.py and tests/test_padding.py hold the GEMM's and padding ops' own
tables.
"""
import math

import pytest
import torch

import moeq
from moeq.experts.swiglu import COMPUTE_BACKENDS, swiglu_experts
from moeq.numerics.validation import NonFiniteError, normalize_filter_fqns
from tests.reference import experts_reference, rel_err

D, H, E = 16, 24, 3


def _experts(backend="grouped_mm", dtype=torch.float32, num_experts=E):
    torch.manual_seed(0)
    ex = moeq.GroupedExperts(D, H, num_experts, compute_backend=backend)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.3)
        ex.down_proj.normal_(0, 0.3)
    return ex.to(dtype)


def _counts(*c, dtype=torch.int64):
    return torch.tensor(c, dtype=dtype)


X6 = lambda: torch.randn(6, D)  # noqa: E731

# (case, call(experts) -> result, exception, message regex)
EXPERTS_BAD = [
    ("sum < M", lambda ex: ex(X6(), _counts(1, 2, 1)), ValueError,
     r"num_tokens_per_expert does not sum to the number of rows of x \(6\)"),
    ("sum > M", lambda ex: ex(X6(), _counts(3, 2, 3)), ValueError,
     r"num_tokens_per_expert does not sum to the number of rows of x \(6\)"),
    ("negative count", lambda ex: ex(X6(), _counts(-1, 4, 3)), ValueError,
     r"num_tokens_per_expert has a negative count"),
    ("length E-1", lambda ex: ex(X6(), _counts(3, 3)), ValueError,
     r"num_tokens_per_expert must have shape \(3,\), one count per expert, got \(2,\)"),
    ("length E+1", lambda ex: ex(X6(), _counts(3, 3, 0, 0)), ValueError, r"num_tokens_per_expert must have shape \(3,\)"),
    ("2-D counts", lambda ex: ex(X6(), _counts(3, 3, 0)[None]), ValueError, r"num_tokens_per_expert must have shape"),
    ("float counts", lambda ex: ex(X6(), torch.tensor([2.5, 2.5, 1.0])), TypeError,
     r"num_tokens_per_expert must have an integer dtype.*got torch.float32"),
    ("bool counts", lambda ex: ex(X6(), torch.tensor([True, True, False])), TypeError,
     r"num_tokens_per_expert must have an integer dtype"),
    ("list counts", lambda ex: ex(X6(), [2, 2, 2]), TypeError, r"num_tokens_per_expert must be a \(3,\) integer tensor"),
    ("1-D x", lambda ex: ex(torch.randn(D), _counts(1, 0, 0)), ValueError, r"x must be 2-D \(tokens, dim\), got shape \(16,\)"),
    ("3-D x", lambda ex: ex(torch.randn(2, 3, D), _counts(2, 0, 0)), ValueError, r"x must be 2-D.*flatten leading dims"),
    ("x features != D", lambda ex: ex(torch.randn(6, 8), _counts(2, 2, 2)), ValueError,
     r"x has 8 features per token but the experts' dim is 16"),
    ("fp16 x, fp32 weights", lambda ex: ex(X6().half(), _counts(2, 2, 2)), TypeError,
     r"x is torch.float16 but the expert weights are torch.float32: cast"),
    ("int x", lambda ex: ex(torch.ones(6, D, dtype=torch.int32), _counts(2, 2, 2)), TypeError,
     r"x must be a floating-point tensor"),
    ("x not a tensor", lambda ex: ex([[0.0] * D], _counts(1, 0, 0)), TypeError, r"x must be a torch.Tensor"),
    ("counts on another device", lambda ex: ex.to("meta")(torch.randn(6, D, device="meta"), _counts(2, 2, 2)),
     ValueError, r"num_tokens_per_expert is on cpu but x is on meta: keep the counts on x's device"),
    ("x on another device", lambda ex: ex(torch.randn(6, D, device="meta"), _counts(2, 2, 2)), ValueError,
     r"x is on meta but the expert weights are on cpu"),
    ("alignment 3", lambda ex: ex(X6(), _counts(2, 2, 2), group_alignment=3), ValueError,
     r"group_alignment must be None or a power of two, got 3"),
    ("alignment 0", lambda ex: ex(X6(), _counts(2, 2, 2), group_alignment=0), ValueError,
     r"group_alignment must be positive, got 0"),
    ("alignment float", lambda ex: ex(X6(), _counts(2, 2, 2), group_alignment=8.0), TypeError,
     r"group_alignment must be an int"),
    ("padded groups exceed rows", lambda ex: ex(torch.randn(20, D), _counts(5, 5, 5), group_alignment=8), ValueError,
     r"rounded up to a multiple of group_alignment=8, needs more rows than x has \(20\)"),
    ("padded, negative", lambda ex: ex(torch.randn(32, D), _counts(-1, 5, 5), group_alignment=8), ValueError,
     r"negative count"),
    ("E = 0 with tokens", lambda ex: moeq.GroupedExperts(D, H, 0)(X6(), torch.zeros(0, dtype=torch.long)), ValueError,
     r"does not sum to the number of rows of x \(6\)"),
]


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("case,call,exc,pattern", EXPERTS_BAD, ids=[c[0] for c in EXPERTS_BAD])
def test_grouped_experts_bad_input(backend, case, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(_experts(backend))


def test_functional_form_checks_weights():
    x, c = X6(), _counts(2, 2, 2)
    w13, w2 = torch.randn(E, 2 * H, D), torch.randn(E, D, H)
    with pytest.raises(ValueError, match=r"expert weights do not fit together"):
        swiglu_experts(x, w13, w2[:, :, :8], c)
    with pytest.raises(TypeError, match=r"gate_up_proj is torch.float32 but down_proj is torch.bfloat16"):
        swiglu_experts(x, w13, w2.bfloat16(), c)
    with pytest.raises(ValueError, match=r"gate_up_proj must be 3-D"):
        swiglu_experts(x, w13[0], w2, c)


# accepted inputs: (case, x, counts, group_alignment, dtype)
EXPERTS_OK = [
    ("plain", lambda: torch.randn(9, D), _counts(4, 0, 5), None, torch.float32),
    ("transposed x", lambda: torch.randn(D, 9).t(), _counts(4, 0, 5), None, torch.float32),
    ("int32 counts", lambda: torch.randn(9, D), _counts(4, 0, 5, dtype=torch.int32), None, torch.float32),
    ("all in one expert", lambda: torch.randn(7, D), _counts(0, 7, 0), None, torch.float32),
    ("no tokens", lambda: torch.randn(0, D), _counts(0, 0, 0), None, torch.float32),
    ("bf16", lambda: torch.randn(9, D), _counts(4, 0, 5), None, torch.bfloat16),
    ("padded with slack", lambda: torch.randn(40, D), _counts(3, 0, 5), 8, torch.float32),
]
OK_TOL = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("case,make_x,counts,align,dtype", EXPERTS_OK, ids=[c[0] for c in EXPERTS_OK])
def test_grouped_experts_accepted_input_matches_reference(backend, case, make_x, counts, align, dtype):
    """Real rows equal the float64 per-expert loop; padding and slack rows (output and x's
    gradient) are exactly zero, even when the slack of x holds NaN."""
    ex = _experts(backend, dtype)
    torch.manual_seed(1)
    x = make_x().to(dtype)
    real_rows = list(range(x.shape[0]))
    if align:
        starts, rows = [], 0
        for c in counts.tolist():
            starts.append(rows)
            rows += -(-c // align) * align
        real_rows = [s + i for s, c in zip(starts, counts.tolist()) for i in range(c)]
        x = x.detach().clone()
        pad = torch.ones(x.shape[0], dtype=torch.bool)
        pad[real_rows] = False
        x[pad] = 0.0
        x[rows:] = float("nan")  # slack: never read
    x = x.requires_grad_()
    out = ex(x, counts, group_alignment=align)
    assert out.shape == (x.shape[0], D) and out.dtype == dtype
    ref = experts_reference(x.detach()[real_rows].double(), ex.gate_up_proj.detach(), ex.down_proj.detach(), counts)
    assert rel_err(out[real_rows], ref) <= OK_TOL[dtype]
    others = [r for r in range(x.shape[0]) if r not in real_rows]
    assert torch.equal(out[others], torch.zeros_like(out[others]))
    out.backward(torch.ones_like(out))
    assert torch.isfinite(x.grad).all()
    if align:
        assert torch.equal(x.grad[rows:], torch.zeros_like(x.grad[rows:]))  # slack rows: zero, defined


def test_value_checks_can_be_skipped_for_trusted_counts():
    ex = _experts()
    x = X6()
    # wrong counts, value checks off: documented as the caller's promise (moeq's routing)
    out = swiglu_experts(x, ex.gate_up_proj, ex.down_proj, _counts(2, 2, 2), validate_counts=False)
    assert out.shape == (6, D)
    with pytest.raises(TypeError, match="integer dtype"):  # static checks stay on
        swiglu_experts(x, ex.gate_up_proj, ex.down_proj, torch.ones(3), validate_counts=False)


# ---- constructors and the MoE / router ----------------------------------------------

CONSTRUCT_BAD = [
    ("experts dim 0", lambda: moeq.GroupedExperts(0, H, E), ValueError, r"dim must be positive, got 0"),
    ("experts E -1", lambda: moeq.GroupedExperts(D, H, -1), ValueError, r"num_experts must be >= 0, got -1"),
    ("experts dim float", lambda: moeq.GroupedExperts(16.0, H, E), TypeError, r"dim must be an int, got 16.0"),
    ("experts backend", lambda: moeq.GroupedExperts(D, H, E, compute_backend="cutlass"), ValueError,
     r"unknown compute_backend 'cutlass'"),
    ("top_k 0", lambda: moeq.MoE(D, H, 4, 0), ValueError, r"top_k=0 must be between 1 and num_experts=4"),
    ("top_k float", lambda: moeq.MoE(D, H, 4, 1.5), TypeError, r"top_k must be an int, got 1.5 \(float\)"),
    ("top_k bool", lambda: moeq.MoE(D, H, 4, True), TypeError, r"top_k must be an int, got True \(bool\)"),
    ("top_k > E", lambda: moeq.MoE(D, H, 4, 5), ValueError, r"top_k=5 must be between 1 and num_experts=4"),
    ("MoE E 0", lambda: moeq.MoE(D, H, 0, 1), ValueError, r"num_experts must be positive, got 0"),
    ("MoE hidden 0", lambda: moeq.MoE(D, 0, 4, 2), ValueError, r"hidden_dim must be positive, got 0"),
    ("MoE dim -1", lambda: moeq.MoE(-1, H, 4, 2), ValueError, r"dim must be positive, got -1"),
    ("shared expert -2", lambda: moeq.MoE(D, H, 4, 2, shared_expert_hidden_dim=-2), ValueError,
     r"shared_expert_hidden_dim must be >= 0"),
    ("aux coeff nan", lambda: moeq.MoE(D, H, 4, 2, aux_loss_coeff=float("nan")), ValueError,
     r"aux_loss_coeff must be finite"),
    ("aux coeff < 0", lambda: moeq.TopKRouter(D, 4, 2, aux_loss_coeff=-1.0), ValueError, r"aux_loss_coeff must be >= 0"),
    ("router E 0", lambda: moeq.TopKRouter(D, 0, 1), ValueError, r"num_experts must be positive"),
    ("score func", lambda: moeq.TopKRouter(D, 4, 2, score_func="relu"), ValueError, r"score_func='relu'"),
]


@pytest.mark.parametrize("case,call,exc,pattern", CONSTRUCT_BAD, ids=[c[0] for c in CONSTRUCT_BAD])
def test_constructor_bad_input(case, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_numpy_ints_are_ints():
    np = pytest.importorskip("numpy")
    moe = moeq.MoE(np.int64(D), np.int64(H), np.int64(4), np.int64(2))
    assert moe(torch.randn(3, D)).shape == (3, D)


MOE_FORWARD_BAD = [
    ("last dim != D", lambda: torch.randn(4, 8), ValueError, r"x must be \(\.\.\., 16\) tokens"),
    ("0-d x", lambda: torch.tensor(1.0), ValueError, r"x must be \(\.\.\., 16\) tokens"),
    ("int x", lambda: torch.ones(4, D, dtype=torch.int64), TypeError, r"x must be a floating-point tensor"),
    ("fp16 x on fp32 MoE", lambda: torch.randn(4, D).half(), TypeError, r"x is torch.float16 but the MoE's parameters"),
    ("not a tensor", lambda: [1.0] * D, TypeError, r"x must be a torch.Tensor"),
]


@pytest.mark.parametrize("case,make_x,exc,pattern", MOE_FORWARD_BAD, ids=[c[0] for c in MOE_FORWARD_BAD])
def test_moe_forward_bad_input(case, make_x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        moeq.MoE(D, H, 4, 2)(make_x())


def test_router_forward_bad_input():
    router = moeq.TopKRouter(D, 4, 2)
    with pytest.raises(ValueError, match=r"x must be 2-D \(tokens, dim\)"):
        router(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match=r"x has 8 features per token but the router's dim is 16"):
        router(torch.randn(3, 8))


# ---- padded_rows, convert_model ------------------------------------------------------

PADDED_ROWS_BAD = [
    ((10, -3, 16), ValueError, r"num_groups must be >= 0, got -3"),
    ((-1, 3, 16), ValueError, r"num_rows must be >= 0, got -1"),
    ((1.5, 3, 16), TypeError, r"num_rows must be an int, got 1.5"),
    ((10, True, 16), TypeError, r"num_groups must be an int, got True"),
    ((10, 3, 12), ValueError, r"alignment must be a power of two"),
]


@pytest.mark.parametrize("args,exc,pattern", PADDED_ROWS_BAD)
def test_padded_rows_bad_input(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        moeq.padded_rows(*args)


@pytest.mark.parametrize("m,e,a", [(0, 0, 16), (10, 3, 16), (10, 3, None), (7, 0, 32), (100, 8, 1)])
def test_padded_rows_is_the_bound(m, e, a):
    want = m if a in (None, 1) else math.ceil((m + e * (a - 1)) / a) * a
    assert moeq.padded_rows(m, e, a) == want


def _two_experts_model():
    m = torch.nn.Module()
    m.a, m.b = torch.nn.Module(), torch.nn.Module()
    m.a.experts = moeq.GroupedExperts(32, 32, 2)
    m.b.experts = moeq.GroupedExperts(32, 32, 2)
    return m


CONVERT_BAD = [
    ("model None", dict(model=None), TypeError, r"model must be a torch.nn.Module, got NoneType"),
    ("model a tensor", dict(model=torch.zeros(2)), TypeError, r"model must be a torch.nn.Module, got Tensor"),
    ("filter int", dict(filter_fqns=3), TypeError, r"filter_fqns must be None, a str, a list/tuple of str.*got int 3"),
    ("filter list of ints", dict(filter_fqns=["a", 1]), TypeError, r"filter_fqns must be .*it holds 1 \(int\)"),
    ("filter bytes", dict(filter_fqns=b"a"), TypeError, r"filter_fqns must be .*got bytes"),
    ("filter matches nothing", dict(filter_fqns="c.experts"), ValueError,
     r"found no experts modules matching filter_fqns=\('c.experts',\)"),
]


@pytest.mark.parametrize("case,kw,exc,pattern", CONVERT_BAD, ids=[c[0] for c in CONVERT_BAD])
def test_convert_model_bad_input(case, kw, exc, pattern):
    kw = dict(kw)
    model = kw.pop("model") if "model" in kw else _two_experts_model()
    with pytest.raises(exc, match=pattern):
        moeq.convert_model(model, "fp8", kernel="emulated", **kw)


@pytest.mark.parametrize("filter_fqns,converted", [
    ("b.experts", ["b.experts"]),  # a str is ONE substring, never its characters
    ("b", ["b.experts"]),
    ("experts", ["a.experts", "b.experts"]),
    (["a.", "b.experts"], ["a.experts", "b.experts"]),
    (("a.experts",), ["a.experts"]),
    (lambda fqn, mod: fqn.startswith("a"), ["a.experts"]),
    (None, ["a.experts", "b.experts"]),
])
def test_convert_model_filter_fqns(filter_fqns, converted):
    model = moeq.convert_model(_two_experts_model(), "fp8", kernel="emulated", filter_fqns=filter_fqns)
    assert model.moeq_converted_fqns == converted
    kinds = {name: type(getattr(model, name[0]).experts).__name__ for name in ("a.experts", "b.experts")}
    assert [n for n, k in kinds.items() if k != "GroupedExperts"] == converted
    assert normalize_filter_fqns("b.experts") == ("b.experts",)


# ---- finite but huge tokens under FP8 / MXFP8 ----------------------------------------


@pytest.mark.parametrize("recipe", ["fp8", "mxfp8"])
def test_huge_finite_token_gemm_gives_the_right_answer(recipe):
    """A finite 1e30 in a quantized GEMM's input is quantized like any value: the GEMM is
    finite and equals the float64 product of the quantized operands."""
    from moeq.ops import quantized_grouped_mm
    from moeq.ops.emulated import _along

    torch.manual_seed(0)
    a = torch.randn(64, 32)
    a[0, 0] = 1e30
    b = torch.randn(2, 32, 32)
    offs = torch.tensor([32, 64], dtype=torch.int32)
    out = quantized_grouped_mm(a, b, offs, qtype=recipe, kernel="emulated")
    assert torch.isfinite(out).all()
    q = moeq.parse_recipe(recipe)
    aq, bq = _along(a, -1, q).double(), _along(b, -1, q).double()
    ref = torch.cat([aq[:32] @ bq[0].T, aq[32:] @ bq[1].T])
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("recipe", ["fp8", "mxfp8"])
def test_huge_finite_token_in_a_converted_moe_names_the_overflow(recipe):
    """The experts' SwiGLU of a 1e30 token overflows (plain torch gives Inf there too): the
    converted MoE says so, as a range problem, not 'contains NaN or Inf' of a finite input."""
    torch.manual_seed(0)
    moe = moeq.MoE(32, 32, 4, 2)
    plain = moeq.MoE(32, 32, 4, 2)
    plain.load_state_dict(moe.state_dict())
    moeq.convert_model(moe, recipe, kernel="emulated")
    x = torch.randn(8, 32)
    x[0, 0] = 1e30
    with pytest.raises(NonFiniteError, match=r"contains Inf: a value beyond the range of torch\.\w+ .*overflowed"):
        moe(x)
    # the unconverted model: the overflow stays in that token's row
    finite = plain(x).isfinite().all(-1)
    assert not finite[0] and finite[1:].all()


# ---- aux-loss scale --------------------------------------------------------------------


def _aux_moe():
    torch.manual_seed(0)
    return moeq.MoE(16, 8, 4, 2, aux_loss_coeff=10.0)


def _gate_grad(moe, x, loss_factor):
    moe.zero_grad()
    (moe(x).sum() * loss_factor).backward()
    return moe.router.gate.weight.grad.clone()


@pytest.mark.parametrize("factor", [0.25, 1024.0])
def test_aux_loss_scales_with_the_loss_it_rides_on(factor):
    """(k * loss).backward() with set_aux_loss_scale(model, k) gives k times the gradient of
    loss.backward(): the balancing term keeps its weight relative to the loss (loss / N
    accumulation: k = 1/N; GradScaler: k = its scale). Without it the term is reweighted."""
    x = torch.randn(32, 16)
    moe = _aux_moe()
    base = _gate_grad(moe, x, 1.0)
    unscaled = _gate_grad(moe, x, factor)
    assert not torch.allclose(unscaled, factor * base, rtol=1e-3)  # the reweighting being fixed
    assert moeq.set_aux_loss_scale(moe, factor) == 1
    torch.testing.assert_close(_gate_grad(moe, x, factor), factor * base, rtol=1e-5, atol=1e-7)
    moeq.set_aux_loss_scale(moe, torch.tensor(factor))  # a 0-d tensor (no host read)
    torch.testing.assert_close(_gate_grad(moe, x, factor), factor * base, rtol=1e-5, atol=1e-7)
    moeq.set_aux_loss_scale(moe, 0.0)  # off: only the task gradient
    moe.router.load_balancing = "none"
    no_aux = _gate_grad(moe, x, 1.0)
    moe.router.load_balancing = "aux_loss"
    torch.testing.assert_close(_gate_grad(moe, x, 1.0), no_aux)


@pytest.mark.parametrize("scale,exc,pattern", [
    (-1.0, ValueError, r"scale must be >= 0"),
    (float("inf"), ValueError, r"scale must be finite"),
    ("1", TypeError, r"scale must be a number"),
    (torch.ones(2), TypeError, r"scale must be a number or a 0-d floating-point tensor"),
])
def test_aux_loss_scale_bad_input(scale, exc, pattern):
    with pytest.raises(exc, match=pattern):
        moeq.set_aux_loss_scale(_aux_moe(), scale)


def test_aux_loss_scale_needs_a_moe():
    with pytest.raises(ValueError, match="found no moeq.MoE layer in Linear"):
        moeq.set_aux_loss_scale(torch.nn.Linear(2, 2), 0.5)


@pytest.mark.parametrize("counts", [_counts(1, 2, 1), _counts(-1, 4, 3)], ids=["sum < M", "negative"])
def test_compiled_experts_check_counts_on_the_device(counts):
    """Under torch.compile the value checks are torch._assert_async (what CUDA runs eager):
    wrong counts still stop the call, with no host read in the graph."""
    ex = _experts()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, c: ex(x, c), fullgraph=True, backend="aot_eager")
    assert compiled(X6(), _counts(2, 2, 2)).shape == (6, D)
    with pytest.raises(RuntimeError, match=r"num_tokens_per_expert: a count is negative or the counts do not fit x's rows"):
        compiled(X6(), counts)


def test_device_messages_fit_torch_limit(monkeypatch):
    """Every message moeq hands torch._assert_async fits its limit (CUDA refuses 255+
    characters even when the condition holds), and a cut message keeps its start."""
    from moeq.numerics import validation

    seen = []

    def assert_async_as_cuda(cond, msg=""):
        if len(msg) >= 255:  # what CUDA's kernel launch does
            raise RuntimeError("Message length must be smaller than 255")
        seen.append(msg)
        assert bool(cond), msg

    monkeypatch.setattr(torch, "_assert_async", assert_async_as_cuda)
    monkeypatch.setattr(validation, "checks_read_on_host", lambda t: False)
    long = "num_tokens_per_expert is wrong: " + "explain " * 60
    cut = validation.device_message(long)
    assert len(cut) == validation.DEVICE_MESSAGE_LIMIT and cut.startswith("num_tokens_per_expert is wrong")
    validation.assert_on_device(torch.tensor(True), long)
    # right input through the entry points, value checks as on CUDA
    ex = moeq.GroupedExperts(D, 32, 4)
    ex(X6(), _counts(2, 2, 0, 2))
    ex(X6(), _counts(0, 0, 0, 6))
    x = torch.randn(16, D)
    padded, layout = moeq.pad_token_groups(x, torch.tensor([3, 5, 0, 8]), 16)
    moeq.unpad_token_groups(padded, layout)
    moeq.permute_and_pad(x, torch.randint(0, 4, (16, 2)), 4, 16)
    assert seen and all(len(m) < 255 for m in seen), max(seen, key=len)
    with pytest.raises(AssertionError, match="num_tokens_per_expert: a count is negative"):
        ex(X6(), _counts(1, 2, 0, 2))


_CUDA_SCRIPT = """
import sys, torch, moeq
ex = moeq.GroupedExperts(64, 64, 4, dtype=torch.bfloat16, device="cuda")
x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
good = torch.tensor([2, 2, 0, 4], device="cuda")
ex(x, good)
torch.cuda.synchronize()
bad = torch.tensor([int(a) for a in sys.argv[1:]], device="cuda")
torch.cuda.set_sync_debug_mode("error")  # the checks must not sync
ex(x, good)
print("good ok", flush=True)
ex(x, bad)
torch.cuda.set_sync_debug_mode("default")
torch.cuda.synchronize()
print("no assert")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("counts", [("1", "2", "0", "4"), ("-1", "5", "0", "4")], ids=["sum < M", "negative"])
def test_cuda_counts_checked_on_the_device_without_sync(counts):
    """On CUDA, wrong counts fail a device-side assert (no host sync, no wrong output
    consumed); right counts pass under sync-debug 'error'. A subprocess: the assert ends
    the CUDA context."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT, *counts], capture_output=True, text=True, timeout=300)
    assert "good ok" in r.stdout, r.stdout + r.stderr[-3000:]  # right counts: no sync, no error
    assert r.returncode != 0 and "no assert" not in r.stdout, r.stdout + r.stderr
    assert "device-side assert" in r.stderr or "num_tokens_per_expert" in r.stderr, r.stderr[-3000:]
