"""The six routed-expert GEMMs one by one: moeq's Triton FP8 / MX32 grouped GEMMs
(kernels/fp8_gemm.py, swept over tile configs) vs torch._scaled_grouped_mm FP8 rowwise vs
BF16 torch._grouped_mm, and the FP8 quantization passes (two-pass vs single-read strips).

Same run, same operands. For each GEMM: achieved TFLOP/s of every variant, the moeq
kernel's relative difference from torch._scaled_grouped_mm on the same FP8 operands (only
accumulation order and the bf16 rounding of the output differ), and whether slack rows came
out zero. For MX32 the reference is the exact path of moeq's current MXFP8 recipe (operands
fake-quantized to bf16, BF16 grouped GEMM with fp32 accumulation). Quantization passes are
checked bitwise against each other on the GPU before they are timed.

    python benchmarks/fp8_gemm.py [--shapes qwen3_30b_a3b ...] [--out DIR] [--quick]

Writes fp8_gemm_<gpu>.json / .md under --out and prints the tables last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # name: (E, D, H, routed rows M)
    "qwen3_30b_a3b": (128, 2048, 768, 65536),
    "dsv3_ep8_local": (32, 7168, 2048, 32768),
    "mixtral_8x7b": (8, 4096, 14336, 16384),
}
F8 = torch.float8_e4m3fn

M_CONFIGS = [  # (bm, bn, bk, warps, stages, tma)
    (128, 128, 128, 8, 3, False), (128, 128, 128, 8, 4, False), (128, 256, 128, 8, 3, False),
    (64, 256, 128, 4, 4, False), (64, 128, 128, 4, 4, False), (128, 128, 64, 4, 5, False),
    (128, 128, 128, 8, 3, True), (128, 128, 128, 8, 4, True), (128, 256, 128, 8, 3, True),
    (64, 256, 128, 4, 4, True), (256, 128, 128, 8, 3, True), (128, 256, 64, 8, 4, True),
]
MX_CONFIGS = [  # bk fixed at 32
    (128, 128, 32, 8, 4, False), (128, 256, 32, 8, 4, False), (64, 256, 32, 4, 5, False),
    (128, 128, 32, 8, 5, True), (128, 256, 32, 8, 4, True), (128, 128, 32, 4, 6, True),
]
K_CONFIGS = [
    (128, 128, 128, 8, 3, False), (128, 128, 64, 4, 4, False), (128, 256, 128, 8, 3, False),
    (128, 128, 128, 8, 3, True), (128, 256, 128, 8, 3, True), (128, 128, 64, 4, 4, True),
    (256, 128, 128, 8, 3, True), (64, 128, 128, 4, 4, True),
]
STRIP_SWEEP = [((8, 256, 4), (64, 64, 4)), ((16, 128, 4), (32, 128, 4)), ((4, 512, 4), (128, 32, 4)),
               ((8, 128, 2), (64, 64, 8)), ((32, 64, 4), (32, 64, 4))]


def routed_counts(num_experts, rows, seed, align=32):
    g = torch.Generator().manual_seed(seed)
    p = torch.distributions.Dirichlet(torch.ones(num_experts)).sample()
    c = torch.multinomial(p, rows // align, replacement=True, generator=g).bincount(minlength=num_experts) * align
    return c


def bench(fn, warmup=10, rep=40):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def rowwise(t, dim=-1):
    """e4m3 copy of t and the per-row inverse scale along ``dim`` (moeq's pow2 numerics)."""
    from moeq.kernels.fp8_rowwise import quantize_rowwise_reference

    if dim == -1:
        return quantize_rowwise_reference(t)
    q, inv = quantize_rowwise_reference(t.transpose(dim, -1))
    return q, inv


def mx_quant(t):
    """MXFP8 along the last dim (moeq.numerics.mxfp8, torchao RCEIL numerics): e4m3 data, float32
    power-of-two factor per 32, and the bf16 fake-quant copy (the exact path's operand)."""
    from moeq.numerics.mxfp8 import mxfp8_dequantize, mxfp8_quantize

    q, e8 = mxfp8_quantize(t)
    scale = (e8.view(torch.uint8).to(torch.int32) << 23).view(torch.float32)
    return q.contiguous(), scale.contiguous(), mxfp8_dequantize(q, e8)


def gemm_cases(E, D, H, M, seed, dev):
    """The six GEMMs' operands: name -> dict(kind, bf16 operands, fp8 operands, flops)."""
    torch.manual_seed(seed)
    counts = routed_counts(E, M, seed).to(dev)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    mk = lambda *s, sc=1.0: (torch.randn(*s, device=dev) * sc).bfloat16()
    x, gy = mk(M, D), mk(M, D)
    h, dgu = mk(M, H), mk(M, 2 * H)
    w13, w2 = mk(E, 2 * H, D, sc=D**-0.5), mk(E, D, H, sc=H**-0.5)
    cases = {}
    # M-grouped: (a (M, K), b (E, N, K))
    for name, a, b in (("fwd gate_up", x, w13), ("fwd down", h, w2),
                       ("dgrad h", gy, w2.transpose(1, 2).contiguous()), ("dgrad x", dgu, w13.transpose(1, 2).contiguous())):
        qa, ia = rowwise(a)
        qb, ib = rowwise(b)
        cases[name] = dict(kind="m", a=a, b=b, qa=qa, ia=ia, qb=qb, ib=ib, flops=2 * M * b.shape[1] * b.shape[2])
    # K-grouped weight gradients: out[e] (N, KO) = a[:, g] @ b[:, g].T
    from moeq.kernels.fp8_rowwise import quantize_colwise_grouped_reference

    for name, a, b in (("wgrad down", gy, h), ("wgrad gate_up", dgu, x)):
        qa, ia = quantize_colwise_grouped_reference(a, offs)
        qb, ib = quantize_colwise_grouped_reference(b, offs)
        cases[name] = dict(kind="k", a=a, b=b, qa=qa, ia=ia, qb=qb, ib=ib, flops=2 * M * a.shape[1] * b.shape[1])
    return offs, cases


def _cfg(c):
    from moeq.kernels.fp8_gemm import GemmConfig

    return GemmConfig(*c)


def _warm_one(args):
    """Compile one (kind, scale, config, E) in a worker so the timed process loads it from disk."""
    kind, scale, cfg, E, out_dtype = args
    try:
        import torch as t
        from moeq.kernels import fp8_gemm as g

        dev = "cuda"
        m, n, k = 256, 256, 256
        offs = t.arange(1, E + 1, device=dev, dtype=t.int32) * (m // E // 16 * 16 if m // E >= 16 else 0)
        offs[-1] = m - 16
        if kind == "m":
            a = t.zeros(m, k, device=dev, dtype=F8)
            b = t.zeros(E, n, k, device=dev, dtype=F8)
            if scale == 1:
                sa, sb = t.ones(m, k // 32, device=dev), t.ones(E, n, k // 32, device=dev)
            else:
                sa, sb = t.ones(m, device=dev), t.ones(E, n, device=dev)
            g.grouped_mm(a, b, sa, sb, offs, scale_mode=scale, out_dtype=out_dtype, config=g.GemmConfig(*cfg))
        else:
            a = t.zeros(n, m, device=dev, dtype=F8)
            b = t.zeros(k, m, device=dev, dtype=F8)
            if scale == 1:
                sa, sb = t.ones(n, m // 32, device=dev), t.ones(k, m // 32, device=dev)
            else:
                sa, sb = t.ones(E, n, device=dev), t.ones(E, k, device=dev)
            g.grouped_mm_wgrad(a, b, sa, sb, offs, scale_mode=scale, out_dtype=out_dtype, config=g.GemmConfig(*cfg))
        t.cuda.synchronize()
        return None
    except Exception as e:  # reported by the timed run
        return f"{kind} {scale} {cfg} E={E}: {type(e).__name__}: {str(e)[:200]}"


def precompile(shapes, quick):
    jobs = []
    for name in shapes:
        E = SHAPES[name][0]
        for c in (M_CONFIGS[:4] if quick else M_CONFIGS):
            jobs.append(("m", 0, c, E, torch.bfloat16))
        for c in (MX_CONFIGS[:2] if quick else MX_CONFIGS):
            jobs.append(("m", 1, c, E, torch.bfloat16))
    for c in (K_CONFIGS[:3] if quick else K_CONFIGS):
        jobs.append(("k", 0, c, 8, torch.bfloat16))
    from fp8_tune import compile_in_workers

    compile_in_workers(_warm_one, jobs, "GEMM kernels")


def run_gemms(name, seed, quick, log, only=None):
    from moeq.kernels import fp8_gemm as g

    E, D, H, M = SHAPES[name]
    dev = "cuda"
    offs, cases = gemm_cases(E, D, H, M, seed, dev)
    rows = []
    for gname, c in cases.items():
        if only and not any(o in gname for o in only):
            continue
        row = {"shape": name, "gemm": gname, "flops": c["flops"]}
        tf = lambda ms: c["flops"] / ms / 1e9
        try:
            if c["kind"] == "m":
                bf = lambda: torch._grouped_mm(c["a"], c["b"].transpose(-2, -1), offs=offs)
                ref = lambda: torch._scaled_grouped_mm(c["qa"], c["qb"].transpose(-2, -1), c["ia"], c["ib"], offs=offs,
                                                       out_dtype=torch.bfloat16, use_fast_accum=True)
            else:
                bf = lambda: torch._grouped_mm(c["a"].t(), c["b"], offs=offs)
                ref = lambda: torch._scaled_grouped_mm(c["qa"], c["qb"].t(), c["ia"].reshape(-1), c["ib"].reshape(-1),
                                                       offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True)
            row["bf16_ms"] = bench(bf)
            row["bf16_tflops"] = tf(row["bf16_ms"])
            want = ref()
            row["torch_fp8_ms"] = bench(ref)
            row["torch_fp8_tflops"] = tf(row["torch_fp8_ms"])
        except Exception as e:
            row["error_baselines"] = f"{type(e).__name__}: {str(e)[:200]}"
            log.write(traceback.format_exc())
            want = None
        best = None
        configs = (M_CONFIGS[:4] if quick else M_CONFIGS) if c["kind"] == "m" else (K_CONFIGS[:3] if quick else K_CONFIGS)
        sweep = []
        for cfg in configs:
            try:
                if c["kind"] == "m":
                    fn = lambda: g.grouped_mm(c["qa"], c["qb"], c["ia"], c["ib"], offs, config=_cfg(cfg))
                else:
                    fn = lambda: g.grouped_mm_wgrad(c["qa"], c["qb"], c["ia"], c["ib"], offs, config=_cfg(cfg))
                got = fn()
                torch.cuda.synchronize()
                err = rel(got[: int(offs[-1])] if c["kind"] == "m" else got, want[: int(offs[-1])] if c["kind"] == "m" else want) if want is not None else None
                slack_zero = bool((got[int(offs[-1]):] == 0).all()) if c["kind"] == "m" else True
                ms = bench(fn)
                sweep.append({"config": cfg, "ms": ms, "tflops": tf(ms), "rel_vs_torch_fp8": err, "slack_zero": slack_zero})
                if err is not None and err < 2e-2 and slack_zero and (best is None or ms < best["ms"]):
                    best = sweep[-1]
            except Exception as e:
                sweep.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                log.write(traceback.format_exc())
        row["sweep"] = sweep
        if best:
            row["moeq_ms"], row["moeq_tflops"], row["moeq_config"] = best["ms"], best["tflops"], best["config"]
            row["moeq_rel_vs_torch_fp8"] = best["rel_vs_torch_fp8"]
        # MX32 on the forward-type GEMMs
        if c["kind"] == "m":
            try:
                qa, sa, fa = mx_quant(c["a"])
                qb, sb, fb = mx_quant(c["b"])
                exact = torch._grouped_mm(fa, fb.transpose(-2, -1), offs=offs)
                row["mx_exact_bf16_ms"] = bench(lambda: torch._grouped_mm(fa, fb.transpose(-2, -1), offs=offs))
                mbest = None
                for cfg in (MX_CONFIGS[:2] if quick else MX_CONFIGS):
                    try:
                        fn = lambda: g.grouped_mm(qa, qb, sa, sb, offs, scale_mode=g.SCALE_MX32, config=_cfg(cfg))
                        got = fn()
                        torch.cuda.synchronize()
                        err = rel(got[: int(offs[-1])], exact[: int(offs[-1])])
                        ms = bench(fn)
                        row.setdefault("mx_sweep", []).append({"config": cfg, "ms": ms, "tflops": tf(ms), "rel_vs_exact": err})
                        if err < 2e-2 and (mbest is None or ms < mbest[0]):
                            mbest = (ms, cfg, err)
                    except Exception as e:
                        row.setdefault("mx_sweep", []).append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                        log.write(traceback.format_exc())
                if mbest:
                    row["mx_ms"], row["mx_config"], row["mx_rel_vs_exact"] = mbest
                    row["mx_tflops"] = tf(mbest[0])
                del qa, qb, fa, fb, exact
            except Exception as e:
                row["error_mx"] = f"{type(e).__name__}: {str(e)[:200]}"
                log.write(traceback.format_exc())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if "sweep" not in k}, default=str), flush=True)
    del cases
    torch.cuda.empty_cache()
    return rows


def run_quant(name):
    """The strip passes' tile sweep (benchmarks/fp8_tune.py) and the two-pass kernels, one shape."""
    from fp8_tune import tune_strips

    return [{"shape": name, "source": kind, **entry} for kind, entry in tune_strips(SHAPES[name]).items()]


def ceilings():
    out = {}
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    out["copy_tbps"] = 2 * a.numel() * 2 / ms / 1e9
    del a, b
    x = torch.randn(8192, 8192, device="cuda").bfloat16()
    y = torch.randn(8192, 8192, device="cuda").bfloat16()
    ms = bench(lambda: x @ y)
    out["bf16_mm_tflops"] = 2 * 8192**3 / ms / 1e9
    xq, yq = x.to(F8), y.to(F8)
    one = torch.ones((), device="cuda")
    try:
        ms = bench(lambda: torch._scaled_mm(xq, yq.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True))
        out["fp8_mm_tflops"] = 2 * 8192**3 / ms / 1e9
    except Exception as e:
        out["fp8_mm_error"] = str(e)[:200]
    return out


def markdown(report):
    lines = [f"FP8 grouped GEMMs, {report['device']}, torch {report['torch']}. Ceilings: {json.dumps(report['ceilings'])}", "",
             "| shape | GEMM | BF16 grouped_mm TFLOP/s | torch FP8 TFLOP/s | moeq FP8 TFLOP/s (config) | moeq vs torch FP8 rel | moeq MX32 TFLOP/s | MX32 vs exact rel | exact-MX (bf16) TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "" if v is None else f"{v:.0f}"
    for r in report["gemms"]:
        lines.append(
            f"| {r['shape']} | {r['gemm']} | {f(r.get('bf16_tflops'))} | {f(r.get('torch_fp8_tflops'))} | "
            f"{f(r.get('moeq_tflops'))} {r.get('moeq_config', '')} | {r.get('moeq_rel_vs_torch_fp8', '')} | "
            f"{f(r.get('mx_tflops'))} | {r.get('mx_rel_vs_exact', '')} | "
            f"{f(r['flops'] / r['mx_exact_bf16_ms'] / 1e9) if r.get('mx_exact_bf16_ms') else ''} |")
    lines += ["", "| shape | source | two-pass ms (row + col) | strips: row copy ms (tiles) | strips: column copy ms (tiles) | strips GB/s (2 reads + 2 fp8 writes) |",
              "|---|---|---|---|---|---|"]
    for r in report["quant"]:
        row, col = r.get("row"), r.get("col")
        tot = (row[1] if row else 0) + (col[1] if col else 0)
        gbps = r["bytes_one_read"] * 3 / tot / 1e6 if tot else 0  # each copy reads the source; fp8 copies write half each
        lines.append(f"| {r['shape']} | {r['source']} | {r.get('two_pass_ms', float('nan')):.3f} | "
                     f"{row[1] if row else float('nan'):.3f} {row[0] if row else ''} | "
                     f"{col[1] if col else float('nan'):.3f} {col[0] if col else ''} | {gbps:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer configs")
    p.add_argument("--no-gemms", action="store_true")
    p.add_argument("--no-quant", action="store_true")
    p.add_argument("--gemms", nargs="+", default=None, help="only GEMMs whose name contains one of these")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/fp8_gemm.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name()
    tag = device.replace("NVIDIA ", "").split()[0].lower()
    report = {"device": device, "torch": torch.__version__, "gemms": [], "quant": []}
    if not args.no_gemms:
        precompile(args.shapes, args.quick)
    report["ceilings"] = ceilings()
    print(json.dumps(report["ceilings"]), flush=True)
    with open(os.path.join(args.out, f"fp8_gemm_{tag}.log"), "w") as log:
        for name in args.shapes:
            t0 = time.time()
            if not args.no_quant:
                report["quant"] += run_quant(name)
            if not args.no_gemms:
                report["gemms"] += run_gemms(name, args.seed, args.quick, log, args.gemms)
            print(f"# {name} done in {time.time() - t0:.0f}s", flush=True)
            with open(os.path.join(args.out, f"fp8_gemm_{tag}.json"), "w") as fh:
                json.dump(report, fh, indent=1, default=str)
    md = markdown(report)
    with open(os.path.join(args.out, f"fp8_gemm_{tag}.md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
