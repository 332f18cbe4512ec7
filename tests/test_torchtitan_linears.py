"""moeq's torchtitan converter composed with torchtitan's own float8 / MXFP8 linear
converters in one ``converters=[...]`` list (the real torchtitan 0.3.0 and torchao 0.18, CPU).

The routed experts are moeq's; the dense linears are torchtitan's ``Float8Linear`` /
``MXFP8Linear`` (torchao's classes with torchtitan's Module protocol). As far as torchtitan
allows on a CPU:

* float8: ``Float8LinearConverter.Config(emulate=True)`` (torchtitan's CPU/test switch;
  note it then uses torchao's *tensorwise* recipe, on a GPU ``recipe_name="rowwise"``).
* MXFP8: ``MXFP8LinearConverter`` refuses to start below SM100, so its capability check
  is patched to pass, and the built ``MXFP8Linear`` modules are switched to torchao's
  emulated kernels (``KernelPreference.EMULATED``) to run forward and backward here.

Per family: the expected linears are converted (all but ``lm_head`` and ``router.gate``,
left out with ``filter_fqns`` / ``fqns`` as docs/torchtitan.md says), the experts are
moeq's, state_dict keys are the stock ones, logits within the recipe's bound, and a few
AdamW steps lower the loss.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import moeq.torchtitan as mt
from moeq.experts.converted import ConvertedExperts
from tests.reference import rel_err
from tests.test_torchtitan import _build, _cpu_sized, _registry, _stock, _tokens, _train
from torchtitan.components.quantization import Float8Linear, Float8LinearConverter, MXFP8Linear, MXFP8LinearConverter
from torchtitan.models.common.linear import Linear

LEFT_OUT = ("lm_head", "router.gate")  # the lm_head and the router gates stay in bf16
# Measured rel err of the logits vs the stock model on these CPU-sized bfloat16 debug
# models (experts + linears quantized) is under 0.06; bound with margin.
LOGITS_BOUND = 0.1


def _wanted(model):
    """FQNs of the torchtitan Linears the converters should have converted."""
    return {f for f, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s in f for s in LEFT_OUT)}


def _linear_converter(recipe, monkeypatch):
    if recipe == "fp8":
        return Float8LinearConverter.Config(emulate=True, filter_fqns=list(LEFT_OUT))
    import torchtitan.components.quantization.mx as tt_mx

    monkeypatch.setattr(tt_mx, "has_cuda_capability", lambda *a: True)  # its SM100 gate
    # MXFP8LinearConverter's fqns selects; it has no skip list: name what to convert
    return MXFP8LinearConverter.Config(fqns=["attention.", "feed_forward.", "shared_experts."])


@pytest.mark.parametrize("recipe", ["fp8", "mxfp8"])
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3"])
def test_moeq_composes_with_torchtitans_linear_converters(family, recipe, monkeypatch):
    registry, flavor = _registry(family)
    converters = [_linear_converter(recipe, monkeypatch), mt.Converter.Config(recipe=recipe)]
    model = _build(_cpu_sized(registry(flavor, converters=converters).model))
    target = Float8Linear if recipe == "fp8" else MXFP8Linear
    if recipe == "mxfp8":
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

        for m in model.modules():
            if isinstance(m, MXFP8Linear):
                m.kernel_preference = KernelPreference.EMULATED  # no SM100 here

    experts, stock_state, stock_logits = _stock(family)
    converted = {f for f, m in model.named_modules() if isinstance(m, target)}
    plain = {f for f, m in model.named_modules() if type(m) is Linear}
    assert converted and converted == _wanted(model)
    assert all(any(s in f for s in LEFT_OUT) for f in plain), plain
    assert any(f.endswith("router.gate") for f in plain) and "lm_head" in plain
    assert sorted(f for f, m in model.named_modules() if isinstance(m, ConvertedExperts)) == sorted(experts)
    assert list(model.state_dict()) == list(stock_state)

    with torch.no_grad():
        logits = model(_tokens(model)[:, :-1])
    err = rel_err(logits.float(), stock_logits.float())
    assert 0 < err <= LOGITS_BOUND, f"{family} {recipe}: logits rel err {err:.4f}"
    losses = _train(model)
    assert losses[-1] < losses[0], losses


def test_convert_model_linears_leaves_torchtitan_linears_to_torchtitan():
    """moeq.convert_model(linears=True) on a built torchtitan model converts the experts and
    names torchtitan's own converters for its Linear subclass instead of swapping it."""
    import moeq

    registry, flavor = _registry("qwen3")
    model = _build(_cpu_sized(registry(flavor).model))
    moeq.convert_model(model, "fp8", linears=lambda fqn, m: True)
    plan = model.moeq_linears
    assert not plan.converted
    attention = [f for f in plan.skipped if "attention" in f]
    assert attention and all("Float8LinearConverter" in plan.skipped[f] for f in attention)
    assert all(type(m) is Linear for f, m in model.named_modules() if f in attention)
