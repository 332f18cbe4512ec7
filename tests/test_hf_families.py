"""The transformers MoE families without ``@use_experts_implementation``, against the real
transformers (tiny random configs, CPU): Llama 4, DBRX, JetMoE, LongCat-Flash, Step 3.7,
Switch Transformers, NLLB-MoE convert; Doge is refused with the reason.

Per family: the expected modules are converted, logits within the recipe's bound of the
unconverted model (and not equal to them: the quantized path ran), finite non-zero
expert gradients, state_dict keys unchanged, and a save_pretrained / from_pretrained
round trip (plain: the same weights, unconverted; with experts_implementation: converted
again, bitwise the same logits).
"""
import copy
import functools
from typing import Callable, NamedTuple, Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeq.convert import ConvertedExperts, convert_model  # noqa: E402
from moeq.integrations.transformers.models import hf_config  # noqa: E402
from tests.reference import rel_err  # noqa: E402
from tests.test_convert import ERROR_BOUND  # noqa: E402

TINY = dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_experts=4, top_k=2, expert_hidden_dim=64)


def _step3p7_config():
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, num_local_experts=4,
                moe_intermediate_size=64, share_expert_dim=64, sliding_window=16,
                mlp_layer_types=["sparse", "sparse"], swiglu_limits=[0.0, 7.0])  # layer 1: clamped SwiGLU
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return transformers.Step3p7Config(text_config=text, vision_config=vision)


def _switch_config():
    return transformers.SwitchTransformersConfig(
        vocab_size=128, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_sparse_encoder_layers=1, num_decoder_layers=2,
        num_sparse_decoder_layers=1, num_heads=4, num_experts=4,
        expert_capacity=3)  # 16 tokens a sequence (32 a batch) > 4 experts * 3: some dropped, however capacity is counted


def _nllb_config():
    return transformers.NllbMoeConfig(
        vocab_size=128, max_position_embeddings=64, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
        decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, d_model=64, num_experts=4,
        expert_capacity=8, encoder_sparse_step=1, decoder_sparse_step=1)


class Family(NamedTuple):
    config: Callable
    auto: str  # the transformers Auto class
    recipe: str
    fqns: tuple  # the modules convert_model converts
    seq2seq: bool = False
    check: Optional[Callable] = None  # family-specific property, f(converted_model, inputs)


