"""Train the demo MoE language model with a recipe; checkpoints resume bit-for-bit.

Runs fail loudly and resumably: the config is checked before anything is built (one
error naming the flag), ``--resume`` refuses a checkpoint of another config unless told
otherwise, checkpoints are atomic and checksummed (moeq/app/checkpoint.py), and a loss or
gradient that turns NaN/Inf stops the run with the step and the last good loss, leaving
the last good checkpoint in place.
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from moeq.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from moeq.app.data import batches, files_corpus, stdlib_corpus
from moeq.experts.swiglu import COMPUTE_BACKENDS
from moeq.nn.model import MoEModelConfig, MoETransformer
from moeq.numerics.recipes import parse_recipe
from moeq.numerics.validation import NonFiniteError, check_float, check_int


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
    allow_config_change: bool = False  # --resume even if the checkpoint's config differs
    compile: bool = False
    progress: bool = True
    model: MoEModelConfig = field(default_factory=MoEModelConfig)
    hf_model: Optional[str] = None  # a moeq.integrations.transformers.models.HF_MODEL_NAMES family instead of moeq's own model


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
    time_breakdown: Optional[dict] = None  # moeq.app.step_breakdown.StepBreakdown.result(), when asked for


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/Inf; the message has the step and the last good loss."""


# Fields that say how a run executes, not what it computes: they may change on --resume.
# (device and compile may change the bits, not the run; steps may grow: see _lr_at.)
EXECUTION_FIELDS = frozenset(
    {"steps", "device", "out_dir", "checkpoint_every", "resume", "allow_config_change", "compile", "progress"}
)
CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_KEYS = ("model", "optimizer", "step", "losses", "config", "lr_horizon")


