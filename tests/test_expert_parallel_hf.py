"""Expert parallelism for transformers experts converted by moeq, and EP's host reads.

Gloo (CPU), 2 spawned processes, the harness of tests/test_expert_parallel.py. Each rank
holds a contiguous, uneven slice of one global batch; the routing is skewed and starves
one expert. EP must equal the converted single-process module on the whole batch:
bitwise for the experts module (outputs, hidden-state, routing-weight and per-expert
weight/bias gradients), for every recipe, the plain-SwiGLU path (Qwen3-MoE) and the
per-GEMM path with biases and interleaved gate/up (GPT-OSS).

The host-read count: one EP forward+backward must read device data on the host exactly
once (the dispatch plan's ``.tolist()`` of the exchanged counts), for every recipe.
"""
import math
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import moeq
from tests import test_expert_parallel as ep_tests

pytest.importorskip("transformers")

E, D, I, K = 4, 32, 32, 2  # multiples of 32: every recipe converts
STARVED = 1  # no token is routed to this expert


def _hf_experts(kind, recipe, *, num_experts=E, seed=0):
    """A converted transformers experts module of family ``kind`` inside a holder module."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from moeq.integrations.transformers.models import hf_config

    cfg = hf_config(kind, vocab_size=64, dim=D, num_layers=1, num_heads=2, num_experts=num_experts, top_k=K,
                    expert_hidden_dim=I)
    cls = {"qwen3_moe": Qwen3MoeExperts, "gpt_oss": GptOssExperts}[kind]
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.experts = cls(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in holder.experts.parameters():
            p.normal_(0, 0.3)
    if recipe is not None:
        moeq.convert_model(holder, recipe, kernel="emulated")
    return holder


def _routing(sizes, seed=1):
    """Global batch: tokens (T, D) bf16, top-k ids (T, K), weights (T, K) fp32, output grad."""
    g = torch.Generator().manual_seed(seed)
    T = sum(sizes)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    scores = torch.randn(T, E, generator=g)
    scores[:, 0] += 1.5  # skewed: expert 0 takes most tokens
    scores[:, STARVED] = -math.inf
    w, idx = scores.softmax(-1).topk(K, dim=-1)
    grad = torch.randn(T, D, generator=g).to(torch.bfloat16)
    return x, idx, w, grad


def _fwd_bwd(experts, x, idx, w, grad):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = experts(x, idx, w)
    out.backward(grad)
    return out.detach(), x.grad, w.grad


# ---- cases (run inside the workers) -----------------------------------------------


def case_hf_experts(mesh, kind, recipe, sizes, fused=True, quantize_dispatch=False):
    rank, ep = dist.get_rank(), dist.get_world_size()
    x, idx, w, g = _routing(sizes)
    ref = _hf_experts(kind, recipe)
    ref_out, ref_gx, ref_gw = _fwd_bwd(ref.experts, x, idx, w, g)
    model = _hf_experts(kind, recipe)
    moeq.apply_expert_parallel(model, mesh, fused=fused, quantize_dispatch=quantize_dispatch)
    if quantize_dispatch:
        from moeq.integrations.transformers.experts import HFLocalExperts

        assert model.experts.moeq_expert_dispatcher.uses_quantized_dispatch(HFLocalExperts(model.experts))
    assert model.moeq_expert_parallel_fqns == ["experts"]
    start, n = sum(sizes[:rank]), sizes[rank]
    sl = slice(start, start + n)
    with ep_tests._PadSpy() as spy:
        out, gx, gw = _fwd_bwd(model.experts, x[sl], idx[sl], w[sl], g[sl])
    what = f"{kind} recipe={recipe} sizes={sizes} fused={fused} quantize_dispatch={quantize_dispatch}"
    if fused:
        assert spy.calls == 0, f"experts padded again although the dispatch aligned: {what}"
    assert torch.equal(out, ref_out[sl]), f"forward differs: {what}"
    assert torch.equal(gx, ref_gx[sl]), f"hidden-state gradient differs: {what}"
    assert torch.equal(gw, ref_gw[sl]), f"routing-weight gradient differs: {what}"
    e_local = E // ep
    ref_params = dict(ref.experts.named_parameters())
    names = []
    for name, p in model.experts.named_parameters():
        assert moeq.experts.padding_policy.is_expert_parallel(p), f"{name} not sharded over ep"
        expect = ref_params[name].grad[rank * e_local: (rank + 1) * e_local]
        if quantize_dispatch and name == "gate_up_proj":
            # its weight gradient re-quantizes the dequantized rows along the tokens
            # (docs/expert_parallel.md, "What is quantized twice"): close, not bitwise
            rel = (p.grad.to_local().float() - expect.float()).norm() / expect.float().norm().clamp_min(1e-30)
            assert rel < 1e-4, f"{name} gradient differs by {rel:.2e}: {what}"
        else:
            assert torch.equal(p.grad.to_local(), expect), f"{name} gradient differs: {what}"
        names.append(name)
    expected = {"qwen3_moe": ["gate_up_proj", "down_proj"],
                "gpt_oss": ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"]}[kind]
    assert sorted(names) == sorted(expected)


def case_hf_model(mesh, recipe, rows):
    """A whole tiny Qwen3-MoE LM: EP ranks hold batch rows; compared with one process."""
    from transformers import AutoModelForCausalLM

    from moeq.integrations.transformers.models import hf_config

    rank = dist.get_rank()
    cfg = hf_config("qwen3_moe", vocab_size=64, dim=D, num_layers=2, num_heads=2, num_experts=E, top_k=K,
                    expert_hidden_dim=I)

    def build():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg)
        return moeq.convert_model(m, recipe, kernel="emulated")

    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (sum(rows), 8), generator=gen)
    grad = torch.randn(sum(rows), 8, 64, generator=gen)
    ref = build()
    ref_logits = ref(input_ids=tokens).logits
    ref_logits.backward(grad)
    model = build()
    moeq.apply_expert_parallel(model, mesh)
    assert len(model.moeq_expert_parallel_fqns) == cfg.num_hidden_layers
    start, n = sum(rows[:rank]), rows[rank]
    logits = model(input_ids=tokens[start: start + n]).logits
    logits.backward(grad[start: start + n])
    # The dense layers compute per batch row, so the logits are bitwise those of one process.
    assert torch.equal(logits.detach(), ref_logits.detach()[start: start + n]), f"logits differ (recipe={recipe})"
    ref_params = dict(ref.named_parameters())
    sharded = 0
    for name, p in model.named_parameters():
        r = ref_params[name].grad
        if moeq.experts.padding_policy.is_expert_parallel(p):
            e_local = r.shape[0] // dist.get_world_size()
            assert torch.equal(p.grad.to_local(), r[rank * e_local: (rank + 1) * e_local]), f"{name} ({recipe})"
            sharded += 1
            continue
        got = p.grad.clone()
        dist.all_reduce(got)  # replicated: the data-parallel gradient sum, another summation order
        rel = (got - r).norm() / r.norm().clamp_min(1e-30)
        # measured worst over all replicated parameters: 1.3e-7 (fp32 rounding of the sum)
        assert rel <= 1e-5, f"{name} gradient differs by {rel:.2e} (recipe={recipe})"
    assert sharded == 2 * cfg.num_hidden_layers


def case_hf_errors(mesh):
    with pytest.raises(ValueError, match=r"moeq.convert_model\(model, recipe\) first"):
        moeq.apply_expert_parallel(_hf_experts("qwen3_moe", None), mesh)
    with pytest.raises(ValueError, match="not divisible by the EP size"):
        moeq.apply_expert_parallel(_hf_experts("qwen3_moe", "bf16", num_experts=3), mesh)
    own = _hf_experts("qwen3_moe", "bf16")
    own.experts._is_expert_parallel = True
    with pytest.raises(ValueError, match="transformers' own expert parallelism"):
        moeq.apply_expert_parallel(own, mesh)
    odd = _hf_experts("qwen3_moe", "bf16")
    odd.experts.expert_scale = nn.Parameter(torch.ones(E))
    with pytest.raises(NotImplementedError, match="expert_scale"):
        moeq.apply_expert_parallel(odd, mesh)
    twice = _hf_experts("qwen3_moe", "mxfp8")
    moeq.apply_expert_parallel(twice, mesh)
    with pytest.raises(ValueError, match="already applied"):
        moeq.apply_expert_parallel(twice, mesh)
    with pytest.raises(ValueError, match="no moeq.MoE layer and no transformers experts"):
        moeq.apply_expert_parallel(nn.Linear(4, 4), mesh)


# ---- host reads -----------------------------------------------------------------------

# Ops that read device data on the host (a CUDA host sync) when they run on CUDA.
_SYNC_OPS = {
    "aten::_local_scalar_dense",  # .item(), bool(t), int(t), float(t), `if t:`
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique_dim",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::equal",
}


class HostReads(TorchDispatchMode):
    """Records every op of one region that reads device data on the host.

    Counts the ops above, ``repeat_interleave`` without ``output_size`` (it sizes its
    output from the data), and ``Tensor.tolist`` (which reads memory without dispatching).
    Sees the backward too: on CPU, autograd runs it in the calling thread.
    """

    def __enter__(self):
        self.reads, self._tolist = [], torch.Tensor.tolist
        reads, tolist = self.reads, self._tolist

        def counted_tolist(t):
            reads.append(("Tensor.tolist", "".join(traceback.format_stack(limit=6)[:-1])))
            return tolist(t)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        unsized = name == "aten::repeat_interleave" and kwargs.get("output_size") is None
        if name in _SYNC_OPS or unsized:
            self.reads.append((name, "".join(traceback.format_stack(limit=6)[:-1])))
        return func(*args, **kwargs)


def _cuda_checks():
    """Make moeq's value checks (offsets, counts, finiteness) behave as on CUDA
    (``torch._assert_async``, no host read): on CPU in eager mode they read on the host on
    purpose, for exact error messages."""
    import moeq.numerics.validation as v

    orig = v.checks_read_on_host
    v.checks_read_on_host = lambda t: False
    return lambda: setattr(v, "checks_read_on_host", orig)


def case_host_reads(mesh, which, recipe):
    rank = dist.get_rank()
    if which == "moe":
        model = ep_tests._global_moe(E)
        ep_tests._convert(model, recipe)
        moeq.apply_expert_parallel(model, mesh)
        x, _ = ep_tests._global_batch([7, 12])
        x = x[:7] if rank == 0 else x[7:]

        def step():
            model(x.clone().requires_grad_()).float().sum().backward()
    else:
        model = _hf_experts("qwen3_moe", recipe)
        moeq.apply_expert_parallel(model, mesh)
        x, idx, w, g = _routing([7, 12])
        sl = slice(0, 7) if rank == 0 else slice(7, 19)

        def step():
            _fwd_bwd(model.experts, x[sl], idx[sl], w[sl], g[sl])

    step()  # warm-up
    restore = _cuda_checks()
    try:
        with HostReads() as probe:
            step()
    finally:
        restore()
    where = "\n".join(f"{n}:\n{s}" for n, s in probe.reads)
    assert len(probe.reads) == 1, f"{which} recipe={recipe}: {len(probe.reads)} host reads, expected 1:\n{where}"
    assert probe.reads[0][0] == "Tensor.tolist" and "dispatch_plan.py" in probe.reads[0][1], where


def case_host_reads_probe_can_fail(mesh):
    # The probe sees each kind of read it claims to count.
    t = torch.tensor([1, 2, 3])
    with HostReads() as probe:
        t.sum().item()
        bool(t[0] > 0)
        t.tolist()
        torch.repeat_interleave(t, t)
        t.nonzero()
    names = [n for n, _ in probe.reads]
    assert names.count("aten::_local_scalar_dense") == 2, names
    assert "Tensor.tolist" in names and "aten::repeat_interleave" in names and "aten::nonzero" in names, names


# ---- tests --------------------------------------------------------------------------


def test_hf_ep2():
    sizes = [7, 12]
    ep_tests._spawn(
        2,
        [
            (case_hf_experts, "qwen3_moe", "bf16", sizes),
            (case_hf_experts, "qwen3_moe", "fp8", sizes),
            (case_hf_experts, "qwen3_moe", "mxfp8", sizes),
            (case_hf_experts, "qwen3_moe", "mxfp8", [0, 9]),  # a rank without tokens
            (case_hf_experts, "qwen3_moe", "fp8", sizes, True, True),  # FP8 rows over the wire
            (case_hf_experts, "qwen3_moe", "mxfp8", sizes, True, True),  # MXFP8 rows over the wire
            (case_hf_experts, "gpt_oss", "bf16", sizes),
            (case_hf_experts, "gpt_oss", "mxfp8", sizes),
            (case_hf_experts, "gpt_oss", "mxfp8", sizes, False),  # unfused baseline: slack rows
            (case_hf_model, "bf16", [1, 2]),
            (case_hf_model, "mxfp8", [1, 2]),
            (case_hf_errors,),
            (case_host_reads_probe_can_fail,),
            (case_host_reads, "moe", None),
            (case_host_reads, "moe", "bf16"),
            (case_host_reads, "moe", "fp8"),
            (case_host_reads, "moe", "mxfp8"),
            (case_host_reads, "hf", "bf16"),
            (case_host_reads, "hf", "mxfp8"),
        ],
    )
