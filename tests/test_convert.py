"""convert_model on CPU (emulated kernels): padding cases, numerics, HF models, checkpoints."""
import copy
import os
import tempfile

import pytest
import torch

import moeq
from moeq.ops import padding as padding_module
from moeq.convert import ConvertedExperts, convert_model
from tests.reference import experts_reference, rel_err

# Relative error of converted SwiGLU experts (two chained GEMMs) vs float64, measured on
# CPU with this file's shapes over 5 seeds, worst of output / grad x / grad weights:
# bf16 0.0046, fp8 0.0745, mxfp8 0.0745 (a single e4m3 GEMM is ~0.037; for Gaussian data
# the per-row and per-32-block power-of-two scales mostly coincide). Bounds add margin.
ERROR_BOUND = {"bf16": 1e-2, "fp8": 0.1, "mxfp8": 0.1}


class PadCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = padding_module.pad_token_groups

        def counted(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(padding_module, "pad_token_groups", counted)


def _experts(recipe, seed=0, dim=64, hidden=64, num_experts=4):
    torch.manual_seed(seed)
    e = moeq.GroupedExperts(dim, hidden, num_experts, dtype=torch.bfloat16)
    with torch.no_grad():
        e.gate_up_proj.normal_(0, 0.1)
        e.down_proj.normal_(0, 0.1)
    return convert_model(e, recipe, kernel="emulated")


def _ep_mesh():
    """A one-rank gloo process group and a DeviceMesh with an "ep" dim."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))


def _shard_experts(experts, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    for name in ("gate_up_proj", "down_proj"):
        p = getattr(experts, name)
        setattr(experts, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    return experts


# (recipe, EP setting, pad expected). "ep" = expert weights are DTensors on an "ep" mesh
# and the dispatch hands packed tokens; "ep_pads" = the dispatch already aligned them.
SEVEN_CASES = [
    ("bf16", "none", False),
    ("bf16", "ep", False),
    ("bf16", "ep_pads", False),
    ("fp8", "none", True),
    ("fp8", "ep", True),
    ("fp8", "ep_pads", False),
    ("mxfp8", "none", True),
    ("mxfp8", "ep", True),
    ("mxfp8", "ep_pads", False),
]


@pytest.mark.parametrize("recipe,ep,pads", SEVEN_CASES)
def test_padding_runs_only_when_no_ep_layer_aligned_tokens(monkeypatch, recipe, ep, pads):
    experts = _experts(recipe)
    if ep != "none":
        _shard_experts(experts, _ep_mesh())
        assert moeq.experts.padding_policy.is_expert_parallel(experts.gate_up_proj)
    counts = torch.tensor([5, 0, 19, 8])
    x = torch.randn(int(counts.sum()), 64, dtype=torch.bfloat16)
    counter = PadCounter(monkeypatch)
    if ep == "ep_pads":
        align = moeq.GROUP_ALIGNMENT[moeq.QuantizationType.MXFP8]  # dispatch pads to 32 >= any recipe's need
        padded, layout = moeq.pad_token_groups(x, counts, align)  # the dispatch's padding, not counted
        out = moeq.unpad_token_groups(experts(padded, counts, group_alignment=align), layout)
    else:
        out = experts(x, counts)
    assert counter.calls == (1 if pads else 0)
    w13 = experts.gate_up_proj.to_local() if ep != "none" else experts.gate_up_proj
    w2 = experts.down_proj.to_local() if ep != "none" else experts.down_proj
    assert rel_err(out, experts_reference(x, w13, w2, counts)) <= ERROR_BOUND[recipe]


@pytest.mark.parametrize("recipe", ["bf16", "fp8", "mxfp8"])
def test_converted_moe_matches_float64_within_recipe_bound(recipe):
    torch.manual_seed(0)
    moe = moeq.MoE(64, 64, 4, 2, load_balancing="none", dtype=torch.bfloat16)
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1.0)
        moe.experts.gate_up_proj.normal_(0, 0.1)
        moe.experts.down_proj.normal_(0, 0.1)
    ref_moe = copy.deepcopy(moe).double()
    convert_model(moe, recipe, kernel="emulated")
    assert moe.experts.group_alignment == moeq.GROUP_ALIGNMENT[moeq.parse_recipe(recipe)]
    x = torch.randn(96, 64)
    out = moe(x.bfloat16())
    ref = ref_moe.to(torch.float64)
    ref.experts.compute_backend = "for_loop"  # torch._grouped_mm has no float64
    want = ref(x.double())
    assert rel_err(out, want) <= ERROR_BOUND[recipe]
    g = torch.randn_like(want)
    out.backward(g.bfloat16())
    want.backward(g)
    for name in ("gate_up_proj", "down_proj"):
        got_g = getattr(moe.experts, name).grad
        assert got_g.dtype == torch.bfloat16  # master weights and their grads keep their dtype
        assert rel_err(got_g, getattr(ref.experts, name).grad) <= ERROR_BOUND[recipe]


def test_bad_input_errors():
    e = moeq.GroupedExperts(64, 64, 2)
    with pytest.raises(ValueError, match="unknown recipe 'int4'.*'bf16', 'fp8', 'mxfp8'"):
        convert_model(e, "int4")
    with pytest.raises(ValueError, match="no experts modules matching filter_fqns"):
        convert_model(e, "fp8", filter_fqns=["layers.7"])
    with pytest.raises(ValueError, match="found no routed-experts modules"):
        convert_model(torch.nn.Linear(4, 4), "fp8")
    bad = torch.nn.Sequential(moeq.GroupedExperts(48, 64, 2))
    with pytest.raises(ValueError, match=r"cannot convert 0 to mxfp8: its dim is 48, not a multiple of 32"):
        convert_model(bad, "mxfp8")
    convert_model(bad, "fp8")  # 48 is a multiple of 16
    with pytest.raises(ValueError, match="unknown kernel 'cutlass': use 'auto', 'triton'.*'emulated'"):
        convert_model(moeq.GroupedExperts(64, 64, 2), "fp8", kernel="cutlass")


def test_convert_twice_is_a_noop_and_keeps_params_and_optimizer():
    model = torch.nn.Sequential(moeq.MoE(64, 64, 4, 2), moeq.MoE(64, 64, 4, 2))
    params = [id(p) for p in model.parameters()]
    keys = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before conversion
    convert_model(model, "mxfp8", kernel="emulated")
    cls = type(model[0].experts)
    convert_model(model, "mxfp8", kernel="emulated")
    assert type(model[0].experts) is cls
    assert model.moeq_converted_fqns == ["0.experts", "1.experts"]
    assert [id(p) for p in model.parameters()] == params
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys
    before = model[0].experts.gate_up_proj.detach().clone()
    model(torch.randn(3, 16, 64)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model[0].experts.gate_up_proj)  # the pre-built optimizer trained it


def test_checkpoints_load_both_ways_bitwise():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(moeq.MoE(64, 64, 4, 2, dtype=torch.bfloat16))
    converted = convert_model(copy.deepcopy(plain), "fp8", kernel="emulated")
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d:
        torch.save(converted.state_dict(), os.path.join(d, "c.pt"))
        plain.load_state_dict(torch.load(os.path.join(d, "c.pt")))
    for a, b in zip(plain.state_dict().values(), converted.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    fresh = convert_model(torch.nn.Sequential(moeq.MoE(64, 64, 4, 2, dtype=torch.bfloat16)), "fp8", kernel="emulated")
    fresh.load_state_dict(plain.state_dict())
    for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def _hf_configs():
    transformers = pytest.importorskip("transformers")
    return {
        "qwen3_moe": transformers.Qwen3MoeConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            decoder_sparse_step=1, mlp_only_layers=[]),
        "mixtral": transformers.MixtralConfig(
            vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
        "olmoe": transformers.OlmoeConfig(
            vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
        "deepseek_v3": transformers.DeepseekV3Config(
            vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
            topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
            qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1),
        "gpt_oss": transformers.GptOssConfig(
            vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"]),
    }


HF_MODELS = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]
_REFERENCE_LOSSES = {}  # model name -> losses of the unconverted run (shared by both recipes)


def _train_hf(model, steps=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Learnable data: a fixed random sequence repeated, so the loss must fall.
    seq = torch.randint(0, 128, (1, 33), generator=g).repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(seq, labels=seq).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name", HF_MODELS)
@pytest.mark.parametrize("recipe", ["fp8", "mxfp8"])
def test_transformers_models_convert_and_train(name, recipe):
    from transformers import AutoModelForCausalLM

    cfg = _hf_configs()[name]
    torch.manual_seed(0)
    # float32 master weights: CPU bf16 GEMMs are slow, and the quantized GEMMs quantize
    # their operands from whatever dtype they get.
    base = AutoModelForCausalLM.from_config(cfg)
    converted = convert_model(copy.deepcopy(base), recipe, kernel="emulated")
    assert len(converted.moeq_converted_fqns) == cfg.num_hidden_layers
    assert all(fqn.endswith("mlp.experts") for fqn in converted.moeq_converted_fqns)
    assert sum(isinstance(m, ConvertedExperts) for m in converted.modules()) == cfg.num_hidden_layers
    from moeq.integrations.transformers.experts import TRANSFORMERS_EXPERTS

    experts = [m for m in converted.modules() if isinstance(m, ConvertedExperts)]
    # GPT-OSS (biases, interleaved gate/up, clamped activation) takes the per-GEMM path.
    assert all(TRANSFORMERS_EXPERTS.is_plain_swiglu(m) == (name != "gpt_oss") for m in experts)
    # Routers, attention and embeddings untouched.
    assert type(converted.model.embed_tokens) is type(base.model.embed_tokens)

    # Same forward as the unconverted model within the recipe's error.
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = base(x).logits.float()
        got_logits = converted(x).logits.float()
    assert rel_err(got_logits, ref_logits) <= ERROR_BOUND[recipe]

    if name not in _REFERENCE_LOSSES:
        _REFERENCE_LOSSES[name] = _train_hf(base)
    ref_losses = _REFERENCE_LOSSES[name]
    losses = _train_hf(converted)
    assert all(map(lambda v: v == v, losses)), "NaN loss"
    assert losses[-1] < 0.6 * losses[0], f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
    # Stated margin: within 15% of the bf16 run's final loss after 20 steps.
    assert abs(losses[-1] - ref_losses[-1]) <= 0.15 * ref_losses[-1] + 0.05, (losses[-1], ref_losses[-1])


@pytest.mark.parametrize("recipe", ["bf16", "fp8", "mxfp8"])
def test_torchtitan_grouped_experts_convert(recipe):
    """torchtitan 0.3's GroupedExperts (w1_EFD/w2_EDF/w3_EFD), built from its Config, converted
    by hand: same parameters, forward and gradients within the recipe's error of the original."""
    from torchtitan.models.common.moe import GroupedExperts as TTExperts

    torch.manual_seed(0)
    experts = TTExperts.Config(dim=64, hidden_dim=64, num_experts=4).build()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.1)
    ref = copy.deepcopy(experts)
    params = [id(p) for p in experts.parameters()]
    convert_model(experts, recipe, kernel="emulated")
    assert isinstance(experts, ConvertedExperts) and isinstance(experts, TTExperts)
    assert [id(p) for p in experts.parameters()] == params
    counts = torch.tensor([5, 0, 19, 8])
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = ref(xr, counts), experts(xc, counts)
    assert got.dtype == want.dtype == torch.bfloat16
    assert rel_err(got, want) <= ERROR_BOUND[recipe]
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    assert rel_err(xc.grad, xr.grad) <= ERROR_BOUND[recipe]
    for (name, p), q in zip(experts.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= ERROR_BOUND[recipe], name
