"""moeq.quantized_weight_cache: expert weights quantized once per optimizer step.

Checked on CPU: results with cached weight copies are bitwise those without, for the
output and every gradient, over gradient-accumulation micro-batches (MXFP8 through its
plain-torch references; FP8 through its Triton kernels under ``TRITON_INTERPRET=1`` in a
subprocess, with tests/test_fp8_hopper.py's emulation of ``torch._scaled_grouped_mm``);
the weight passes run once per context; a weight changed inside the context raises;
exiting drops the cache; nesting and unconverted models raise; the per-GEMM paths ignore
it; torch.compile bypasses it. The fused Hopper path only runs on SM90, so the end-to-end
tests route converted models to it by letting the registry's "triton" entry run on CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeq
from moeq.numerics.recipes import QuantizationType

ROOT = Path(__file__).resolve().parents[1]
MICRO_BATCHES = 3


def _bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    ia = a.contiguous().view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.contiguous().view(torch.int16 if b.element_size() == 2 else torch.int32)
    bad = int((ia != ib).sum())
    assert bad == 0, f"{what}: {bad} of {a.numel()} elements differ bitwise"


def _fused_on_cpu():
    """The registry's "triton" entry (the fused Hopper experts) allowed on any device, so
    a plan made after this takes it (their CPU/emulated ops run)."""
    import dataclasses

    from moeq.ops import registry

    return dataclasses.replace(registry.get_kernel("triton"), unsupported_reason=lambda qtype, device: None)


def _use_fused(monkeypatch) -> None:
    """Send converted experts to the fused Hopper functions on CPU (their CPU/emulated ops).
    Plans are made at conversion: call before converting."""
    from moeq.ops import registry

    monkeypatch.setitem(registry._REGISTRY, "triton", _fused_on_cpu())


def _count_weight_passes(monkeypatch, recipe: str) -> list:
    """Patch the recipe's weight-quantization pass with a counting wrapper; returns the counter."""
    calls = []
    if recipe == "mxfp8":
        from moeq.ops import mxfp8_hopper as mod

        name = "_ref_weight"
    else:
        from moeq.ops.fp8_hopper import _k as mod

        name = "quantize_weight"
    orig = getattr(mod, name)

    def counted(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(mod, name, counted)
    return calls


def _wide(w: torch.Tensor, gen=None) -> torch.Tensor:
    """Spread magnitudes over 2**-20..1, into e4m3's subnormals: blocks along K and along N then differ (with
    plain Gaussian weights the two copies of a weight are nearly always equal, and a mix-up
    of them would go unnoticed)."""
    return w * torch.exp2(-torch.randint(0, 21, w.shape, generator=gen).float()).to(w.dtype)


def _moe(recipe: str, seed: int = 0, dim: int = 64, hidden: int = 32, num_experts: int = 4):
    from moeq.convert import convert_model

    torch.manual_seed(seed)
    moe = moeq.MoE(dim, hidden, num_experts, 2, router_dtype=torch.float32, dtype=torch.bfloat16,
                   load_balancing="none")
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1.0)
        for w in (moe.experts.gate_up_proj, moe.experts.down_proj):
            w.copy_(_wide(w.normal_(0, 0.5)))
    return convert_model(moe, recipe)


def _accumulate(model, batches, cached: bool):
    """Gradient accumulation over ``batches``; returns (outputs, {name: grad})."""
    model.zero_grad(set_to_none=True)
    outs = []
    ctx = moeq.quantized_weight_cache(model) if cached else None
    if ctx is not None:
        ctx.__enter__()
    try:
        for x in batches:
            xr = x.detach().clone().requires_grad_()
            y = model(xr)
            y.float().square().mean().backward()
            outs.append((y.detach(), xr.grad))
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batches(dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(40 + 8 * i, dim, generator=g).bfloat16() for i in range(MICRO_BATCHES)]


def _assert_accumulation_bitwise(model, batches):
    want_outs, want_grads = _accumulate(model, batches, cached=False)
    got_outs, got_grads = _accumulate(model, batches, cached=True)
    for i, ((gy, gx), (wy, wx)) in enumerate(zip(got_outs, want_outs)):
        _bits_equal(gy, wy, f"micro-batch {i} y")
        _bits_equal(gx, wx, f"micro-batch {i} grad x")
    assert got_grads.keys() == want_grads.keys() and {"experts.gate_up_proj", "experts.down_proj"} <= got_grads.keys()
    for name in want_grads:
        _bits_equal(got_grads[name], want_grads[name], f"accumulated grad {name}")
    return want_outs


# ------------------------------------------------------------------ MXFP8 (references on CPU)


