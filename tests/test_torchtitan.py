"""moeq.torchtitan against the real torchtitan 0.3.0 package (CPU, moeq's emulated kernels).

Both routes a torchtitan user has, on deepseek_v3, qwen3 (MoE flavor) and gpt_oss:

* the model converter: ``model_registry(flavor, converters=[moeq.torchtitan.Converter.Config(recipe=r)])``;
* the override: ``--override.imports moeq.torchtitan.<r>`` parsed by torchtitan's
  ConfigManager, then the trainer's own order (``update_from_config``, ``apply_overrides``,
  build on meta, ``to_empty``, ``init_states``).

For each recipe: exactly the routed experts are converted; state_dict keys and values are
the stock model's (same seed); logits are the stock model's (bf16: bitwise; fp8/mxfp8:
within LOGITS_BOUND); a few AdamW steps lower the loss with finite gradients.

CPU sizing (what a user would also change to run these on a CPU): FlexAttention/varlen
have no CPU backward, so attention is swapped to SDPA; the debug flavors keep their
structure but only their first two layers, and expert hidden dims above 128 are cut to
128, so the whole file stays within CI's time budget. Models run in bfloat16, as
torchtitan trains (FSDP mixed precision).

Also: torchtitan's per-block ``torch.compile(fullgraph=True)``; the padding
``TorchAOTokenDispatcher`` with tail rows (bitwise equal to the packed dispatch, no second
padding when ``pad_multiple`` suffices); EP=2 on gloo with torchtitan's all-to-all
dispatcher and DTensor expert shards (equal to one process); error messages.
"""
from __future__ import annotations

import copy
import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

import moeq

pytest.importorskip("torchtitan", reason="moeq.torchtitan needs torchtitan (pip install torchtitan==0.3.0)")

import moeq.torchtitan as mt  # noqa: E402
from moeq.experts.converted import ConvertedExperts  # noqa: E402
from tests.reference import rel_err
from tests.test_convert import PadCounter
from tests.test_expert_parallel import _PadSpy, _spawn
from torchtitan.config import ConfigManager
from torchtitan.config.override import apply_overrides
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention, VarlenAttention
from torchtitan.models.common.moe import GroupedExperts, RoutedExperts
from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

RECIPES = ["bf16", "fp8", "mxfp8"]
# family -> (torchtitan.models package, flavor, config_registry function)
FAMILIES = {
    "deepseek_v3": ("deepseek_v3", "debugmodel", "deepseek_v3_debugmodel"),
    "qwen3": ("qwen3", "debugmodel_moe", "qwen3_moe_debug"),
    "gpt_oss": ("gpt_oss", "debugmodel", "gpt_oss_debugmodel"),
}
CPU_LAYERS = 2
CPU_EXPERT_HIDDEN = 128
BATCH, SEQ = 2, 32
# Relative error of the logits vs the stock model, measured on these CPU-sized models
# over 3 token seeds (worst): deepseek_v3 (one MoE layer) 0.0013, qwen3 0.0061, gpt_oss
# 0.0092, the same for fp8 and mxfp8 (their outputs are bitwise equal here: with
# power-of-two scales e4m3 rounds alike unless values fall into its subnormals, see
# docs/recipes.md). Bound with margin; bf16 is asserted bitwise.
LOGITS_BOUND = {"fp8": 0.05, "mxfp8": 0.05}
TRAIN_STEPS = 3


def _cpu_sized(model_config):
    """SDPA attention (CPU backward), the first CPU_LAYERS layers, expert hidden <= CPU_EXPERT_HIDDEN."""
    for _, _, parent, attr in list(model_config.traverse((FlexAttention.Config, VarlenAttention.Config))):
        setattr(parent, attr, ScaledDotProductAttention.Config())
    model_config.layers = model_config.layers[:CPU_LAYERS]
    for _, cfg, _, _ in model_config.traverse(GroupedExperts.Config):
        cfg.hidden_dim = min(cfg.hidden_dim, CPU_EXPERT_HIDDEN)
    return model_config


def _registry(family):
    package, flavor, _ = FAMILIES[family]
    return importlib.import_module(f"torchtitan.models.{package}").model_registry, flavor


def _converter_route(family, recipe=None):
    """The model config ``model_registry(flavor, converters=[...])`` gives (recipe None: stock)."""
    registry, flavor = _registry(family)
    converters = None if recipe is None else [mt.Converter.Config(recipe=recipe)]
    return _cpu_sized(registry(flavor, converters=converters).model)


