"""MXFP8 routed SwiGLU experts on Hopper: moeq vs BF16 torch._grouped_mm vs torchao emulated.

Device benchmark of the fused MXFP8 Hopper experts (run on an H100/H200; needs torchao for its emulated MXFP8).
For each shape, in one process and on the same inputs:

1. correctness first: y, dx, d gate_up, d down of
   * ``moeq``: moeq.ops.mxfp8_hopper.mxfp8_swiglu_experts,
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
from moeq.ops.slack_rows import zero_slack_rows_
from moeq.ops.mxfp8_hopper import mxfp8_swiglu_experts
from moeq.numerics.recipes import GROUP_ALIGNMENT, QuantizationType

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


_F32SwiGLU = K.SwiGLUReference


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
    configs = [(32, 64, 2), (32, 64, 4), (32, 128, 2), (32, 128, 4), (32, 256, 4), (32, 256, 8), (64, 64, 4), (64, 128, 4)]
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


def component_times(x, w1, w2, gy, offs):
    """Each pass of moeq's forward+backward timed alone (median ms) with its bytes moved."""
    H = w2.shape[2]
    M, D = x.shape
    E = w1.shape[0]
    xd, w1d, w2d = x.detach(), w1.detach(), w2.detach()
    x_row, x_col = K.mxfp8_fake_quant_2d(xd, offs)
    w1k, w1n = K.mxfp8_fake_quant_weight(w1d)
    w2k, w2n = K.mxfp8_fake_quant_weight(w2d)
    gu = torch._grouped_mm(x_row, w1k.transpose(-2, -1), offs=offs)
    h_row, h_col = K.mxfp8_swiglu_fake_quant(gu, offs)
    gy_row, gy_col = K.mxfp8_fake_quant_2d(gy, offs)
    gh = torch._grouped_mm(gy_row, w2n, offs=offs)
    d_row, d_col = K.mxfp8_swiglu_backward_fake_quant(gh, gu, offs)
    b = 2  # bytes per bf16
    comps = {
        "fq x (row+col)": (lambda: K.mxfp8_fake_quant_2d(xd, offs), 3 * b * M * D),
        "fq gate_up_proj (K+N)": (lambda: K.mxfp8_fake_quant_weight(w1d), 3 * b * E * 2 * H * D),
        "fq down_proj (K+N)": (lambda: K.mxfp8_fake_quant_weight(w2d), 3 * b * E * D * H),
        "swiglu+fq h (row+col)": (lambda: K.mxfp8_swiglu_fake_quant(gu, offs), 4 * b * M * H),
        "fq grad_y (row+col)": (lambda: K.mxfp8_fake_quant_2d(gy, offs), 3 * b * M * D),
        "swiglu bwd+fq (row+col)": (lambda: K.mxfp8_swiglu_backward_fake_quant(gh, gu, offs), 7 * b * M * H),
        "zero slack rows (x2)": (lambda: (zero_slack_rows_(gh, offs), zero_slack_rows_(gh, offs)), 0),
        "GEMM fwd gate_up": (lambda: torch._grouped_mm(x_row, w1k.transpose(-2, -1), offs=offs), None),
        "GEMM fwd down": (lambda: torch._grouped_mm(h_row, w2k.transpose(-2, -1), offs=offs), None),
        "GEMM dgrad down": (lambda: torch._grouped_mm(gy_row, w2n, offs=offs), None),
        "GEMM wgrad down": (lambda: torch._grouped_mm(gy_col.t(), h_col, offs=offs), None),
        "GEMM dgrad gate_up": (lambda: torch._grouped_mm(d_row, w1n, offs=offs), None),
        "GEMM wgrad gate_up": (lambda: torch._grouped_mm(d_col.t(), x_col, offs=offs), None),
    }
    out = {}
    for name, (fn, nbytes) in comps.items():
        ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
        out[name] = {"ms": ms, "GBps": (nbytes / ms / 1e6) if nbytes else None}
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
    for backend in ("aot_eager", "inductor"):
        try:
            torch._dynamo.reset()
            t0 = time.time()
            fn = torch.compile(lambda a, b, d, o: mxfp8_swiglu_experts(a, b, d, o), fullgraph=True, backend=backend)
            for p in (x, w1, w2):
                p.grad = None
            yc = fn(x, w1, w2, offs)
            yc.backward(gy)
            torch.cuda.synchronize()
            comp = [yc.detach(), x.grad, w1.grad, w2.grad]
            out[f"compile_{backend}_fullgraph"] = True
            out[f"compile_{backend}_s"] = time.time() - t0
            out[f"compile_{backend}_vs_eager_rel"] = [rel(a, b) for a, b in zip(comp, eager)]
            out[f"compile_{backend}_vs_eager_bitwise"] = [bool(torch.equal(a, b)) for a, b in zip(comp, eager)]
        except Exception as e:  # noqa: BLE001
            out[f"compile_{backend}_fullgraph"] = False
            out["compile_error"] = repr(e)[:600] + "\n" + traceback.format_exc()[-1500:]
    log(f"checks: {json.dumps({k: v for k, v in out.items() if k != 'compile_error'})}")
    if "compile_error" in out:
        log(out["compile_error"])
    return out


