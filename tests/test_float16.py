"""float16 models, every recipe, every way in: ``convert_model`` on a float16 model,
``from_pretrained(..., dtype=torch.float16, experts_implementation="moeq_*")``, and a
model converted in float32 then cast with ``.to(torch.float16)``.

Against the real transformers on CPU (tiny Qwen3-MoE, Mixtral, DeepSeek-V3 configs): the
logits are within the recipe's bound of transformers' own float16 ``grouped_mm`` model
with the same weights, come back in float16, the backward is finite, and a few optimizer
steps lower the loss.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moeq  # noqa: E402,F401  (registers the experts implementations)
from moeq.convert import ConvertedExperts, convert_model  # noqa: E402
from moeq.integrations.transformers.models import hf_config  # noqa: E402
from moeq.numerics.recipes import QuantizationType  # noqa: E402
from tests.reference import rel_err  # noqa: E402
from tests.test_convert import ERROR_BOUND  # noqa: E402

TINY = dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_experts=4, top_k=2, expert_hidden_dim=64)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3"]
RECIPES = ["bf16", "fp8", "mxfp8"]
ROUTES = ["convert", "load", "cast"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family saved once in float32: the weights every route starts from."""
    paths = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_config(name, **TINY))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        paths[name] = path
    return paths


def _load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _model(route, path, recipe):
    if route == "convert":
        return convert_model(_load(path, dtype=torch.float16), recipe)
    if route == "load":
        return _load(path, dtype=torch.float16, experts_implementation=f"moeq_{recipe}")
    return convert_model(_load(path, dtype=torch.float32), recipe).to(torch.float16)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", FAMILIES)
def test_float16_runs_every_recipe_and_route(name, recipe, route, saved):
    ref_model = _load(saved[name], dtype=torch.float16)
    assert ref_model.get_experts_implementation()[""] == "grouped_mm"
    ref = _logits(ref_model)
    assert ref.dtype == torch.float16 and torch.isfinite(ref).all()

    model = _model(route, saved[name], recipe)
    converted = [m for m in model.modules() if isinstance(m, ConvertedExperts)]
    assert converted and {m.moeq_recipe for m in converted} == {QuantizationType(recipe)}
    assert all(p.dtype == torch.float16 for m in converted for p in m.parameters())
    got = _logits(model)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    err = rel_err(got, ref)
    assert err <= ERROR_BOUND[recipe], err
    if recipe != "bf16":
        assert err > 0, "logits equal transformers' float16 model: the quantized GEMMs did not run"

    # training: finite float16 gradients on the experts, and the loss goes down
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    labels = IDS
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = model(IDS, labels=labels).loss
        loss.backward()
        for m in converted:
            grads = [p.grad for p in m.parameters()]
            assert all(g is not None and g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_float16_quantizes_as_its_exact_float32_copy():
    """A float16 operand gives the same FP8 / MXFP8 GEMM as its float32 copy (float16 is
    exact in float32), returned in float16."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 64, generator=g).half()
    b = torch.randn(2, 32, 64, generator=g).half()
    offs = torch.tensor([32, 64], dtype=torch.int32)
    for recipe in ("fp8", "mxfp8"):
        got = moeq.quantized_grouped_mm(a, b, offs, qtype=recipe)
        want = moeq.quantized_grouped_mm(a.float(), b.float(), offs, qtype=recipe)
        assert got.dtype == torch.float16
        assert torch.equal(got, want.half())


def test_triton_kernel_refuses_float16_at_conversion():
    """The fused SM90 experts take bfloat16: kernel='triton' says so at conversion, in one
    line naming the fix, not at the first forward."""
    model = transformers.AutoModelForCausalLM.from_config(hf_config("qwen3_moe", **TINY), dtype=torch.float16)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"kernel='triton'.*takes bfloat16 activations, got torch.float16.*kernel='auto'"):
        convert_model(model, "fp8", kernel="triton")
    assert not any(isinstance(m, ConvertedExperts) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", RECIPES)
def test_float16_on_cuda_every_recipe(recipe):
    """On the GPU: a float16 model converts (on SM90 with one line saying the fused
    experts take bfloat16), runs forward within the recipe's bound of transformers' own
    float16 grouped_mm and backward with finite float16 gradients."""
    torch.manual_seed(0)
    config = hf_config("qwen3_moe", **{**TINY, "dim": 256, "expert_hidden_dim": 256})
    ref_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16).cuda()
    ids = IDS.cuda()
    with torch.no_grad():
        ref = ref_model(ids).logits
    model = copy.deepcopy(ref_model)
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    if recipe != "bf16" and sm90:
        with pytest.warns(UserWarning, match=r"fused SM90 .* take bfloat16"):
            convert_model(model, recipe)
    else:
        convert_model(model, recipe)
    with torch.no_grad():
        got = model(ids).logits
    assert got.dtype == torch.float16 and rel_err(got, ref) <= ERROR_BOUND[recipe]
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for m in model.modules() if isinstance(m, ConvertedExperts) for p in m.parameters()]
    assert grads and all(g is not None and g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads)
