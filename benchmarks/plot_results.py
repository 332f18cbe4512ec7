"""Plot the committed GPU benchmark results into docs/img/ (no GPU needed).

    python benchmarks/plot_results.py [--results benchmarks/results] [--out docs/img]

Reads only what the benchmark scripts wrote:

* ``experts_h100.json`` (benchmarks/experts.py) -> ``experts_speed_h100.png``: speed of
  every variant per shape, against the fastest BF16 variant of the same run and against
  the 3-GEMM BF16 baseline, with the recipe targets drawn in (FP8 >= 1.3x, MXFP8 >= 0.8x).
  Rows with an ``error`` (a variant that failed on the device) are skipped.
* ``ep/qwen3_ep2_h200x4.json`` and ``ep/qwen3_ep4_h200x4.json`` (benchmarks/ep.py) ->
  ``ep_scaling_h200.png``: ms per 1k routed tokens per GPU (weak scaling: same tokens per
  GPU at EP=2 and EP=4), fused vs unfused dispatch, and the all-to-all bytes per rank.

Prints the numbers it plotted. The EP JSONs hold whole-step times only (dispatch +
experts + combine, forward + backward), no separate all-to-all time, so no all-to-all
bandwidth is computed here: bytes / step time is only a lower bound on it.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FP8_TARGET = 1.3  # FP8 experts step >= 1.3x the BF16 step
MXFP8_TARGET = 0.8  # MXFP8 experts step >= 0.8x the BF16 step (Hopper has no MXFP8 GEMM)

SHAPE_LABELS = {
    "mixtral_8x7b": "Mixtral-8x7B\nE=8 D=4096 H=14336 M=16384",
    "qwen3_30b_a3b": "Qwen3-30B-A3B\nE=128 D=2048 H=768 M=65536",
    "dsv3_ep8_local": "DeepSeek-V3, EP8-local\nE=32 D=7168 H=2048 M=32768",
}


def _load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _variant_color(variant: str) -> str:
    if variant.startswith("bf16") or "bf16" in variant:
        return "#7f7f7f" if variant.startswith("bf16") else "#4d4d4d"
    if "mxfp8" in variant:
        return "#9ecae1" if "torchao" in variant else "#08519c"
    if "per-GEMM" in variant:
        return "#fdae6b"
    if "torchao" in variant:
        return "#fdd0a2" if "compiled" not in variant else "#f16913"
    return "#a63603"  # moeq fp8


def plot_experts(results_dir: str, out_path: str) -> None:
    data = _load(os.path.join(results_dir, "experts_h100.json"))
    rows = [r for r in data["rows"] if "error" not in r and "ms" in r]
    skipped = [r for r in data["rows"] if "error" in r or "ms" not in r]
    shapes = list(OrderedDict.fromkeys(r["shape"] for r in rows))
    variants = list(OrderedDict.fromkeys(r["variant"] for r in rows))
    by = {(r["shape"], r["variant"]): r for r in rows}

    fig, axes = plt.subplots(2, 1, figsize=(14, 10.5), dpi=110, sharex=True)
    panels = (
        ("speed_vs_best_bf16", "speed vs the run's fastest BF16"),
        ("speed_vs_bf16_3gemm", "speed vs BF16, 3 GEMMs\n(the issues' baseline)"),
    )
    width = 0.8 / len(variants)
    for ax, (key, ylabel) in zip(axes, panels):
        top = 0.0
        for i, v in enumerate(variants):
            xs, ys = [], []
            for s, shape in enumerate(shapes):
                r = by.get((shape, v))
                if r is None:
                    continue
                xs.append(s - 0.4 + (i + 0.5) * width)
                ys.append(r[key])
            cached = "cached" in v  # per micro-batch inside moeq.quantized_weight_cache, not per step
            ax.bar(xs, ys, width * 0.92, color=_variant_color(v), edgecolor="white" if cached else "black",
                   linewidth=0.4, hatch="//" if cached else None, label=v.split(" [")[0] + (
                       " [micro-batch 2..N of grad. accumulation]" if cached else ""))
            for x, y in zip(xs, ys):
                ax.text(x, y + 0.02, f"{y:.2f}", ha="center", va="bottom", fontsize=7, rotation=90,
                        bbox=dict(facecolor="white", edgecolor="none", pad=0.3, alpha=0.85))
            top = max(top, max(ys, default=0))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.axhline(FP8_TARGET, color="#a63603", linestyle="--", linewidth=1)
        ax.axhline(MXFP8_TARGET, color="#08519c", linestyle="--", linewidth=1)
        # Labels in an empty strip right of the last shape, clear of the bars.
        ax.text(2.98, 1.0, "1.0x = baseline", ha="right", va="bottom", fontsize=9)
        ax.text(2.98, FP8_TARGET, f"FP8 target {FP8_TARGET}x", ha="right", va="bottom", fontsize=9, color="#a63603")
        ax.text(2.98, MXFP8_TARGET, f"MXFP8 target {MXFP8_TARGET}x", ha="right", va="bottom", fontsize=9,
                color="#08519c")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(top, FP8_TARGET) * 1.2)
        ax.set_xlim(-0.5, 3.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(
        f"Routed SwiGLU experts, forward + backward, {data['device']} (torch {data['torch']}); "
        "higher is faster", fontsize=11,
    )
    axes[1].set_xticks(range(len(shapes)))
    axes[1].set_xticklabels([SHAPE_LABELS.get(s, s) for s in shapes])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out_path)
    plt.close(fig)

    print(f"{out_path}:")
    for shape in shapes:
        for v in variants:
            r = by.get((shape, v))
            if r:
                print(f"  {shape:15s} {v:34s} {r['ms']:8.2f} ms  vs best BF16 {r['speed_vs_best_bf16']:.2f}x  "
                      f"vs 3-GEMM BF16 {r['speed_vs_bf16_3gemm']:.2f}x")
    for r in skipped:
        print(f"  skipped (failed): {r.get('shape')} {r.get('variant')}: {r.get('error', 'no ms')}")


def _ep_rows(path: str) -> tuple[dict, dict]:
    d = _load(path)
    return d["meta"], {r["recipe"]: r for r in d["rows"]}


# NVLink 4 on H200: 18 links per GPU (`nvidia-smi topo -m`: NV18), 900 GB/s both
# directions together, so 450 GB/s that one GPU can send.
NVLINK_SEND_GBPS = 450.0
EP_RUNS = {  # shape label: {EP size: results file}
    "Qwen3-30B-A3B-like (E=128, D=2048, H=768, top-8)": {
        2: "qwen3_ep2_h200x4.json", 4: "qwen3_ep4_h200x4.json", 8: "qwen3_ep8_h200x8.json"},
    "DeepSeek-V3-like (E=256, D=7168, H=2048, top-8)": {
        2: "dsv3_ep2_h200x4.json", 4: "dsv3_ep4_h200x4.json", 8: "dsv3_ep8_h200x8.json"},
}
RECIPE_COLORS = {"bf16": "#4d4d4d", "fp8": "#a63603", "mxfp8": "#08519c"}


def plot_ep(results_dir: str, out_path: str) -> None:
    fig, axes = plt.subplots(len(EP_RUNS), 2, figsize=(13, 9.5), dpi=110)
    for row_axes, (label, files) in zip(axes, EP_RUNS.items()):
        runs = {}
        for ep, name in files.items():
            path = os.path.join(results_dir, "ep", name)
            if os.path.exists(path):
                runs[ep] = _ep_rows(path)
        eps = sorted(runs)
        ax, ax2 = row_axes
        for recipe, color in RECIPE_COLORS.items():
            for kind, style in (("fused", "-o"), ("unfused", ":s")):
                ys = [runs[ep][1][recipe][f"ep_{kind}_ms"] for ep in eps]
                ax.plot(eps, ys, style, color=color, label=f"{recipe}, {kind} dispatch", alpha=1 if kind == "fused" else 0.6)
            if all("ep_quantized_ms" in runs[ep][1][recipe] for ep in eps):
                ys = [runs[ep][1][recipe]["ep_quantized_ms"] for ep in eps]
                ax.plot(eps, ys, "--^", color=color, label=f"{recipe}, quantized dispatch", alpha=0.8)
        tokens = runs[eps[0]][0]["args"]["tokens"]
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps)
        ax.set_xticklabels([str(e) for e in eps])
        ax.set_xlabel("EP size (GPUs; tokens per GPU fixed: weak scaling)")
        ax.set_ylabel("ms per step (fwd+bwd of dispatch + experts + combine)")
        ax.set_ylim(0, None)
        ax.set_title(f"{label}, {tokens} tokens/GPU, H200\nflat = perfect weak scaling (lower is better)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3, loc="lower left")
        # all-to-all rate of the forward dispatch alone
        for recipe, color in RECIPE_COLORS.items():
            ys = [runs[ep][1][recipe].get("a2a_fwd_remote_GBps") for ep in eps]
            if all(y is not None for y in ys):
                ax2.plot(eps, ys, "-o", color=color, label=f"{recipe} run, bf16 rows")
            ys = [runs[ep][1][recipe].get("a2a_fwd_remote_GBps_quantized") for ep in eps]
            if all(y is not None for y in ys):
                ax2.plot(eps, ys, "--^", color=color, label=f"{recipe} run, packed {recipe} rows")
        ax2.axhline(NVLINK_SEND_GBPS, color="green", linestyle="--", linewidth=1)
        ax2.text(eps[0], NVLINK_SEND_GBPS, " NVLink 4 x18, one direction: 450 GB/s", va="bottom", fontsize=8, color="green")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(eps)
        ax2.set_xticklabels([str(e) for e in eps])
        ax2.set_ylim(0, NVLINK_SEND_GBPS * 1.15)
        ax2.set_xlabel("EP size")
        ax2.set_ylabel("GB/s each rank sends to other ranks")
        ax2.set_title("forward dispatch all-to-all alone: achieved rate", fontsize=10)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    print(f"{out_path}:")
    for label, files in EP_RUNS.items():
        for ep, name in files.items():
            path = os.path.join(results_dir, "ep", name)
            if not os.path.exists(path):
                print(f"  {label} EP={ep}: missing {name}")
                continue
            _, rows = _ep_rows(path)
            for r, row in rows.items():
                print(f"  {label[:6]} EP={ep} {r:6s} fused {row['ep_fused_ms']:.2f} unfused {row['ep_unfused_ms']:.2f} "
                      f"a2a {row.get('a2a_fwd_remote_GBps') or float('nan'):.0f} GB/s")


def plot_moe_layer(results_dir: str, out_path: str, name: str = "moe_layer_h200.json") -> None:
    """Routed block (benchmarks/moe_layer.py): speed vs the fastest BF16 and the memory
    kept for backward vs the 3-GEMM BF16 baseline, per shape and variant, with the FP8
    targets (>= 1.3x speed, <= 0.6x memory) drawn in."""
    rows = [r for r in _load(os.path.join(results_dir, name))["rows"] if "error" not in r]
    shapes = list(OrderedDict.fromkeys(r["shape"] for r in rows))
    variants = list(OrderedDict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.2))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        for ax, key in zip(axes, ("speed_vs_best_bf16", "saved_vs_bf16")):
            xs, ys = [], []
            for j, sh in enumerate(shapes):
                r = next((r for r in rows if r["shape"] == sh and r["variant"] == v), None)
                if r is not None and r.get(key) is not None:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=v, color=_variant_color(v))
            for x, y in zip(xs, ys):
                ax.text(x, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=6.5, rotation=90)
    axes[0].axhline(FP8_TARGET, color="#a63603", ls="--", lw=1, label="FP8 target 1.3x")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("speed vs the run's fastest BF16 (higher is better)")
    axes[1].axhline(0.6, color="#a63603", ls="--", lw=1, label="FP8 target 0.6x")
    axes[1].set_ylabel("kept for backward, vs BF16 3-GEMM baseline (lower is better)")
    for ax in axes:
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([SHAPE_LABELS.get(sh, sh) for sh in shapes], fontsize=8)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Routed MoE block (permute-and-pad, SwiGLU experts, combine), fwd+bwd, H200, one run")
    fig.tight_layout()
    fig.savefig(out_path, dpi=130)
    plt.close(fig)
    for r in rows:
        print(f"{r['shape']:16s} {r['variant'][:48]:48s} {r.get('speed_vs_best_bf16', 0):.2f}x "
              f"saved {r.get('saved_vs_bf16', 0):.2f}")


def plot_gemms(results_dir: str, out_path: str, name: str = "fp8_gemm_h200.json") -> None:
    """Per-GEMM achieved TFLOP/s (benchmarks/fp8_gemm.py): BF16 torch._grouped_mm, FP8
    torch._scaled_grouped_mm, moeq's FP8 GEMM (best swept tile) and moeq's MX32 GEMM."""
    rows = _load(os.path.join(results_dir, name))["gemms"]
    series = [("BF16 torch._grouped_mm", "bf16_tflops", "#7f7f7f"), ("FP8 torch._scaled_grouped_mm", "torch_fp8_tflops", "#fdae6b"),
              ("FP8 moeq", "moeq_tflops", "#a63603"), ("MX32 moeq (per-32 promotion)", "mx_tflops", "#08519c")]
    labels = [f"{r['shape'].split('_')[0]}\n{r['gemm']}" for r in rows]
    fig, ax = plt.subplots(figsize=(16, 4.8))
    width = 0.8 / len(series)
    for i, (lab, key, col) in enumerate(series):
        xs = [j + (i - 1.5) * width for j, r in enumerate(rows) if r.get(key)]
        ys = [r[key] for r in rows if r.get(key)]
        ax.bar(xs, ys, width, label=lab, color=col)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=8)
    ax.set_title("The six routed-expert GEMMs, H200, same FP8 operands (fwd, input-gradient, weight-gradient)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    plot_experts(args.results, os.path.join(args.out, "experts_speed_h100.png"))
    plot_ep(args.results, os.path.join(args.out, "ep_scaling_h200.png"))
    plot_moe_layer(args.results, os.path.join(args.out, "moe_layer_h200.png"))
    plot_gemms(args.results, os.path.join(args.out, "fp8_gemm_h200.png"))


if __name__ == "__main__":
    main()
