"""``convert_model(..., linears=...)``: the dense linears through torchao's own training
linears, on CPU with the real torchao 0.18 and transformers 5.x.

CPU path: torchao's emulation (``Float8LinearConfig(emulate=True)`` with the rowwise
recipe; ``MXFP8Linear(kernel_preference=EMULATED)``): the same quantization numerics,
the GEMM dequantized in float32. The models are tiny but their attention width is 512, so
``linears=True`` (which leaves out linears whose smaller side is under
``MIN_FEATURES = 512``) has something to convert.

Per family (moeq's own model, transformers Qwen3-MoE, Mixtral, DeepSeek-V3, GPT-OSS) and
recipe: exactly the expected linears become torchao's classes, the rest are skipped with
the documented reason, state_dict keys and values are unchanged, the logits are within
the recipe's bound of the unconverted model (and differ from it: the quantized path ran),
AdamW steps lower the loss, a save_pretrained / from_pretrained round trip gives back the
same weights, and one decoder layer traces with ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeq
from moeq.experts.converted import ConvertedExperts
from moeq.integrations.transformers.models import hf_config
from moeq.integrations.torchao.linears import MIN_FEATURES, convert_linears, plan_linears
from moeq.integrations.torchao.linears_plan import LinearsPlan
from moeq.nn.model import MoEModelConfig, MoETransformer
from tests.reference import rel_err
from tests.test_convert import ERROR_BOUND

transformers = pytest.importorskip("transformers")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402
from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear  # noqa: E402

TARGET = {"fp8": Float8Linear, "mxfp8": MXFP8Linear}
RECIPES = ["fp8", "mxfp8"]
DIM = MIN_FEATURES
SIZES = dict(vocab_size=128, dim=DIM, num_layers=2, num_heads=4, num_experts=4, top_k=2, expert_hidden_dim=64)
BATCH, SEQ = 2, 32  # 64 tokens: a multiple of 32, as MXFP8's weight-gradient GEMM needs

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
# family -> (builder, suffixes of the linears linears=True converts in every layer, {suffix: skip reason part})
FAMILIES = {
    "moeq": (lambda: MoETransformer(MoEModelConfig(dim=DIM, num_heads=4, expert_hidden_dim=64,
                                                   shared_expert_hidden_dim=DIM, max_seq_len=SEQ + 1)),
             ("attn.qkv", "attn.proj", "moe.shared_expert.w1", "moe.shared_expert.w2", "moe.shared_expert.w3"),
             {"moe.router.gate": "router gate", "head": "output projection"}),
    "qwen3_moe": (lambda: transformers.AutoModelForCausalLM.from_config(hf_config("qwen3_moe", **SIZES)),
                  ATTN, {"lm_head": "output projection"}),
    "mixtral": (lambda: transformers.AutoModelForCausalLM.from_config(hf_config("mixtral", **SIZES)),
                ATTN, {"lm_head": "output projection"}),
    # shared experts of width 512 and one dense MLP layer first; MLA's low-rank kv projections are too small
    "deepseek_v3": (lambda: _deepseek(),
                    ("self_attn.q_proj", "self_attn.o_proj", "mlp.shared_experts.gate_proj",
                     "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"),
                    {"self_attn.kv_a_proj_with_mqa": "too small", "self_attn.kv_b_proj": "too small",
                     "lm_head": "output projection"}),
    "gpt_oss": (lambda: transformers.AutoModelForCausalLM.from_config(hf_config("gpt_oss", **SIZES)),
                ATTN, {"lm_head": "output projection"}),
}


def _deepseek():
    cfg = hf_config("deepseek_v3", **{**SIZES, "expert_hidden_dim": DIM})
    cfg.first_k_dense_replace = 1  # layer 0: a dense MLP (gate/up/down of intermediate_size)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _expected(name, model):
    """(FQNs linears=True converts, {fqn: skip reason part}) of ``model``."""
    _, converted, skipped = FAMILIES[name]
    layers = [f for f, _ in model.named_modules() if re.fullmatch(r"(.*\.)?layers\.\d+", f)]
    want, skips = set(), {}
    for layer in layers:
        mods = dict(model.get_submodule(layer).named_modules())
        want |= {f"{layer}.{s}" for s in converted if s in mods}
        skips |= {f"{layer}.{s}": r for s, r in skipped.items() if s in mods}
    if name == "deepseek_v3":
        want |= {f"{layers[0]}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    skips |= {s: r for s, r in skipped.items() if s in dict(model.named_modules())}
    return want, skips


def _logits(model, tokens):
    if isinstance(model, MoETransformer):
        return model(tokens)
    return model(input_ids=tokens).logits


def _loss(model, tokens):
    logits = _logits(model, tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def _tokens(seed=1):
    return torch.randint(0, 128, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _base(name):
    torch.manual_seed(0)
    model = FAMILIES[name][0]().to(torch.bfloat16)
    with torch.no_grad():
        logits = _logits(model, _tokens()[:, :-1])
    return model, logits


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_linears_true_converts_the_expected_linears(name, recipe):
    base, base_logits = _base(name)
    model = copy.deepcopy(base)
    params_before = {n: id(p) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before conversion: must keep working
    moeq.convert_model(model, recipe, linears=True)
    plan = model.moeq_linears
    assert isinstance(plan, LinearsPlan) and plan.recipe == recipe and plan.emulated

    want, skips = _expected(name, model)
    assert want and set(plan.converted) == want
    for fqn in want:
        assert isinstance(model.get_submodule(fqn), TARGET[recipe]), fqn
    for fqn, reason in skips.items():
        assert reason in plan.skipped[fqn], (fqn, plan.skipped.get(fqn))
        assert type(model.get_submodule(fqn)) is nn.Linear, fqn
    every = {f for f, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {d.fqn for d in plan.decisions} == every
    assert all(isinstance(m, ConvertedExperts) for f, m in model.named_modules() if f in model.moeq_converted_fqns)
    assert fqn in plan.summary()

    # same Parameters (objects, names, values): state_dict keys unchanged, the optimizer still holds them
    assert {n: id(p) for n, p in model.named_parameters()} == params_before
    assert list(model.state_dict()) == list(base.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, base.state_dict()[key]), key

    with torch.no_grad():
        logits = _logits(model, _tokens()[:, :-1])
    err = rel_err(logits.float(), base_logits.float())
    assert 0 < err <= ERROR_BOUND[recipe], f"{name} {recipe}: logits rel err {err:.4f}"

    tokens = _tokens(seed=2)
    losses = []
    for _ in range(4):
        loss = _loss(model, tokens)
        opt.zero_grad()
        loss.backward()
        for fqn in want:
            g = model.get_submodule(fqn).weight.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, fqn
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{name} {recipe}: loss did not fall: {losses}"


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_save_pretrained_round_trip(name, tmp_path):
    """A converted model saves the stock checkpoint: plain weights under the stock keys,
    equal to the unconverted model's; loaded and converted again it computes bitwise what
    the stock checkpoint loaded and converted computes. (Loading re-creates transformers'
    non-persistent buffers, e.g. rotary tables, in float32, so a loaded model is compared
    with a loaded model.)"""
    base, _ = _base(name)
    base.save_pretrained(tmp_path / "stock")
    model = moeq.convert_model(copy.deepcopy(base), "fp8", linears=True)
    model.save_pretrained(tmp_path / "converted")
    loaded, stock = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.bfloat16)
                     for d in ("converted", "stock"))
    assert not any(isinstance(m, Float8Linear) for m in loaded.modules())  # the checkpoint is plain
    assert list(loaded.state_dict()) == list(model.state_dict())
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    for m in (loaded, stock):
        moeq.convert_model(m, "fp8", linears=True)
        assert m.moeq_linears.converted == model.moeq_linears.converted
    with torch.no_grad():
        tokens = _tokens()[:, :-1]
        assert torch.equal(_logits(loaded, tokens), _logits(stock, tokens))


def _first_layer(model):
    return model.layers[0] if isinstance(model, MoETransformer) else model.model.layers[0]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", ["moeq", "qwen3_moe"])
def test_decoder_layer_compiles_fullgraph(name, recipe):
    """One decoder layer (moeq experts + torchao linears) traces forward and backward in one
    graph (aot_eager: the trace, not inductor's codegen) and computes what eager does."""
    base, _ = _base(name)
    model = moeq.convert_model(copy.deepcopy(base), recipe, linears=True)
    layer = _first_layer(model)
    assert any(isinstance(m, TARGET[recipe]) for m in layer.modules())
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        _logits(model, _tokens()[:, :-1])
    handle.remove()
    args, kwargs = seen[0]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}  # no KV cache
    x = args[0].detach() if args else kwargs.pop("hidden_states").detach()
    rest = args[1:]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    outs, grads = [], []
    for fn in (layer, compiled):
        xi = x.clone().requires_grad_(True)
        out = fn(xi, *rest, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=1e-4)