def _override_route(family, recipe=None, extra_args=()):
    """The model config the trainer builds from ``--override.imports moeq.torchtitan.<recipe>``."""
    package, _, config_fn = FAMILIES[family]
    args = ["--module", package, "--config", config_fn, "--training.seq_len", str(SEQ), *extra_args]
    if recipe is not None:
        args += ["--override.imports", f"moeq.torchtitan.{recipe}"]
    trainer_config = ConfigManager().parse_args(args)
    model_config = _cpu_sized(trainer_config.model_spec.model)
    # Trainer.__init__'s order: runtime config into the model config, then the overrides.
    model_config.update_from_config(config=trainer_config)
    if trainer_config.override.imports:
        apply_overrides(trainer_config.override, trainer_config)
    return trainer_config.model_spec.model, trainer_config


def _build(model_config, seed=0):
    """What the trainer does: build on meta, to_empty, init_states; bfloat16 as under FSDP."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = model_config.build()
    model.verify_module_protocol()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_states()
    return model.to(torch.bfloat16)


def _tokens(model, seed=1):
    vocab = model.tok_embeddings.weight.shape[0]
    return torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _stock(family):
    """(experts FQNs and classes, state_dict, logits) of the unconverted CPU-sized model."""
    model = _build(_converter_route(family))
    experts = {f: type(m) for f, m in model.named_modules() if isinstance(m, GroupedExperts)}
    with torch.no_grad():
        logits = model(_tokens(model)[:, :-1])
    return experts, {k: v.clone() for k, v in model.state_dict().items()}, logits


def _train(model, steps=TRAIN_STEPS):
    tokens = _tokens(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        opt.step()
        losses.append(float(loss))
    return losses


def _check_converted(family, model_config, recipe):
    experts, stock_state, stock_logits = _stock(family)
    model = _build(model_config)
    converted = {f: m for f, m in model.named_modules() if isinstance(m, ConvertedExperts)}
    assert sorted(converted) == sorted(experts), "not exactly the routed experts were converted"
    for fqn, m in converted.items():
        assert isinstance(m, experts[fqn]) and m.moeq_recipe is moeq.parse_recipe(recipe), fqn
    state = model.state_dict()
    assert list(state) == list(stock_state)
    for key, value in state.items():
        assert value.dtype == stock_state[key].dtype and torch.equal(value, stock_state[key]), key

    with torch.no_grad():
        logits = model(_tokens(model)[:, :-1])
    if recipe == "bf16":
        assert torch.equal(logits, stock_logits), "bf16 logits differ from torchtitan's own experts"
    else:
        err = rel_err(logits.float(), stock_logits.float())
        assert err <= LOGITS_BOUND[recipe], f"{family} {recipe}: logits rel err {err:.4f}"

    losses = _train(model)
    assert losses[-1] < losses[0], f"{family} {recipe}: loss did not fall: {losses}"
    for fqn, m in converted.items():
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{fqn}.{name} got no gradient"


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_converter_route(family, recipe):
    _check_converted(family, _converter_route(family, recipe), recipe)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_override_imports_route(family, recipe):
    model_config, trainer_config = _override_route(family, recipe)
    assert trainer_config.override.imports == [f"moeq.torchtitan.{recipe}"]
    _check_converted(family, model_config, recipe)


def test_config_function_route_as_documented(tmp_path, monkeypatch):
    """docs/torchtitan.md's config function, loaded by torchtitan's ConfigManager (--module)."""
    (tmp_path / "my_moeq_configs.py").write_text(
        "import moeq.torchtitan\n"
        "from torchtitan.models.deepseek_v3 import model_registry\n"
        "from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel\n\n\n"
        "def deepseek_v3_debugmodel_moeq_mxfp8():\n"
        "    config = deepseek_v3_debugmodel()\n"
        "    config.model_spec = model_registry(\n"
        "        'debugmodel', converters=[moeq.torchtitan.Converter.Config(recipe='mxfp8')]\n"
        "    )\n"
        "    return config\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = ConfigManager().parse_args(["--module", "my_moeq_configs", "--config", "deepseek_v3_debugmodel_moeq_mxfp8"])
    experts = [c for _, c, _, _ in config.model_spec.model.traverse(GroupedExperts.Config)]
    assert experts and all(type(c).__qualname__ == "MoeqGroupedExperts.Config" for c in experts)
    assert {c.moeq_recipe for c in experts} == {"mxfp8"}


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_per_block_compile_fullgraph_matches_eager(family):
    """``--compile.enable``: torchtitan's apply_compile (each block, fullgraph=True) traces the
    converted experts forward and backward and computes what eager does."""
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.compile import apply_compile

    args = ["--compile.enable", "--compile.backend", "aot_eager"]
    model_config, trainer_config = _override_route(family, "mxfp8", args)
    eager = _build(model_config)
    compiled = copy.deepcopy(eager)
    one = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
    torch._dynamo.reset()
    apply_compile(compiled, compile_config=trainer_config.compile, parallel_dims=one)
    tokens = _tokens(eager)[:, :-1]
    outs = []
    for model in (eager, compiled):
        out = model(tokens)
        out.float().square().mean().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


# ------------------------------------------------------------ TorchAOTokenDispatcher


def _torchao_permute_on_cpu(set_attr=setattr):
    """torchao's permute_and_pad builds its indices with a Triton kernel (CUDA); on CPU run
    its own CPU reference of that kernel instead."""
    from torchao.prototype.moe_training.ep import kernels

    def fill_indices(*args, **_):  # (counts, starts, write offsets, experts per rank, ranks, max_len)
        return kernels.fill_indices_cpu(*args[:6])

    set_attr(kernels, "fill_indices_wrapper", fill_indices)


@pytest.fixture
def torchao_permute_on_cpu(monkeypatch):
    _torchao_permute_on_cpu(monkeypatch.setattr)


def _routed_experts(recipe, pad_multiple=None, seed=0):
    """deepseek_v3's MoE-layer RoutedExperts, converted through the config (the dispatcher
    swapped for TorchAOTokenDispatcher(pad_multiple) first when given)."""
    registry, flavor = _registry("deepseek_v3")
    model_config = registry(flavor).model
    routed = next(cfg for _, cfg, _, _ in model_config.traverse(RoutedExperts.Config))
    if pad_multiple is not None:
        d = routed.token_dispatcher
        routed.token_dispatcher = TorchAOTokenDispatcher.Config(
            num_experts=d.num_experts, top_k=d.top_k, pad_multiple=pad_multiple
        )
    routed = mt.convert_model_config(routed, recipe)
    torch.manual_seed(seed)
    module = routed.build()
    with torch.no_grad():
        module.init_states()
    return module.to(torch.bfloat16)


def _routing(num_experts, top_k, dim, seed=3, tokens=(2, 24)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, dim, generator=g).bfloat16()
    ids = torch.rand(*tokens, num_experts, generator=g).topk(top_k, dim=-1).indices
    ids[0, :5] = torch.arange(top_k)  # expert 0..k-1 busy, some experts starved
    scores = torch.rand(*tokens, top_k, generator=g)
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    return x, scores, ids, counts


def _run_routed(module, x, scores, ids, counts, grad):
    x, scores = x.clone().requires_grad_(), scores.clone().requires_grad_()
    seen = {}

    def hook(mod, args, out):
        rows, group_counts = args
        seen["rows"], seen["counts"], seen["out"] = rows.shape[0], group_counts, out
        rows.register_hook(lambda g: seen.__setitem__("grad_in", g))

    handle = module.inner_experts.register_forward_hook(hook)
    out = module(x, scores, ids, counts)
    out.backward(grad)
    handle.remove()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out, x.grad, scores.grad, grads, seen


@pytest.mark.parametrize(
    "recipe,pad_multiple,pads",
    [("mxfp8", 32, 0), ("mxfp8", 128, 0), ("mxfp8", 16, 1), ("fp8", 32, 0), ("fp8", 48, 0), ("bf16", 32, 0)],
)
def test_torchao_dispatcher_tail_rows_bitwise(monkeypatch, torchao_permute_on_cpu, recipe, pad_multiple, pads):
    """Behind TorchAOTokenDispatcher (fixed-size buffer, padded counts, unused tail rows) the
    converted experts give bitwise the results of the same experts behind the packed
    dispatch; tail rows come out zero with zero gradient; no second padding when
    pad_multiple already is a multiple of the recipe's alignment (48 = 3 * 16 for fp8)."""
    packed = _routed_experts(recipe)
    padded = _routed_experts(recipe, pad_multiple)
    assert packed.inner_experts.moeq_incoming_alignment is None
    assert padded.inner_experts.moeq_incoming_alignment == pad_multiple & -pad_multiple
    E = packed.inner_experts.num_experts
    top_k = packed.token_dispatcher.top_k
    x, scores, ids, counts = _routing(E, top_k, packed.inner_experts.w1_EFD.shape[-1])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    want = _run_routed(packed, x, scores, ids, counts, grad)
    counter = PadCounter(monkeypatch)
    got = _run_routed(padded, x, scores, ids, counts, grad)
    assert counter.calls == pads
    seen = got[4]
    total = int(seen["counts"].sum())
    assert seen["rows"] > total, "the dispatcher left no tail rows: the case is not exercised"
    assert (seen["counts"] % pad_multiple == 0).all()
    assert torch.equal(seen["out"][total:], torch.zeros_like(seen["out"][total:]))
    assert torch.equal(seen["grad_in"][total:], torch.zeros_like(seen["grad_in"][total:]))
    for a, b, what in zip(want[:3], got[:3], ("output", "x grad", "score grad")):
        assert torch.equal(a, b), f"{what} differs behind TorchAOTokenDispatcher"
    for name in want[3]:
        assert torch.equal(want[3][name], got[3][name]), f"{name} grad differs behind TorchAOTokenDispatcher"


