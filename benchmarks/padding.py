#!/usr/bin/env python3
"""Token-group padding on the GPU: moeq pad / unpad / permute-and-pad / combine against
the copy roofline (``x.clone()`` of the same (M, D) tensor) and torchao's
``torch_pad_token_groups`` / ``torch_unpad_token_groups``, same run, same inputs.

Shapes are routed-row counts M and widths D of real models (bfloat16 tokens):

* mixtral8x7b:    T=8192 tokens, top-2 of E=8     -> M=16384, D=4096
* qwen3_30b_a3b:  T=8192 tokens, top-8 of E=128   -> M=65536, D=2048
* dsv3_ep8_local: T=4096 tokens, top-8 of E=32    -> M=32768, D=7168 (one EP8 rank's experts)

Routing: top-k of ``randn(T, E) + randn(E)`` (a per-expert bias makes the loads uneven);
``pad``/``unpad`` use the grouped (M, D) tensor and the counts of that routing.
Alignments: ``moeq.GROUP_ALIGNMENT`` of FP8 and MXFP8 (16, 32).

Correctness first, on fresh random data: every Triton result against its plain-torch
reference bitwise, unpad(pad(x)) == x, the padded data rows against torchao's, the
combine against float64. Then the times: ``triton.testing.do_bench`` medians (it flushes
L2 before each call; eager, so host launch overhead shows where it is not hidden), and
CUDA-graph replays of the moeq ops and the copy (device time alone; the moeq ops are
capturable because they never sync; torchao's torch pad syncs, so it is not).

``--sweep`` first times a few tile configurations of the copy and combine kernels on
every shape (bitwise-checked) and runs the table with the best.

Run on the device:  python benchmarks/padding.py --sweep --out benchmarks/results
Writes padding_<gpu>.json / .md there (and to $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moeq import GROUP_ALIGNMENT, QuantizationType  # noqa: E402
from moeq.kernels import padding as kp  # noqa: E402
from moeq.ops.padding import (  # noqa: E402
    combine_token_groups,
    pad_token_groups,
    padded_rows,
    permute_and_pad,
    unpad_token_groups,
)

SHAPES = {
    # name: (T tokens, top_k, E, D)
    "mixtral8x7b": (8192, 2, 8, 4096),
    "qwen3_30b_a3b": (8192, 8, 128, 2048),
    "dsv3_ep8_local": (4096, 8, 32, 7168),
}
ALIGNMENTS = (GROUP_ALIGNMENT[QuantizationType.FP8], GROUP_ALIGNMENT[QuantizationType.MXFP8])
COPY_CONFIGS = [
    {"block_m": 16, "row_bytes": 2048, "num_warps": 4},
    {"block_m": 8, "row_bytes": 2048, "num_warps": 4},
    {"block_m": 32, "row_bytes": 2048, "num_warps": 8},
    {"block_m": 16, "row_bytes": 4096, "num_warps": 8},
    {"block_m": 32, "row_bytes": 1024, "num_warps": 4},
    {"block_m": 8, "row_bytes": 4096, "num_warps": 4},
]
COMBINE_CONFIGS = [
    {"block_t": 4, "row_bytes": 1024, "num_warps": 4},
    {"block_t": 2, "row_bytes": 2048, "num_warps": 4},
    {"block_t": 8, "row_bytes": 1024, "num_warps": 8},
    {"block_t": 4, "row_bytes": 2048, "num_warps": 8},
    {"block_t": 1, "row_bytes": 4096, "num_warps": 4},
]


def log(*a):
    print(*a, flush=True)


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_inputs(T, k, E, D, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, device="cuda", generator=g) + torch.randn(E, device="cuda", generator=g)
    ids = logits.topk(k, dim=-1).indices
    weights = torch.softmax(torch.randn(T, k, device="cuda", generator=g), -1)
    x = torch.randn(T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    counts = torch.bincount(ids.view(-1), minlength=E)
    order = torch.argsort(ids.view(-1), stable=True)
    xg = torch.randn(T * k, D, device="cuda", generator=g, dtype=torch.bfloat16)  # grouped rows, fresh values
    return x, ids, weights, counts, xg, order


EAGER_REPEATS = 5


def bench(fn, graph=False):
    """Median ms. Eager: the median of EAGER_REPEATS do_bench medians (the device host's
    launch cost moves between windows); the spread is kept in SPREAD[fn]."""
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    ts = sorted(do_bench(fn, warmup=25, rep=100, return_mode="median") for _ in range(EAGER_REPEATS))
    SPREAD[fn] = (ts[0], ts[-1])
    return ts[len(ts) // 2]


SPREAD = {}


def torchao_fns():
    try:
        from torchao.prototype.moe_training.kernels.mxfp8 import quant as q

        cuda_pad = None
        try:
            from torchao.prototype.moe_training.kernels.mxfp8 import _mxfp8_cuda_kernels_available

            if _mxfp8_cuda_kernels_available:
                cuda_pad = q.fused_pad_token_groups_cuda
        except Exception:
            pass
        return q.torch_pad_token_groups, q.torch_unpad_token_groups, cuda_pad
    except Exception as e:  # torchao missing on the device
        log("torchao unavailable:", repr(e)[:200])
        return None, None, None


# ------------------------------------------------------------------------------- checks


def check_shape(name, a, x, ids, weights, counts, xg, ao_pad):
    T, k = ids.shape
    E = counts.numel()
    M, D = xg.shape
    rows = padded_rows(M, E, a)
    out = {}
    padded, layout = pad_token_groups(xg, counts, a)
    ref = kp.pad_reference(xg, counts, a, rows)
    out["pad_bitwise_vs_reference"] = same_bits(padded, ref[0]) and torch.equal(layout.padded_offsets, ref[1])
    out["unpad_roundtrip_bitwise"] = same_bits(unpad_token_groups(padded, layout), xg)
    if ao_pad is not None:
        offs = counts.cumsum(0).to(torch.int32)
        p_ao, _, e_ao = ao_pad(xg, offs, a)
        total = int(layout.padded_offsets[-1])
        out["pad_offsets_equal_torchao"] = torch.equal(layout.padded_offsets, e_ao.to(torch.int32))
        out["pad_rows_equal_torchao"] = same_bits(padded[:total], p_ao[:total])
    pp, cnt, lay = permute_and_pad(x, ids, E, a)
    rr = kp.permute_and_pad_reference(x, ids, E, a, padded_rows(T * k, E, a))
    out["permute_bitwise_vs_reference"] = same_bits(pp, rr[0]) and all(
        torch.equal(u, v) for u, v in zip((cnt, lay.padded_offsets, lay.group_starts, lay.dest_rows, lay.source_rows), rr[1:])
    )
    y = torch.randn_like(pp)
    comb = combine_token_groups(y, lay, weights)
    out["combine_bitwise_vs_reference"] = same_bits(comb, kp.combine_reference(y, rr[4], weights, k))
    ref64 = (y.double()[lay.dest_rows.long()].view(T, k, D) * weights.double()[..., None]).sum(1)
    out["combine_rel_err_vs_fp64"] = rel_err(comb, ref64)
    ok = all(v for kk, v in out.items() if isinstance(v, bool))
    log(f"  check {name} a={a}: {'OK' if ok else 'FAILED'} {out}")
    return out, ok


# ------------------------------------------------------------------------------- sweep


def sweep(inputs):
    log("== sweep: copy-kernel tiles (pad + unpad + permute, alignment 32) ==")
    a = ALIGNMENTS[-1]
    res = []
    for cfg in COPY_CONFIGS:
        total, row = 0.0, {"config": cfg}
        for name, (x, ids, weights, counts, xg, _) in inputs.items():
            M, D = xg.shape
            E = counts.numel()
            rows = padded_rows(M, E, a)
            copy = bench(lambda: xg.clone())
            p = kp.pad_triton(xg, counts, a, rows, config=cfg)
            assert same_bits(p[0], kp.pad_reference(xg, counts, a, rows)[0])
            assert same_bits(kp.unpad_triton(p[0], counts, a, M, config=cfg), xg)
            t_pad = bench(lambda: kp.pad_triton(xg, counts, a, rows, config=cfg))
            t_unpad = bench(lambda: kp.unpad_triton(p[0], counts, a, M, config=cfg))
            t_perm = bench(lambda: kp.permute_and_pad_triton(x, ids, E, a, rows, config=cfg))
            row[name] = [round(t / copy, 3) for t in (t_pad, t_unpad, t_perm)]
            total += (t_pad + t_unpad) / copy + t_perm / copy
        row["score"] = round(total, 3)
        log(f"  {cfg}: {row}")
        res.append(row)
    best_copy = min(res, key=lambda r: r["score"])["config"]

    log("== sweep: combine tiles ==")
    cres = []
    for cfg in COMBINE_CONFIGS:
        total, row = 0.0, {"config": cfg}
        for name, (x, ids, weights, counts, xg, _) in inputs.items():
            T, k = ids.shape
            E = counts.numel()
            pp, _, lay = permute_and_pad(x, ids, E, a)
            y = torch.randn_like(pp)
            want = kp.combine_reference(y, lay.dest_rows, weights, k)
            assert same_bits(kp.combine_triton(y, lay.dest_rows, weights, k, config=cfg), want)
            t = bench(lambda: kp.combine_triton(y, lay.dest_rows, weights, k, config=cfg))
            row[name] = round(t, 4)
            total += t / bench(lambda: xg.clone())
        row["score"] = round(total, 3)
        log(f"  {cfg}: {row}")
        cres.append(row)
    best_combine = min(cres, key=lambda r: r["score"])["config"]
    return best_copy, best_combine, {"copy": res, "combine": cres}


# ------------------------------------------------------------------------------- diagnostics


def profile_permute(inputs, a):
    """Device time of each kernel of one permute-and-pad and one combine (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, (x, ids, weights, counts, xg, _) in inputs.items():
        E = counts.numel()
        pp, _, lay = permute_and_pad(x, ids, E, a)
        y = torch.randn_like(pp)
        for _ in range(3):
            permute_and_pad(x, ids, E, a)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                permute_and_pad(x, ids, E, a)
                combine_token_groups(y, lay, weights)
            torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
            if total > 0:  # microseconds per (permute + combine) iteration
                rows.append((ev.key[:60], round(total / 10, 2), ev.count))
        rows.sort(key=lambda r: -r[1])
        out[name] = rows
        log(f"  profile {name} a={a} (us per call, count):")
        for r in rows:
            log(f"    {r}")
    return out


def host_overhead(a):
    """Microseconds per call on a tiny problem, where the host's launch cost dominates."""
    T, k, E, D = 128, 8, 64, 256
    x, ids, w, counts, xg, _ = make_inputs(T, k, E, D, seed=7)
    rows = padded_rows(T * k, E, a)
    pp, _, lay = permute_and_pad(x, ids, E, a)
    padded, layout = pad_token_groups(xg, counts, a)

    xr = x.detach().requires_grad_()

    cases = {
        "pad (public)": lambda: pad_token_groups(xg, counts, a),
        "pad (kernel launcher only)": lambda: kp.pad_triton(xg, counts, a, rows),
        "unpad (public)": lambda: unpad_token_groups(padded, layout),
        "permute_and_pad (public)": lambda: permute_and_pad(x, ids, E, a),
        "permute_and_pad (the custom op alone, no validation)": lambda: torch.ops.moeq.permute_and_pad(
            x, ids, E, a, rows
        ),
        "permute_and_pad (kernel launchers only)": lambda: kp.permute_and_pad_triton(x, ids, E, a, rows),
        "permute_and_pad (public, x requires grad)": lambda: permute_and_pad(xr, ids, E, a),
        "combine (public)": lambda: combine_token_groups(y, lay, w),
        "combine (the custom op alone, no validation)": lambda: torch.ops.moeq.combine_token_groups(
            y, lay.dest_rows, lay.source_rows, w, k
        ),
        "combine (kernel launcher only)": lambda: kp.combine_triton(y, lay.dest_rows, w, k),
        "x.clone()": lambda: xg.clone(),
    }
    y = torch.randn_like(pp)
    res = {}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(300):
                fn()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) / 300 * 1e6)
        ts.sort()
        res[name] = (round(ts[0], 1), round(ts[2], 1))
        log(f"  host: {name}: min {res[name][0]} / median {res[name][1]} us/call")
    return res