def _mx_problem(seed=0, e=3, d=64, h=32):
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor([32, 32, 96], dtype=torch.int32)  # expert 1 empty
    x = torch.randn(110, d, generator=g).bfloat16()  # 14 slack rows
    w1 = _wide(torch.randn(e, 2 * h, d, generator=g) * 0.3, g).bfloat16().requires_grad_()
    w2 = _wide(torch.randn(e, d, h, generator=g) * 0.3, g).bfloat16().requires_grad_()
    return x, w1, w2, offs


def test_mxfp8_function_with_precomputed_weights_is_bitwise():
    from moeq.ops.mxfp8_hopper import mxfp8_swiglu_experts, quantize_mxfp8_expert_weights

    x, w1, w2, offs = _mx_problem()
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).bfloat16()

    def run(qw):
        xr = x.detach().clone().requires_grad_()
        w1.grad = w2.grad = None
        y = mxfp8_swiglu_experts(xr, w1, w2, offs, quantized_weights=qw)
        y.backward(gy)
        return y.detach(), xr.grad, w1.grad, w2.grad

    qw = quantize_mxfp8_expert_weights(w1, w2)
    assert not any(t.requires_grad for t in qw), "cached copies must carry no autograd history"
    for got, want, what in zip(run(qw), run(None), ("y", "grad x", "grad gate_up", "grad down")):
        _bits_equal(got, want, what)
    # forward-only copies cannot serve a backward
    with pytest.raises(ValueError, match="need_dgrad=True"):
        mxfp8_swiglu_experts(x.detach().clone().requires_grad_(), w1, w2, offs, quantized_weights=quantize_mxfp8_expert_weights(
            w1, w2, need_dgrad=False))
    with torch.no_grad():
        y_nd = mxfp8_swiglu_experts(x, w1, w2, offs, quantized_weights=quantize_mxfp8_expert_weights(
            w1, w2, need_dgrad=False))
    _bits_equal(y_nd, run(None)[0], "no-grad y")
    with pytest.raises(ValueError, match="shape"):
        mxfp8_swiglu_experts(x, w1, w2, offs, quantized_weights=quantize_mxfp8_expert_weights(w1[:2], w2[:2]))
    with pytest.raises(TypeError, match="MXFP8ExpertWeights"):
        mxfp8_swiglu_experts(x, w1, w2, offs, quantized_weights=(w1, w1, w2, w2))


def test_mxfp8_moe_accumulation_cached_is_bitwise_and_quantizes_once(monkeypatch):
    _use_fused(monkeypatch)
    moe = _moe("mxfp8")
    batches = _batches(64)
    calls = _count_weight_passes(monkeypatch, "mxfp8")
    _accumulate(moe, batches, cached=False)
    assert len(calls) == 2 * MICRO_BATCHES, "uncached: both weights quantized every forward"
    calls.clear()
    with moeq.quantized_weight_cache(moe) as caches:
        for x in batches:
            moe(x.detach().clone().requires_grad_()).float().sum().backward()
        assert len(calls) == 2, f"cached: {len(calls)} weight passes in {MICRO_BATCHES} micro-batches, want 2"
        assert caches["experts"].quantize_count == 1
    assert "_moeq_weight_cache" not in moe.experts.__dict__, "exiting must drop the cache"
    assert not caches["experts"]._entries, "exiting must free the cached copies"
    # a second step quantizes again (the optimizer changed the weights between contexts)
    calls.clear()
    torch.optim.SGD(moe.parameters(), lr=0.1).step()
    with moeq.quantized_weight_cache(moe):
        moe(batches[0]).float().sum().backward()
    assert len(calls) == 2
    # bitwise: outputs, input grads and accumulated grads of every parameter
    _assert_accumulation_bitwise(moe, batches)


def test_stale_weight_raises_and_cache_is_dropped(monkeypatch):
    _use_fused(monkeypatch)
    moe = _moe("mxfp8")
    x = _batches(64)[0]
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="outside"):
        with moeq.quantized_weight_cache(moe):
            moe(x).float().sum().backward()
            with torch.no_grad():
                moe.experts.down_proj.add_(1)
            moe(x)
    assert "_moeq_weight_cache" not in moe.experts.__dict__
    # optimizer.step() inside the context is caught the same way
    with pytest.raises(RuntimeError, match=r"\['gate_up_proj', 'down_proj'\]"):
        with moeq.quantized_weight_cache(moe):
            moe(x).float().sum().backward()
            opt.step()
            moe(x)
    # replacing the parameter (new storage) is caught too
    with pytest.raises(RuntimeError, match="stale"):
        with moeq.quantized_weight_cache(moe):
            moe(x)
            moe.experts.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj.detach().clone())
            moe(x)
    # after the context everything works uncached
    moe(x).float().sum().backward()


