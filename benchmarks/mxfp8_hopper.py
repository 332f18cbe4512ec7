"""MXFP8 routed SwiGLU experts on Hopper: moeq vs BF16 torch._grouped_mm vs torchao emulated.

Device benchmark for issue 6 (run on an H100/H200; needs torchao for its emulated MXFP8).
For each shape, in one process and on the same inputs:

1. correctness first: y, dx, d gate_up, d down of
   * ``moeq``: moeq.quant.mxfp8_hopper.mxfp8_swiglu_experts,
   * ``torchao``: torchao ``_to_mxfp8_then_scaled_grouped_mm(..., KernelPreference.EMULATED)``
     composed into SwiGLU with eager ``F.silu(gate) * up``,
   * ``torchao_f32swiglu``: the same with moeq's SwiGLU numerics (fp32 math, one bf16
     rounding), which isolates the GEMMs: it differs from ``moeq`` only by accumulation
     order and by the exp() of the fused kernel,
   * ``bf16``: BF16 ``torch._grouped_mm``,
   each compared by ||a - b|| / ||b|| against a float64 reference (per expert, on the GPU)
   and ``moeq`` against the torchao variants; the check uses a slack tail (last group not a
   multiple of 32, rows past it) and an empty expert;
2. timing (``triton.testing.do_bench`` median, grads reset each step) of forward+backward;
3. a torch.profiler per-kernel breakdown of moeq and BF16;
plus, once: a tile sweep of the fake-quant kernels, a sync-free check and a
``torch.compile(fullgraph=True)`` check.

    python benchmarks/mxfp8_hopper.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from moeq.kernels import mxfp8_hopper as K
from moeq.quant.mxfp8_hopper import mxfp8_swiglu_experts
from moeq.recipes import GROUP_ALIGNMENT, QuantizationType

ALIGN = GROUP_ALIGNMENT[QuantizationType.MXFP8]
SHAPES = {
    # name: (E, D, H, routed rows M)
    "mixtral_8x7b": (8, 4096, 14336, 16384),
    "qwen3_30b_a3b": (128, 2048, 768, 65536),
    "dsv3_ep8_local": (32, 7168, 2048, 32768),
}
BF16 = torch.bfloat16
DEV = "cuda"


def aligned_counts(E: int, M: int, gen: torch.Generator) -> torch.Tensor:
    """Dirichlet(1)-skewed token counts, each a multiple of ALIGN, summing to M (M % ALIGN == 0)."""
    p = torch.distributions.Dirichlet(torch.ones(E)).sample()
    c = torch.distributions.Multinomial(M // ALIGN, p).sample().long() * ALIGN
    c[0] += M - c.sum()
    return c


# ---- the candidates -------------------------------------------------------------------


def bf16_experts(x, w1, w2, offs):
    gu = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs)
    g, u = gu.chunk(2, -1)
    return torch._grouped_mm(F.silu(g) * u, w2.transpose(-2, -1), offs=offs)


def bf16_split_experts(x, w1g, w1u, w2, offs):
    # the BF16 anchor: separate gate / up weights, three GEMMs
    h = F.silu(torch._grouped_mm(x, w1g.transpose(-2, -1), offs=offs)) * torch._grouped_mm(x, w1u.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)


class _F32SwiGLU(torch.autograd.Function):
    """moeq's SwiGLU numerics in plain torch (fp32 math, one bf16 rounding)."""

    @staticmethod
    def forward(ctx, gu):
        ctx.save_for_backward(gu)
        return K.swiglu_reference(gu)

    @staticmethod
    def backward(ctx, dh):
        (gu,) = ctx.saved_tensors
        return K.swiglu_backward_reference(dh.contiguous(), gu)


def torchao_experts(x, w1, w2, offs, f32_swiglu=False):
    from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm as mx
    from torchao.quantization.quantize_.common import KernelPreference

    def mm(a, w):
        return mx(a, w.transpose(-2, -1), offs, kernel_preference=KernelPreference.EMULATED)

    gu = mm(x, w1)
    if f32_swiglu:
        h = _F32SwiGLU.apply(gu)
    else:
        g, u = gu.chunk(2, -1)
        h = F.silu(g) * u
    return mm(h, w2)


