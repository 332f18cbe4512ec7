"""Whole training steps of real transformers MoE model classes, per variant: tokens/s, peak
memory, loss, recompiles, host syncs.

Models (random init, bf16 parameters (float32 on CPU), fused AdamW, one fixed batch of random tokens
repeated every step so the loss falls; vocab cut to 32768 so the lm_head and logits do not
dominate; fewer layers than the real models):

* ``qwen3_30b_a3b``: ``Qwen3MoeForCausalLM`` of Qwen3-30B-A3B layer shape (hidden 2048,
  128 experts top-8, expert hidden 768, 32 heads / 4 KV heads, head_dim 128), 4 layers.
* ``mixtral_8x7b``: ``MixtralForCausalLM`` of Mixtral-8x7B layer shape (hidden 4096,
  8 experts top-2, expert hidden 14336, 32 heads / 8 KV heads), 2 layers.
* ``tiny_qwen3`` / ``tiny_mixtral``: CPU smoke-test sizes (hidden 512, 2 layers).

torchtitan 0.3 models (``tt_*``: built as its trainer does, on meta then ``init_states``;
SDPA attention; vocab cut to 32768; ``loss = cross_entropy(model(tokens))``):

* ``tt_qwen3_30b_a3b``: torchtitan's qwen3 ``30B-A3B`` flavor (its widths: hidden 2048,
  128 experts top-8, expert hidden 768, fused QKV), first 4 layers.
* ``tt_deepseek_v3_16b``: deepseek_v3 ``16B`` (hidden 2048, 64 experts top-6 + 2 shared,
  expert hidden 1408, MLA; layer 0 dense), first 3 layers.
* ``tt_tiny_qwen3``: the ``debugmodel_moe`` flavor, 1 layer, expert hidden 64 (CPU smoke test).

For them the variants are torchtitan's converters: ``bf16`` (stock), ``moeq-<recipe>``
(``moeq.torchtitan.Converter``), ``+linears`` (and torchtitan's ``Float8LinearConverter``
rowwise / ``MXFP8LinearConverter``, lm_head and router gates left out),
``bf16+torchao-linears`` (``Float8LinearConverter`` alone), ``torchao-fp8-moe``
(torchtitan's ``Float8GroupedExpertsConverter``, torchao's float8 MoE). On CPU the float8
linear converter runs with ``emulate=True`` (torchao's tensorwise recipe, eager only).

Variants (each in a fresh state: built from the same seed, memory freed after):

* ``bf16``: transformers' ``grouped_mm`` experts;
* ``moeq-fp8`` / ``moeq-mxfp8``: ``moeq.convert_model(model, recipe)`` (experts only);
* ``moeq-fp8+linears`` / ``moeq-mxfp8+linears``: ``linears=True`` (torchao dense linears);
* ``torchao-fp8-moe``: torchao's own float8 MoE route (``quantize_`` with
  ``Float8TrainingOpConfig`` on the experts); the row is an error if its grouped GEMM
  never engaged (it is checked on one eager forward);
* ``bf16+torchao-linears``: BF16 experts, ``moeq.convert_linears(model, "fp8")``.

Modes: ``eager``, ``compiled`` (each decoder layer ``layer.compile()``). Per run: median
step time over ``--steps`` steps after ``--warmup`` (CUDA events), tokens/s, peak
``torch.cuda.max_memory_allocated`` (model, optimizer and step), first and last loss,
new dynamo graphs during the timed steps (recompiles), graph breaks, and whether one
step does a host sync (``torch.cuda.set_sync_debug_mode("error")`` around one extra step).
One run failing records its error and the sweep goes on; runs that would start past
``--budget-s`` (default 400 s on a GPU) are recorded as skipped: rerun those with
``--models/--tokens/--modes/--variants`` in another call.

    python benchmarks/train_step.py --out DIR                    # the GPU sweep (see SWEEPS)
    python benchmarks/train_step.py --device cpu --tiny --out DIR  # CPU smoke test (seconds)

Writes ``train_step_<gpu>.{json,md,png}`` to --out (git commit, date, device, versions
inside) and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import List, Optional

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "0")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    "qwen3_30b_a3b": dict(family="qwen3_moe", layers=4, hidden=2048, experts=128, top_k=8, expert_hidden=768,
                          heads=32, kv_heads=4, head_dim=128, vocab=32768, seq=4096),
    "mixtral_8x7b": dict(family="mixtral", layers=2, hidden=4096, experts=8, top_k=2, expert_hidden=14336,
                         heads=32, kv_heads=8, head_dim=128, vocab=32768, seq=4096),
    # hidden 512: the smallest width whose attention linears linears=True converts
    "tiny_qwen3": dict(family="qwen3_moe", layers=1, hidden=512, experts=4, top_k=2, expert_hidden=64,
                       heads=4, kv_heads=2, head_dim=128, vocab=256, seq=32),
    "tiny_mixtral": dict(family="mixtral", layers=1, hidden=512, experts=4, top_k=2, expert_hidden=64,
                         heads=4, kv_heads=2, head_dim=128, vocab=256, seq=32),
    # torchtitan: (package, flavor, layers kept, vocab, sequence length)
    "tt_qwen3_30b_a3b": dict(family="torchtitan", package="qwen3", flavor="30B-A3B", layers=4, vocab=32768, seq=4096),
    "tt_deepseek_v3_16b": dict(family="torchtitan", package="deepseek_v3", flavor="16B", layers=3, vocab=32768,
                               seq=4096),
    "tt_tiny_qwen3": dict(family="torchtitan", package="qwen3", flavor="debugmodel_moe", layers=1, vocab=2048, seq=32,
                          expert_hidden=64),
}
VARIANTS = ("bf16", "moeq-fp8", "moeq-fp8+linears", "moeq-mxfp8", "moeq-mxfp8+linears", "torchao-fp8-moe",
            "bf16+torchao-linears")
MODES = ("eager", "compiled")

# (model, tokens per step, mode, variants), in the order they run: the most telling first,
# so a --budget-s cut drops the least. mxfp8+linears is left out on Hopper (torchao's MXFP8
# linear is emulated there); it is added on SM100+.
SWEEPS = {
    "full": [
        ("qwen3_30b_a3b", 8192, "compiled", ("bf16", "moeq-fp8", "moeq-fp8+linears", "moeq-mxfp8",
                                            "bf16+torchao-linears", "torchao-fp8-moe")),
        ("mixtral_8x7b", 8192, "compiled", ("bf16", "moeq-fp8", "moeq-fp8+linears", "moeq-mxfp8")),
        ("qwen3_30b_a3b", 32768, "compiled", ("bf16", "moeq-fp8", "moeq-fp8+linears", "moeq-mxfp8")),
        ("qwen3_30b_a3b", 8192, "eager", ("bf16", "moeq-fp8", "moeq-mxfp8")),
        ("tt_qwen3_30b_a3b", 8192, "compiled", ("bf16", "moeq-fp8", "moeq-fp8+linears", "torchao-fp8-moe")),
        ("tt_deepseek_v3_16b", 8192, "compiled", ("bf16", "moeq-fp8", "moeq-fp8+linears")),
    ],
    "short": [
        ("qwen3_30b_a3b", 8192, "compiled", ("bf16", "moeq-fp8", "moeq-fp8+linears", "moeq-mxfp8")),
    ],
    "tiny": [
        ("tiny_qwen3", 64, "eager", ("bf16", "moeq-fp8+linears", "moeq-mxfp8+linears", "bf16+torchao-linears")),
        ("tiny_mixtral", 64, "eager", ("bf16", "moeq-mxfp8")),
        ("tt_tiny_qwen3", 64, "eager", ("bf16", "moeq-fp8+linears")),
    ],
}


@dataclass
class Row:
    model: str
    tokens: int
    mode: str
    variant: str
    status: str = "ok"  # ok / error / skipped
    error: str = ""
    ms_per_step: Optional[float] = None
    tokens_per_s: Optional[float] = None
    vs_bf16: Optional[float] = None
    peak_gib: Optional[float] = None
    loss_first: Optional[float] = None
    loss_last: Optional[float] = None
    loss_vs_bf16: Optional[float] = None
    recompiles: Optional[int] = None
    graph_breaks: Optional[int] = None
    host_sync: str = "not checked"
    converted_experts: int = 0
    converted_linears: int = 0
    step_ms: List[float] = field(default_factory=list)


def build_model(name: str, device: torch.device):
    """A transformers causal LM of MODELS[name] on ``device`` (seeded): bfloat16 on a GPU,
    float32 on CPU (CPU bfloat16 GEMMs are slow; the smoke test checks the plumbing)."""
    import transformers

    m = MODELS[name]
    common = dict(vocab_size=m["vocab"], hidden_size=m["hidden"], num_hidden_layers=m["layers"],
                  num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"], head_dim=m["head_dim"],
                  num_experts_per_tok=m["top_k"], max_position_embeddings=max(m["seq"], 4096),
                  bos_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    if m["family"] == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=m["experts"], moe_intermediate_size=m["expert_hidden"],
                                          intermediate_size=4 * m["expert_hidden"], decoder_sparse_step=1,
                                          mlp_only_layers=[], norm_topk_prob=True)
    else:
        cfg = transformers.MixtralConfig(**common, num_local_experts=m["experts"], intermediate_size=m["expert_hidden"])
    torch.manual_seed(0)
    with torch.device(device):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                              experts_implementation="grouped_mm")
    return model


def build_torchtitan(name: str, variant: str, device: torch.device, row: Row):
    """A torchtitan model of MODELS[name] with ``variant``'s converters, built as its trainer
    builds it (meta, ``to_empty``, ``init_states``; bf16 on GPU, float32 on CPU)."""
    import importlib

    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention, VarlenAttention

    m = MODELS[name]
    registry = importlib.import_module(f"torchtitan.models.{m['package']}").model_registry
    config = registry(m["flavor"], converters=_torchtitan_converters(variant, device)).model
    for _, _, parent, attr in list(config.traverse((FlexAttention.Config, VarlenAttention.Config))):
        setattr(parent, attr, ScaledDotProductAttention.Config())
    config.layers = config.layers[: m["layers"]]
    if "expert_hidden" in m:  # the CPU smoke size
        from torchtitan.models.common.moe import GroupedExperts

        for _, experts, _, _ in config.traverse(GroupedExperts.Config):
            experts.hidden_dim = m["expert_hidden"]
    config.vocab_size = m["vocab"]
    config.tok_embeddings.num_embeddings = m["vocab"]
    config.lm_head.out_features = m["vocab"]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states()
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    from moeq.experts.converted import ConvertedExperts

    row.converted_experts = sum(isinstance(x, ConvertedExperts) or "Float8" in type(x).__name__ and "Experts"
                                in type(x).__name__ for x in model.modules())
    row.converted_linears = sum(type(x).__name__ in ("Float8Linear", "MXFP8Linear") for x in model.modules())
    return model


def _torchtitan_converters(variant: str, device: torch.device) -> list:
    import moeq.torchtitan as mt
    from torchtitan.components.quantization import (
        Float8GroupedExpertsConverter,
        Float8LinearConverter,
        MXFP8LinearConverter,
    )

    gpu = device.type == "cuda"
    fp8_linears = Float8LinearConverter.Config(recipe_name="rowwise", filter_fqns=["lm_head", "router.gate"],
                                               emulate=not gpu, model_compile_enabled=gpu)
    if variant == "bf16":
        return []
    if variant == "bf16+torchao-linears":
        return [fp8_linears]
    if variant == "torchao-fp8-moe":
        return [Float8GroupedExpertsConverter.Config(model_compile_enabled=True)]
    if variant.startswith("moeq-"):
        recipe = variant.split("-")[1].split("+")[0]
        experts = mt.Converter.Config(recipe=recipe)
        if "+linears" not in variant:
            return [experts]
        if recipe == "fp8":
            return [fp8_linears, experts]
        return [MXFP8LinearConverter.Config(fqns=["attention.", "feed_forward.", "shared_experts."]), experts]
    raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")


def apply_variant(model, variant: str, row: Row) -> None:
    """Convert ``model`` in place as ``variant`` says; counts what was converted into ``row``."""
    import moeq

    if variant.startswith("moeq-"):
        recipe = variant.split("-")[1].split("+")[0]
        moeq.convert_model(model, recipe, linears="+linears" in variant)
        row.converted_experts = len(model.moeq_converted_fqns)
    elif variant == "bf16+torchao-linears":
        moeq.convert_linears(model, "fp8")
    elif variant == "torchao-fp8-moe":
        _torchao_fp8_moe(model, row)
    elif variant != "bf16":
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    plan = getattr(model, "moeq_linears", None)
    row.converted_linears = len(plan.converted) if plan is not None else 0


def _torchao_fp8_moe(model, row: Row) -> None:
    from torchao.prototype.moe_training.config import Float8TrainingOpConfig
    from torchao.quantization import quantize_

    from moeq.integrations import find_adapter

    experts = {id(m) for _, m in model.named_modules() if find_adapter(m) is not None}
    quantize_(model, Float8TrainingOpConfig(pad_token_groups_for_grouped_mm=True),
              filter_fn=lambda m, fqn: id(m) in experts)
    row.converted_experts = len(experts)


def _torchao_engaged(model, tokens) -> int:
    """Calls of torchao's quantized grouped GEMM during one eager forward (no grad)."""
    import torchao.prototype.moe_training.tensor as tao_tensor

    calls = [0]
    real = tao_tensor._quantize_then_scaled_grouped_mm

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    tao_tensor._quantize_then_scaled_grouped_mm = counting
    try:
        with torch.no_grad():
            model(input_ids=tokens)
    finally:
        tao_tensor._quantize_then_scaled_grouped_mm = real
    return calls[0]


