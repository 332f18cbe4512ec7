"""The quantize-once FP8 dataflow block (moeq/quant/fp8_flow.py) and its kernels (kernels/fp8_flow.py).

CPU: the Triton kernels run under ``TRITON_INTERPRET=1`` in subprocesses (tests/interpreted.py);
``torch._scaled_grouped_mm`` (the weight-gradient GEMM) is replaced by the float64 emulation
of tests/test_fp8_hopper.py, which also enforces the CUDA op's layout checks.
"""
from __future__ import annotations

import pytest
import torch

from tests.interpreted import run_interpreted

FP8_ERROR_BOUND = 0.1  # the FP8 recipe's bound vs float64 (tests/test_fp8_hopper.py)


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _routing(gen, tokens_n, num_experts, k, mode):
    """(T, k) distinct expert ids: "random", "one" (every token's first slot on expert 0),
    "empty" (expert 1 gets nothing)."""
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens_n)])
    if mode == "one":
        ids = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(num_experts - 1, generator=gen)[: k - 1] + 1])
                           for _ in range(tokens_n)])
    if mode == "empty":
        ids = torch.stack([torch.tensor([e for e in torch.randperm(num_experts, generator=gen).tolist() if e != 1][:k])
                           for _ in range(tokens_n)])
    return ids


# ------------------------------------------------------------------ interpreted checks (subprocess)


def _check_kernels() -> None:
    from moeq.kernels import fp8_flow as ff
    from moeq.kernels.fp8_rowwise import quantize_colwise_grouped_reference
    from moeq.ops.padding import permute_and_pad

    gen = torch.Generator().manual_seed(3)
    for mode, (tokens_n, d, e, k) in (("random", (37, 48, 4, 2)), ("one", (21, 32, 3, 2)), ("empty", (16, 64, 4, 3))):
        tok = torch.randn(tokens_n, d, generator=gen).bfloat16()
        tok[2] *= 2.0**-20  # a tiny row: scales at the far end of the range
        tok[5, 3] = 1e4  # an outlier: its column's other elements shift down (underflow possible)
        ids = _routing(gen, tokens_n, e, k, mode)
        x, _, lay = permute_and_pad(tok, ids, e, 16)
        row, inv = ff.gather_quantize_rows(tok, lay.source_rows, k)
        r_ref, i_ref = ff.gather_quantize_rows_reference(tok, lay.source_rows, k)
        assert torch.equal(ff.gather_rows_reference(tok, lay.source_rows, k), x), "gather reference != permute_and_pad"
        assert torch.equal(_bits(row), _bits(r_ref)) and torch.equal(_bits(inv), _bits(i_ref)), mode
        offs = lay.padded_offsets
        m = row.shape[0]
        col, cinv = ff.columns_from_rows(row, inv, offs)
        c_ref, ci_ref = ff.columns_from_rows_reference(row, inv, offs)
        assert col.shape[1] >= m and col.shape[1] % 16 == 0
        assert torch.equal(_bits(col[:, :m]), _bits(c_ref)) and torch.equal(_bits(cinv), _bits(ci_ref)), mode
        # the scaling-aware transpose is exact wherever the shifted value stays a normal e4m3
        deq_row = (row.float() * inv[:, None]).t()  # (D, M)
        gid = (offs.long()[None, :] <= torch.arange(m)[:, None]).sum(1)
        valid = gid < e
        scale_inv = torch.cat([cinv, torch.ones(1, d)])[gid].t()  # (D, M)
        deq_col = col[:, :m].float() * scale_inv
        normal = (deq_row.abs() / scale_inv >= 2.0**-6) | (deq_row == 0)  # before rounding
        sel = valid[None, :] & normal
        assert torch.equal(deq_col[sel], deq_row[sel]), "the exponent shift must be exact above e4m3's normal range"
        assert (col[:, :m][:, ~valid].float() == 0).all(), "padding/slack rows must be zero in the column copy"
        # its error vs float64 next to quantizing bf16 directly along the columns
        direct, dinv = quantize_colwise_grouped_reference(x, offs)
        x64 = x.double().t()[:, valid]
        err_flow = _rel((deq_col[:, valid]), x64)
        err_direct = _rel((direct.float() * torch.cat([dinv, torch.ones(1, d)])[gid].t())[:, valid], x64)
        assert err_flow < 2.0 * err_direct + 1e-3, (mode, err_flow, err_direct)
        print(f"{mode}: x column copy rel err vs float64 {err_flow:.4g} (direct from bf16 {err_direct:.4g})")


