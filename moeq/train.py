"""Train the demo MoE language model with a recipe; checkpoints resume bit-for-bit."""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from moeq.data import batches, files_corpus, stdlib_corpus
from moeq.model import MoEModelConfig, MoETransformer
from moeq.recipes import parse_recipe


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved with each checkpoint)."""

    recipe: str = "bf16"
    kernel: str = "auto"
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU (CPU bf16 GEMMs are slow)
    data: Optional[list] = None  # None: the embedded Python-stdlib corpus
    out_dir: Optional[str] = None
    checkpoint_every: int = 0  # 0: only at the end (when out_dir is set)
    resume: bool = False
    compile: bool = False
    progress: bool = True
    model: MoEModelConfig = field(default_factory=MoEModelConfig)
    hf_model: Optional[str] = None  # a moeq.hf_models.HF_MODEL_NAMES family instead of moeq's own model


@dataclass
class TrainResult:
    """Per-step losses and throughput of a finished run."""

    recipe: str
    losses: list
    tokens_per_s: float
    peak_memory_mb: float
    final_loss: float
    steps: int
    converted: list


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 elsewhere; else ``getattr(torch, dtype)``."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, list]:
    """The demo model in ``cfg.dtype``, converted to ``cfg.recipe``; returns (model, converted FQNs)."""
    torch.manual_seed(cfg.seed)
    if cfg.hf_model:
        from moeq.hf_models import build_hf_model

        m = cfg.model
        model = build_hf_model(cfg.hf_model, vocab_size=m.vocab_size, dim=m.dim, num_layers=m.num_layers,
                               num_heads=m.num_heads, num_experts=m.num_experts, top_k=m.top_k,
                               expert_hidden_dim=m.expert_hidden_dim)
    else:
        model = MoETransformer(cfg.model)
    model = model.to(device=device, dtype=resolve_dtype(cfg.dtype, device))
    from moeq.convert import convert_model  # imported late: convert pulls in the quant stack

    kernel = cfg.kernel
    if kernel == "auto" and device.type == "cpu" and parse_recipe(cfg.recipe).value != "bf16":
        kernel = "emulated"
    model = convert_model(model, cfg.recipe, kernel=kernel)
    return model, list(getattr(model, "moeq_converted_fqns", []))


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def train(cfg: TrainConfig) -> TrainResult:
    """Train the demo model for ``cfg.steps`` steps and return the loss curve.

    With ``cfg.out_dir`` set, writes ``checkpoint.pt`` (model, optimizer, step, data RNG)
    and ``metrics.json``; ``cfg.resume`` continues from the checkpoint there.
    """
    parse_recipe(cfg.recipe)  # fail fast on an unknown recipe
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # per run, so compare's rows are per recipe
    model, converted = build_model(cfg, device)
    step_fn = torch.compile(model.loss) if cfg.compile else model.loss
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    data = files_corpus(cfg.data) if cfg.data else stdlib_corpus()

    start, losses = 0, []
    ckpt_path = Path(cfg.out_dir) / "checkpoint.pt" if cfg.out_dir else None
    if cfg.resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; train once with --out-dir first")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, losses = state["step"], state["losses"]
    stream = batches(data, cfg.batch_size, cfg.seq_len, seed=cfg.seed, device=device)
    for _ in range(start):  # replay the data stream so a resumed run sees the same batches
        next(stream)

    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(range(start, cfg.steps), desc=f"{cfg.recipe:>5}", disable=not cfg.progress, unit="step")
    t0, timed_steps = None, 0
    model.train()
    for step in bar:
        if step == start + min(3, max(cfg.steps - start - 1, 0)):  # skip warm-up/compile steps in tokens/s
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, timed_steps = time.perf_counter(), 0
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = step_fn(next(stream))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} with recipe {cfg.recipe!r}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if t0 is not None:
            timed_steps += 1
        tps = timed_steps * tokens_per_step / max(time.perf_counter() - t0, 1e-9) if t0 and timed_steps else 0.0
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}")
        if ckpt_path and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save(ckpt_path, model, opt, step + 1, losses, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tps = timed_steps * tokens_per_step / max(time.perf_counter() - t0, 1e-9) if t0 and timed_steps else 0.0
    result = TrainResult(
        recipe=cfg.recipe,
        losses=losses,
        tokens_per_s=tps,
        peak_memory_mb=_peak_memory_mb(device),
        final_loss=sum(losses[-10:]) / max(len(losses[-10:]), 1),
        steps=len(losses),
        converted=converted,
    )
    if ckpt_path:
        _save(ckpt_path, model, opt, len(losses), losses, cfg)
        (ckpt_path.parent / "metrics.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _save(path: Path, model, opt, step: int, losses: list, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "losses": losses,
         "config": asdict(cfg)},
        tmp,
    )
    tmp.replace(path)