def _dynamo_counts():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def run_one(model_name: str, tokens: int, mode: str, variant: str, args, device: torch.device) -> Row:
    """One (model, tokens, mode, variant) run in a fresh state; errors go into the row."""
    row = Row(model_name, tokens, mode, variant)
    model = opt = None
    cuda = device.type == "cuda"
    try:
        torch._dynamo.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seq = min(MODELS[model_name]["seq"], tokens)
        if tokens % seq:
            raise ValueError(f"tokens per step {tokens} is not a multiple of the sequence length {seq}")
        gen = torch.Generator().manual_seed(1)
        torchtitan = MODELS[model_name]["family"] == "torchtitan"  # shifts by hand: one more token per row
        batch = torch.randint(2, MODELS[model_name]["vocab"], (tokens // seq, seq + torchtitan), generator=gen)
        batch = batch.to(device)
        if torchtitan:
            model = build_torchtitan(model_name, variant, device, row)
            layers = list(model.layers.values())

            def forward_loss():
                logits = model(batch[:, :-1])
                return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        else:
            model = build_model(model_name, device)
            apply_variant(model, variant, row)
            layers = list(model.model.layers)
            if variant == "torchao-fp8-moe" and _torchao_engaged(model, batch) == 0:
                raise RuntimeError("torchao's float8 MoE route did not engage: its weight wrapper intercepts "
                                   "torch._grouped_mm, and these transformers experts call another grouped GEMM")

            def forward_loss():
                return model(input_ids=batch, labels=batch).loss  # transformers shifts the labels itself
        if mode == "compiled":
            for layer in layers:
                layer.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=cuda)
        model.train()

        def step():
            loss = forward_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        losses = []
        for _ in range(args.warmup):
            losses.append(step())
        graphs0, _ = _dynamo_counts()
        times = []
        for _ in range(args.steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                losses.append(step())
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                losses.append(step())
                times.append((time.perf_counter() - t0) * 1e3)
        graphs1, breaks = _dynamo_counts()
        values = [float(v) for v in losses]
        row.loss_first, row.loss_last = values[0], values[-1]
        row.step_ms = [round(t, 3) for t in times]
        row.ms_per_step = statistics.median(times)
        row.tokens_per_s = tokens / (row.ms_per_step / 1e3)
        row.recompiles = graphs1 - graphs0 if mode == "compiled" else 0
        row.graph_breaks = breaks if mode == "compiled" else 0
        if cuda:
            row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
            row.host_sync = _host_sync(step)
        if not all(map(_finite, values)):
            raise FloatingPointError(f"non-finite loss: {values}")
    except Exception as e:  # one failing run never stops the sweep
        row.status, row.error = "error", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
        if args.verbose:
            traceback.print_exc()
    finally:
        del model, opt
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return row


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _host_sync(step) -> str:
    """'none' if one more step runs under set_sync_debug_mode("error"), else what synced."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "none"
    except RuntimeError as e:
        return "sync: " + " ".join(str(e).split())[:160]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def add_ratios(rows: List[Row]) -> None:
    """``vs_bf16`` (tokens/s ratio) and ``loss_vs_bf16`` against the bf16 row of the same
    model, tokens and mode."""
    base = {(r.model, r.tokens, r.mode): r for r in rows if r.variant == "bf16" and r.status == "ok"}
    for r in rows:
        b = base.get((r.model, r.tokens, r.mode))
        if b is not None and r.status == "ok":
            r.vs_bf16 = r.tokens_per_s / b.tokens_per_s
            r.loss_vs_bf16 = r.loss_last - b.loss_last


def environment(device: torch.device) -> dict:
    """Git commit, date, device and package versions of this run."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("triton", "transformers", "torchao", "torchtitan"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            versions[pkg] = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "versions": versions,
    }


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(rows: List[Row], env: dict, args) -> str:
    """The side-by-side table (one row per run) with the run's environment on top."""
    lines = [
        f"# train_step: {env['device']}, commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}, {env['date']}",
        "",
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
        f"torchao {env['versions']['torchao']}; {args.steps} timed steps after {args.warmup} warm-up, median; "
        f"bf16 params, fused AdamW lr {args.lr}, one fixed random batch.",
        "",
        "| model | tokens/step | mode | variant | ms/step | tokens/s | vs bf16 | peak GiB | loss first -> last |"
        " loss vs bf16 | recompiles | graph breaks | host sync | experts / linears converted | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = "-" if r.loss_first is None else f"{r.loss_first:.3f} -> {r.loss_last:.3f}"
        status = r.status if r.status == "ok" else f"{r.status}: {r.error}"
        lines.append(
            f"| {r.model} | {r.tokens} | {r.mode} | {r.variant} | {_fmt(r.ms_per_step, '.1f')} | "
            f"{_fmt(r.tokens_per_s, ',.0f')} | {_fmt(r.vs_bf16, '.2f')}{'x' if r.vs_bf16 is not None else ''} | {_fmt(r.peak_gib, '.1f')} | {loss} | "
            f"{_fmt(r.loss_vs_bf16, '+.4f')} | {_fmt(r.recompiles, 'd')} | {_fmt(r.graph_breaks, 'd')} | "
            f"{r.host_sync} | {r.converted_experts} / {r.converted_linears} | {status} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: List[Row], path: str, title: str) -> None:
    """Two bar charts: tokens/s and peak memory per run (ok runs only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    labels = [f"{r.model} {r.tokens // 1024 or r.tokens}{'k' if r.tokens >= 1024 else ''} {r.mode}\n{r.variant}"
              for r in ok]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(ok) + 2), 8), dpi=110)
    axes[0].bar(range(len(ok)), [r.tokens_per_s or 0 for r in ok], color="tab:blue")
    axes[0].set_ylabel("tokens/s")
    axes[1].bar(range(len(ok)), [r.peak_gib or 0 for r in ok], color="tab:orange")
    axes[1].set_ylabel("peak GiB" if any(r.peak_gib for r in ok) else "peak GiB (not measured on CPU)")
    for ax in axes:
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels(labels, rotation=70, fontsize=6, ha="right")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plan_runs(args, device: torch.device):
    """The (model, tokens, mode, variant) runs of this invocation, in order."""
    if args.models or args.tokens or args.modes or args.variants:
        models = args.models or ["qwen3_30b_a3b"]
        return [(m, t, mode, v) for m in models for t in (args.tokens or [8192]) for mode in (args.modes or ["compiled"])
                for v in (args.variants or VARIANTS)]
    sweep = SWEEPS["tiny" if args.tiny else args.sweep]
    runs = []
    sm100 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0)
    for model, tokens, mode, variants in sweep:
        if sm100 and "moeq-mxfp8" in variants and "moeq-mxfp8+linears" not in variants:
            variants = variants + ("moeq-mxfp8+linears",)
        runs += [(model, tokens, mode, v) for v in variants]
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the CPU smoke-test sweep (tiny models, eager)")
    p.add_argument("--sweep", default="full", choices=sorted(SWEEPS))
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), help="instead of a sweep: these models ...")
    p.add_argument("--tokens", nargs="+", type=int, help="... at these tokens/step ...")
    p.add_argument("--modes", nargs="+", choices=MODES, help="... in these modes ...")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="... with these variants")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8 on GPU, 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3 on GPU, 1 with --tiny)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--budget-s", type=float, default=None,
                   help="runs that would start later than this many seconds in are recorded as skipped "
                        "(default 400 on a GPU, so one call ends inside ~8 minutes; none on CPU)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print each failing run's traceback")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.budget_s is None:
        args.budget_s = 400.0 if args.device.startswith("cuda") else float("inf")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_step.py: no CUDA GPU here: use --device cpu --tiny for the smoke test")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    from tqdm.auto import tqdm

    env = environment(device)
    print(f"{env['device']} {env['versions']}", flush=True)
    t_start = time.time()
    rows = []
    runs = plan_runs(args, device)
    for model, tokens, mode, variant in tqdm(runs, desc="train_step", disable=args.no_progress, unit="run"):
        if time.time() - t_start > args.budget_s:
            rows.append(Row(model, tokens, mode, variant, status="skipped", error=f"past --budget-s {args.budget_s:.0f}"))
            continue
        t0 = time.time()
        row = run_one(model, tokens, mode, variant, args, device)
        rows.append(row)
        print(f"# {model} {tokens} {mode} {variant}: {row.status} {_fmt(row.ms_per_step, '.1f')} ms/step "
              f"({time.time() - t0:.0f}s) {row.error}", flush=True)
    add_ratios(rows)
    os.makedirs(args.out, exist_ok=True)
    tag = "cpu" if device.type != "cuda" else env["device"].replace("NVIDIA ", "").split()[0].lower()
    stem = os.path.join(args.out, f"train_step_{tag}")
    with open(stem + ".json", "w") as fh:
        json.dump({"environment": env, "args": {k: v for k, v in vars(args).items() if k != "out"},
                   "rows": [asdict(r) for r in rows]}, fh, indent=1, default=str)
    md = markdown(rows, env, args)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    plot(rows, stem + ".png", f"train_step on {env['device']} ({env['commit'][:10]})")
    print(md)
    print(f"wrote {stem}.json, .md, .png ({time.time() - t_start:.0f}s)")
    return 0 if any(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
