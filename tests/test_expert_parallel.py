"""Expert parallelism on gloo (CPU), 2 and 4 spawned processes, against the single-process MoE.

Each spawn runs many cases, so process start-up is paid twice for the whole file. Every
rank holds a contiguous (uneven, possibly empty) slice of one global batch; the routing
is skewed so some experts get no tokens from anyone. EP forward and backward must equal
the single-process MoE on the whole batch: bitwise where the reduction order is the
same (outputs, input and expert gradients: within an expert, rows arrive in global token
order), within a float tolerance for the router gradient (a sum over ranks).
"""
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moeq
from moeq.ops import padding as moeq_padding

DIM, HIDDEN, TOP_K = 32, 32, 2  # multiples of 32: every recipe converts
STARVED = (1,)  # experts no token is ever routed to (a whole-group-empty case)


def _global_moe(num_experts, seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    moe = moeq.MoE(DIM, HIDDEN, num_experts, TOP_K, load_balancing="none", dtype=dtype)
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1.0)
        moe.router.gate.weight[list(STARVED), 0] = -50.0  # x[:, 0] > 0 below: never chosen
        moe.experts.gate_up_proj.normal_(0, 0.3)
        moe.experts.down_proj.normal_(0, 0.3)
    return moe


def _global_batch(sizes, seed=1, spread=False, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), DIM, generator=g)
    x[:, 0] = x[:, 0].abs() + 1.0
    grad = torch.randn(sum(sizes), DIM, generator=g)
    if spread:
        # token norms and channel magnitudes spread over 2**+-4, as real activations do:
        # row (along D) and column (along tokens) quantization scales then differ
        x = x * torch.exp2(torch.rand(sum(sizes), 1, generator=g) * 8 - 4)
        x = x * torch.exp2(torch.rand(1, DIM, generator=g) * 8 - 4)
    return x.to(dtype), grad.to(dtype)


def _convert(moe, recipe):
    if recipe is not None:
        moeq.convert_model(moe, recipe, kernel="emulated")


def _reference(num_experts, recipe, sizes, spread=False, dtype=torch.bfloat16):
    moe = _global_moe(num_experts, dtype=dtype)
    _convert(moe, recipe)
    x, g = _global_batch(sizes, spread=spread, dtype=dtype)
    x.requires_grad_()
    out = moe(x)
    out.backward(g)
    return out.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters()}


class _PadSpy:
    """Counts calls of moeq.ops.padding.pad_token_groups (what converted experts pad with)."""

    def __init__(self):
        self.calls, self._orig = 0, moeq_padding.pad_token_groups

    def __enter__(self):
        def spy(*a, **k):
            self.calls += 1
            return self._orig(*a, **k)

        moeq_padding.pad_token_groups = spy
        return self

    def __exit__(self, *exc):
        moeq_padding.pad_token_groups = self._orig


def _ep_step(mesh, num_experts, recipe, sizes, *, convert_first, fused=True, compile=False, quantize_dispatch=False,
             spread=False, dtype=torch.bfloat16):
    rank = dist.get_rank()
    moe = _global_moe(num_experts, dtype=dtype)
    if convert_first:
        _convert(moe, recipe)
    moeq.apply_expert_parallel(moe, mesh, fused=fused, quantize_dispatch=quantize_dispatch)
    if not convert_first:
        _convert(moe, recipe)
    x, g = _global_batch(sizes, spread=spread, dtype=dtype)
    start = sum(sizes[:rank])
    x = x[start: start + sizes[rank]].clone().requires_grad_()
    fn = torch.compile(moe, backend="aot_eager") if compile else moe
    with _PadSpy() as spy:
        out = fn(x)
        out.backward(g[start: start + sizes[rank]])
    return moe, out.detach(), x.grad, spy.calls