def test_pad_in_dispatch_installs_the_recipes_dispatcher():
    registry, flavor = _registry("deepseek_v3")
    cfg = registry(flavor, converters=[mt.Converter.Config(recipe="mxfp8", pad_in_dispatch=True)]).model
    routed = [c for _, c, _, _ in cfg.traverse(RoutedExperts.Config)]
    assert routed and all(isinstance(c.token_dispatcher, TorchAOTokenDispatcher.Config) for c in routed)
    assert all(c.token_dispatcher.pad_multiple == 32 and c.inner_experts.moeq_incoming_alignment == 32 for c in routed)


# ------------------------------------------------------------------------------ errors


def test_bad_input_errors():
    registry, flavor = _registry("deepseek_v3")
    with pytest.raises(ValueError, match="unknown recipe 'int4'"):
        registry(flavor, converters=[mt.Converter.Config(recipe="int4")])
    with pytest.raises(ValueError, match="unknown kernel 'cutlass'"):
        registry(flavor, converters=[mt.Converter.Config(kernel="cutlass")])
    with pytest.raises(ValueError, match=r"no routed experts .* matching fqns=\['layers.99.'\]"):
        registry(flavor, converters=[mt.Converter.Config(fqns=["layers.99."])])
    from torchtitan.models.llama3 import model_registry as llama3

    with pytest.raises(ValueError, match="found no routed experts"):
        llama3("debugmodel", converters=[mt.Converter.Config()])
    cfg = registry(flavor).model
    experts = next(c for _, c, _, _ in cfg.traverse(GroupedExperts.Config))
    experts.hidden_dim = 48
    with pytest.raises(ValueError, match="its hidden_dim is 48, not a multiple of 32"):
        mt.convert_model_config(cfg, "mxfp8")
    mt.convert_model_config(cfg, "fp8")  # 48 is a multiple of 16
    # A GroupedExperts layout moeq does not know (torchtitan's fused-w13 override) is named, not skipped.
    from torchtitan.overrides.fused_swiglu import fused_grouped_experts

    fused_cfg = registry(flavor).model
    for _, experts, parent, attr in list(fused_cfg.traverse(GroupedExperts.Config)):
        setattr(parent, attr, fused_grouped_experts(experts))
    with pytest.raises(TypeError, match=r"FusedGroupedExperts with parameters \['w2_EDF', 'w13'\]"):
        mt.convert_model_config(fused_cfg, "mxfp8")
    with torch.device("meta"):
        fused_model = fused_cfg.build()
    with pytest.raises(TypeError, match=r"cannot convert layers\.1\.moe\.routed_experts\.inner_experts: it is a "
                       r"torchtitan FusedGroupedExperts"):
        moeq.convert_model(fused_model, "mxfp8")