def _captured_inputs(module, run):
    """The positional inputs of module's forward during run()."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def _check_longcat(model, run):
    experts = model.model.layers[0].mlp.experts
    _, top_k_index, top_k_weights = _captured_inputs(experts, run)
    if hasattr(experts, "num_routed_experts"):
        # identity experts inside the experts module (transformers < 5.25): both kinds of
        # experts were chosen, so the identity group and the GEMM groups both ran
        routed = experts.num_routed_experts
        assert (top_k_index >= routed).any() and (top_k_index < routed).any()
    else:
        # transformers 5.25 adds the identity experts' output in the MoE block and hands the
        # experts their routes as real ids with weight 0
        assert ((top_k_index >= 0) & (top_k_index < experts.num_experts)).all()
        assert (top_k_weights == 0).any(), "no route went to an identity expert: the test does not cover it"


def _check_step3p7(model, run):
    from moeq.integrations.transformers.stacked import STEP3P7_EXPERTS

    layers = model.model.language_model.layers
    assert [STEP3P7_EXPERTS.is_plain_swiglu(layer.mlp.experts) for layer in layers] == [True, False]


def _check_switch(model, run):
    experts = model.encoder.block[1].layer[1].mlp.experts
    _, selected, _ = _captured_inputs(experts, run)
    dropped = bool((selected.sum(dim=(-1, -2)) == 0).any())
    # transformers before 5.25 applies no capacity at all (its router's cumsum runs over a
    # size-1 dim), so only there may no token be dropped
    old_router = tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 25)
    assert dropped or old_router, "no token was dropped at capacity: the test does not cover it"


def _check_llama4(model, run):
    block = model.model.layers[0].feed_forward
    # the block is converted (sparse routing); its dense experts module is left as it is
    assert isinstance(block, ConvertedExperts) and not isinstance(block.experts, ConvertedExperts)


FAMILIES = {
    "llama4": Family(lambda: hf_config("llama4", **TINY), "AutoModelForCausalLM", "mxfp8",
                     ("model.layers.0.feed_forward", "model.layers.1.feed_forward"), check=_check_llama4),
    "dbrx": Family(lambda: hf_config("dbrx", **TINY), "AutoModelForCausalLM", "fp8",
                   ("transformer.blocks.0.ffn.experts", "transformer.blocks.1.ffn.experts")),
    "jetmoe": Family(lambda: hf_config("jetmoe", **{**TINY, "num_layers": 1, "num_heads": 2}), "AutoModelForCausalLM",
                     "mxfp8", ("model.layers.0.mlp.input_linear", "model.layers.0.mlp.output_linear",
                               "model.layers.0.self_attention.experts.input_linear",
                               "model.layers.0.self_attention.experts.output_linear")),
    "longcat_flash": Family(lambda: hf_config("longcat_flash", **{**TINY, "num_layers": 1}), "AutoModelForCausalLM",
                            "fp8", ("model.layers.0.mlp.experts",), check=_check_longcat),
    "step3p7": Family(_step3p7_config, "AutoModelForImageTextToText", "mxfp8",
                      ("model.language_model.layers.0.mlp.experts", "model.language_model.layers.1.mlp.experts"),
                      check=_check_step3p7),
    "switch_transformers": Family(_switch_config, "AutoModelForSeq2SeqLM", "fp8",
                                  ("encoder.block.1.layer.1.mlp.experts", "decoder.block.1.layer.2.mlp.experts"),
                                  seq2seq=True, check=_check_switch),
    "nllb_moe": Family(_nllb_config, "AutoModelForSeq2SeqLM", "bf16",
                       ("model.encoder.layers.0.ffn.experts", "model.decoder.layers.0.ffn.experts"), seq2seq=True),
}


@functools.lru_cache(maxsize=None)
def _base(name):
    fam = FAMILIES[name]
    torch.manual_seed(0)
    return getattr(transformers, fam.auto).from_config(fam.config()).eval()


def _inputs(fam):
    ids = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, decoder_input_ids=ids) if fam.seq2seq else dict(input_ids=ids)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_converts_trains_and_round_trips(name, tmp_path):
    fam = FAMILIES[name]
    base = _base(name)
    keys = {k: (v.shape, v.dtype) for k, v in base.state_dict().items()}
    model = convert_model(copy.deepcopy(base), fam.recipe)
    assert tuple(model.moeq_converted_fqns) == fam.fqns
    assert all(isinstance(model.get_submodule(f), ConvertedExperts) for f in fam.fqns)
    assert sum(isinstance(m, ConvertedExperts) for m in model.modules()) == len(fam.fqns)
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys

    inputs = _inputs(fam)
    ref, got = _logits(base, inputs), _logits(model, inputs)
    err = rel_err(got, ref)
    assert err <= ERROR_BOUND[fam.recipe], err
    if fam.recipe != "bf16":
        assert err > 0, "logits equal the unconverted model's: the quantized GEMMs did not run"
    if fam.check is not None:
        fam.check(model, lambda: _logits(model, inputs))

    model.train()
    model(**inputs).logits.float().square().mean().backward()
    for fqn in fam.fqns:
        grads = [p.grad for p in model.get_submodule(fqn).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), fqn
        assert any(g.abs().sum() > 0 for g in grads), fqn
    model.zero_grad(set_to_none=True)
    model.eval()

    model.save_pretrained(tmp_path)
    auto = getattr(transformers, fam.auto)
    plain = auto.from_pretrained(tmp_path)  # convert_model leaves no trace in the config
    assert not any(isinstance(m, ConvertedExperts) for m in plain.modules())
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k
    again = auto.from_pretrained(tmp_path, experts_implementation=f"moeq_{fam.recipe}").eval()
    assert tuple(again.moeq_converted_fqns) == fam.fqns
    assert torch.equal(_logits(again, inputs), got)


def test_ergo_is_refused_naming_the_wrapping_forward():
    """transformers 5.25's Ergo wraps its decorated experts forward in a forward of its own
    (one row per route, then a per-expert RMSNorm): converting would drop that math."""
    if not hasattr(transformers, "ErgoConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Ergo (added in 5.25)")
    cfg = transformers.ErgoConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(TypeError, match=r"cannot convert model\.layers\.\d\.mlp\.experts \(ErgoExperts\): ErgoExperts\.forward "
                                        r"wraps the experts forward .*\(ErgoExpertProjections\)"):
        convert_model(model, "fp8")
    assert not any(isinstance(m, ConvertedExperts) for m in model.modules())


def test_doge_is_refused_naming_the_module_and_why():
    cfg = transformers.DogeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, is_moe=True, num_experts=16,
                                  num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(TypeError, match=r"cannot convert model\.layers\.0\.mlp: it is a Doge DogeCDMoE.*single vectors"):
        convert_model(model, "fp8")
    with pytest.raises(TypeError, match=r"experts_implementation='moeq_fp8' cannot convert layers\.0\.mlp.*DogeCDMoE"):
        transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="moeq_fp8")