def test_forward_only_then_backward_requantizes_with_dgrad_copies(monkeypatch):
    """A no-grad forward first (e.g. reentrant activation checkpointing) caches forward
    copies only; the next grad-enabled forward adds the dgrad copies, bitwise as uncached."""
    _use_fused(monkeypatch)
    moe = _moe("mxfp8")
    x = _batches(64)[0]
    with torch.no_grad():
        y_ref = moe(x)
    want = moe(x.detach().clone().requires_grad_())
    calls = _count_weight_passes(monkeypatch, "mxfp8")
    with moeq.quantized_weight_cache(moe):
        with torch.no_grad():
            _bits_equal(moe(x), y_ref, "no-grad y")
        got = moe(x.detach().clone().requires_grad_())
        moe(x.detach().clone().requires_grad_())
    assert len(calls) == 4  # forward-only pair, then the pair with dgrad copies, then reuse
    _bits_equal(got.detach(), want.detach(), "y")


def test_nesting_and_unconverted_models_raise(monkeypatch):
    moe = _moe("mxfp8")
    with moeq.quantized_weight_cache(moe):
        with pytest.raises(RuntimeError, match="nesting"):
            with moeq.quantized_weight_cache(moe):
                pass
        assert "_moeq_weight_cache" in moe.experts.__dict__, "a refused nested entry must not drop the outer cache"
    with pytest.raises(ValueError, match="convert_model"):
        with moeq.quantized_weight_cache(moeq.MoE(64, 32, 4, 2)):
            pass


@pytest.mark.parametrize("recipe,kernel", [("mxfp8", "auto"), ("fp8", "emulated"), ("bf16", "auto")])
def test_per_gemm_and_bf16_paths_ignore_the_cache(recipe, kernel):
    """Off SM90 (or with a per-GEMM kernel, or bf16) the context changes nothing."""
    from moeq.convert import convert_model

    torch.manual_seed(0)
    moe = convert_model(moeq.MoE(64, 32, 4, 2, router_dtype=torch.float32, dtype=torch.bfloat16), recipe, kernel=kernel)
    x = _batches(64)[0]
    want = moe(x)
    with moeq.quantized_weight_cache(moe) as caches:
        got = moe(x)
    _bits_equal(got.detach(), want.detach(), "y")
    assert caches["experts"].quantize_count == 0


def test_transformers_plain_swiglu_experts_end_to_end(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from moeq.convert import convert_model

    _use_fused(monkeypatch)
    cfg = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = convert_model(transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16), "mxfp8")
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "experts." in name:
                w.copy_(_wide(w.normal_(0, 0.5)))
    seqs = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(MICRO_BATCHES)]
    calls = _count_weight_passes(monkeypatch, "mxfp8")

    def step(cached):
        model.zero_grad(set_to_none=True)
        losses = []
        with (moeq.quantized_weight_cache(model) if cached else torch.enable_grad()):
            for s in seqs:
                loss = model(s, labels=s).loss
                loss.backward()
                losses.append(loss.detach())
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_losses, want_grads = step(False)
    assert len(calls) == 2 * 2 * MICRO_BATCHES  # 2 layers, 2 weights, every micro-batch
    calls.clear()
    got_losses, got_grads = step(True)
    assert len(calls) == 2 * 2, "one weight pass per weight per layer per step"
    for a, b in zip(got_losses, want_losses):
        _bits_equal(a, b, "loss")
    assert any("experts.gate_up_proj" in n for n in want_grads)
    for n in want_grads:
        _bits_equal(got_grads[n], want_grads[n], n)


def test_compile_fullgraph_bypasses_the_cache(monkeypatch):
    """fullgraph=True still traces the converted MoE forward and backward, with the context
    inactive and active (compiled code quantizes in the graph; the cache is eager-only)."""
    _use_fused(monkeypatch)
    moe = _moe("mxfp8")
    x = _batches(64)[0]

    def loss_fn(m, t):
        return m(t).float().square().mean()

    want = loss_fn(moe, x)
    want.backward()
    want_grads = [p.grad.clone() for p in moe.parameters()]
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for active in (False, True):
        moe.zero_grad(set_to_none=True)
        if active:
            with moeq.quantized_weight_cache(moe) as caches:
                got = compiled(moe, x)
                got.backward()
            assert caches["experts"].quantize_count == 0, "compiled code must not use the eager cache"
        else:
            got = compiled(moe, x)
            got.backward()
        torch.testing.assert_close(got, want)
        for g, p in zip(want_grads, moe.parameters()):
            torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------ FP8 (Triton interpreter + emulated GEMM)