def _check_case(mesh, num_experts, recipe, sizes, **kw):
    rank, ep = dist.get_rank(), dist.get_world_size()
    ref_out, ref_gx, ref_grads = _reference(num_experts, recipe, sizes)
    moe, out, gx, pad_calls = _ep_step(mesh, num_experts, recipe, sizes, **kw)
    start, n = sum(sizes[:rank]), sizes[rank]
    what = f"recipe={recipe} sizes={sizes} {kw}"
    assert torch.equal(out, ref_out[start: start + n]), f"forward differs: {what}"
    assert torch.equal(gx, ref_gx[start: start + n]), f"input gradient differs: {what}"
    e_local = num_experts // ep
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        p = dict(moe.named_parameters())[name]
        assert moeq.experts.padding_policy.is_expert_parallel(p)
        local = p.grad.to_local()
        expect = ref_grads[name][rank * e_local: (rank + 1) * e_local]
        assert torch.equal(local, expect), f"{name} gradient differs: {what}"
    gw = moe.router.gate.weight.grad.float()
    dist.all_reduce(gw)  # replicated router: data-parallel gradient sum (FSDP's job in training)
    ref_gw = ref_grads["router.gate.weight"].float()
    assert (gw - ref_gw).norm() <= 2e-2 * ref_gw.norm(), f"router gradient differs: {what}"
    if recipe in ("fp8", "mxfp8") and kw.get("fused", True):
        assert pad_calls == 0, f"experts padded again although dispatch aligned: {what}"
    return moe


def _worker(rank, world, store_path, cases, errors):
    try:
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
        try:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
            for case in cases:
                # A case is named in this module, or is a module-level function of another test file.
                fn = case[0] if callable(case[0]) else globals()[case[0]]
                fn(mesh, *case[1:])
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _spawn(world, cases):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_worker, (world, os.path.join(d, "store"), cases, errors), nprocs=world)
        except Exception:
            msgs = []
            while not errors.empty():
                msgs.append(errors.get())
            pytest.fail("\n".join(msgs) or "a worker failed")


# ---- cases (run inside the workers) -----------------------------------------------


def case_equivalence(mesh, num_experts, recipe, sizes, convert_first):
    _check_case(mesh, num_experts, recipe, sizes, convert_first=convert_first)


def case_unfused(mesh, num_experts, recipe, sizes):
    _check_case(mesh, num_experts, recipe, sizes, convert_first=True, fused=False)


def case_compile(mesh, num_experts, recipe, sizes):
    _check_case(mesh, num_experts, recipe, sizes, convert_first=True, compile=True)


def case_pad_spy_can_fail(mesh, num_experts, recipe, sizes):
    # The spy sees the experts' own padding when the caller does not promise alignment.
    moe = _global_moe(num_experts)
    _convert(moe, recipe)
    moeq.apply_expert_parallel(moe, mesh)
    x = torch.randn(5, DIM, dtype=torch.bfloat16)
    with _PadSpy() as spy:
        moe.experts(x, torch.tensor([2, 3]), group_alignment=None)
    assert spy.calls == 1


def case_fsdp(mesh, num_experts, recipe, sizes):
    # 2D mesh (dp, ep): FSDP2 shards the experts over "dp" (on top of their EP shard) and
    # everything else over all ranks; the EP all-to-all runs inside each "ep" group.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh2d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    ref_out, ref_gx, ref_grads = _reference(num_experts, recipe, sizes)
    moe = _global_moe(num_experts)
    _convert(moe, recipe)
    moeq.apply_expert_parallel(moe, mesh2d)
    fully_shard(moe.experts, mesh=mesh2d["dp"])
    fully_shard(moe, mesh=mesh2d["dp", "ep"]._flatten("dp_ep"))
    x, g = _global_batch(sizes)
    start, n = sum(sizes[:rank]), sizes[rank]
    x = x[start: start + n].clone().requires_grad_()
    out = moe(x)
    out.backward(g[start: start + n])
    assert torch.equal(out.detach(), ref_out[start: start + n])
    assert torch.equal(x.grad, ref_gx[start: start + n])
    # FSDP2 averages gradients over the ranks that share a parameter.
    for name, scale in (("experts.gate_up_proj", 2), ("experts.down_proj", 2), ("router.gate.weight", world)):
        got = dict(moe.named_parameters())[name].grad.full_tensor().float() * scale
        ref = ref_grads[name].float()
        assert (got - ref).norm() <= 2e-2 * ref.norm(), f"{name} gradient differs under FSDP2"


class _AllToAllSpy:
    """Records (dtype, shape) of every all_to_all_single input (what crosses the wire)."""

    def __init__(self):
        self.sent, self._orig = [], dist.all_to_all_single

    def __enter__(self):
        def spy(out, inp, *a, **k):
            self.sent.append((inp.dtype, tuple(inp.shape)))
            return self._orig(out, inp, *a, **k)

        dist.all_to_all_single = spy
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig


def _float64_expert_grads(num_experts, sizes, spread):
    """Float64 expert-weight gradients of the single-process MoE's routing (fixed, from its
    bf16 router), same weights, tokens and output gradient: the quantization-free truth."""
    moe = _global_moe(num_experts)
    x, g = _global_batch(sizes, spread=spread)
    with torch.no_grad():
        r = moe.router(x)
    w13 = moe.experts.gate_up_proj.detach().double().requires_grad_()
    w2 = moe.experts.down_proj.detach().double().requires_grad_()
    xd, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    for e in range(num_experts):
        tok, slot = (r.expert_indices == e).nonzero(as_tuple=True)
        gu = xd[tok] @ w13[e].t()
        y = (torch.nn.functional.silu(gu[:, :HIDDEN]) * gu[:, HIDDEN:]) @ w2[e].t()
        out = out.index_add(0, tok, y * r.expert_weights[tok, slot, None].double())
    out.backward(g.double())
    return {"experts.gate_up_proj": w13.grad, "experts.down_proj": w2.grad}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# gate_up_proj gradient under quantized dispatch, measured on these cases (fp8 and mxfp8
# alike: D = 32 is one MX block, so both recipes pick the same scales here): relative error
# vs the single process 1.6e-9 (2 processes) and 4.4e-7 (4 processes); vs float64 9.27e-2 /
# 6.13e-2, the single process's own error to 4 digits (BF16 experts: 3.8e-3). With
# power-of-two scales e4m3 rounding is "round to 4 significant bits" for every element in
# e4m3's normal range, whatever the scale, so quantizing the dequantized rows along the
# tokens differs from quantizing the originals only on elements below ~2**-15 of their
# row's or column's amax (e4m3 subnormals). Bounds, with margin:
QDISPATCH_VS_ONE_PROCESS = 1e-4
QDISPATCH_VS_FP64_EXCESS = 1e-4  # added error vs float64, beyond the single process's own
QDISPATCH_VS_FP64 = 0.15


