"""A routed MoE experts block, forward + backward, per recipe: tokens in, tokens out.

``benchmarks/experts.py`` times the experts on tokens already grouped by expert. A
training step also pays for routing tokens into that layout and back; moeq fuses part of
the quantization into that routing (MXFP8 on SM90: the permute-and-pad gather writes the
fake-quant copies directly), so this script times the whole block every variant needs:

    tokens (T, D), routing (T, k) -> permute-and-pad -> SwiGLU experts -> weighted combine

Every variant uses moeq's permute-and-pad and combine (the fastest available), so only
the experts' numerics and their fusion with the routing differ. Same run, same inputs;
relative errors vs a float64 reference (output, token grads, routing-weight grads,
both weight grads) are checked before timing.

    python benchmarks/moe_layer.py [--shapes ...] [--variants ...] [--out DIR]
    python benchmarks/moe_layer.py --device cpu --shapes tiny   # smoke test of the script

Writes ``moe_layer_<gpu>.json`` / ``.md`` under --out (default benchmarks/results).
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experts import (  # noqa: E402
    _bench, _sync, add_speeds, compiled, make_torchao, parse_bench_args, rel, run_and_write,
)

SHAPES = {  # name: (E, D, H, tokens T, top-k); routed rows M = T * k as in experts.py
    "mixtral_8x7b": (8, 4096, 14336, 8192, 2),
    "qwen3_30b_a3b": (128, 2048, 768, 8192, 8),
    "dsv3_ep8_local": (32, 7168, 2048, 4096, 8),
    "tiny": (4, 64, 64, 64, 2),
}


def routing(T, E, k, seed, device):
    """Skewed top-k routing: (T, k) distinct experts per token and softmax-like weights."""
    g = torch.Generator().manual_seed(seed)
    p = torch.distributions.Dirichlet(torch.full((E,), 2.0)).sample()
    ids = torch.multinomial(p.expand(T, E), k, replacement=False, generator=g)
    weights = torch.softmax(torch.randn(T, k, generator=g), -1)
    return ids.to(device), weights.to(device)


def reference64(tokens, ids, weights, w13, w2):
    """Float64 loop over experts (outside timing)."""
    out = torch.zeros_like(tokens)
    hidden = w2.shape[-1]
    for e in range(w13.shape[0]):
        t, j = (ids == e).nonzero(as_tuple=True)
        if t.numel():
            gu = tokens[t] @ w13[e].t()
            y = (F.silu(gu[:, :hidden]) * gu[:, hidden:]) @ w2[e].t()
            out.index_add_(0, t, y * weights[t, j, None])
    return out


def _experts_module(recipe, w13, w2, kernel="auto"):
    import moeq
    from moeq.convert import convert_model

    experts = moeq.GroupedExperts(1, 1, 0, device="meta")
    experts.gate_up_proj, experts.down_proj = w13, w2
    experts.dim, experts.hidden_dim, experts.num_experts = w2.shape[1], w2.shape[2], w13.shape[0]
    return convert_model(experts, recipe, kernel=kernel)


def make_moeq(recipe):
    state = {}

    def fn(tokens, ids, weights, w13, w2):
        if "m" not in state:
            state["m"] = _experts_module(recipe, w13, w2)
        return state["m"].routed_forward(tokens, ids, weights)

    return fn


def make_grouped(experts_fn, alignment):
    """permute_and_pad(alignment) -> experts_fn(x, w13, w2, offs, counts) -> combine."""
    from moeq.experts.swiglu import group_end_offsets
    from moeq.ops.padding import combine_token_groups, permute_and_pad

    def fn(tokens, ids, weights, w13, w2):
        x, counts, layout = permute_and_pad(tokens, ids, w13.shape[0], alignment)
        y = experts_fn(x, w13, w2, group_end_offsets(counts, alignment), counts)
        return combine_token_groups(y, layout, weights)

    return fn


def make_bf16_three_gemms():
    split = {}

    def experts_fn(x, w13, w2, offs, counts):
        hidden = w2.shape[-1]
        if "w1" not in split:  # contiguous gate / up weights, made once outside timing
            split["w1"] = torch.nn.Parameter(w13.detach()[:, :hidden].contiguous())
            split["w3"] = torch.nn.Parameter(w13.detach()[:, hidden:].contiguous())
        w1, w3 = split["w1"], split["w3"]
        w1.grad = w3.grad = None
        mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
        return mm(F.silu(mm(x, w1)) * mm(x, w3), w2)

    fn = make_grouped(experts_fn, None)
    fn.fused_grad = lambda: torch.cat([split["w1"].grad, split["w3"].grad], dim=1)
    return fn


def make_mxfp8_unfused():
    from moeq.ops.mxfp8_hopper import mxfp8_swiglu_experts
    from moeq.numerics.recipes import group_alignment

    return make_grouped(lambda x, w13, w2, offs, counts: mxfp8_swiglu_experts(x, w13, w2, offs), group_alignment("mxfp8"))


def make_torchao_layer(kind):
    from moeq.numerics.recipes import group_alignment

    inner = make_torchao(kind)
    return make_grouped(inner, group_alignment(kind))


VARIANTS = {
    "bf16 grouped_mm (3 GEMMs)": make_bf16_three_gemms,
    "moeq bf16": lambda: make_moeq("bf16"),
    "torchao fp8 rowwise compiled": lambda: compiled(make_torchao_layer("fp8")),
    "moeq fp8": lambda: make_moeq("fp8"),
    "torchao mxfp8 emulated": lambda: make_torchao_layer("mxfp8"),
    "moeq mxfp8, permute then experts": make_mxfp8_unfused,
    "moeq mxfp8 (routed: gather fused into fake-quant)": lambda: make_moeq("mxfp8"),
}
BASELINE = "bf16 grouped_mm (3 GEMMs)"
FUSED_MX, UNFUSED_MX = "moeq mxfp8 (routed: gather fused into fake-quant)", "moeq mxfp8, permute then experts"


def saved_bytes(fn, leaves, *args):
    """Bytes of the distinct tensors autograd keeps from ``fn(*args)``'s forward for its
    backward (storages shared with ``leaves``, the inputs and weights, are not counted:
    they exist anyway). Returns (bytes, output)."""
    leaf_ptrs = {t.untyped_storage().data_ptr() for t in leaves}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in leaf_ptrs and st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out


def run_shape(name, shape, variants, seed, log, dev, tune=False):
    E, D, H, T, k = shape
    strip_report = None
    if tune and dev == "cuda":
        from fp8_tune import tune_strips

        from moeq.ops.padding import padded_rows
        from moeq.numerics.recipes import group_alignment

        strip_report = tune_strips((E, D, H, padded_rows(T * k, E, group_alignment("fp8"))))
    torch.manual_seed(seed)
    ids, weights0 = routing(T, E, k, seed, dev)
    tokens = torch.randn(T, D, device=dev, dtype=torch.bfloat16).requires_grad_()
    weights = weights0.clone().requires_grad_()
    w13 = torch.nn.Parameter((torch.randn(E, 2 * H, D, device=dev) / D**0.5).bfloat16())
    w2 = torch.nn.Parameter((torch.randn(E, D, H, device=dev) / H**0.5).bfloat16())
    gout = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    leaves = (tokens, weights, w13, w2)

    r64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = reference64(r64[0], ids, r64[1], r64[2], r64[3])
    y64.backward(gout.double())
    ref = {"y": y64.detach(), "dtok": r64[0].grad, "dwts": r64[1].grad, "dw13": r64[2].grad, "dw2": r64[3].grad}
    del r64, y64

    rows, outs = [], {}
    for vname in variants:
        row = {"shape": name, "E": E, "D": D, "H": H, "T": T, "k": k, "variant": vname}
        if strip_report is not None and "fp8" in vname and "mxfp8" not in vname:
            row["fp8_strip_tuning"] = strip_report
        try:
            fn = VARIANTS[vname]()
            for t in leaves:
                t.grad = None
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            nbytes, y = saved_bytes(fn, leaves, tokens, ids, weights, w13, w2)
            row["saved_mib"] = nbytes / 2**20
            y.backward(gout)
            if dev == "cuda":
                row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            _sync(dev)
            dw13 = fn.fused_grad() if hasattr(fn, "fused_grad") else w13.grad
            got = {"y": y.detach(), "dtok": tokens.grad, "dwts": weights.grad, "dw13": dw13, "dw2": w2.grad}
            for key in ref:
                row[f"err_{key}"] = rel(got[key], ref[key])
            if not all(torch.isfinite(v).all() for v in got.values()):
                raise FloatingPointError("non-finite output or gradient")
            if vname in (FUSED_MX, UNFUSED_MX):
                outs[vname] = {key: v.clone() for key, v in got.items()}
            del y, got

            def step():
                for t in leaves:
                    t.grad = None
                fn(tokens, ids, weights, w13, w2).backward(gout)

            row["ms"] = _bench(step, dev, 25, 150)
            row["ms_repeat"] = _bench(step, dev, 5, 100)
        except Exception as e:  # reported, not hidden
            row["error"] = f"{type(e).__name__}: {str(e)[:240]}"
            log.write(traceback.format_exc())
        rows.append(row)
        print(json.dumps({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()
                          if kk != "fp8_strip_tuning"}), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    if len(outs) == 2:  # the fused gather must not change a bit
        same = {key: bool(torch.equal(outs[FUSED_MX][key], outs[UNFUSED_MX][key])) for key in ref}
        for r in rows:
            if r["variant"] == FUSED_MX:
                r["bitwise_equal_to_unfused"] = same
        print(f"# {name}: routed mxfp8 bitwise equal to permute-then-experts: {same}", flush=True)
    add_speeds(rows, BASELINE)
    base = next((r for r in rows if r["variant"] == BASELINE and r.get("saved_mib")), None)
    for r in rows:
        if base and r.get("saved_mib") is not None:
            r["saved_vs_bf16"] = r["saved_mib"] / base["saved_mib"]
    return rows


def markdown(rows, device):
    out = [
        f"Routed MoE experts block (permute-and-pad, SwiGLU experts, weighted combine), forward + backward, "
        f"{device}, torch {torch.__version__}. Median ms of triton.testing.do_bench (grads set to None each step); "
        "rel. errors vs float64 (output, token grads, routing-weight grads, dW13, dW2).",
        "",
        "| shape | variant | ms | vs BF16 (3 GEMMs) | vs best BF16 | saved for bwd MiB | vs BF16 saved | peak MiB | err y | err dtok | err dwts | err dW13 | err dW2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, p=4: "" if v is None else f"{v:.{p}f}"
    x = lambda v: "" if v is None else f"{v:.2f}x"
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['variant']} | failed: {r['error'][:120]} | | | | | | | | | | |")
            continue
        out.append(
            f"| {r['shape']} | {r['variant']} | {f(r['ms'], 3)} | {x(r.get('speed_vs_bf16_3gemm'))} | "
            f"{x(r.get('speed_vs_best_bf16'))} | {f(r.get('saved_mib'), 1)} | {f(r.get('saved_vs_bf16'), 2)} | "
            f"{f(r.get('peak_mib'), 0)} | {f(r['err_y'])} | {f(r['err_dtok'])} | {f(r['err_dwts'])} | "
            f"{f(r['err_dw13'])} | {f(r['err_dw2'])} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_bench_args(__doc__, SHAPES, VARIANTS, argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/moe_layer.py needs a CUDA GPU (or --device cpu --shapes tiny)")
    import functools

    run_and_write(args, "moe_layer", functools.partial(run_shape, tune=args.tune_fp8_strips), SHAPES, markdown)


if __name__ == "__main__":
    sys.exit(main())