def test_callable_filter_and_hard_skips():
    """A callable chooses among the linears the safety skips leave; it is never asked about
    (and cannot force) the lm_head, router gates or odd dims; it may take small linears."""
    base, _ = _base("moeq")
    model = copy.deepcopy(base)
    asked = []

    def only_proj(fqn, module):
        asked.append(fqn)
        return fqn.endswith("attn.proj")

    moeq.convert_model(model, "fp8", linears=only_proj)
    assert set(model.moeq_linears.converted) == {"layers.0.attn.proj", "layers.1.attn.proj"}
    assert "head" not in asked and not any(f.endswith("router.gate") for f in asked)
    assert model.moeq_linears.skipped["layers.0.attn.qkv"] == "left out by the linears filter"

    everything = moeq.convert_model(copy.deepcopy(base), "mxfp8", linears=lambda fqn, m: True)
    assert "head" in everything.moeq_linears.skipped and "layers.0.moe.router.gate" in everything.moeq_linears.skipped

    small = MoETransformer(MoEModelConfig(dim=64, num_heads=4, expert_hidden_dim=32, shared_expert_hidden_dim=48))
    moeq.convert_model(small, "mxfp8", linears=lambda fqn, m: True)
    skipped = small.moeq_linears.skipped
    assert "not multiples of 32" in skipped["layers.0.moe.shared_expert.w1"]  # 48 % 32
    assert "layers.0.attn.proj" in small.moeq_linears.converted  # 64x64: too small for True, fine for a callable
    default = moeq.convert_model(MoETransformer(MoEModelConfig(dim=64, num_heads=4)), "fp8", linears=True)
    assert not default.moeq_linears.converted
    assert all("too small" in r or "router" in r or "output" in r for r in default.moeq_linears.skipped.values())