def write_markdown(report: dict, path: str) -> None:
    """The committed summary: speed table, errors, per-pass breakdown, profiler top kernels."""
    env = report["env"]
    L = [
        "# MXFP8 routed SwiGLU experts on Hopper: moeq vs BF16 vs torchao emulated",
        "",
        f"Device: {env['device']} (sm{env['capability'][0]}{env['capability'][1]}), torch {env['torch']}, "
        f"triton {env['triton']}, torchao {env['torchao']}. Produced by `benchmarks/mxfp8_hopper.py` "
        "(forward+backward of the routed experts, grads reset each step, `do_bench` median; "
        "groups Dirichlet(1)-sized in multiples of 32, no slack rows, seed 0). Fake-quant tiles "
        f"(rows, cols, warps) per mode: {report.get('tiles')}.",
        "",
        "## Speed (ms, forward+backward)",
        "",
        "| shape (E, D, H, M) | BF16 `_grouped_mm` | BF16, split gate/up | moeq mxfp8 | torchao emulated mxfp8 | moeq speed vs BF16 | torchao speed vs BF16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["shapes"].items():
        t = row["ms"]
        tao = t.get("torchao_emulated", float("nan"))
        L.append(
            f"| {name} ({row['E']}, {row['D']}, {row['H']}, {row['M']}) | {t['bf16']:.2f} | {t['bf16_split']:.2f} | "
            f"{t['moeq']:.2f} | {tao:.1f} | **{t['bf16'] / t['moeq']:.2f}x** | {t['bf16'] / tao:.2f}x |"
        )
    L += [
        "",
        "## Correctness (same inputs; ||a - b|| / ||b||; y, dx, d gate_up_proj, d down_proj)",
        "",
        "Layout A: groups multiples of 32, expert 1 empty, no slack. `torchao`: torchao's emulated MXFP8 "
        "grouped GEMM composed with eager `F.silu(gate) * up`; `torchao_f32swiglu`: the same GEMMs with "
        "moeq's SwiGLU numerics (fp32 math, one bf16 rounding), so only accumulation order and the fused "
        "kernel's exp() differ. Layout B (moeq only): last group ends off a multiple of 32, slack rows hold "
        "NaN in x and grad_y.",
        "",
        "| shape | moeq vs torchao | moeq vs torchao_f32swiglu (bitwise-equal fraction) | moeq vs float64 | torchao vs float64 | BF16 vs float64 | moeq vs float64, layout B | checks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    f4 = lambda d: ", ".join(f"{d[k]:.2e}" for k in ("y", "dx", "dw1", "dw2"))
    for name, row in report["shapes"].items():
        c = row.get("correctness")
        if not c:
            L.append(f"| {name} | error: {row.get('correctness_error', '')[:100]} |")
            continue
        bw = ", ".join(f"{c['moeq_vs_torchao_f32swiglu_bitwise_frac'][k]:.4f}" for k in ("y", "dx", "dw1", "dw2"))
        checks = (
            f"empty-expert grads zero: {c['moeq_empty_expert_grads_zero']}; slack rows zero: "
            f"{c['slack_rows_zero']}; finite with NaN slack: {c['slack_finite']}"
        )
        L.append(
            f"| {name} | {f4(c['moeq_vs_torchao'])} | {f4(c['moeq_vs_torchao_f32swiglu'])} ({bw}) | "
            f"{f4(c['vs_float64']['moeq'])} | {f4(c['vs_float64']['torchao'])} | {f4(c['vs_float64']['bf16'])} | "
            f"{f4(c['slack_vs_float64'])} | {checks} |"
        )
    L += ["", "## Where moeq's time goes (each pass timed alone, ms; GB/s counts bytes read + written once)", ""]
    names = list(next(iter(report["shapes"].values()))["components"])
    L.append("| pass | " + " | ".join(report["shapes"]) + " |")
    L.append("|---" * (len(report["shapes"]) + 1) + "|")
    for n in names:
        cells = []
        for row in report["shapes"].values():
            v = row["components"][n]
            cells.append(f"{v['ms']:.3f}" + (f" ({v['GBps']:.0f} GB/s)" if v["GBps"] else ""))
        L.append(f"| {n} | " + " | ".join(cells) + " |")
    for label, pref in (("fake-quant passes, sum", False), ("GEMMs, sum", True)):
        L.append(
            f"| **{label}** | "
            + " | ".join(
                f"{sum(v['ms'] for k, v in row['components'].items() if k.startswith('GEMM') == pref):.3f}"
                for row in report["shapes"].values()
            )
            + " |"
        )
    L += ["", "## torch.profiler: GPU kernels per forward+backward (ms, calls)", ""]
    for name, row in report["shapes"].items():
        for cand in ("moeq", "bf16"):
            p = row["profile"][cand]
            ks = "; ".join(f"{k['name'][:48]} {k['ms']:.3f} x{k['calls']}" for k in p["kernels"][:8])
            L.append(f"- {name}, {cand}: total {p['total_ms']:.2f} ms. {ks}")
    sw = report.get("tile_sweep")
    if sw:
        L += ["", f"## Fake-quant tile sweep (Qwen3 sizes; device-to-device copy: {sw['copy_GBps']:.0f} GB/s)", ""]
        for mode, res in sw["modes"].items():
            L.append(f"- mode {mode}: " + ", ".join(f"{tuple(r['tile'])} {r.get('GBps', 0):.0f} GB/s" for r in res))
    ch = report.get("checks", {})
    if ch:
        L += ["", "## Checks", "", "```", json.dumps({k: v for k, v in ch.items() if k != "compile_error"}), "```"]
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-compile-check", action="store_true")
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: correctness path only")
    ap.add_argument("--markdown-from", help="only rewrite the .md summary from a saved .json report")
    args = ap.parse_args()
    if args.markdown_from:
        with open(args.markdown_from) as fh:
            write_markdown(json.load(fh), os.path.join(args.out, "mxfp8_hopper_h100.md"))
        return
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
        row["components"] = component_times(x, w1, w2, gy, offs)
        log(f"[{name}] components: " + "; ".join(f"{k} {v['ms']:.3f} ms" + (f" ({v['GBps']:.0f} GB/s)" if v["GBps"] else "") for k, v in row["components"].items()))
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
    write_markdown(report, os.path.join(args.out, "mxfp8_hopper_h100.md"))


if __name__ == "__main__":
    main()