def check_config(cfg: TrainConfig) -> None:
    """Raise ValueError/TypeError naming the field (and its ``moeq train`` flag) for a bad config.

    Host-only; nothing is built or read besides ``out_dir``'s kind and CUDA's presence."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a moeq.app.train.TrainConfig, got {type(cfg).__name__}")
    parse_recipe(cfg.recipe)
    check_int("steps (--steps)", cfg.steps, minimum=1, fix="train at least one step")
    check_int("batch_size (--batch-size)", cfg.batch_size, minimum=1, fix="pass the sequences per step, e.g. 8")
    check_int("seq_len (--seq-len)", cfg.seq_len, minimum=1, fix="pass the bytes per sequence, e.g. 128")
    check_int("seed (--seed)", cfg.seed)
    check_float("lr (--lr)", cfg.lr, fix="pass a finite learning rate > 0, e.g. 3e-3")
    if cfg.lr <= 0:
        raise ValueError(f"lr (--lr) must be > 0, got {cfg.lr}: pass a learning rate such as 3e-3")
    check_int("warmup_steps", cfg.warmup_steps, minimum=0, fix="pass 0 for no warm-up")
    check_float("weight_decay", cfg.weight_decay, minimum=0.0)
    check_int("checkpoint_every (--checkpoint-every)", cfg.checkpoint_every, minimum=0,
              fix="pass N > 0 to checkpoint every N steps, or 0 for the end only")
    if cfg.checkpoint_every and not cfg.out_dir:
        raise ValueError(
            f"checkpoint_every (--checkpoint-every {cfg.checkpoint_every}) needs out_dir (--out-dir DIR): "
            f"there is nowhere to write the checkpoints"
        )
    if cfg.resume and not cfg.out_dir:
        raise ValueError("resume (--resume) needs out_dir (--out-dir DIR), the directory of the run to continue")
    if cfg.out_dir is not None and Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise ValueError(f"out_dir (--out-dir) {cfg.out_dir} is a file, not a directory: pass a directory")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"dtype (--dtype) {cfg.dtype!r}: use 'auto', 'bfloat16' or 'float32'")
    _check_device(cfg.device)
    _check_model_config(cfg)


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device (--device) {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device (--device) {device!r}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                f"False): use --device cpu or --device auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device (--device) {device!r}: only {torch.cuda.device_count()} CUDA device(s) here: use "
                f"cuda:0 ... cuda:{torch.cuda.device_count() - 1}"
            )


def _check_model_config(cfg: TrainConfig) -> None:
    m = cfg.model
    for name, flag, value in (
        ("dim", "--dim", m.dim),
        ("num_layers", "--layers", m.num_layers),
        ("num_heads", "--heads", m.num_heads),
        ("num_experts", "--experts", m.num_experts),
        ("top_k", "--top-k", m.top_k),
        ("expert_hidden_dim", "--expert-hidden", m.expert_hidden_dim),
        ("vocab_size", "", m.vocab_size),
    ):
        check_int(f"model.{name}" + (f" ({flag})" if flag else ""), value, minimum=1, fix="pass at least 1")
    if m.top_k > m.num_experts:
        raise ValueError(
            f"model.top_k (--top-k {m.top_k}) exceeds model.num_experts (--experts {m.num_experts}): each token "
            f"goes to top_k distinct experts"
        )
    if not cfg.hf_model:
        if m.dim % m.num_heads or (m.dim // m.num_heads) % 2:
            raise ValueError(
                f"model.dim (--dim {m.dim}) must be a multiple of 2 * model.num_heads (--heads {m.num_heads}): "
                f"each head's width must be even for the rotary embedding"
            )
    if m.compute_backend not in COMPUTE_BACKENDS:
        raise ValueError(f"model.compute_backend (--compute-backend) {m.compute_backend!r}: use one of "
                         f"{', '.join(COMPUTE_BACKENDS)}")
    if cfg.hf_model:
        from moeq.integrations.transformers.models import HF_MODEL_NAMES

        if cfg.hf_model not in HF_MODEL_NAMES:
            raise ValueError(f"hf_model (--model) {cfg.hf_model!r}: use one of {', '.join(HF_MODEL_NAMES)}")


def config_differences(saved: dict, current: TrainConfig) -> List[str]:
    """Fields (outside EXECUTION_FIELDS) where a checkpoint's saved config differs from ``current``,
    as ``"name: saved value in the checkpoint, current value now"`` lines."""
    now = asdict(current)
    out = []
    for f in fields(TrainConfig):
        if f.name in EXECUTION_FIELDS:
            continue
        a, b = saved.get(f.name, "<missing>"), now[f.name]
        if isinstance(b, dict) and isinstance(a, dict):
            out += [f"{f.name}.{k}: {a.get(k, '<missing>')!r} in the checkpoint, {v!r} now"
                    for k, v in b.items() if a.get(k, "<missing>") != v]
        elif a != b:
            out.append(f"{f.name}: {a!r} in the checkpoint, {b!r} now")
    return out


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


def build_unconverted_model(cfg: TrainConfig) -> torch.nn.Module:
    """The model ``cfg`` describes (moeq's demo LM or a transformers family), unconverted,
    on the current default device."""
    if cfg.hf_model:
        from moeq.integrations.transformers.models import build_hf_model

        m = cfg.model
        model = build_hf_model(cfg.hf_model, vocab_size=m.vocab_size, dim=m.dim, num_layers=m.num_layers,
                               num_heads=m.num_heads, num_experts=m.num_experts, top_k=m.top_k,
                               expert_hidden_dim=m.expert_hidden_dim)
    else:
        model = MoETransformer(cfg.model)
    return model


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, list]:
    """The demo model in ``cfg.dtype``, converted to ``cfg.recipe``; returns (model, converted FQNs)."""
    torch.manual_seed(cfg.seed)
    model = build_unconverted_model(cfg).to(device=device, dtype=resolve_dtype(cfg.dtype, device))
    from moeq.convert import convert_model  # imported late: convert pulls in the quant stack

    model = convert_model(model, cfg.recipe, kernel=cfg.kernel)
    return model, list(getattr(model, "moeq_converted_fqns", []))


def _lr_at(step: int, cfg: TrainConfig, horizon: int) -> float:
    """Linear warm-up, then cosine decay to 0.1 * lr at step ``horizon``, then 0.1 * lr.

    ``horizon`` is the run's first ``steps`` (saved in its checkpoint): resuming with more
    steps keeps the schedule and continues at the final lr, so the lr never jumps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def train(cfg: TrainConfig, *, breakdown=None) -> TrainResult:
    """Train the demo model for ``cfg.steps`` steps and return the loss curve.

    With ``cfg.out_dir`` set, writes ``checkpoint.pt`` (model, optimizer, step, losses,
    config, lr horizon; atomic and checksummed, see moeq/app/checkpoint.py) and
    ``metrics.json``. ``cfg.resume`` continues from the checkpoint there, bitwise as if
    never interrupted: its saved config must equal ``cfg`` outside ``EXECUTION_FIELDS``
    unless ``cfg.allow_config_change``; ``cfg.steps`` may exceed the run's first
    ``steps`` (the lr schedule then continues at its final value, see ``_lr_at``).

    Raises:
        ValueError/TypeError: a bad config (see :func:`check_config`), a checkpoint of
            another config, or an unusable checkpoint (``CheckpointError``).
        FileNotFoundError: ``--resume`` without a checkpoint.
        TrainingDiverged: the loss or the gradient became NaN/Inf (the message has the
            step and the last good loss; checkpoints written before stay as they are).

    ``breakdown``: a ``moeq.app.step_breakdown.StepBreakdown`` to attach to the model and
    optimizer (eager mode); its result goes into ``TrainResult.time_breakdown``.
    """
    check_config(cfg)
    device = resolve_device(cfg.device)
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME if cfg.out_dir else None
    state = _resume_state(ckpt_path, cfg, device) if cfg.resume else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # per run, so compare's rows are per recipe
    model, converted = build_model(cfg, device)
    step_fn = torch.compile(model.loss) if cfg.compile else model.loss
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    data = files_corpus(cfg.data) if cfg.data else stdlib_corpus()
    if breakdown is not None:
        breakdown.attach(model, opt, device)

    start, losses, horizon = 0, [], cfg.steps
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this model: {first}") from None
        start, losses, horizon = state["step"], list(state["losses"]), state["lr_horizon"]
    stream = batches(data, cfg.batch_size, cfg.seq_len, seed=cfg.seed, device=device)
    for _ in range(start):  # replay the data stream so a resumed run sees the same batches
        next(stream)

    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(range(start, cfg.steps), desc=f"{cfg.recipe:>5}", disable=not cfg.progress, unit="step")
    t0, timed_steps, saved_step = None, 0, start if state is not None else None
    model.train()
    for step in bar:
        if step == start + min(3, max(cfg.steps - start - 1, 0)):  # skip warm-up/compile steps in tokens/s
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, timed_steps = time.perf_counter(), 0
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg, horizon)
        loss, problem = _train_step(step_fn, next(stream), model, opt)
        if problem is not None:
            raise _diverged(cfg, step, problem, losses, ckpt_path, saved_step)
        losses.append(loss)
        if t0 is not None:
            timed_steps += 1
        tps = timed_steps * tokens_per_step / max(time.perf_counter() - t0, 1e-9) if t0 and timed_steps else 0.0
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}")
        if ckpt_path and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save(ckpt_path, model, opt, step + 1, losses, cfg, horizon)
            saved_step = step + 1
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
        time_breakdown=None if breakdown is None else breakdown.result(),
    )
    if breakdown is not None:
        breakdown.detach()
    if ckpt_path:
        _save(ckpt_path, model, opt, len(losses), losses, cfg, horizon)
        (ckpt_path.parent / "metrics.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _train_step(step_fn, batch, model, opt) -> Tuple[Optional[float], Optional[str]]:
    """One optimizer step: ``(loss, None)``, or ``(None, what turned non-finite)`` with the
    step not applied (the weights stay those of the last good step)."""
    try:
        loss = step_fn(batch)
        value = float(loss.detach())  # the loop's one host read of the loss per step
        if not math.isfinite(value):
            return None, f"the loss became {value}"
        opt.zero_grad(set_to_none=True)
        loss.backward()
    except NonFiniteError as e:  # a quantized GEMM's check saw it first (eager CPU)
        return None, f"an activation or gradient became non-finite ({e})"
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if not torch.isfinite(grad_norm):
        return None, f"the gradient norm became {float(grad_norm)}"
    opt.step()
    return value, None


def _diverged(cfg, step, problem, losses, ckpt_path, saved_step) -> TrainingDiverged:
    # steps counted from 1 here, as in the checkpoint's "steps done"
    last = f"the last good loss was {losses[-1]:.4f} at step {step}" if losses else "no step had a finite loss"
    if saved_step is not None:
        kept = f"the last good checkpoint is {ckpt_path} (after step {saved_step}), left as it was"
    else:
        kept = "no checkpoint was written (use --out-dir with --checkpoint-every N to keep one)"
    return TrainingDiverged(
        f"training diverged at step {step + 1} of {cfg.steps} with recipe {cfg.recipe!r}: {problem}; {last}; {kept}. "
        f"Lower --lr (now {cfg.lr:g}) and train again or resume"
    )


def _resume_state(ckpt_path: Optional[Path], cfg: TrainConfig, device: torch.device) -> dict:
    """The checkpoint to continue from, checked against ``cfg`` (see :func:`train`)."""
    if ckpt_path is None or not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; train once with --out-dir first")
    state = load_checkpoint(ckpt_path, required_keys=_CHECKPOINT_KEYS, map_location=device)
    if not isinstance(state["config"], dict) or not isinstance(state["step"], int):
        raise CheckpointError(f"checkpoint {ckpt_path} has a malformed config or step: it is not a moeq train run")
    diff = config_differences(state["config"], cfg)
    if diff and not cfg.allow_config_change:
        raise ValueError(
            f"--resume: the checkpoint in {cfg.out_dir} was trained with another config ({'; '.join(diff)}): "
            f"pass the same flags, or --allow-config-change to continue it anyway (then it is no longer one run)"
        )
    if cfg.steps < state["step"]:
        raise ValueError(
            f"steps (--steps {cfg.steps}) is below the {state['step']} steps the checkpoint has done: pass "
            f"--steps {state['step']} or more"
        )
    return state


def _save(path: Path, model, opt, step: int, losses: list, cfg: TrainConfig, horizon: int) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                           "losses": losses, "config": asdict(cfg), "lr_horizon": horizon})
