"""Routed SwiGLU experts, forward + backward, per recipe, on the GPU: moeq vs BF16 vs torchao.

Same run, same inputs, three model shapes. For every variant: relative error of the
output and of the gradients of x and of both weights against a float64 reference (fresh
random data), then the median fwd+bwd time (triton.testing.do_bench). MXFP8 variants are
also compared against torchao's emulated MXFP8 (same numerics up to accumulation order).
The "(weights cached)" variants time a micro-batch under ``moeq.quantized_weight_cache``
(checked bitwise equal to uncached first) and report the mean over a 4-micro-batch step.

    python benchmarks/experts.py [--shapes qwen3_30b_a3b ...] [--variants ...] [--out DIR]

Writes ``experts_<gpu>.json`` and ``experts_<gpu>.md`` to --out (default
benchmarks/results) and prints the markdown table last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "0")

SHAPES = {  # name: (E, D, H, routed rows M)
    "mixtral_8x7b": (8, 4096, 14336, 16384),
    "qwen3_30b_a3b": (128, 2048, 768, 65536),
    "dsv3_ep8_local": (32, 7168, 2048, 32768),
    "tiny": (4, 64, 64, 256),  # --device cpu smoke test of this script
}
GROUP = 32  # counts are multiples of the largest recipe alignment: no variant needs to pad


def routed_counts(num_experts: int, rows: int, seed: int) -> torch.Tensor:
    """Dirichlet-skewed token counts, multiples of GROUP, summing to rows."""
    g = torch.Generator().manual_seed(seed)
    p = torch.distributions.Dirichlet(torch.ones(num_experts)).sample()
    c = torch.multinomial(p, rows // GROUP, replacement=True, generator=g).bincount(minlength=num_experts) * GROUP
    return c


def swiglu_ref64(x, w13, w2, offs):
    """Float64 per-group reference (Python loop over groups: small E or big groups)."""
    out, start = [], 0
    hidden = w2.shape[-1]
    for e, end in enumerate(offs.tolist()):
        gu = x[start:end] @ w13[e].t()
        out.append((F.silu(gu[:, :hidden]) * gu[:, hidden:]) @ w2[e].t())
        start = end
    return torch.cat(out)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- variants: each maps (x, w13, w2, offs, counts) -> y -------------------------------

def make_bf16_three_gemms():
    """The anchors' BF16 baseline: gate and up as two torch._grouped_mm calls on their own
    contiguous (E, H, D) weights (strided slices of the fused weight would run slower and
    flatter the quantized variants). Gradients are reported for the fused layout."""
    split = {}

    def fn(x, w13, w2, offs, counts):
        hidden = w2.shape[-1]
        if "w1" not in split:  # made once, outside the timed step
            split["w1"] = torch.nn.Parameter(w13.detach()[:, :hidden].contiguous())
            split["w3"] = torch.nn.Parameter(w13.detach()[:, hidden:].contiguous())
        w1, w3 = split["w1"], split["w3"]
        w1.grad = w3.grad = None
        mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
        y = mm(F.silu(mm(x, w1)) * mm(x, w3), w2)
        # The split weights' grads, in the fused layout, for the error check.
        fn.fused_grad = lambda: torch.cat([w1.grad, w3.grad], dim=1)
        return y

    return fn


def make_moeq(recipe, kernel="auto"):
    import moeq
    from moeq.convert import convert_model

    experts = None

    def build(w13, w2):
        nonlocal experts
        if experts is None:  # built on first call, sharing the benchmark's parameters
            experts = moeq.GroupedExperts(1, 1, 0, device="meta")
            experts.gate_up_proj, experts.down_proj = w13, w2
            experts.dim, experts.hidden_dim, experts.num_experts = w2.shape[1], w2.shape[2], w13.shape[0]
            experts = convert_model(experts, recipe, kernel=kernel)
        return experts

    def fn(x, w13, w2, offs, counts):
        module = build(w13, w2)
        # The alignment moeq.MoE's permute-and-pad would produce for this recipe
        # (None for bf16: packed groups, nothing to mask).
        return module(x, counts, group_alignment=module.group_alignment)

    fn.build = build
    return fn


def make_moeq_cached(recipe):
    """moeq's experts inside ``moeq.quantized_weight_cache``: the cost of the 2nd..Nth
    micro-batch of a gradient-accumulation step (the expert weights' quantized copies come
    from the cache). ``fn.uncached`` is the same module outside the cache; ``fn.close()``
    leaves the cache (call it before timing ``fn.uncached``)."""
    import moeq

    base = make_moeq(recipe)
    state = {}

    def fn(x, w13, w2, offs, counts):
        module = base.build(w13, w2)
        if "stack" not in state:
            state["stack"] = contextlib.ExitStack()
            state["caches"] = state["stack"].enter_context(moeq.quantized_weight_cache(module))
        return base(x, w13, w2, offs, counts)

    def close():
        if "stack" in state:
            state.pop("stack").close()

    def uncached(*a):
        if "stack" in state:
            raise RuntimeError("close the weight cache before running the uncached variant")
        return base(*a)

    fn.uncached, fn.close = uncached, close
    fn.quantize_count = lambda: sum(c.quantize_count for c in state["caches"].values())
    return fn


def check_cached_bitwise(fn, x, w13, w2, offs, counts, gy, dev):
    """Cached vs uncached fwd+bwd, bitwise (y, dx, dW13, dW2), over two cached micro-batches;
    leaves ``fn``'s cache filled. Raises AssertionError on any difference, and on CUDA when
    the cache was not used (no fused Hopper path: the timing would mean nothing)."""
    def run(f):
        for t in (x, w13, w2):
            t.grad = None
        y = f(x, w13, w2, offs, counts)
        y.backward(gy)
        _sync(dev)
        return [y.detach().clone(), x.grad.clone(), w13.grad.clone(), w2.grad.clone()]

    want = run(fn.uncached)
    for micro_batch in (1, 2):
        got = run(fn)
        for name, a, b in zip(("y", "dx", "dW13", "dW2"), got, want):
            bad = int((a.view(torch.int16) != b.view(torch.int16)).sum()) if a.dtype == torch.bfloat16 else int((a != b).sum())
            assert bad == 0, f"weights cached: micro-batch {micro_batch} {name} differs from uncached in {bad} elements"
    used = fn.quantize_count()
    if dev == "cuda" and used != 1:
        raise AssertionError(f"the weight cache quantized {used} times in 2 micro-batches (want 1): fused path not taken?")
    for t in (x, w13, w2):
        t.grad = None
    return {"bitwise_vs_uncached": True, "cache_used": used == 1}


def make_torchao(kind):
    def fn(x, w13, w2, offs, counts):
        if kind == "fp8":
            from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm as f

            mm = lambda a, w: f(a, w.transpose(-2, -1), offs, pad_token_groups_for_grouped_mm=False)
        else:
            from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm as f
            from torchao.quantization.quantize_.common import KernelPreference

            mm = lambda a, w: f(a, w.transpose(-2, -1), offs, kernel_preference=KernelPreference.EMULATED)
        # One GEMM over the fused gate|up weight (x quantized once), as moeq does: the
        # most favourable way to call torchao here.
        gate, up = mm(x, w13).chunk(2, dim=-1)
        return mm(F.silu(gate) * up, w2)

    return fn


def compiled(fn):
    c = torch.compile(fn)
    return lambda *a: c(*a)


VARIANTS = {
    "bf16 grouped_mm (3 GEMMs)": make_bf16_three_gemms,
    "moeq bf16 (fused gate|up)": lambda: make_moeq("bf16"),
    "torchao fp8 rowwise": lambda: make_torchao("fp8"),
    "torchao fp8 rowwise compiled": lambda: compiled(make_torchao("fp8")),
    "moeq fp8": lambda: make_moeq("fp8"),
    "moeq fp8 per-GEMM (kernel=torch)": lambda: make_moeq("fp8", "torch"),
    "torchao mxfp8 emulated": lambda: make_torchao("mxfp8"),
    "moeq mxfp8": lambda: make_moeq("mxfp8"),
    # Per micro-batch with the expert weights' quantized copies cached (2nd..Nth micro-batch
    # of a step), plus the average over 4 micro-batches: NOT a per-step time (see markdown()).
    "moeq fp8 (weights cached)": lambda: make_moeq_cached("fp8"),
    "moeq mxfp8 (weights cached)": lambda: make_moeq_cached("mxfp8"),
}
AMORTIZE_OVER = 4  # micro-batches: the first quantizes the weights, the others reuse them
BASELINE = "bf16 grouped_mm (3 GEMMs)"


def _bench(fn, dev, warmup, rep):
    if dev == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def run_shape(name, shape, variants, seed, log, dev="cuda"):
    E, D, H, M = shape
    torch.manual_seed(seed)
    counts = routed_counts(E, M, seed).to(dev)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(M, D, device=dev, dtype=torch.bfloat16).requires_grad_()
    w13 = torch.nn.Parameter((torch.randn(E, 2 * H, D, device=dev) / D**0.5).bfloat16())
    w2 = torch.nn.Parameter((torch.randn(E, D, H, device=dev) / H**0.5).bfloat16())
    gy = torch.randn(M, D, device=dev, dtype=torch.bfloat16)

    # float64 reference, computed once and kept on the GPU
    x64, w13_64, w2_64 = (t.detach().double().requires_grad_() for t in (x, w13, w2))
    y64 = swiglu_ref64(x64, w13_64, w2_64, offs)
    y64.backward(gy.double())
    ref = {"y": y64.detach(), "dx": x64.grad, "dw13": w13_64.grad, "dw2": w2_64.grad}
    del x64, w13_64, w2_64, y64

    rows, emulated_mx = [], None
    for vname in variants:
        row = {"shape": name, "E": E, "D": D, "H": H, "M": M, "variant": vname}
        fn = None
        try:
            fn = VARIANTS[vname]()
            if hasattr(fn, "uncached"):
                row.update(check_cached_bitwise(fn, x, w13, w2, offs, counts, gy, dev))
            for t in (x, w13, w2):
                t.grad = None
            y = fn(x, w13, w2, offs, counts)
            y.backward(gy)
            _sync(dev)
            dw13 = fn.fused_grad() if hasattr(fn, "fused_grad") else w13.grad
            got = {"y": y.detach(), "dx": x.grad, "dw13": dw13, "dw2": w2.grad}
            for k in ref:
                row[f"err_{k}"] = rel(got[k], ref[k])
            if vname == "torchao mxfp8 emulated":
                emulated_mx = {k: v.clone() for k, v in got.items()}
            elif "mxfp8" in vname and emulated_mx is not None:
                row["err_vs_torchao_emulated_y"] = rel(got["y"], emulated_mx["y"])
                row["err_vs_torchao_emulated_dw13"] = rel(got["dw13"], emulated_mx["dw13"])
            if not all(torch.isfinite(v).all() for v in got.values()):
                raise FloatingPointError("non-finite output or gradient")
            del y, got

            def step():  # one training step's experts work: grads start empty (zero_grad(set_to_none))
                x.grad = w13.grad = w2.grad = None
                fn(x, w13, w2, offs, counts).backward(gy)

            row["ms"] = _bench(step, dev, 25, 150)
            row["ms_repeat"] = _bench(step, dev, 5, 100)
            if hasattr(fn, "uncached"):  # the first micro-batch of a step, same run, same inputs
                fn.close()

                def step_uncached():
                    x.grad = w13.grad = w2.grad = None
                    fn.uncached(x, w13, w2, offs, counts).backward(gy)

                row["ms_uncached"] = _bench(step_uncached, dev, 25, 150)
                row["ms_amortized"] = (row["ms_uncached"] + (AMORTIZE_OVER - 1) * row["ms"]) / AMORTIZE_OVER
        except Exception as e:  # a variant that cannot run is reported, not hidden
            row["error"] = f"{type(e).__name__}: {str(e)[:240]}"
            log.write(traceback.format_exc())
        finally:
            if fn is not None and hasattr(fn, "close"):
                fn.close()  # frees the cached weight copies
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    best_bf16 = add_speeds(rows, BASELINE)
    for r in rows:
        if "ms_amortized" in r and best_bf16:
            r["speed_amortized_vs_best_bf16"] = best_bf16 / r["ms_amortized"]
        r["tflops"] = 3 * 2 * M * D * H * 3 / r["ms"] / 1e9 if "ms" in r else None
    return rows


def add_speeds(rows, baseline):
    """Set each row's speed vs the ``baseline`` variant and vs the fastest BF16 variant of
    the same shape (rows of one shape); returns that fastest BF16 time (ms) or None."""
    base = next((r.get("ms") for r in rows if r["variant"] == baseline), None)
    best_bf16 = min((r["ms"] for r in rows if "bf16" in r["variant"] and "ms" in r), default=None)
    for r in rows:
        if "ms" in r and base:
            r["speed_vs_bf16_3gemm"] = base / r["ms"]
        if "ms" in r and best_bf16:
            r["speed_vs_best_bf16"] = best_bf16 / r["ms"]
    return best_bf16


def markdown(rows, device):
    out = [
        f"Routed SwiGLU experts, forward + backward, {device}, torch {torch.__version__}. "
        "Median of triton.testing.do_bench (ms) of one step (grads set to None first, as zero_grad does); "
        "rel. errors vs float64 (y, dx, dW13, dW2); token groups are multiples of 32 (no padding needed).",
        "",
        "\"(weights cached)\" rows are NOT per-step times: their ms is one fwd+bwd micro-batch whose expert "
        "weights' quantized copies come from moeq.quantized_weight_cache (the 2nd..Nth micro-batch of a "
        f"gradient-accumulation step; checked bitwise equal to uncached first), and \"amortized / {AMORTIZE_OVER} "
        f"micro-batches\" is (uncached + {AMORTIZE_OVER - 1} x cached) / {AMORTIZE_OVER}, the mean micro-batch time "
        f"of a {AMORTIZE_OVER}-micro-batch step (uncached measured in the same run). Without gradient accumulation "
        "(or activation recomputation) the per-step time is the uncached row's.",
        "",
        f"| shape | variant | ms | speed vs BF16 (3 GEMMs) | speed vs best BF16 | err y | err dx | err dW13 | err dW2 "
        f"| vs torchao emulated (y) | amortized / {AMORTIZE_OVER} micro-batches (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, p=4: "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))
    x = lambda v: "" if v is None else f"{v:.2f}x"

    def amortized(r):
        if "ms_amortized" not in r:
            return ""
        speed = r.get("speed_amortized_vs_best_bf16")
        return f"{r['ms_amortized']:.2f}" + (f" ({speed:.2f}x best BF16)" if speed else "")
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['variant']} | failed: {r['error'][:120]} | | | | | | | | |")
            continue
        variant = r["variant"].replace("|", "&#124;")
        if "ms_amortized" in r:
            variant += " [per micro-batch 2..N]" + ("" if r.get("cache_used") else " (cache unused: no fused path here)")
        out.append(
            f"| {r['shape']} | {variant} | {f(r['ms'], 2)} | {x(r.get('speed_vs_bf16_3gemm'))} | "
            f"{x(r.get('speed_vs_best_bf16'))} | {f(r['err_y'])} | {f(r['err_dx'])} | {f(r['err_dw13'])} | "
            f"{f(r['err_dw2'])} | {f(r.get('err_vs_torchao_emulated_y'))} | {amortized(r)} |"
        )
    return "\n".join(out) + "\n"


def parse_bench_args(doc, shapes, variants, argv=None):
    """The shared command line of the experts-level benchmarks."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=[s for s in shapes if s != "tiny"], choices=list(shapes))
    p.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke-test the script only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tune-fp8-strips", action="store_true",
                   help="sweep the FP8 strip-pass tiles per shape first and use the fastest (benchmarks/fp8_tune.py)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_bench_args(__doc__, SHAPES, VARIANTS, argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/experts.py needs a CUDA GPU (or --device cpu --shapes tiny to smoke-test it)")
    run_and_write(args, "experts", run_shape, SHAPES, markdown)


def run_and_write(args, prefix, run_shape_fn, shapes, markdown_fn):
    """Run ``run_shape_fn`` over ``args.shapes`` and write ``<prefix>_<gpu>.{log,json,md}``
    to ``args.out``; prints the markdown table last."""
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(device, torch.cuda.get_device_capability() if args.device == "cuda" else "", "torch", torch.__version__, flush=True)
    os.makedirs(args.out, exist_ok=True)
    tag = device.replace("NVIDIA ", "").split()[0].lower()
    rows = []
    with open(os.path.join(args.out, f"{prefix}_{tag}.log"), "w") as log:
        for name in args.shapes:
            t0 = time.time()
            rows += run_shape_fn(name, shapes[name], args.variants, args.seed, log, args.device)
            print(f"# {name} done in {time.time() - t0:.0f}s", flush=True)
    with open(os.path.join(args.out, f"{prefix}_{tag}.json"), "w") as fh:
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, fh, indent=1)
    md = markdown_fn(rows, device)
    with open(os.path.join(args.out, f"{prefix}_{tag}.md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
