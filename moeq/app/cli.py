"""The ``moeq`` command: ``train``, ``compare``, ``plan`` and ``bench``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

from moeq.experts.swiglu import COMPUTE_BACKENDS
from moeq.integrations.transformers.models import HF_MODEL_NAMES
from moeq.numerics.recipes import RECIPE_NAMES

def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files or directories to train on (default: the Python standard library's sources)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="master-weight dtype; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--kernel", default="auto",
                   help="auto (fastest the device runs) or emulated (plain-torch numerics, any device)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--model", default="moeq", choices=("moeq",) + HF_MODEL_NAMES,
                   help="moeq's own MoE LM, or a transformers MoE family built from config (no download)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=128)
    p.add_argument("--compute-backend", default="grouped_mm", choices=COMPUTE_BACKENDS)
    p.add_argument("--no-progress", action="store_true")


def _config(args):
    from moeq.nn.model import MoEModelConfig
    from moeq.app.train import TrainConfig

    if args.data:
        missing = [d for d in args.data if not os.path.exists(d)]
        if missing:
            raise SystemExit(f"moeq: --data {missing[0]}: no such file or directory")
    model = MoEModelConfig(dim=args.dim, num_layers=args.layers, num_heads=args.heads, num_experts=args.experts,
                           top_k=args.top_k, expert_hidden_dim=args.expert_hidden,
                           compute_backend=args.compute_backend, max_seq_len=args.seq_len)
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       seed=args.seed, device=args.device, dtype=args.dtype, kernel=args.kernel,
                       data=args.data, compile=args.compile, progress=not args.no_progress, model=model,
                       hf_model=None if args.model == "moeq" else args.model)


def _cmd_train(args) -> int:
    from moeq.app.train import train

    cfg = dataclasses.replace(_config(args), recipe=args.recipe, out_dir=args.out_dir, resume=args.resume,
                              checkpoint_every=args.checkpoint_every, allow_config_change=args.allow_config_change)
    r = train(cfg)
    print(f"recipe={r.recipe} steps={r.steps} final_loss={r.final_loss:.4f} (first {r.losses[0]:.4f}) "
          f"tokens/s={r.tokens_per_s:,.0f} peak_memory={r.peak_memory_mb:,.0f} MB converted={len(r.converted)} modules")
    if args.out_dir:
        print(f"checkpoint and metrics in {args.out_dir}/")
    return 0


# `moeq compare` on a GPU with no size flag: a model large enough for the recipes' speeds
# to differ (expert GEMMs of 2048 x 1024, 8192 tokens/step; ~1.6B parameters).
GPU_COMPARE_SIZES = {"--dim": ("dim", 2048), "--layers": ("layers", 4), "--heads": ("heads", 16),
                     "--experts": ("experts", 64), "--top-k": ("top_k", 8), "--expert-hidden": ("expert_hidden", 1024),
                     "--batch-size": ("batch_size", 8), "--seq-len": ("seq_len", 1024)}


def _cmd_compare(args) -> int:
    from moeq.app.compare import compare_recipes
    from moeq.app.train import resolve_device

    if args.device != "cpu" and not (getattr(args, "given", set()) & set(GPU_COMPARE_SIZES)):
        try:
            on_gpu = resolve_device(args.device).type == "cuda"
        except RuntimeError:
            on_gpu = False  # a bad --device: check_config names it
        if on_gpu:
            for attr, value in GPU_COMPARE_SIZES.values():
                setattr(args, attr, value)
    results = compare_recipes(_config(args), args.recipes, args.out_dir)
    print((open(os.path.join(args.out_dir, "results.md")).read()))
    print(f"loss curves: {os.path.join(args.out_dir, 'loss_curves.png')}")
    return 0 if all(r.steps for r in results) else 1


def _cmd_bench(args) -> int:
    import runpy

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(here, "benchmarks", "experts.py")
    if not os.path.exists(script):
        raise SystemExit("moeq bench: benchmarks/experts.py not found (run from a source checkout)")
    sys.argv = [script] + args.bench_args
    runpy.run_path(script, run_name="__main__")
    return 0


def _plan_model(args):
    """The model ``moeq plan`` describes, on the meta device (no memory, nothing downloaded)."""
    import torch

    with torch.device("meta"):
        if args.config:
            from moeq.integrations.transformers.models import model_from_config_path

            return model_from_config_path(args.config, torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype))
        from moeq.app.train import build_unconverted_model

        return build_unconverted_model(_config(args)).to(torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype))


def _cmd_plan(args) -> int:
    import torch

    from moeq.convert import plan

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(plan(_plan_model(args), args.recipe, kernel=args.kernel, device=torch.device(device)))
    return 0


def _recipe(value: str) -> str:
    from moeq.numerics.recipes import parse_recipe

    try:
        return parse_recipe(value).value
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeq", description="Quantization-aware MoE training (FP8 / MXFP8 experts)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the demo MoE language model with one recipe")
    t.add_argument("--recipe", type=_recipe, default="bf16", help=f"one of {', '.join(RECIPE_NAMES)}")
    t.add_argument("--out-dir", help="write checkpoint.pt and metrics.json here")
    t.add_argument("--resume", action="store_true",
                   help="continue from --out-dir/checkpoint.pt (refused if its config differs from these flags)")
    t.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue even if the checkpoint was trained with other flags")
    t.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (needs --out-dir)")
    _add_train_args(t)
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("compare", help="train every recipe from the same seed and data; plot and tabulate")
    c.add_argument("--recipes", nargs="+", type=_recipe, default=list(RECIPE_NAMES))
    c.add_argument("--out-dir", default="moeq_runs/compare")
    _add_train_args(c)
    c.set_defaults(func=_cmd_compare)

    p = sub.add_parser("plan", help="print what convert_model would run per experts module on a device "
                       "(kernels per GEMM, padding, emulation), without converting or allocating the model")
    p.add_argument("--recipe", type=_recipe, default="mxfp8", help=f"one of {', '.join(RECIPE_NAMES)}")
    p.add_argument("--config", metavar="PATH",
                   help="a transformers model: its config.json or the directory holding it (nothing is downloaded); "
                   "without it, the model the --model and size flags describe")
    _add_train_args(p)
    p.set_defaults(func=_cmd_plan)

    b = sub.add_parser("bench", help="run benchmarks/experts.py on this GPU and print its table "
                       "(arguments after 'bench' go to it, e.g. --shapes qwen3_30b_a3b --out DIR)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``moeq`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to benchmarks/experts.py
        args = argparse.Namespace(func=_cmd_bench, bench_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
        args.given = {a.split("=")[0] for a in argv if a.startswith("--")}  # the flags spelled out
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, RuntimeError) as e:
        # one line, no traceback: moeq's own messages name the flag and the fix
        print(f"moeq: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