def test_convert_model_by_hand_on_a_built_model():
    """``moeq.convert_model`` on a model torchtitan built (no config route) converts the same
    modules as the converter and computes the same logits."""
    model = _build(_converter_route("qwen3"))
    experts, _, _ = _stock("qwen3")
    moeq.convert_model(model, "fp8")
    assert sorted(model.moeq_converted_fqns) == sorted(experts)
    assert all(m.moeq_incoming_alignment is None for m in model.modules() if isinstance(m, ConvertedExperts))
    via_config = _build(_converter_route("qwen3", "fp8"))
    tokens = _tokens(model)[:, :-1]
    with torch.no_grad():
        assert torch.equal(model(tokens), via_config(tokens))


def test_by_hand_conversion_reads_the_torchao_dispatcher():
    """convert_model reads pad_multiple from the experts' parent RoutedExperts' dispatcher."""
    for pad_multiple, want in ((64, 64), (48, 16), (None, None)):
        routed = _routed_experts("bf16", pad_multiple)
        routed.inner_experts.moeq_incoming_alignment = None  # forget what the config route set
        parent = torch.nn.Module()
        parent.routed = routed
        moeq.convert_model(parent, "mxfp8")
        assert routed.inner_experts.moeq_incoming_alignment == want, pad_multiple