def test_tied_weight_and_already_converted_and_bf16():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(DIM, DIM)
            self.proj = nn.Linear(DIM, DIM, bias=False)
            self.unembed = nn.Linear(DIM, DIM, bias=False)
            self.unembed.weight = self.embed.weight

    model = Tied()
    plan = convert_linears(model, "fp8")
    assert plan.converted == ("proj",) and plan.skipped["unembed"] == "weight tied to an input embedding"
    assert model.moeq_linears is plan and isinstance(model.proj, Float8Linear)
    again = convert_linears(model, "fp8")  # converting again to the same recipe: a no-op
    assert again.converted == ("proj",) and isinstance(model.proj, Float8Linear)
    other = convert_linears(model, "mxfp8")
    assert not other.converted and "not a plain nn.Linear" in other.skipped["proj"]
    assert isinstance(model.proj, Float8Linear)

    bf16 = convert_linears(Tied(), "bf16")
    assert not bf16.converted and bf16.backend.startswith("none")
    assert moeq.convert_linears is convert_linears


def test_bad_linears_argument_changes_nothing():
    base, _ = _base("moeq")
    model = copy.deepcopy(base)
    with pytest.raises(TypeError, match="linears must be True, False or a callable"):
        moeq.convert_model(model, "fp8", linears="all")
    assert not any(isinstance(m, ConvertedExperts) for m in model.modules())
    assert not hasattr(model, "moeq_linears")
    assert not hasattr(moeq.convert_model(model, "fp8"), "moeq_linears")  # default: experts only
    assert plan_linears(model, "fp8", False).converted == ()
