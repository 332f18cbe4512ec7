"""One ExpertsPlan per converted experts module, made once; ``moeq.plan`` shows it first.

* ``moeq.plan(model, recipe)`` builds, without converting, exactly the plans
  ``convert_model`` then stores (``model.moeq_plan``, every ``module.moeq_plan``): moeq's
  MoE, transformers Qwen3-MoE / GPT-OSS / Llama 4 and torchtitan debug models.
* What runs is what the plan says: with a spy kernel registered the plan names it for
  every GEMM and forward, dgrad and wgrad all call it; the experts pad exactly when the
  plan says they do.
* Counters: forward and backward parse no recipe and resolve no kernel; conversion
  resolves once per module; a dtype change remakes each plan once.
"""
from __future__ import annotations

import collections
import dataclasses
import sys

import pytest
import torch

import moeq
from moeq.experts.plan import ExpertsPlan, ModelPlan
from moeq.numerics import recipes
from moeq.ops import emulated, registry

# ------------------------------------------------------------------ helpers


def _spy_kernel(calls):
    """A per-GEMM kernel "spy": moeq's emulated numerics, recording each GEMM it runs."""

    def wrap(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)

        return run

    return dataclasses.replace(
        registry.get_kernel("emulated"),
        name="spy",
        forward=wrap("forward", emulated.emulated_forward),
        dgrad=wrap("dgrad", emulated.emulated_dgrad),
        wgrad=wrap("wgrad", emulated.emulated_wgrad),
    )


@pytest.fixture
def spy(monkeypatch):
    calls = collections.Counter()
    monkeypatch.setitem(registry._REGISTRY, "spy", _spy_kernel(calls))
    return calls


@pytest.fixture
def pads(monkeypatch):
    """Counts calls of the pad op (pad_token_groups) the experts use to align groups."""
    from moeq.ops import padding

    calls = []
    original = padding.pad_token_groups

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(padding, "pad_token_groups", counted)
    return calls


_COUNTED = ("parse_recipe", "resolve_experts_kernels", "select_kernel", "choose_kernel", "get_kernel")


@pytest.fixture
def counters(monkeypatch):
    """Counting wrappers around the recipe parser and the kernel resolver, installed in
    every moeq module that holds them (imported by name or called through the module)."""
    counts = collections.Counter()
    originals = {
        "parse_recipe": recipes.parse_recipe,
        **{name: getattr(registry, name) for name in _COUNTED[1:]},
    }

    def counted(name, fn):
        def run(*args, **kwargs):
            # parse_recipe handed the enum itself parses nothing: counted apart
            passthrough = name == "parse_recipe" and isinstance(args[0], moeq.QuantizationType)
            counts[name + " (enum passed through)" if passthrough else name] += 1
            return fn(*args, **kwargs)

        return run

    wrappers = {name: counted(name, fn) for name, fn in originals.items()}
    patched = 0
    for modname, module in list(sys.modules.items()):
        if modname == "moeq" or modname.startswith("moeq."):
            for name, fn in originals.items():
                if module.__dict__.get(name) is fn:
                    monkeypatch.setattr(module, name, wrappers[name])
                    patched += 1
    assert patched >= len(originals)  # the wrappers really sit where the code calls them
    return counts


def _train_steps(model, make_inputs, steps=3):
    for _ in range(steps):
        out = model(*make_inputs())
        out = out[0] if isinstance(out, tuple) else out
        out = getattr(out, "logits", out)
        out.float().square().mean().backward()


def _assert_same_plans(planned: ModelPlan, model):
    """The plan printed before conversion is the one conversion stored, module by module."""
    stored = model.moeq_plan
    assert isinstance(stored, ModelPlan)
    assert planned == stored
    assert planned.summary() == stored.summary()
    assert str(planned) == str(stored)
    assert planned.fqns() == tuple(model.moeq_converted_fqns)
    for entry in planned.modules:
        assert model.get_submodule(entry.fqn).moeq_plan == entry.plan


# ------------------------------------------------------------------ moeq's own MoE


def _moe():
    torch.manual_seed(0)
    return moeq.MoE(64, 32, 4, 2, router_dtype=torch.float32, dtype=torch.float32)