def case_quantized_dispatch(mesh, num_experts, recipe, sizes):
    """quantize_dispatch=True: FP8/MXFP8 rows + scales cross the all-to-all.

    Bitwise equal to the single-process MoE: the output (the experts' quantization along D
    of the dequantized rows reproduces their values), the input and router gradients and
    the down_proj gradient (none of them reads the activations' token-dim quantization).
    gate_up_proj's gradient quantizes the dequantized rows along the tokens (a second
    rounding): bounded against the single process and against float64."""
    rank, ep = dist.get_rank(), dist.get_world_size()
    ref_out, ref_gx, ref_grads = _reference(num_experts, recipe, sizes, spread=True)
    with _AllToAllSpy() as spy:
        moe, out, gx, pad_calls = _ep_step(
            mesh, num_experts, recipe, sizes, convert_first=True, quantize_dispatch=True, spread=True
        )
    start, n = sum(sizes[:rank]), sizes[rank]
    what = f"quantized dispatch recipe={recipe} sizes={sizes}"
    assert torch.equal(out, ref_out[start: start + n]), f"forward differs: {what}"
    assert torch.equal(gx, ref_gx[start: start + n]), f"input gradient differs: {what}"
    assert pad_calls == 0, what
    gw = moe.router.gate.weight.grad.float()
    dist.all_reduce(gw)
    ref_gw = ref_grads["router.gate.weight"].float()
    assert (gw - ref_gw).norm() <= 2e-2 * ref_gw.norm(), f"router gradient differs: {what}"
    e_local = num_experts // ep
    shard = slice(rank * e_local, (rank + 1) * e_local)
    grads = {name: p.grad.to_local() for name, p in moe.named_parameters() if name.startswith("experts.")}
    assert torch.equal(grads["experts.down_proj"], ref_grads["experts.down_proj"][shard]), what
    fp64 = _float64_expert_grads(num_experts, sizes, spread=True)
    # norms over all ranks' shards together (a rank may hold only starved experts)
    got = grads["experts.gate_up_proj"].double()
    parts = torch.stack([
        (got - ref_grads["experts.gate_up_proj"][shard].double()).norm() ** 2,
        ref_grads["experts.gate_up_proj"][shard].double().norm() ** 2,
        (got - fp64["experts.gate_up_proj"][shard]).norm() ** 2,
        (ref_grads["experts.gate_up_proj"][shard].double() - fp64["experts.gate_up_proj"][shard]).norm() ** 2,
        fp64["experts.gate_up_proj"][shard].norm() ** 2,
    ])
    dist.all_reduce(parts)
    vs_one = (parts[0] / parts[1]).sqrt()
    vs_fp64, one_vs_fp64 = (parts[2] / parts[4]).sqrt(), (parts[3] / parts[4]).sqrt()
    if rank == 0:
        print(f"[qdispatch] {recipe} ep={ep} gate_up grad rel err: vs 1 process {vs_one:.3e}, vs fp64 "
              f"{vs_fp64:.3e} (1 process vs fp64 {one_vs_fp64:.3e})", flush=True)
    assert vs_one < QDISPATCH_VS_ONE_PROCESS, f"gate_up_proj gradient vs 1 process {vs_one:.3e}: {what}"
    assert vs_fp64 < QDISPATCH_VS_FP64, f"gate_up_proj gradient vs float64 {vs_fp64:.3e}: {what}"
    assert vs_fp64 <= one_vs_fp64 + QDISPATCH_VS_FP64_EXCESS, f"{vs_fp64:.3e} vs {one_vs_fp64:.3e}: {what}"
    # What crossed the wire: counts (int64), the dispatch as packed uint8 rows, the combine
    # and both backward all-to-alls in bf16.
    from moeq.ops.quantized_dispatch import packed_row_bytes

    row = (DIM + (4 if recipe == "fp8" else DIM // 32) + 15) // 16 * 16
    assert packed_row_bytes(DIM, recipe) == row
    plan = moe.expert_dispatcher.last_plan
    rows_sent = [(dt, sh) for dt, sh in spy.sent if dt != torch.int64]
    assert rows_sent == [
        (torch.uint8, (plan.num_send, row)),
        (torch.bfloat16, (plan.num_recv, DIM)),
        (torch.bfloat16, (plan.num_send, DIM)),
        (torch.bfloat16, (plan.num_recv, DIM)),
    ], rows_sent


def case_quantized_dispatch_bf16_ignored(mesh, num_experts, recipe, sizes):
    # BF16 / unconverted experts: quantize_dispatch changes nothing (bitwise, bf16 rows sent)
    with _AllToAllSpy() as spy:
        _check_case(mesh, num_experts, recipe, sizes, convert_first=False, quantize_dispatch=True)
    assert all(dt in (torch.int64, torch.bfloat16) for dt, _ in spy.sent), spy.sent


def case_errors(mesh, num_experts, recipe, sizes):
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    no_ep = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    with pytest.raises(ValueError, match="no 'ep' dim"):
        moeq.apply_expert_parallel(_global_moe(num_experts), no_ep)
    with pytest.raises(ValueError, match="not divisible by the EP size"):
        moeq.apply_expert_parallel(_global_moe(num_experts + 1), mesh)
    with pytest.raises(TypeError, match="DeviceMesh"):
        moeq.apply_expert_parallel(_global_moe(num_experts), None)
    moe = _global_moe(num_experts)
    moeq.apply_expert_parallel(moe, mesh)
    with pytest.raises(ValueError, match="already applied"):
        moeq.apply_expert_parallel(moe, mesh)
    # Mismatched recipes: every rank raises at the count exchange (no hang).
    moeq.convert_model(moe, "fp8" if dist.get_rank() == 0 else "mxfp8", kernel="emulated")
    x = torch.randn(4, DIM, dtype=torch.bfloat16)
    x[:, 0] = x[:, 0].abs() + 1
    with pytest.raises(RuntimeError, match="different expert recipes"):
        moe(x)
    with pytest.raises(ValueError, match="needs fused=True"):
        moeq.apply_expert_parallel(_global_moe(num_experts), mesh, fused=False, quantize_dispatch=True)
    from moeq.parallel import ExpertParallelDispatcher

    with pytest.raises(ValueError, match="needs fused=True"):
        ExpertParallelDispatcher(mesh, num_experts, fused=False, quantize_dispatch=True)
    # One rank quantizes, the other does not: every rank raises at setup, naming rank 1.
    moe = _global_moe(num_experts)
    moeq.convert_model(moe, "fp8", kernel="emulated")
    with pytest.raises(ValueError, match=r"EP rank 1 \(global rank 1\) differs from EP rank 0.*quantize_dispatch True vs False"):
        moeq.apply_expert_parallel(moe, mesh, quantize_dispatch=dist.get_rank() == 0)
    # ... and if the dispatch mode changes after setup, the count exchange still catches it
    moeq.apply_expert_parallel(moe, mesh)
    moe.expert_dispatcher.quantize_dispatch = dist.get_rank() == 0
    with pytest.raises(RuntimeError, match=r"fp8 \(quantized dispatch\)"):
        moe(x)


SETUP_DISAGREEMENTS = [
    # (what rank 1 builds differently, expected error on every rank)
    (dict(num_experts=8), r"EP rank 1 \(global rank 1\) differs from EP rank 0 \(global rank 0\): <root> num_experts 4 vs 8"),
    (dict(hidden=64), r"<root>.gate_up_proj \(4, 64, 32\) torch.bfloat16 vs \(4, 128, 32\) torch.bfloat16"),
    (dict(dtype=torch.float32), r"<root>.down_proj \(4, 32, 32\) torch.bfloat16 vs \(4, 32, 32\) torch.float32"),
    (dict(recipe="mxfp8"), r"<root> recipe fp8 vs mxfp8"),
    (dict(fused=False), r"fused True vs False"),
]


def case_setup_disagreement(mesh, num_experts, recipe, sizes):
    """Ranks that built different models fail at apply_expert_parallel, all of them, naming
    the rank and each differing field (one collective; before: a crash inside gloo or a
    recipe error blaming the wrong thing at the first forward)."""
    rank = dist.get_rank()
    for change, pattern in SETUP_DISAGREEMENTS:
        mine = change if rank == 1 else {}
        torch.manual_seed(0)
        moe = moeq.MoE(DIM, mine.get("hidden", HIDDEN), mine.get("num_experts", num_experts), TOP_K,
                       dtype=mine.get("dtype", torch.bfloat16))
        moeq.convert_model(moe, mine.get("recipe", "fp8"), kernel="emulated")
        with pytest.raises(ValueError, match=pattern):
            moeq.apply_expert_parallel(moe, mesh, fused=mine.get("fused", True))
        assert moe.expert_dispatcher is None  # nothing was sharded
    # a check that fails on one rank only: that rank raises its own error, the others name it
    moe = _global_moe(num_experts + (1 if rank == 1 else 0))
    pattern = "not divisible by the EP size" if rank == 1 else r"failed on EP rank 1 .*5 experts, not divisible"
    with pytest.raises(ValueError, match=pattern):
        moeq.apply_expert_parallel(moe, mesh)
    # agreeing ranks still work afterwards (the group is healthy)
    _check_case(mesh, num_experts, "fp8", sizes, convert_first=True)


def case_quantized_dispatch_float32(mesh, num_experts, recipe, sizes):
    """A float32 model with quantized dispatch: float32 output, bitwise the single process's
    (before: bfloat16 output differing by 2.4e-2), as are the input and down_proj gradients;
    gate_up_proj's gradient as for bfloat16 models (the token-dim quantization of rows
    dequantized along D)."""
    rank, ep = dist.get_rank(), dist.get_world_size()
    f32 = torch.float32
    ref_out, ref_gx, ref_grads = _reference(num_experts, recipe, sizes, spread=True, dtype=f32)
    moe, out, gx, _ = _ep_step(mesh, num_experts, recipe, sizes, convert_first=True, quantize_dispatch=True,
                               spread=True, dtype=f32)
    assert moe.expert_dispatcher.uses_quantized_dispatch(moe.experts)
    start, n = sum(sizes[:rank]), sizes[rank]
    assert out.dtype == f32 and gx.dtype == f32
    assert torch.equal(out, ref_out[start: start + n]), f"forward differs: {recipe}"
    assert torch.equal(gx, ref_gx[start: start + n]), f"input gradient differs: {recipe}"
    e_local = num_experts // ep
    shard = slice(rank * e_local, (rank + 1) * e_local)
    grads = {name: p.grad.to_local() for name, p in moe.named_parameters() if name.startswith("experts.")}
    assert grads["experts.down_proj"].dtype == f32
    assert torch.equal(grads["experts.down_proj"], ref_grads["experts.down_proj"][shard])
    got, want = grads["experts.gate_up_proj"].double(), ref_grads["experts.gate_up_proj"][shard].double()
    parts = torch.stack([(got - want).norm() ** 2, want.norm() ** 2])
    dist.all_reduce(parts)
    assert (parts[0] / parts[1]).sqrt() < QDISPATCH_VS_ONE_PROCESS


# ---- tests --------------------------------------------------------------------------


def test_ep2():
    sizes = [7, 12]
    _spawn(
        2,
        [
            ("case_equivalence", 4, None, sizes, True),
            ("case_equivalence", 4, "bf16", sizes, False),
            ("case_equivalence", 4, "fp8", sizes, True),
            ("case_equivalence", 4, "mxfp8", sizes, False),
            ("case_unfused", 4, "mxfp8", sizes),
            ("case_compile", 4, None, sizes),
            ("case_pad_spy_can_fail", 4, "fp8", sizes),
            ("case_quantized_dispatch", 4, "fp8", sizes),
            ("case_quantized_dispatch", 4, "mxfp8", sizes),
            ("case_quantized_dispatch_bf16_ignored", 4, "bf16", sizes),
            ("case_errors", 4, None, sizes),
            ("case_setup_disagreement", 4, None, sizes),
            ("case_quantized_dispatch_float32", 4, "fp8", sizes),
            ("case_quantized_dispatch_float32", 4, "mxfp8", sizes),
        ],
    )


def test_ep4():
    sizes = [5, 0, 9, 3]  # one rank with no tokens at all
    _spawn(
        4,
        [
            ("case_equivalence", 8, None, sizes, True),
            ("case_equivalence", 8, "fp8", sizes, False),
            ("case_equivalence", 8, "mxfp8", sizes, True),
            ("case_unfused", 8, "fp8", sizes),
            ("case_fsdp", 8, "mxfp8", sizes),
            ("case_quantized_dispatch", 8, "fp8", sizes),
            ("case_quantized_dispatch", 8, "mxfp8", sizes),
        ],
    )


# ---- a rank that fails mid-step ------------------------------------------------------

COLLECTIVE_TIMEOUT_S = 3.0


def _failing_rank_worker(rank, world, store_path, results, done):
    """Rank 1 raises on a bad input mid-step (before its count exchange) and stays alive;
    rank 0 is left waiting in the all-to-all until the process group's timeout."""
    import datetime
    import time

    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    moe = _global_moe(4)
    moeq.apply_expert_parallel(moe, mesh)
    x, _ = _global_batch([6])
    moe(x)  # one good step on both ranks
    if rank == 1:
        try:
            moe(x[:, :16])
            results.put((rank, "no error", "", 0.0))
        except ValueError as e:
            results.put((rank, type(e).__name__, str(e), 0.0))
        done.wait(120)  # alive but gone from the collectives: only the timeout frees rank 0
        os._exit(0)
    t0 = time.monotonic()
    try:
        moe(x)
        results.put((rank, "no error", "", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 - the test asserts which one
        results.put((rank, type(e).__name__, str(e), time.monotonic() - t0))
    done.set()
    os._exit(0)  # the group is broken: skip its teardown


def test_failed_rank_turns_into_an_error_within_the_timeout():
    ctx = mp.get_context("spawn")
    results, done = ctx.SimpleQueue(), ctx.Event()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_failing_rank_worker, (2, os.path.join(d, "store"), results, done), nprocs=2)
    got = {}
    while not results.empty():
        rank, kind, msg, waited = results.get()
        got[rank] = (kind, msg, waited)
    assert got[1][0] == "ValueError" and "features" in got[1][1], got
    kind, msg, waited = got[0]
    assert kind == "RuntimeError", got  # an error, not a hang and not a silent result
    assert "timed out" in msg.lower() or "timeout" in msg.lower(), msg
    print(f"rank 0: {kind} after {waited:.2f} s: {msg[:200]}")
    assert waited < COLLECTIVE_TIMEOUT_S + 10, f"rank 0 waited {waited:.1f} s with a {COLLECTIVE_TIMEOUT_S} s timeout"
