"""Train the same model on the same data with several recipes; plot and tabulate."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from moeq.app.step_breakdown import CATEGORIES, StepBreakdown
from moeq.app.train import TrainConfig, TrainResult, check_config, resolve_device, train


def compare_recipes(base: TrainConfig, recipes: Sequence[str], out_dir: str) -> list[TrainResult]:
    """Run :func:`moeq.app.train.train` once per recipe from the same seed and data.

    Writes to ``out_dir``: ``loss_curves.png`` (loss per step, one line per recipe),
    ``results.md`` (final loss, gap to the first recipe, tokens/s, peak memory) and
    ``results.json``. Returns the results in ``recipes`` order.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir (--out-dir) {out_dir} is a file, not a directory: pass a directory")
    if not recipes:
        raise ValueError("recipes (--recipes) is empty: name at least one recipe")
    configs = [dataclasses.replace(base, recipe=recipe, out_dir=None, resume=False, checkpoint_every=0)
               for recipe in recipes]
    for cfg in configs:  # every config is checked before the first run starts
        check_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # where each recipe's step time goes (eager only: compiled code would trace the hooks)
    results = [train(cfg, breakdown=None if cfg.compile else StepBreakdown()) for cfg in configs]
    plot_loss_curves(results, out / "loss_curves.png", title=_title(base))
    (out / "results.md").write_text(results_table(results, base))
    (out / "results.json").write_text(
        json.dumps({"config": dataclasses.asdict(base), "results": [dataclasses.asdict(r) for r in results]}, indent=1)
    )
    return results


def _title(cfg: TrainConfig) -> str:
    m = cfg.model
    return (
        f"moeq demo: {m.num_layers} layers, D={m.dim}, E={m.num_experts} top-{m.top_k}, "
        f"{cfg.steps} steps x {cfg.batch_size}x{cfg.seq_len} bytes"
    )


def results_table(results: Sequence[TrainResult], cfg: TrainConfig) -> str:
    """Markdown table of final loss (mean of the last 10 steps), gap vs the first recipe,
    tokens/s, peak memory and where the step's time goes (experts, attention, optimizer,
    other: % of the step, from ``TrainResult.time_breakdown``), under a line saying
    whether the run is a speed comparison or a numerics demo (:func:`size_note`)."""
    base = results[0].final_loss
    lines = [
        f"{_title(cfg)}; device={cfg.device}, dtype={cfg.dtype}, kernel={cfg.kernel}",
        "",
        size_note(cfg),
        "",
        "| recipe | final loss (last 10 steps) | vs first | tokens/s | peak memory (MB) | "
        + " | ".join(f"{c} %" for c in CATEGORIES) + " |",
        "|---|---|---|---|---|" + "---|" * len(CATEGORIES),
    ]
    for r in results:
        b = r.time_breakdown
        shares = [f"{100 * b['fractions'][c]:.0f}" if b else "n/a" for c in CATEGORIES]
        lines.append(
            f"| {r.recipe} | {r.final_loss:.4f} | {r.final_loss - base:+.4f} | {r.tokens_per_s:,.0f} | "
            f"{r.peak_memory_mb:,.0f} | " + " | ".join(shares) + " |"
        )
    if any(r.time_breakdown is None for r in results):
        lines.append("")
        lines.append("n/a: the time breakdown needs eager mode (hooks around modules); run without --compile.")
    return "\n".join(lines) + "\n"


# Below these expert GEMM sizes FP8's quantization passes cost about what its faster GEMMs
# save, so the recipes' speeds cannot differ much (see docs/benchmarks.md).
SPEED_MIN_DIM = 1024
SPEED_MIN_TOKENS = 4096


def size_note(cfg: TrainConfig) -> str:
    """One sentence: is this run a speed comparison of the recipes, or a numerics demo?"""
    m = cfg.model
    tokens = cfg.batch_size * cfg.seq_len
    if resolve_device(cfg.device).type != "cuda":
        return ("Numerics demo: on CPU FP8/MXFP8 are emulated (no CPU has FP8 GEMMs), so they are slower than "
                "bf16 by construction; compare the losses, not the speeds.")
    if min(m.dim, m.expert_hidden_dim) < SPEED_MIN_DIM or tokens < SPEED_MIN_TOKENS:
        return (f"Numerics demo: at dim {m.dim}, expert hidden {m.expert_hidden_dim} and {tokens} tokens/step the "
                f"expert GEMMs are too small for FP8 to pay off (speed needs dim and expert hidden >= "
                f"{SPEED_MIN_DIM} and >= {SPEED_MIN_TOKENS} tokens/step; `moeq compare` without size flags "
                f"picks such a model on a GPU).")
    return (f"Speed comparison: dim {m.dim}, expert hidden {m.expert_hidden_dim}, {m.num_experts} experts top-"
            f"{m.top_k}, {tokens} tokens/step.")


def plot_loss_curves(results: Sequence[TrainResult], path: Path, title: str = "") -> None:
    """Loss-per-step plot (raw, faint; 20-step moving average, solid) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for r in results:
        steps = range(1, len(r.losses) + 1)
        (line,) = ax.plot(steps, r.losses, alpha=0.25, linewidth=0.8)
        k = max(1, min(20, len(r.losses) // 5))
        smooth = [sum(r.losses[max(0, i - k + 1) : i + 1]) / len(r.losses[max(0, i - k + 1) : i + 1]) for i in range(len(r.losses))]
        ax.plot(steps, smooth, color=line.get_color(), linewidth=1.8,
                label=f"{r.recipe}: final {r.final_loss:.3f}, {r.tokens_per_s:,.0f} tok/s")
    ax.set_xlabel("step")
    ax.set_ylabel("next-byte cross-entropy (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
