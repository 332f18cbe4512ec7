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
    "qwen3_ep8_local": (16, 2048, 768, 8192, 8),
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


def make_fp8_today():
    """Today's FP8 routed block (moeq/quant/fp8_hopper.py), called directly: weights quantized per call."""
    from moeq.ops.fp8_hopper import fp8_routed_swiglu_experts

    return fp8_routed_swiglu_experts


def make_fp8_flow(precisions=None, cached=False):
    """The quantize-once dataflow (moeq/quant/fp8_flow.py). ``precisions``: None = the
    rule's choice for the shape and device, else a dict of GemmPrecisions fields.
    Weight copies live in an Fp8WeightCopies; ``cached=False`` invalidates them before
    every call (one micro-batch per optimizer step: the copies are made in the timed
    step, as an optimizer step would force), ``cached=True`` keeps them (micro-batches
    2..N of a gradient-accumulation step)."""
    from moeq.ops.fp8_flow import Fp8WeightCopies, GemmPrecisions, fp8_flow_routed_swiglu_experts

    state = {}

    def fn(tokens, ids, weights, w13, w2):
        if "copies" not in state:
            state["copies"] = Fp8WeightCopies(w13, w2)
        copies = state["copies"]
        if not cached:
            copies.state[:4] = -1  # as after an optimizer step: the next refresh re-quantizes
        prec = None if precisions is None else GemmPrecisions(**precisions)
        return fp8_flow_routed_swiglu_experts(tokens, ids, weights, w13, w2, precisions=prec, weight_copies=copies)

    def prepare(w13, w2):
        # the copies are persistent state (like optimizer state): allocated before the
        # peak-memory window, reported separately as weight_copies_mib
        state.setdefault("copies", Fp8WeightCopies(w13, w2))

    fn.state, fn.prepare = state, prepare
    return fn