# ------------------------------------------------------------------------------- table


def time_shape(name, a, x, ids, weights, counts, xg, order, ao):
    ao_pad, ao_unpad, ao_cuda_pad = ao
    T, k = ids.shape
    E = counts.numel()
    M, D = xg.shape
    rows = padded_rows(M, E, a)
    es = xg.element_size()
    r = dict(shape=name, alignment=a, T=T, k=k, E=E, M=M, D=D, padded_rows=rows)
    padded, layout = pad_token_groups(xg, counts, a)
    pp, _, lay = permute_and_pad(x, ids, E, a)
    y = torch.randn_like(pp)

    r["copy_ms"] = bench(lambda: xg.clone())
    r["pad_ms"] = bench(lambda: pad_token_groups(xg, counts, a))
    r["pad_kernel_ms"] = bench(lambda: kp.pad_triton(xg, counts, a, rows))
    r["unpad_ms"] = bench(lambda: unpad_token_groups(padded, layout))
    fn_permute = lambda: permute_and_pad(x, ids, E, a)  # noqa: E731
    r["permute_pad_ms"] = bench(fn_permute)
    r["permute_pad_spread_ms"] = SPREAD[fn_permute]
    # the same job in the route launches + gather (what larger routings run)
    r["permute_pad_unfused_ms"] = bench(lambda: kp.permute_and_pad_triton(x, ids, E, a, rows, fused=False))
    r["permute_pad_unfused_graph_ms"] = bench(
        lambda: kp.permute_and_pad_triton(x, ids, E, a, rows, fused=False), graph=True
    )
    r["permute_fused"] = bool(kp._use_fused_permute(T, k, E))
    # as in training: x requires grad, so the autograd node is recorded too
    xr = x.detach().requires_grad_()
    fn_permute_grad = lambda: permute_and_pad(xr, ids, E, a)  # noqa: E731
    r["permute_pad_grad_ms"] = bench(fn_permute_grad)
    r["permute_pad_grad_spread_ms"] = SPREAD[fn_permute_grad]
    r["combine_ms"] = bench(lambda: combine_token_groups(y, lay, weights))
    # device time alone (CUDA graph replay)
    r["copy_graph_ms"] = bench(lambda: xg.clone(), graph=True)
    r["pad_graph_ms"] = bench(lambda: pad_token_groups(xg, counts, a), graph=True)
    r["unpad_graph_ms"] = bench(lambda: unpad_token_groups(padded, layout), graph=True)
    r["permute_pad_graph_ms"] = bench(lambda: permute_and_pad(x, ids, E, a), graph=True)
    r["combine_graph_ms"] = bench(lambda: combine_token_groups(y, lay, weights), graph=True)
    # plain-torch baselines of the same jobs (no padding): argsort + gather, gather + weighted sum
    r["torch_permute_nopad_ms"] = bench(lambda: x[torch.argsort(ids.view(-1), stable=True) // k])
    dest = lay.dest_rows.long()
    r["torch_combine_ms"] = bench(
        lambda: (y[dest].view(T, k, D).float() * weights[..., None]).sum(1).to(y.dtype)
    )
    if ao_pad is not None:
        offs = counts.cumsum(0).to(torch.int32)
        r["torchao_torch_pad_ms"] = bench(lambda: ao_pad(xg, offs, a))
        p_ao, s_ao, _ = ao_pad(xg, offs, a)
        r["torchao_torch_unpad_ms"] = bench(lambda: ao_unpad(p_ao, offs, s_ao, M, a))
        if ao_cuda_pad is not None:
            try:
                r["torchao_cuda_pad_ms"] = bench(lambda: ao_cuda_pad(xg, offs, a))
            except Exception as e:
                r["torchao_cuda_pad_err"] = repr(e)[:200]
    # effective bandwidth, bytes read + written
    total = int(layout.padded_offsets[-1])
    r["pad_GBps"] = (M * D + rows * D) * es / r["pad_ms"] / 1e6
    r["copy_GBps"] = 2 * M * D * es / r["copy_ms"] / 1e6
    r["pad_rows_used"] = total
    r["permute_pad_grad_x_copy"] = r["permute_pad_grad_ms"] / r["copy_ms"]
    for op in ("pad", "unpad", "permute_pad", "combine"):
        r[f"{op}_x_copy"] = r[f"{op}_ms"] / r["copy_ms"]
        r[f"{op}_graph_x_copy"] = r[f"{op}_graph_ms"] / r["copy_graph_ms"]
    log("  " + json.dumps({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in r.items()}))
    return r


def markdown(rows, checks, env, sweep_res, cfgs, diag=None):
    L = []
    L.append(f"# Token-group padding on {env['gpu']}\n")
    L.append(
        f"torch {env['torch']}, triton {env['triton']}, torchao {env['torchao']}; bfloat16 tokens; "
        f"`benchmarks/padding.py{' --sweep' if sweep_res else ''}`. Times are medians in ms "
        f"(`triton.testing.do_bench`, L2 flushed before each call); `x copy` is the time over "
        f"`x.clone()` of the same (M, D) tensor in the same run. Targets: pad and unpad <= 1.25x copy, "
        f"permute-and-pad <= 1.5x copy.\n"
    )
    L.append(f"Kernel tiles: copy {cfgs[0]}, combine {cfgs[1]}.\n")
    L.append("## Eager (what a training step pays without CUDA graphs)\n")
    L.append(
        "| shape | a | M | D | E | copy | pad (x copy) | unpad (x copy) | permute+pad (x copy) "
        "| permute+pad, x requires grad (x copy) | permute+pad in route launches + gather, launchers only (x copy) "
        "| combine (x copy) "
        "| torchao torch pad (x copy) | torchao torch unpad (x copy) | torch argsort+gather, no pad | torch gather+sum combine |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["copy_ms"]

        def f(key):
            v = r.get(key)
            return "n/a" if v is None else f"{v:.3f} ({v / c:.2f}x)"

        L.append(
            f"| {r['shape']} | {r['alignment']} | {r['M']} | {r['D']} | {r['E']} | {c:.3f} | {f('pad_ms')} | "
            f"{f('unpad_ms')} | {f('permute_pad_ms')}{' one launch' if r['permute_fused'] else ''} | "
            f"{f('permute_pad_grad_ms')} | {f('permute_pad_unfused_ms')} | {f('combine_ms')} | "
            f"{f('torchao_torch_pad_ms')} | "
            f"{f('torchao_torch_unpad_ms')} | {f('torch_permute_nopad_ms')} | {f('torch_combine_ms')} |"
        )
    L.append(
        f"\nEager times are the median of {EAGER_REPEATS} `do_bench` runs (each a median); their spread, "
        "min-max in x copy, for permute+pad (x plain / x requiring grad):\n"
    )
    for r in rows:
        c = r["copy_ms"]
        lo, hi = r["permute_pad_spread_ms"]
        glo, ghi = r["permute_pad_grad_spread_ms"]
        L.append(f"- {r['shape']} a={r['alignment']}: {lo / c:.2f}-{hi / c:.2f}x / {glo / c:.2f}-{ghi / c:.2f}x")
    L.append("\n## CUDA-graph replay (device time only; moeq ops never sync, so they capture)\n")
    L.append(
        "| shape | a | copy | pad (x copy) | unpad (x copy) | permute+pad (x copy) "
        "| permute+pad, route launches + gather (x copy) | combine (x copy) | pad kernel alone, eager |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["copy_graph_ms"]

        def g(key):
            return f"{r[key]:.3f} ({r[key] / c:.2f}x)"

        L.append(
            f"| {r['shape']} | {r['alignment']} | {c:.3f} | {g('pad_graph_ms')} | {g('unpad_graph_ms')} | "
            f"{g('permute_pad_graph_ms')} | {g('permute_pad_unfused_graph_ms')} | {g('combine_graph_ms')} | "
            f"{r['pad_kernel_ms']:.3f} |"
        )
    L.append("\n## Correctness checks (same run, before timing)\n")
    for key, (chk, ok) in checks.items():
        L.append(f"- {key}: {'OK' if ok else 'FAILED'} `{json.dumps(chk)}`")
    if diag:
        L.append("\n## Where the time goes (alignment 32)\n")
        L.append(
            "Host cost per call on a tiny problem (T=128, k=8, E=64, D=256; launch-bound), microseconds, "
            "min / median of 5 runs of 300 calls:\n"
        )
        for kk, v in diag["host_us"].items():
            L.append(f"- {kk}: {v}")
        L.append("\nDevice time per kernel of one permute-and-pad + one combine (torch.profiler, us per call):\n")
        for shape, prow in diag["profile"].items():
            L.append(f"- {shape}: " + "; ".join(f"`{n}` {t:.1f}" for n, t, c in prow))
    if sweep_res:
        L.append("\n## Tile sweep (ratios to copy: pad, unpad, permute+pad per shape; combine in ms)\n")
        for kind in ("copy", "combine"):
            for r in sweep_res[kind]:
                L.append(f"- {kind} `{json.dumps(r)}`")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--diagnose", action="store_true", help="kernel profile of permute/combine, host overhead")
    args = ap.parse_args()
    import triton

    try:
        import torchao

        ao_ver = torchao.__version__
    except Exception:
        ao_ver = "missing"
    env = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        torchao=ao_ver,
    )
    log(env)
    ao = torchao_fns()
    names = args.shapes.split(",")
    inputs = {n: make_inputs(*SHAPES[n], seed=i) for i, n in enumerate(names)}

    sweep_res = None
    if args.sweep:
        best_copy, best_combine, sweep_res = sweep(inputs)
        kp.COPY_CONFIG.update(best_copy)
        kp.COMBINE_CONFIG.update(best_combine)
        log("best copy config:", best_copy, "best combine config:", best_combine)

    rows, checks = [], {}
    for name in names:
        x, ids, weights, counts, xg, order = inputs[name]
        for a in ALIGNMENTS:
            try:
                checks[f"{name} a={a}"] = check_shape(name, a, x, ids, weights, counts, xg, ao[0])
                rows.append(time_shape(name, a, x, ids, weights, counts, xg, order, ao))
            except Exception:
                traceback.print_exc()
    diag = None
    if args.diagnose:
        diag = {"profile": profile_permute(inputs, ALIGNMENTS[-1]), "host_us": host_overhead(ALIGNMENTS[-1])}
    cfgs = (dict(kp.COPY_CONFIG), dict(kp.COMBINE_CONFIG))
    md = markdown(rows, checks, env, sweep_res, cfgs, diag)
    log(md)
    gpu = "h100" if "H100" in env["gpu"] else env["gpu"].split()[-1].lower()
    payload = dict(
        env=env, configs=cfgs, rows=rows, checks={k: v[0] for k, v in checks.items()}, sweep=sweep_res, diagnostics=diag
    )
    for d in filter(None, {args.out, os.environ.get("OUT")}):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"padding_{gpu}.json"), "w") as fh:
            json.dump(payload, fh, indent=1)
        with open(os.path.join(d, f"padding_{gpu}.md"), "w") as fh:
            fh.write(md)
    if not all(ok for _, ok in checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    t0 = time.time()
    main()
    log(f"done in {time.time() - t0:.0f}s")