def _check_fp8_cached_bitwise() -> None:
    """Run under TRITON_INTERPRET=1: fp8_swiglu_experts with precomputed / cached weights."""
    from moeq.convert import convert_model
    from moeq.ops import registry
    from moeq.ops import fp8_hopper as fh
    from tests.test_fp8_hopper import emulated_scaled_grouped_mm

    fh._scaled_grouped_mm = emulated_scaled_grouped_mm
    # 1) the function with precomputed weights, bitwise, forward and every gradient
    g = torch.Generator().manual_seed(3)
    e, d, h = 3, 32, 48
    offs = torch.tensor([32, 32, 80], dtype=torch.int32)  # expert 1 empty, 7 slack rows
    x = torch.randn(87, d, generator=g).bfloat16()
    w1 = _wide(torch.randn(e, 2 * h, d, generator=g) * 0.3, g).bfloat16().requires_grad_()
    w2 = _wide(torch.randn(e, d, h, generator=g) * 0.3, g).bfloat16().requires_grad_()
    gy = torch.randn(87, d, generator=g).bfloat16()

    def run(qw):
        xr = x.detach().clone().requires_grad_()
        w1.grad = w2.grad = None
        y = fh.fp8_swiglu_experts(xr, w1, w2, offs, quantized_weights=qw)
        y.backward(gy)
        return y.detach(), xr.grad, w1.grad, w2.grad

    qw = fh.quantize_fp8_expert_weights(w1, w2)
    for got, want, what in zip(run(qw), run(None), ("y", "grad x", "grad gate_up", "grad down")):
        _bits_equal(got, want, what)

    # x without grad (a first layer): uncached, gate_up's dgrad copy is skipped; same bits
    def run_no_x_grad(qw):
        w1.grad = w2.grad = None
        y = fh.fp8_swiglu_experts(x, w1, w2, offs, quantized_weights=qw)
        y.backward(gy)
        return y.detach(), w1.grad, w2.grad

    for got, want, what in zip(run_no_x_grad(qw), run_no_x_grad(None), ("y", "grad gate_up", "grad down")):
        _bits_equal(got, want, f"{what} (x without grad)")
    try:
        fh.fp8_swiglu_experts(x.detach().clone().requires_grad_(), w1, w2, offs,
                              quantized_weights=fh.quantize_fp8_expert_weights(w1, w2, need_dgrad=False))
        raise AssertionError("forward-only copies accepted for a backward")
    except ValueError as err:
        assert "need_dgrad=True" in str(err)
    # 2) a converted moeq.MoE over gradient-accumulation micro-batches, one weight pass per weight
    registry._REGISTRY["triton"] = _fused_on_cpu()
    torch.manual_seed(0)
    moe = moeq.MoE(32, 48, 3, 2, router_dtype=torch.float32, dtype=torch.bfloat16, load_balancing="none")
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1.0)
        for w in (moe.experts.gate_up_proj, moe.experts.down_proj):
            w.copy_(_wide(w.normal_(0, 0.5)))
    moe = convert_model(moe, "fp8")
    # one pass per weight copy: uncached, each micro-batch makes both weights' forward copies
    # in its forward and their input-gradient copies in its backward (4 passes); cached, the
    # context makes the same 4 once
    calls = []
    for name in ("quantize_weight_rows", "quantize_weight_cols"):
        orig = getattr(fh._s, name)
        setattr(fh._s, name, lambda *a, _orig=orig, **k: (calls.append(1), _orig(*a, **k))[1])
    batches = [t[:24] for t in _batches(32)]
    _assert_accumulation_bitwise(moe, batches)  # an uncached step, then a cached one
    assert len(calls) == 4 * MICRO_BATCHES + 4, f"{len(calls)} weight passes, want {4 * MICRO_BATCHES} uncached + 4 cached"


def test_fp8_cached_weights_bitwise_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import tests.test_weight_cache as t; t._check_fp8_cached_bitwise()"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def test_benchmark_cached_variant_runs_with_the_cache_in_use(monkeypatch, tmp_path):
    """benchmarks/experts.py's "(weights cached)" variant: its bitwise check and timing
    path, with the fused MXFP8 path (CPU references) so the cache is really used."""
    import importlib.util
    import io

    _use_fused(monkeypatch)
    spec = importlib.util.spec_from_file_location("bench_experts", ROOT / "benchmarks" / "experts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run_shape("tiny", bench.SHAPES["tiny"], ["moeq mxfp8 (weights cached)"], 0, io.StringIO(), "cpu")
    (row,) = rows
    assert "error" not in row, row.get("error")
    assert row["bitwise_vs_uncached"] and row["cache_used"]
    assert row["ms_amortized"] == pytest.approx((row["ms_uncached"] + 3 * row["ms"]) / 4)
    assert "amortized / 4 micro-batches" in bench.markdown(rows, "cpu")