def _emulate():
    from moeq.ops import fp8_hopper as fh
    from tests.test_fp8_hopper import emulated_scaled_grouped_mm

    fh._scaled_grouped_mm = emulated_scaled_grouped_mm


def _case(seed, mode, tokens_n=40, num_experts=4, d=32, hdim=48, k=2):
    gen = torch.Generator().manual_seed(seed)
    ids = _routing(gen, tokens_n, num_experts, k, mode)
    weights = torch.softmax(torch.randn(tokens_n, k, generator=gen), -1)
    tokens = torch.randn(tokens_n, d, generator=gen).bfloat16()
    gate_up = (torch.randn(num_experts, 2 * hdim, d, generator=gen) * 0.2).bfloat16()
    down = (torch.randn(num_experts, d, hdim, generator=gen) * 0.2).bfloat16()
    gout = torch.randn(tokens_n, d, generator=gen).bfloat16()
    return tokens, ids, weights, gate_up, down, gout


def _run(fn, tokens, ids, weights, gate_up, down, gout, **kw):
    leaves = [t.clone().requires_grad_() for t in (tokens, weights, gate_up, down)]
    out = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3], **kw)
    out.backward(gout)
    return [out.detach()] + [t.grad for t in leaves]


def _check_flow_vs_block_and_float64() -> None:
    _emulate()
    from moeq.ops.fp8_flow import GemmPrecisions, fp8_flow_routed_swiglu_experts
    from moeq.ops.fp8_hopper import fp8_routed_swiglu_experts
    from tests.test_fp8_hopper import _routed_float64_reference

    names = ("out", "grad_tokens", "grad_routing_weights", "grad_gate_up", "grad_down")
    variants = {  # precisions and the results whose GEMMs they change
        "fp8": (GemmPrecisions(), ()),
        "wgrad bf16": (GemmPrecisions(wgrad_gate_up="bf16", wgrad_down="bf16"), ("grad_gate_up", "grad_down")),
        "wgrad_down bf16": (GemmPrecisions(wgrad_down="bf16"), ("grad_down",)),
        "dgrad_h bf16": (GemmPrecisions(dgrad_h="bf16"), ("grad_tokens", "grad_routing_weights", "grad_gate_up")),
    }
    for seed, mode, n in ((0, "random", 40), (1, "empty", 24), (2, "one", 19)):
        case = _case(seed, mode, tokens_n=n)
        today = _run(fp8_routed_swiglu_experts, *case)
        exact = _routed_float64_reference(*[t.detach() for t in case[:5]], case[5])
        for vname, (prec, changed) in variants.items():
            got = _run(fp8_flow_routed_swiglu_experts, *case, precisions=prec)
            assert all(torch.isfinite(g).all() for g in got), (mode, vname)
            if mode == "empty":
                assert (got[3][1] == 0).all() and (got[4][1] == 0).all(), "an expert without tokens gets zero grads"
            for what, a, b, r in zip(names, got, today, exact):
                e_today, e_exact, today_exact = _rel(a, b), _rel(a, r), _rel(b, r)
                assert e_exact < FP8_ERROR_BOUND, (mode, vname, what, e_exact)
                if what in changed:  # a BF16 GEMM: never less accurate than today's FP8 one
                    assert e_exact <= 1.1 * today_exact + 1e-3, (mode, vname, what, e_exact, today_exact)
                else:  # the same GEMMs: today's numerics (the x column copy may differ by underflow)
                    assert e_today < 1e-2, (mode, vname, what, e_today)
                print(f"{mode:6s} {vname:15s} {what:22s} vs today {e_today:.3g}  vs float64 {e_exact:.4f} "
                      f"(today {today_exact:.4f})")
            if vname == "fp8":
                # forward, the down weight's gradient: bitwise today's (same operands, same kernels)
                assert torch.equal(got[0], today[0]), mode
                assert torch.equal(got[4], today[4]), mode
                assert torch.equal(got[2], today[2]), mode