MOE_REGISTRIES = ["deepseek_v3", "qwen3", "gpt_oss", "kimi_k2_7"]


@pytest.mark.parametrize("package", MOE_REGISTRIES)
def test_every_moe_flavor_converts(package):
    """Every flavor with routed experts of every torchtitan MoE model converts (config level:
    each experts config is checked by building it on the meta device)."""
    module = importlib.import_module(f"torchtitan.models.{package}")
    tables = [getattr(module, n) for n in dir(module) if n.endswith("_configs")]
    flavors = [f for table in tables for f in table]
    converted = 0
    for flavor in flavors:
        model_config = module.model_registry(flavor).model
        n = len(list(model_config.traverse(GroupedExperts.Config)))
        if n == 0:
            continue
        model_config = mt.convert_model_config(model_config, "mxfp8")
        kinds = {type(c).__qualname__ for _, c, _, _ in model_config.traverse(GroupedExperts.Config)}
        assert len(kinds) == 1 and kinds.pop().startswith("Moeq"), (flavor, kinds)
        converted += 1
    assert converted >= 2, f"{package}: found {converted} MoE flavors"


def test_torchtitan_02_layout():
    """0.2.x GroupedExperts (w1/w2/w3) still convert. CI has torchtitan 0.3.0, not 0.2, so this
    runs on a module of 0.2's layout (same class name, module path and parameters) against
    the 0.3 experts' math on the same weights."""
    Legacy = type("GroupedExperts", (torch.nn.Module,), {"__module__": "torchtitan.models.moe.moe"})
    legacy = Legacy()
    stock = GroupedExperts.Config(dim=64, hidden_dim=64, num_experts=4).build()
    torch.manual_seed(0)
    for name in ("w1", "w2", "w3"):
        p = torch.nn.Parameter(torch.randn(4, 64, 64, dtype=torch.bfloat16) * 0.1)
        setattr(legacy, name, p)
        getattr(stock, f"{name}_{'EDF' if name == 'w2' else 'EFD'}").data = p.data.clone()
    Legacy.forward = lambda self, x, counts: None  # the 0.2 signature; replaced by the conversion
    moeq.convert_model(legacy, "mxfp8", kernel="emulated")
    moeq.convert_model(stock, "mxfp8", kernel="emulated")
    assert legacy.moeq_adapter.family == "torchtitan 0.2 GroupedExperts"
    counts = torch.tensor([5, 0, 19, 8])
    x = torch.randn(40, 64).bfloat16()  # 8 tail rows, as 0.2's EP dispatch leaves
    got, want = legacy(x, counts), stock(x, counts)
    assert torch.equal(got, want) and torch.equal(got[32:], torch.zeros_like(got[32:]))


# ----------------------------------------------------------------------- EP=2 (gloo)