# ---- correctness ----------------------------------------------------------------------


def run_fwd_bwd(fn, x, w1, w2, gy):
    xs, a, b = (t.detach().clone().requires_grad_() for t in (x, w1, w2))
    y = fn(xs, a, b)
    y.backward(gy)
    if DEV == "cuda":
        torch.cuda.synchronize()
    return {"y": y.detach(), "dx": xs.grad, "dw1": a.grad, "dw2": b.grad}


@torch.no_grad()
def float64_errors(x, w1, w2, gy, offs_list, results: dict):
    """Per expert in float64 on the GPU: accumulate ||cand - ref||^2 and ||ref||^2 per output."""
    names = list(results)
    err = {n: {k: 0.0 for k in ("y", "dx", "dw1", "dw2")} for n in names}
    ref2 = {k: 0.0 for k in ("y", "dx", "dw1", "dw2")}
    start = 0
    H = w2.shape[2]
    for e, end in enumerate(offs_list):
        xe, a, b, g_y = x[start:end].double(), w1[e].double(), w2[e].double(), gy[start:end].double()
        gu = xe @ a.t()
        g, u = gu[:, :H], gu[:, H:]
        s = torch.sigmoid(g)
        h = g * s * u
        ref = {"y": h @ b.t()}
        dh = g_y @ b
        ref["dw2"] = g_y.t() @ h
        dgu = torch.cat([dh * u * s * (1 + g * (1 - s)), dh * g * s], 1)
        ref["dx"] = dgu @ a
        ref["dw1"] = dgu.t() @ xe
        for k, r in ref.items():
            ref2[k] += r.square().sum().item()
            for n in names:
                c = results[n][k]
                c = c[start:end] if k in ("y", "dx") else c[e]
                err[n][k] += (c.double() - r).square().sum().item()
        start = end
    for n in names:  # slack rows: the reference is zero there
        for k in ("y", "dx"):
            err[n][k] += results[n][k][start:].double().square().sum().item()
    return {n: {k: (err[n][k] / ref2[k]) ** 0.5 for k in ref2} for n in names}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def correctness(E, D, H, M, counts, seed):
    """Fresh random inputs; returns error tables.

    Layout A (every candidate): all groups multiples of 32, one expert empty, no slack,
    as torchao expects (it quantizes whatever sits past ``offs[-1]`` into the last
    group's wgrad blocks, and torch._grouped_mm leaves those rows of its outputs
    unwritten). Layout B (moeq only): the last group ends off a multiple of 32 and the
    rows after it are slack holding NaN in x and grad_y, which moeq must ignore.
    """
    g = torch.Generator(device=DEV).manual_seed(seed)
    c = counts.clone()
    c[0] += c[1]
    c[1] = 0  # an empty expert
    offs = torch.cumsum(c, 0).to(torch.int32).to(DEV)
    offs_list = offs.tolist()
    x = torch.randn(M, D, device=DEV, generator=g).to(BF16)
    w1 = (torch.randn(E, 2 * H, D, device=DEV, generator=g) * 0.02).to(BF16)
    w2 = (torch.randn(E, D, H, device=DEV, generator=g) * 0.02).to(BF16)
    gy = torch.randn(M, D, device=DEV, generator=g).to(BF16)
    res = {}
    res["moeq"] = run_fwd_bwd(lambda a, b, d: mxfp8_swiglu_experts(a, b, d, offs), x, w1, w2, gy)
    res["torchao"] = run_fwd_bwd(lambda a, b, d: torchao_experts(a, b, d, offs), x, w1, w2, gy)
    res["torchao_f32swiglu"] = run_fwd_bwd(lambda a, b, d: torchao_experts(a, b, d, offs, True), x, w1, w2, gy)
    res["bf16"] = run_fwd_bwd(lambda a, b, d: bf16_experts(a, b, d, offs), x, w1, w2, gy)
    out = {"vs_float64": float64_errors(x, w1, w2, gy, offs_list, res)}
    for n in ("torchao", "torchao_f32swiglu"):
        out[f"moeq_vs_{n}"] = {k: rel(res["moeq"][k], res[n][k]) for k in res["moeq"]}
        out[f"moeq_vs_{n}_bitwise_frac"] = {
            k: (res["moeq"][k].view(torch.int16) == res[n][k].view(torch.int16)).float().mean().item() for k in res["moeq"]
        }
    out["moeq_empty_expert_grads_zero"] = bool((res["moeq"]["dw1"][1] == 0).all() and (res["moeq"]["dw2"][1] == 0).all())
    del res

    # layout B: slack tail with NaN, moeq only
    last = int(torch.nonzero(c).max())
    c[last] -= min(int(c[last]), ALIGN + 7)
    offs = torch.cumsum(c, 0).to(torch.int32).to(DEV)
    offs_list = offs.tolist()
    x_nan, gy_nan = x.clone(), gy.clone()
    x_nan[offs_list[-1]:] = float("nan")
    gy_nan[offs_list[-1]:] = float("nan")
    res = {"moeq": run_fwd_bwd(lambda a, b, d: mxfp8_swiglu_experts(a, b, d, offs), x_nan, w1, w2, gy_nan)}
    out["slack_vs_float64"] = float64_errors(x, w1, w2, gy, offs_list, res)["moeq"]
    out["slack_finite"] = all(bool(torch.isfinite(v).all()) for v in res["moeq"].values())
    out["slack_rows_zero"] = bool((res["moeq"]["y"][offs_list[-1]:] == 0).all() and (res["moeq"]["dx"][offs_list[-1]:] == 0).all())
    del res
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return out