def _check_weight_copies_once_per_step() -> None:
    """Copies made exactly once per optimizer step over micro-batches (eager and compiled),
    never served stale after a write without a step; results bitwise those of per-call
    quantization."""
    _emulate()
    from moeq.ops.fp8_flow import Fp8WeightCopies, GemmPrecisions, fp8_flow_routed_swiglu_experts

    tokens, ids, weights, gate_up, down, gout = _case(4, "random")
    prec = GemmPrecisions()
    for compiled in (False, True):
        w13 = torch.nn.Parameter(gate_up.clone())
        w2 = torch.nn.Parameter(down.clone())
        copies = Fp8WeightCopies(w13, w2)
        assert copies.nbytes == 2 * (w13.numel() + w2.numel()) + 4 * (
            w13.shape[0] * (w13.shape[1] + w13.shape[2]) + w2.shape[0] * (w2.shape[1] + w2.shape[2]))

        def block(t, i, wts, a, b, wc):
            return fp8_flow_routed_swiglu_experts(t, i, wts, a, b, precisions=prec, weight_copies=wc)

        fn = torch.compile(block, fullgraph=True, backend="aot_eager") if compiled else block
        opt = torch.optim.SGD([w13, w2], lr=0.5)
        for step in range(2):
            for mb in range(3):  # gradient-accumulation micro-batches
                t_leaf = tokens.clone().requires_grad_()
                y = fn(t_leaf, ids, weights, w13, w2, copies)
                y.backward(gout)
                if mb == 0:  # bitwise the results of quantizing in the call (on copies of the weights)
                    ref = _run(fp8_flow_routed_swiglu_experts, tokens, ids, weights, w13.detach(), w2.detach(), gout,
                               precisions=prec)
                    for a, b in zip((y.detach(), t_leaf.grad, w13.grad, w2.grad), (ref[0], ref[1], ref[3], ref[4])):
                        assert torch.equal(a, b), compiled
            assert copies.quantize_count == step + 1, (compiled, step, copies.quantize_count)
            opt.step()
            opt.zero_grad()
        count = copies.quantize_count
        # a weight written without a step: the next forward re-quantizes, never serves the old copy
        with torch.no_grad():
            w2.mul_(-1.0)
        y = fn(tokens, ids, weights, w13, w2, copies)
        assert copies.quantize_count == count + 1
        y_ref = fp8_flow_routed_swiglu_experts(tokens, ids, weights, w13, w2, precisions=prec)
        assert torch.equal(y.detach(), y_ref.detach()), "a stale copy was served"
        # replaced storage (load into new memory) is seen too
        w13.data = w13.data.clone() * 0.5
        y = fn(tokens, ids, weights, w13, w2, copies)
        assert copies.quantize_count == count + 2
        assert torch.equal(y.detach(), fp8_flow_routed_swiglu_experts(tokens, ids, weights, w13, w2,
                                                                       precisions=prec).detach())
        # the step post-hook variant refreshes at the step, so the forward finds them current
        handle = copies.refresh_after(opt, w13, w2)
        fn(tokens, ids, weights, w13, w2, copies).backward(gout)
        opt.step()
        c = copies.quantize_count
        fn(tokens, ids, weights, w13, w2, copies).backward(gout)
        assert copies.quantize_count == c
        handle.remove()
        print(f"compiled={compiled}: refreshes {copies.quantize_count}, copies {copies.nbytes} bytes")


def _check_compile_fullgraph() -> None:
    _emulate()
    from moeq.ops.fp8_flow import GemmPrecisions, fp8_flow_routed_swiglu_experts

    case = _case(5, "random")
    for prec in (GemmPrecisions(), GemmPrecisions(wgrad_gate_up="bf16", wgrad_down="bf16", dgrad_h="bf16")):
        eager = _run(fp8_flow_routed_swiglu_experts, *case, precisions=prec)
        torch._dynamo.reset()
        comp = _run(torch.compile(fp8_flow_routed_swiglu_experts, fullgraph=True, backend="aot_eager"), *case,
                    precisions=prec)
        for a, b in zip(eager, comp):
            assert torch.equal(a, b)