FLOW = "moeq fp8 flow (rule's precisions)"
VARIANTS = {
    "bf16 grouped_mm (3 GEMMs)": make_bf16_three_gemms,
    "moeq bf16": lambda: make_moeq("bf16"),
    "torchao fp8 rowwise compiled": lambda: compiled(make_torchao_layer("fp8")),
    "moeq fp8": lambda: make_moeq("fp8"),
    "moeq fp8 today's block": make_fp8_today,
    FLOW: make_fp8_flow,
    "moeq fp8 flow all-FP8": lambda: make_fp8_flow({}),
    "moeq fp8 flow wgrads in BF16": lambda: make_fp8_flow({"wgrad_gate_up": "bf16", "wgrad_down": "bf16"}),
    "moeq fp8 flow wgrad_down in BF16": lambda: make_fp8_flow({"wgrad_down": "bf16"}),
    "moeq fp8 flow, weights cached (micro-batch 2..N)": lambda: make_fp8_flow(None, cached=True),
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


_KERNEL_GROUPS = (  # profiler kernel name -> stage of the FP8 blocks
    ("GEMMs", ("grouped_mm_kernel", "grouped_mm_wgrad", "gemm", "cutlass", "sm90", "xmma", "nvjet", "wgmma")),
    ("FP8 copies (strips)", ("_row_strip_kernel", "_col_strip_kernel", "_cast_kernel", "_amax_kernel")),
    ("permute+quantize", ("_gather_quant_rows_kernel",)),
    ("permute / combine / route", ("permute", "combine", "route", "pad_rows", "unpad", "gather", "scatter", "index")),
)


def kernel_breakdown(step, dev):
    """One profiled step: ms of GPU kernel time per stage (``_KERNEL_GROUPS`` by kernel
    name; "other" for the rest: elementwise, memsets, copies), their sum (the step's
    time minus it is launch gaps and host time) and the step's kernel count."""
    if dev != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    out, n = {}, 0
    for ev in prof.events():  # device-side kernel events only (CPU ops would count their kernels twice)
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(ev, "device_time_total", None)
        t = ev.cuda_time_total if t is None else t
        group = next((g for g, keys in _KERNEL_GROUPS if any(k in ev.key for k in keys)), "other")
        out[group] = out.get(group, 0.0) + t / 1e3
        n += 1
    out["sum of kernels"] = sum(v for v in out.values())
    out["kernels"] = n
    return out


def flow_stage_times(tokens, ids, weights, w13, w2, dev):
    """Each quantization stage of the FP8 dataflow alone (do_bench median ms) on this
    shape's data: the weight copies (both orientations of both weights), the permute that
    writes x's FP8 row copy, the scaling-aware transpose (x's column copy), the SwiGLU
    forward copies, grad_y's copies, the SwiGLU backward copies, and today's permute +
    x strips for comparison."""
    if dev != "cuda":
        return None
    from moeq.kernels import fp8_flow as ff
    from moeq.kernels import fp8_strips as fs
    from moeq.kernels.fp8_rowwise import ALIGN
    from moeq.ops.padding import permute_and_pad, route_tokens
    from moeq.ops.fp8_flow import Fp8WeightCopies

    copies = Fp8WeightCopies(w13, w2)

    def refresh():
        copies.state[:4] = -1
        copies.refresh(w13, w2)

    lay = route_tokens(ids, w13.shape[0], ALIGN)
    offs = lay.padded_offsets
    t = tokens.detach()
    row, inv = ff.gather_quantize_rows(t, lay.source_rows, lay.top_k)
    m = row.shape[0]
    gate_up = torch.randn(m, w13.shape[1], device=dev, dtype=torch.bfloat16)
    grad_y = torch.randn(m, w2.shape[1], device=dev, dtype=torch.bfloat16)
    grad_h = torch.randn(m, w2.shape[2], device=dev, dtype=torch.bfloat16)
    rw = torch.rand(m, device=dev)
    stages = {
        "weight copies (refresh)": refresh,
        "permute + x row copy": lambda: ff.gather_quantize_rows(t, lay.source_rows, lay.top_k),
        "x column copy (scaling-aware transpose)": lambda: ff.columns_from_rows(row, inv, offs),
        "swiglu fwd copies": lambda: fs.swiglu_quantize_strips(gate_up, offs),
        "grad_y copies": lambda: fs.quantize_dual_strips(grad_y, offs, row_weights=rw, weight_col_copy=True),
        "swiglu bwd copies": lambda: fs.swiglu_backward_quantize_strips(gate_up, grad_h, offs, row_weights=rw),
        "today: permute_and_pad + x strips": lambda: fs.quantize_dual_strips(
            permute_and_pad(t, ids, w13.shape[0], ALIGN)[0], offs),
    }
    return {k: _bench(f, dev, 10, 50) for k, f in stages.items()}


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
            if hasattr(fn, "prepare"):
                fn.prepare(w13, w2)
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
            if "fp8" in vname and "torchao" not in vname:
                row["kernel_breakdown_ms"] = kernel_breakdown(step, dev)
            if vname == FLOW:
                from moeq.ops.padding import padded_rows
                from moeq.ops.fp8_flow import choose_gemm_precisions

                prec = choose_gemm_precisions(tokens.device, E, padded_rows(T * k, E, 16), D, H)
                row["precisions"] = {f: getattr(prec, f) for f in prec.__dataclass_fields__}
                row["weight_copies_mib"] = fn.state["copies"].nbytes / 2**20
                row["stage_ms"] = flow_stage_times(tokens, ids, weights, w13, w2, dev)
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
    _stamp_json(args)


def _stamp_json(args):
    """Add the git commit, date and device to the JSON run_and_write wrote, and print the
    FP8 blocks' per-stage breakdowns."""
    import datetime
    import subprocess

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    path = os.path.join(args.out, f"moe_layer_{device.replace('NVIDIA ', '').split()[0].lower()}.json")
    with open(path) as fh:
        data = json.load(fh)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "unknown", None
    data.update(git_commit=commit, git_dirty=dirty, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                device=device, capability=list(torch.cuda.get_device_capability()) if args.device == "cuda" else None)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    for r in data["rows"]:
        for key in ("kernel_breakdown_ms", "stage_ms", "precisions"):
            if r.get(key):
                print(f"# {r['shape']} | {r['variant']} | {key}: "
                      f"{json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r[key].items()})}")
        if r.get("weight_copies_mib") is not None:
            print(f"# {r['shape']} | {r['variant']} | weight copies kept: {r['weight_copies_mib']:.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