def _tt_moe_layer(recipe, *, dispatcher="standard", enable_ep):
    """deepseek_v3's MoE layer config, converted, with torchtitan's MoE sharding set."""
    import spmd_types as spmd
    from torchtitan.models.common.moe_sharding import set_moe_sharding_config

    registry, flavor = _registry("deepseek_v3")
    model_config = registry(flavor).model
    layer = next(layer for layer in model_config.layers if getattr(layer, "moe", None) is not None)
    moe_cfg = layer.moe
    if dispatcher == "torchao":
        d = moe_cfg.routed_experts.token_dispatcher
        moe_cfg.routed_experts.token_dispatcher = TorchAOTokenDispatcher.Config(
            num_experts=d.num_experts, top_k=d.top_k, pad_multiple=32
        )
    mt.convert_model_config(moe_cfg, recipe)
    set_moe_sharding_config(
        moe_cfg, enable_ep=enable_ep, enable_sp=False,
        expert_param_layout={"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)},
    )
    return moe_cfg


def _build_layer(cfg, seed=0):
    torch.manual_seed(seed)
    module = cfg.build()
    with torch.no_grad():
        module.init_states()
    return module.to(torch.bfloat16)


def case_torchtitan_ep(mesh, recipe, dispatcher, backend):
    """One torchtitan MoE layer under torchtitan's EP=2 (``Module.parallelize``: DTensor
    expert shards, its all-to-all dispatcher) vs the same layer in one process on all
    ranks' tokens: outputs and expert gradients bitwise, router gradients summed over
    the ranks within rounding."""
    import torch.distributed as dist
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed import utils as dist_utils

    if dispatcher == "torchao":
        _torchao_permute_on_cpu()
    parallel_dims_module.device_type = "cpu"  # torchtitan builds its meshes on its accelerator type
    rank, world = dist.get_rank(), dist.get_world_size()
    dist_utils.set_spmd_backend(backend)
    parallel_dims = parallel_dims_module.ParallelDims(
        dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=world, world_size=world, spmd_backend=backend
    )
    parallel_dims.build_mesh()
    context = dist_utils.get_spmd_context(parallel_dims=parallel_dims)
    balanced = backend == "spmd_types"  # gloo's list all_to_all (spmd_types') needs equal splits
    ref_cfg = _tt_moe_layer(recipe, dispatcher=dispatcher, enable_ep=False)
    ref_cfg.router._debug_force_load_balance = balanced
    ep_cfg = _tt_moe_layer(recipe, dispatcher=dispatcher, enable_ep=True)
    ep_cfg.router._debug_force_load_balance = balanced
    ref, moe = _build_layer(ref_cfg), _build_layer(ep_cfg)
    with context():
        moe.parallelize(parallel_dims)
    experts = moe.routed_experts.inner_experts
    assert isinstance(experts, ConvertedExperts)
    e_local = experts.num_experts // world
    for p in experts.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        assert local.shape[0] == e_local, "expert weights are not sharded over EP"

    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(world, 24, ref.router.gate.weight.shape[1], generator=g).bfloat16()
    grad_all = torch.randn(x_all.shape, generator=g).bfloat16()
    x_ref = x_all.clone().requires_grad_()
    want = ref(x_ref)
    want.backward(grad_all)
    x = x_all[rank : rank + 1].clone().requires_grad_()
    with context(), _PadSpy() as spy:
        got = moe(x)
        got.backward(grad_all[rank : rank + 1])
    what = f"recipe={recipe} dispatcher={dispatcher} backend={backend}"
    # The padding policy under torchtitan's EP: packed groups -> the experts pad once
    # (fp8/mxfp8); TorchAOTokenDispatcher(pad_multiple=32) -> never.
    assert spy.calls == (1 if recipe != "bf16" and dispatcher == "standard" else 0), f"pad calls {spy.calls}: {what}"
    assert torch.equal(got, want[rank : rank + 1]), f"EP output differs: {what}"
    assert torch.equal(x.grad, x_ref.grad[rank : rank + 1]), f"EP input gradient differs: {what}"
    ref_experts = ref.routed_experts.inner_experts
    for name, p in experts.named_parameters():
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        want_g = getattr(ref_experts, name).grad[rank * e_local : (rank + 1) * e_local]
        assert torch.equal(local, want_g), f"EP expert gradient {name} differs: {what}"
    gate = moe.router.gate.weight.grad
    gate = (gate.to_local() if isinstance(gate, DTensor) else gate).float()
    dist.all_reduce(gate)
    assert rel_err(gate, ref.router.gate.weight.grad.float()) < 1e-2, f"router gradient differs: {what}"


def case_moeq_ep_refuses_torchtitan(mesh):
    model = _build(_converter_route("deepseek_v3", "mxfp8"))
    with pytest.raises(NotImplementedError, match=r"layers\.1\.moe\.routed_experts\.inner_experts is a torchtitan "
                       r"GroupedExperts .*use torchtitan's own expert parallelism"):
        moeq.apply_expert_parallel(model, mesh)


def test_torchtitan_expert_parallel_ep2():
    _spawn(
        2,
        [
            (case_torchtitan_ep, "mxfp8", "standard", "partial_dtensor"),
            (case_torchtitan_ep, "fp8", "standard", "partial_dtensor"),
            (case_torchtitan_ep, "bf16", "standard", "partial_dtensor"),
            (case_torchtitan_ep, "mxfp8", "torchao", "partial_dtensor"),
            (case_torchtitan_ep, "mxfp8", "standard", "spmd_types"),
            (case_moeq_ep_refuses_torchtitan,),
        ],
    )