def _check_saved_bytes_vs_bf16() -> None:
    """Bytes kept from forward to backward (saved_tensors_hooks), vs moeq's BF16 block."""
    _emulate()
    from moeq.experts.gemms import routed_swiglu_experts
    from moeq.experts.plan import build_plan
    from moeq.ops.fp8_flow import GemmPrecisions, fp8_flow_routed_swiglu_experts
    from moeq.ops.fp8_hopper import fp8_routed_swiglu_experts
    from moeq.numerics.recipes import QuantizationType

    tokens, ids, weights, gate_up, down, _ = _case(6, "random", tokens_n=96, num_experts=4, d=128, hdim=32, k=2)
    leaves = [t.clone().requires_grad_() for t in (tokens, weights, gate_up, down)]
    leaf_ptrs = {t.untyped_storage().data_ptr() for t in leaves}

    def saved(fn):
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in leaf_ptrs and st.nbytes():
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(leaves[0], ids, leaves[1], leaves[2], leaves[3])
        return sum(seen.values())

    bf16_plan = build_plan(QuantizationType.BF16, "auto", tokens.device, tokens.dtype, routes_tokens=True)
    bf16 = saved(lambda *a: routed_swiglu_experts(*a, bf16_plan))
    today = saved(fp8_routed_swiglu_experts)
    flow = saved(lambda *a: fp8_flow_routed_swiglu_experts(*a, precisions=GemmPrecisions()))
    flow_bf16_wgrad = saved(lambda *a: fp8_flow_routed_swiglu_experts(
        *a, precisions=GemmPrecisions(wgrad_gate_up="bf16", wgrad_down="bf16")))
    print(f"saved for backward: bf16 {bf16}, fp8 today {today}, fp8 flow {flow} ({flow / bf16:.2f}x), "
          f"flow with bf16 wgrads {flow_bf16_wgrad} ({flow_bf16_wgrad / bf16:.2f}x)")
    assert flow <= today, "the dataflow keeps no more than today's block"
    # at this shape (D = 4H) the FP8 copies keep 0.55x of BF16's bytes, 0.25x with BF16 weight
    # gradients (only gate_up): the ratio falls with D / H (Qwen3-30B-A3B: 0.43x on the H200)
    assert flow <= 0.6 * bf16 and flow_bf16_wgrad <= 0.3 * bf16
    assert flow_bf16_wgrad < flow, "BF16 weight gradients need neither FP8 column copy"


# ------------------------------------------------------------------ CPU tests


def test_flow_kernels_bitwise_interpreted():
    run_interpreted("test_fp8_flow", "_check_kernels")


def test_flow_block_vs_today_and_float64_interpreted():
    run_interpreted("test_fp8_flow", "_check_flow_vs_block_and_float64")


def test_weight_copies_once_per_step_eager_and_compiled_interpreted():
    run_interpreted("test_fp8_flow", "_check_weight_copies_once_per_step")


def test_flow_compile_fullgraph_interpreted():
    run_interpreted("test_fp8_flow", "_check_compile_fullgraph")


def test_saved_bytes_vs_bf16_interpreted():
    run_interpreted("test_fp8_flow", "_check_saved_bytes_vs_bf16")


def test_choose_gemm_precisions_rule():
    from moeq.ops.fp8_flow import GemmPrecisions, choose_gemm_precisions

    # Qwen3-30B-A3B: ~512 rows per expert -> the down weight's gradient in BF16
    qwen = choose_gemm_precisions("NVIDIA H100 80GB HBM3", 128, 67584, 2048, 768)
    assert qwen == GemmPrecisions(wgrad_down="bf16") and qwen.bf16_gemms == ("wgrad_down",)
    assert choose_gemm_precisions((9, 0), 128, 128 * 128, 2048, 768).bf16_gemms == ("wgrad_gate_up", "wgrad_down")
    for e, m in ((8, 16384), (32, 32768), (16, 65536)):  # Mixtral, DSV3 EP8, Qwen3 EP8-local: all FP8
        assert choose_gemm_precisions("NVIDIA H200", e, m, 4096, 1024) == GemmPrecisions()
    assert choose_gemm_precisions((8, 0), 128, 1024, 64, 64) == GemmPrecisions()  # not Hopper: unchanged
    assert choose_gemm_precisions("cpu", 128, 1024, 64, 64) == GemmPrecisions()


@pytest.mark.parametrize("kw, match", [({"gate_up": "bf16"}, "not implemented"), ({"wgrad_down": "fp16"}, "one of"),
                                       ({"dgrad_x": "bf16"}, "not implemented")])
def test_gemm_precisions_validation(kw, match):
    from moeq.ops.fp8_flow import GemmPrecisions

    with pytest.raises(ValueError, match=match):
        GemmPrecisions(**kw)