@pytest.mark.parametrize("recipe", ["bf16", "fp8", "mxfp8"])
def test_moeq_plan_equals_conversion_and_runs(recipe, spy, pads):
    model = torch.nn.Sequential(_moe(), _moe())
    planned = moeq.plan(model, recipe, kernel="spy" if recipe != "bf16" else "auto")
    assert not any(isinstance(m, moeq.convert.ConvertedExperts) for m in model.modules()), "plan converted"
    assert planned.fqns() == ("0.experts", "1.experts")
    text = str(planned)
    assert "0.experts, 1.experts [moeq.GroupedExperts]" in text and "padding:" in text
    moeq.convert_model(model, recipe, kernel="spy" if recipe != "bf16" else "auto")
    _assert_same_plans(planned, model)
    plan = planned["0.experts"]
    assert plan.recipe is moeq.parse_recipe(recipe) and plan.alignment == moeq.group_alignment(recipe)
    x = torch.randn(40, 64, requires_grad=True)
    _train_steps(model, lambda: (x,), steps=1)
    if recipe == "bf16":
        assert plan.kernels() == dict.fromkeys(plan.kernels(), "torch._grouped_mm") and not spy
        return
    assert set(plan.kernels().values()) == {"spy"} and plan.fused is None
    assert spy["forward"] == 4 and spy["dgrad"] == 4 and spy["wgrad"] == 4  # 2 layers x 2 GEMMs each
    # moeq.MoE lays groups out aligned in its permute: the experts never pad...
    assert plan.pads and not pads
    # ...but called with packed groups they do, as the plan says
    experts = model[0].experts
    experts(torch.randn(10, 64), torch.tensor([3, 0, 5, 2]))
    assert len(pads) == 1


def test_plan_reports_emulation_and_the_faster_option():
    plan = moeq.plan(_moe(), "fp8")["experts"]
    assert plan.emulated and "quantized and dequantized in plain torch" in plan.emulated
    assert plan.faster and "kernel='torch'" in plan.faster and "kernel='triton'" in plan.faster
    assert "faster:" in plan.describe()
    # what a GPU would run, described without one: an SM90 H100 takes the fused kernel
    sm90 = registry.DeviceInfo("cuda", 0, (9, 0))
    resolved = registry.resolve_experts_kernels("auto", moeq.QuantizationType.FP8, sm90)
    assert resolved.fused.name == "triton" and resolved.per_gemm.name == "torch"


def test_plan_without_recipe_reads_converted_modules():
    model = moeq.convert_model(_moe(), "mxfp8")
    assert moeq.plan(model) .summary() == model.moeq_plan.summary()
    with pytest.raises(ValueError, match="pass a recipe"):
        moeq.plan(_moe())


def test_plan_raises_what_conversion_raises():
    with pytest.raises(ValueError, match="unknown recipe"):
        moeq.plan(_moe(), "int4")
    with pytest.raises(ValueError, match="unknown kernel 'cutlass'"):
        moeq.plan(_moe(), "fp8", kernel="cutlass")
    with pytest.raises(RuntimeError, match="needs an SM90 GPU"):
        moeq.plan(_moe(), "fp8", kernel="triton")
    with pytest.raises(ValueError, match="found no routed-experts"):
        moeq.plan(torch.nn.Linear(4, 4), "fp8")


def test_triton_is_a_registry_entry():
    triton = registry.get_kernel("triton")
    assert triton.fused and "triton" in registry.kernel_names()
    assert "triton" not in registry.available_kernels("fp8", registry.DeviceInfo("cuda", 0, (9, 0)))
    with pytest.raises(ValueError, match="whole SwiGLU experts"):
        moeq.quantized_grouped_mm(torch.randn(16, 16), torch.randn(1, 16, 16), torch.tensor([16], dtype=torch.int32),
                                  qtype="fp8", kernel="triton")


# ------------------------------------------------------------------ counters