def correctness_smoke_shapes():
    return {"tiny_a": (4, 64, 96, 256), "tiny_b": (8, 128, 64, 512)}


# ---- timing ---------------------------------------------------------------------------


def time_fwd_bwd(fn, params, gy, rep_ms):
    def step():
        for p in params:
            p.grad = None
        fn().backward(gy)

    step()
    return do_bench(step, warmup=max(rep_ms // 8, 25), rep=rep_ms, return_mode="median")


def profile_kernels(fn, params, gy, iters=3, top=14):
    from torch.profiler import ProfilerActivity, profile

    def step():
        for p in params:
            p.grad = None
        fn().backward(gy)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append((ev.key[:90], t / iters / 1e3, ev.count // iters))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"total_ms": total, "kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in rows[:top]]}


def sweep_tiles(log):
    """Time the fake-quant kernel per mode and tile on Qwen3-like sizes; set the best as default."""
    configs = [(32, 128, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 64, 8), (32, 256, 8), (128, 128, 8)]
    M, D, H = 65536, 2048, 768
    x = torch.randn(M, D, device=DEV).to(BF16)
    gu = torch.randn(M, 2 * H, device=DEV).to(BF16)
    dh = torch.randn(M, H, device=DEV).to(BF16)
    offs = torch.tensor([M], dtype=torch.int32, device=DEV)
    cases = {
        K.MODE_PLAIN: (lambda t: K.mxfp8_fake_quant_2d(x, offs, tiles=t), M * D * (2 + 4)),
        K.MODE_SWIGLU: (lambda t: K.mxfp8_swiglu_fake_quant(gu, offs, tiles=t), M * H * (4 + 4)),
        K.MODE_SWIGLU_BWD: (lambda t: K.mxfp8_swiglu_backward_fake_quant(dh, gu, offs, tiles=t), M * H * (6 + 8)),
    }
    copy_ms = do_bench(lambda: x.clone(), warmup=25, rep=100, return_mode="median")
    out = {"copy_GBps": 2 * x.numel() * 2 / copy_ms / 1e6, "modes": {}}
    best = dict(K.GPU_TILES)
    for mode, (fn, nbytes) in cases.items():
        res = []
        for cfg in configs:
            tiles = {mode: cfg}
            try:
                ms = do_bench(lambda: fn(tiles), warmup=25, rep=100, return_mode="median")
                res.append({"tile": cfg, "ms": ms, "GBps": nbytes / ms / 1e6})
            except Exception as e:  # noqa: BLE001 - report and go on
                res.append({"tile": cfg, "error": repr(e)[:200]})
        ok = [r for r in res if "ms" in r]
        best[mode] = tuple(min(ok, key=lambda r: r["ms"])["tile"])
        out["modes"][mode] = res
        log(f"sweep mode {mode}: " + ", ".join(f"{r['tile']}:{r.get('GBps', 0):.0f}GB/s" for r in res))
    K.GPU_TILES.update(best)
    out["chosen"] = {str(k): v for k, v in best.items()}
    log(f"copy {out['copy_GBps']:.0f} GB/s (read+write); chosen tiles {best}")
    return out


def sync_and_compile_checks(log):
    out = {}
    E, D, H, M = 4, 256, 128, 512
    c = torch.tensor([128, 0, 224, 96])
    offs = torch.cumsum(c, 0).to(torch.int32).to(DEV)
    x = torch.randn(M, D, device=DEV).to(BF16).requires_grad_()
    w1 = (torch.randn(E, 2 * H, D, device=DEV) * 0.05).to(BF16).requires_grad_()
    w2 = (torch.randn(E, D, H, device=DEV) * 0.05).to(BF16).requires_grad_()
    gy = torch.randn(M, D, device=DEV).to(BF16)
    y = mxfp8_swiglu_experts(x, w1, w2, offs)
    y.backward(gy)
    torch.cuda.synchronize()
    eager = [y.detach().clone(), x.grad.clone(), w1.grad.clone(), w2.grad.clone()]
    try:
        torch.cuda.set_sync_debug_mode("error")
        for p in (x, w1, w2):
            p.grad = None
        mxfp8_swiglu_experts(x, w1, w2, offs).backward(gy)
        out["sync_free"] = True
    except Exception as e:  # noqa: BLE001
        out["sync_free"] = False
        out["sync_error"] = repr(e)[:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    try:
        t0 = time.time()
        fn = torch.compile(lambda a, b, d, o: mxfp8_swiglu_experts(a, b, d, o), fullgraph=True)
        for p in (x, w1, w2):
            p.grad = None
        yc = fn(x, w1, w2, offs)
        yc.backward(gy)
        torch.cuda.synchronize()
        comp = [yc.detach(), x.grad, w1.grad, w2.grad]
        out["compile_fullgraph"] = True
        out["compile_s"] = time.time() - t0
        out["compile_vs_eager_max_rel"] = max(rel(a, b) for a, b in zip(comp, eager))
    except Exception as e:  # noqa: BLE001
        out["compile_fullgraph"] = False
        out["compile_error"] = (repr(e)[:600] + "\n" + traceback.format_exc()[-1500:])
    log(f"checks: {json.dumps({k: v for k, v in out.items() if k != 'compile_error'})}")
    if "compile_error" in out:
        log(out["compile_error"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-compile-check", action="store_true")
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: correctness path only")
    args = ap.parse_args()
    if args.cpu_smoke:
        global DEV
        DEV = "cpu"
        for name, (E, D, H, M) in correctness_smoke_shapes().items():
            print(name, json.dumps(correctness(E, D, H, M, aligned_counts(E, M, torch.Generator().manual_seed(0)), 1), indent=None))
        return
    os.makedirs(args.out, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    import triton

    try:
        import torchao

        tao_version = torchao.__version__
    except Exception:  # noqa: BLE001
        tao_version = None
    env = {
        "device": torch.cuda.get_device_name(),
        "capability": torch.cuda.get_device_capability(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "torchao": tao_version,
    }
    log(json.dumps(env))
    report = {"env": env, "shapes": {}}
    if not args.no_sweep:
        report["tile_sweep"] = sweep_tiles(log)
    report["tiles"] = {str(k): v for k, v in K.GPU_TILES.items()}
    report["checks"] = sync_and_compile_checks(log) if not args.no_compile_check else {}

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for name in args.shapes.split(","):
        E, D, H, M = SHAPES[name]
        counts = aligned_counts(E, M, gen)
        row = {"E": E, "D": D, "H": H, "M": M, "flops": 3 * 2 * M * D * (3 * H)}
        t0 = time.time()
        try:
            row["correctness"] = correctness(E, D, H, M, counts, seed=1)
        except Exception as e:  # noqa: BLE001
            row["correctness_error"] = repr(e)[:500] + traceback.format_exc()[-1500:]
        log(f"[{name}] correctness in {time.time() - t0:.1f}s: {json.dumps(row.get('correctness', row.get('correctness_error')))}")
        torch.cuda.empty_cache()

        offs = torch.cumsum(counts, 0).to(torch.int32).to(DEV)
        x = torch.randn(M, D, device=DEV).to(BF16).requires_grad_()
        w1 = (torch.randn(E, 2 * H, D, device=DEV) * 0.02).to(BF16).requires_grad_()
        w2 = (torch.randn(E, D, H, device=DEV) * 0.02).to(BF16).requires_grad_()
        gy = torch.randn(M, D, device=DEV).to(BF16)
        params = (x, w1, w2)
        t = {}
        t["bf16"] = time_fwd_bwd(lambda: bf16_experts(x, w1, w2, offs), params, gy, args.rep_ms)
        w1g = w1[:, :H].detach().clone().requires_grad_()
        w1u = w1[:, H:].detach().clone().requires_grad_()
        t["bf16_split"] = time_fwd_bwd(lambda: bf16_split_experts(x, w1g, w1u, w2, offs), (x, w1g, w1u, w2), gy, args.rep_ms)
        del w1g, w1u
        t["moeq"] = time_fwd_bwd(lambda: mxfp8_swiglu_experts(x, w1, w2, offs), params, gy, args.rep_ms)
        with torch.no_grad():
            t["moeq_fwd"] = do_bench(lambda: mxfp8_swiglu_experts(x, w1, w2, offs), warmup=25, rep=100, return_mode="median")
            t["bf16_fwd"] = do_bench(lambda: bf16_experts(x, w1, w2, offs), warmup=25, rep=100, return_mode="median")
        try:
            t["torchao_emulated"] = time_fwd_bwd(lambda: torchao_experts(x, w1, w2, offs), params, gy, 600)
        except Exception as e:  # noqa: BLE001
            row["torchao_error"] = repr(e)[:300]
        row["ms"] = t
        row["moeq_speed_vs_bf16"] = t["bf16"] / t["moeq"]
        row["profile"] = {
            "moeq": profile_kernels(lambda: mxfp8_swiglu_experts(x, w1, w2, offs), params, gy),
            "bf16": profile_kernels(lambda: bf16_experts(x, w1, w2, offs), params, gy),
        }
        log(f"[{name}] ms {json.dumps({k: round(v, 3) for k, v in t.items()})} moeq/bf16 speed {row['moeq_speed_vs_bf16']:.3f}x")
        for cand in ("moeq", "bf16"):
            p = row["profile"][cand]
            log(f"  profile {cand}: total {p['total_ms']:.2f} ms/iter")
            for k in p["kernels"]:
                log(f"    {k['ms']:8.3f} ms  x{k['calls']:<3d} {k['name']}")
        report["shapes"][name] = row
        del x, w1, w2, gy
        torch.cuda.empty_cache()

    # final table
    hdr = "| shape | BF16 ms | BF16 (3 GEMMs) ms | moeq mxfp8 ms | torchao emulated ms | moeq / BF16 speed | rel err vs torchao (y, dx, dw1, dw2) | rel err vs f64 moeq | rel err vs f64 torchao | rel err vs f64 BF16 |"
    log("")
    log(hdr)
    log("|---" * (hdr.count("|") - 1) + "|")
    for name, row in report["shapes"].items():
        t = row["ms"]
        c = row.get("correctness", {})
        f = lambda d: ", ".join(f"{d[k]:.2e}" for k in ("y", "dx", "dw1", "dw2")) if d else "n/a"
        log(
            f"| {name} | {t['bf16']:.2f} | {t['bf16_split']:.2f} | {t['moeq']:.2f} | {t.get('torchao_emulated', float('nan')):.1f} | "
            f"{row['moeq_speed_vs_bf16']:.2f}x | {f(c.get('moeq_vs_torchao'))} | {f(c.get('vs_float64', {}).get('moeq'))} | "
            f"{f(c.get('vs_float64', {}).get('torchao'))} | {f(c.get('vs_float64', {}).get('bf16'))} |"
        )
    with open(os.path.join(args.out, "mxfp8_hopper_h100.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    with open(os.path.join(args.out, "mxfp8_hopper_h100.log"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