def test_weight_copies_reject_other_shapes():
    from moeq.ops.fp8_flow import Fp8WeightCopies

    c = Fp8WeightCopies(torch.zeros(2, 32, 16), torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="made for weights"):
        c.refresh(torch.zeros(2, 64, 16), torch.zeros(2, 16, 32))


# ------------------------------------------------------------------ GPU (Hopper)

_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper (SM90) GPU"
)


@pytest.mark.gpu
@_hopper
def test_gpu_kernels_match_references():
    """The hardware-cast kernels bitwise against the CPU references."""
    from moeq.kernels import fp8_flow as ff
    from moeq.ops.padding import permute_and_pad

    gen = torch.Generator().manual_seed(1)
    tok = torch.randn(1000, 512, generator=gen).bfloat16()
    tok[7, 3] = 3e4
    ids = _routing(gen, 1000, 8, 2, "random")
    _, _, lay = permute_and_pad(tok, ids, 8, 16)
    row, inv = ff.gather_quantize_rows(tok.cuda(), lay.source_rows.cuda(), 2)
    r_ref, i_ref = ff.gather_quantize_rows_reference(tok, lay.source_rows, 2)
    assert torch.equal(_bits(row.cpu()), _bits(r_ref)) and torch.equal(inv.cpu(), i_ref)
    col, cinv = ff.columns_from_rows(row, inv, lay.padded_offsets.cuda())
    c_ref, ci_ref = ff.columns_from_rows_reference(r_ref, i_ref, lay.padded_offsets)
    m = row.shape[0]
    assert torch.equal(_bits(col[:, :m].cpu()), _bits(c_ref)) and torch.equal(cinv.cpu(), ci_ref)


@pytest.mark.gpu
@_hopper
def test_gpu_flow_block():
    """The dataflow block on the GPU: vs today's block and float64 for the precision
    choices, torch.compile(fullgraph=True) == eager, no host sync, weight copies once per
    step under inductor."""
    from moeq.ops.fp8_flow import Fp8WeightCopies, GemmPrecisions, fp8_flow_routed_swiglu_experts
    from moeq.ops.fp8_hopper import fp8_routed_swiglu_experts
    from tests.test_fp8_hopper import _routed_float64_reference

    case = _case(11, "random", tokens_n=512, num_experts=8, d=256, hdim=128, k=2)
    cuda = [t.cuda() for t in case]
    exact = _routed_float64_reference(*[t.detach() for t in case[:5]], case[5])
    today = [t.cpu() for t in _run(fp8_routed_swiglu_experts, *cuda)]
    for prec in (GemmPrecisions(), GemmPrecisions(wgrad_gate_up="bf16", wgrad_down="bf16", dgrad_h="bf16")):
        got = [t.cpu() for t in _run(fp8_flow_routed_swiglu_experts, *cuda, precisions=prec)]
        for a, b, r in zip(got, today, exact):
            assert _rel(a, r) < FP8_ERROR_BOUND and _rel(a, r) <= 1.1 * _rel(b, r) + 2e-3
        if prec == GemmPrecisions():
            assert torch.equal(got[0], today[0]) and torch.equal(got[4], today[4])
        torch._dynamo.reset()
        comp = [t.cpu() for t in _run(torch.compile(fp8_flow_routed_swiglu_experts, fullgraph=True), *cuda,
                                      precisions=prec)]
        for a, b in zip(got, comp):
            assert torch.equal(a, b)
    w13 = torch.nn.Parameter(cuda[3].clone())
    w2 = torch.nn.Parameter(cuda[4].clone())
    copies = Fp8WeightCopies(w13, w2)
    torch._dynamo.reset()
    fn = torch.compile(lambda t, i, w, a, b: fp8_flow_routed_swiglu_experts(t, i, w, a, b, weight_copies=copies),
                       fullgraph=True)
    opt = torch.optim.SGD([w13, w2], lr=0.1)
    for step in range(2):
        for _ in range(2):
            fn(cuda[0], cuda[1], cuda[2], w13, w2).backward(cuda[5])
        assert copies.quantize_count == step + 1
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        leaves = [t.clone().requires_grad_() for t in (cuda[0], cuda[2])]
        fp8_flow_routed_swiglu_experts(leaves[0], cuda[1], leaves[1], w13, w2, weight_copies=copies).backward(cuda[5])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
