"""moeq in transformers' experts switch (``experts_implementation="moeq_*"``), switching
back, pickling converted models, float64 refused at conversion, SiLU in any form
(float16 runs: tests/test_float16.py).

Against the real transformers, tiny Qwen3-MoE / Llama 4 configs on CPU. "Bitwise" means
torch.equal on the logits: both routes must build the very same computation.
"""
import copy
import io
import json
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moeq  # noqa: E402,F401  (registers the experts implementations)
from moeq.convert import ConvertedExperts, convert_model, unconvert_experts_module  # noqa: E402
from moeq.integrations.transformers.models import hf_config  # noqa: E402
from moeq.integrations.base import is_silu  # noqa: E402
from moeq.numerics.recipes import QuantizationType  # noqa: E402

AutoModelForCausalLM = transformers.AutoModelForCausalLM
TINY = dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_experts=4, top_k=2, expert_hidden_dim=64)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _model(name="qwen3_moe", seed=0, **kwargs):
    # a fresh config each time: from_config(experts_implementation=...) writes into the config
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(name, **TINY), **kwargs)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _converted(model):
    return [fqn for fqn, m in model.named_modules() if isinstance(m, ConvertedExperts)]


def test_registered_names_are_transformers_experts_implementations():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert {"moeq_bf16", "moeq_fp8", "moeq_mxfp8"} <= set(ALL_EXPERTS_FUNCTIONS.keys())


@pytest.mark.parametrize("name", ["qwen3_moe", "llama4"])  # decorated experts / a family transformers' switch misses
def test_from_config_and_set_equal_convert_model_bitwise_and_switch_back(name):
    base = _model(name)
    ref = _logits(base)
    converted = convert_model(copy.deepcopy(base), "mxfp8")
    chosen = _model(name, experts_implementation="moeq_mxfp8")
    assert chosen.moeq_converted_fqns == converted.moeq_converted_fqns == _converted(chosen)
    assert chosen.get_experts_implementation()[""] == "moeq_mxfp8"
    want = _logits(converted)
    assert not torch.equal(want, ref)
    assert torch.equal(_logits(chosen), want)

    switched = copy.deepcopy(base)
    switched.set_experts_implementation("moeq_mxfp8")
    assert torch.equal(_logits(switched), want)
    switched.set_experts_implementation("moeq_fp8")  # another recipe through the same switch
    assert {m.moeq_recipe for m in switched.modules() if isinstance(m, ConvertedExperts)} == {QuantizationType.FP8}

    # back to transformers' own implementation, after either route: bitwise the unconverted model
    back = "grouped_mm" if name == "qwen3_moe" else "eager"  # Llama 4 has no grouped_mm in transformers
    for model in (chosen, converted, switched):
        model.set_experts_implementation(back)
        assert _converted(model) == [] and not hasattr(model, "moeq_converted_fqns")
        assert torch.equal(_logits(model), ref)


def test_set_grouped_mm_after_convert_model_really_switches():
    """The reported bug: convert_model leaves the config at grouped_mm, so transformers
    took set_experts_implementation("grouped_mm") for a no-op."""
    base = _model()
    model = convert_model(copy.deepcopy(base), "mxfp8", kernel="emulated")
    assert model.get_experts_implementation()[""] == "grouped_mm"
    model.set_experts_implementation("grouped_mm")
    assert _converted(model) == []
    assert torch.equal(_logits(model), _logits(base))
    base.set_experts_implementation("eager")
    model.set_experts_implementation("eager")
    assert torch.equal(_logits(model), _logits(base))