def test_recipe_parsed_and_kernel_resolved_once_per_module(counters):
    model = torch.nn.Sequential(_moe(), _moe())
    moeq.convert_model(model, "fp8")
    assert counters["parse_recipe"] == 1  # the user's string, once for the model
    assert counters["resolve_experts_kernels"] == 2  # once per experts module
    assert counters["select_kernel"] == 2  # inside each resolution
    counters.clear()
    x = torch.randn(40, 64)
    _train_steps(model, lambda: (x.clone().requires_grad_(),))
    assert sum(counters.values()) == 0, f"per-call parsing / resolution: {dict(counters)}"
    # a new dtype: each plan is made again once (by .to()), then calls reuse it
    model.to(torch.bfloat16)
    assert counters["resolve_experts_kernels"] == 2
    assert all(m.moeq_plan.dtype == torch.bfloat16 for m in model.modules() if hasattr(m, "moeq_adapter"))
    counters.clear()
    _train_steps(model, lambda: (x.bfloat16().requires_grad_(),))
    assert sum(counters.values()) == 0, dict(counters)


# ------------------------------------------------------------------ transformers

HF_SIZES = dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_experts=4, top_k=2, expert_hidden_dim=64)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4"])
def test_transformers_plan_equals_conversion(family, spy, pads, counters):
    pytest.importorskip("transformers")
    from moeq.integrations.transformers.models import build_hf_model

    torch.manual_seed(0)
    model = build_hf_model(family, **HF_SIZES).float()
    planned = moeq.plan(model, "fp8", kernel="spy")
    assert len(planned) == 2 and all("transformers" in m.family for m in planned.modules)
    moeq.convert_model(model, "fp8", kernel="spy")
    _assert_same_plans(planned, model)
    for entry in planned.modules:
        assert set(entry.plan.kernels().values()) == {"spy"}
        assert entry.plan.routes_tokens and not entry.plan.pads  # the routed permute aligns in one pass
    counters.clear()
    tokens = torch.randint(0, 128, (2, 16))
    _train_steps(model, lambda: (tokens,), steps=2)
    assert spy["forward"] > 0 and spy["dgrad"] > 0 and spy["wgrad"] > 0
    assert not pads, "the plan says the routed permute aligns the groups: no separate pad"
    assert sum(counters.values()) == 0, dict(counters)


# ------------------------------------------------------------------ torchtitan


@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_torchtitan_plan_equals_conversion(family, spy, pads, counters):
    pytest.importorskip("torchtitan")
    from tests.test_torchtitan import _build, _converter_route, _tokens

    model = _build(_converter_route(family))
    planned = moeq.plan(model, "fp8", kernel="spy")
    assert len(planned) >= 1 and all("torchtitan" in m.family for m in planned.modules)
    moeq.convert_model(model, "fp8", kernel="spy")
    _assert_same_plans(planned, model)
    counters.clear()
    tokens = _tokens(model)[:, :-1]
    _train_steps(model, lambda: (tokens,), steps=1)
    assert spy["forward"] > 0 and spy["dgrad"] > 0 and spy["wgrad"] > 0
    assert sum(counters.values()) == 0, dict(counters)
    # the stock dispatcher hands over packed groups: the experts pad, as planned
    assert all(m.plan.pads for m in planned.modules) and len(pads) >= len(planned)


def test_torchtitan_config_route_plans_after_to_empty():
    """moeq.torchtitan converts at config time, on the meta device: the plan waits for
    real weights (to_empty), then is the one moeq.plan gives for the built model."""
    pytest.importorskip("torchtitan")
    from tests.test_torchtitan import _build, _converter_route

    converted = _build(_converter_route("qwen3", "fp8"))
    stock = _build(_converter_route("qwen3"))
    current = moeq.plan(converted)
    fresh = moeq.plan(stock, "fp8")
    assert current.fqns() == fresh.fqns()
    for a, b in zip(current.modules, fresh.modules):
        assert not a.plan.pending and a.plan.kernels() == b.plan.kernels() and a.plan.pads == b.plan.pads


def test_plan_is_frozen():
    plan = moeq.plan(_moe(), "fp8")["experts"]
    assert isinstance(plan, ExpertsPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.recipe = moeq.QuantizationType.MXFP8