def test_save_pretrained_keeps_the_moeq_choice(tmp_path):
    model = _model(experts_implementation="moeq_mxfp8")
    model.save_pretrained(tmp_path / "moeq")
    assert json.loads((tmp_path / "moeq" / "config.json").read_text())["experts_implementation"] == "moeq_mxfp8"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moeq")
    assert loaded.get_experts_implementation()[""] == "moeq_mxfp8"
    assert _converted(loaded) == model.moeq_converted_fqns
    assert torch.equal(_logits(loaded), _logits(model))
    # switched back before saving: no trace, and it loads unconverted
    model.set_experts_implementation("grouped_mm")
    model.save_pretrained(tmp_path / "plain")
    assert "experts_implementation" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert _converted(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")) == []


def test_standalone_experts_module_converts_at_its_first_forward():
    """A decorated experts module outside a PreTrainedModel reaches moeq through the
    registered function: it converts itself, then runs, as convert_model's would."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = hf_config("qwen3_moe", **TINY)
    cfg._experts_implementation = "moeq_fp8"
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.1)
    want = convert_model(copy.deepcopy(experts), "fp8")
    x, idx, w = torch.randn(8, 64), torch.randint(0, 4, (8, 2)), torch.rand(8, 2)
    got = experts(x, idx, w)
    assert isinstance(experts, ConvertedExperts) and experts.moeq_recipe is QuantizationType.FP8
    assert torch.equal(got, want(x, idx, w))


def test_converted_model_pickles():
    model = convert_model(_model("llama4"), "fp8", kernel="emulated")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]  # the same converted classes
    assert loaded.model.layers[0].feed_forward.moeq_kernel == "emulated"
    assert torch.equal(_logits(loaded), _logits(model))
    clone = copy.deepcopy(model)
    assert type(clone.model.layers[0].feed_forward) is type(model.model.layers[0].feed_forward)


def test_float64_refused_at_conversion_naming_module_dtype_and_supported():
    msg = (r"cannot convert (model\.)?layers\.0\.mlp\.experts to fp8: its expert weight gate_up_proj is float64"
           r".*bfloat16 or float16 or float32")
    with pytest.raises(TypeError, match=msg):
        convert_model(_model(dtype=torch.float64), "fp8")
    with pytest.raises(TypeError, match=msg):
        _model(dtype=torch.float64, experts_implementation="moeq_fp8")
    model = _model(dtype=torch.float64)
    with pytest.raises(TypeError, match=msg):
        model.set_experts_implementation("moeq_fp8")
    # a refused switch leaves the model as it was
    assert model.get_experts_implementation()[""] == "grouped_mm" and _converted(model) == []


def test_filtered_convert_then_whole_model_switch():
    model = convert_model(_model(), "fp8", filter_fqns="layers.0.")
    assert _converted(model) == ["model.layers.0.mlp.experts"]
    model.set_experts_implementation("moeq_mxfp8")  # a whole-model choice reaches every layer
    assert _converted(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_switching_back_refuses_expert_parallel_shards():
    model = convert_model(_model(), "fp8")
    experts = model.model.layers[0].mlp.experts
    experts.moeq_expert_dispatcher = object()  # what moeq.apply_expert_parallel installs
    with pytest.raises(RuntimeError, match="apply_expert_parallel sharded its experts"):
        unconvert_experts_module(experts, "model.layers.0.mlp.experts")
    assert isinstance(experts, ConvertedExperts)


def test_silu_in_any_form_takes_the_fused_swiglu_path():
    from transformers.activations import ACT2FN

    assert all(is_silu(f) for f in (torch.nn.SiLU(), ACT2FN["silu"], ACT2FN["swish"], torch.nn.functional.silu))

    class NotSiLU(torch.nn.SiLU):
        def forward(self, x):
            return x

    assert not any(is_silu(f) for f in (torch.nn.GELU(), NotSiLU(), torch.sigmoid, lambda x: x, None))

    from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeExperts

    from moeq.integrations.transformers.experts import TRANSFORMERS_EXPERTS

    cfg = transformers.Lfm2MoeConfig(hidden_size=64, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    experts = Lfm2MoeExperts(cfg)
    assert experts.act_fn is torch.nn.functional.silu  # LFM2-MoE's plain function
    assert TRANSFORMERS_EXPERTS.is_plain_swiglu(experts)


def test_post_import_hook_runs_after_the_module_and_leaves_its_loader(tmp_path, monkeypatch):
    from moeq.post_import import when_imported

    (tmp_path / "moeq_hook_probe.py").write_text(textwrap.dedent("VALUE = 41\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("moeq_hook_probe", lambda m: seen.append(m.VALUE + 1))
    assert seen == []
    import moeq_hook_probe

    assert seen == [42]
    assert type(moeq_hook_probe.__loader__).__name__ == "SourceFileLoader"
    when_imported("moeq_hook_probe", lambda m: seen.append(0))  # already imported: at once
    assert seen == [42, 0]
    with pytest.warns(UserWarning, match="post-import hook for moeq_hook_probe failed"):
        when_imported("moeq_hook_probe", lambda m: 1 / 0)
    sys.modules.pop("moeq_hook_probe")
