"""The moeq command: train, resume, compare, and its error messages."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from moeq.app.checkpoint import MAGIC, load_checkpoint, save_checkpoint
from moeq.app.cli import main
from moeq.numerics.recipes import RECIPE_NAMES
from moeq.app.train import TrainConfig, _lr_at

TINY = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--dim", "64", "--layers", "1", "--experts", "4",
        "--expert-hidden", "64", "--no-progress"]


def _with(args, flag, value):
    """``args`` with ``flag``'s value replaced."""
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def _losses(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["losses"]


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_kill_9_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, recipe):
    """`moeq train` killed with SIGKILL mid-run, then `--resume`d: the same losses as a run
    never interrupted, bit for bit, for every recipe. The poller also never sees a
    half-written checkpoint (they are written atomically)."""
    steps = 10
    args = ["train", "--recipe", recipe, "--checkpoint-every", "1", *_with(TINY, "--steps", str(steps))]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args + ["--out-dir", str(full)]) == 0
    ckpt = part / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "moeq.app.cli", *args, "--out-dir", str(part)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if ckpt.exists() and load_checkpoint(ckpt)["step"] >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-run (rc {proc.returncode}): {err[-2000:]}"
    killed_at = load_checkpoint(ckpt)["step"]
    assert 2 <= killed_at < steps
    assert not (part / "metrics.json").exists()
    assert main(args + ["--out-dir", str(part), "--resume"]) == 0
    a, b = _losses(full), _losses(part)
    assert len(a) == len(b) == steps
    assert a == b  # bitwise: resuming reproduces the uninterrupted run exactly


def test_same_seed_runs_are_bitwise_identical(tmp_path):
    for recipe in RECIPE_NAMES:
        args = ["train", "--recipe", recipe, *_with(TINY, "--steps", "3")]
        assert main(args + ["--out-dir", str(tmp_path / f"{recipe}1")]) == 0
        assert main(args + ["--out-dir", str(tmp_path / f"{recipe}2")]) == 0
        assert _losses(tmp_path / f"{recipe}1") == _losses(tmp_path / f"{recipe}2")


def test_compare_writes_plot_and_table(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--out-dir", str(out), "--recipes", "bf16", "mxfp8"] + TINY) == 0
    assert (out / "loss_curves.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "| bf16 |" in table and "| mxfp8 |" in table
    assert len(json.loads((out / "results.json").read_text())["results"]) == 2


def test_train_hf_model(tmp_path):
    pytest.importorskip("transformers")
    assert main(["train", "--model", "mixtral", "--recipe", "mxfp8"] + TINY) == 0


def test_clear_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "int4"] + TINY)
    assert "unknown recipe 'int4'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file or directory"):
        main(["train", "--data", str(tmp_path / "missing.txt")] + TINY)
    with pytest.raises(SystemExit):
        main(["train", "--model", "llama"] + TINY)
    assert "invalid choice: 'llama'" in capsys.readouterr().err
    # A kernel the hardware cannot run: the message names what to use instead.
    assert main(["train", "--recipe", "fp8", "--kernel", "triton", "--device", "cpu"] + TINY) == 2
    err = capsys.readouterr().err
    assert "needs an SM90 GPU" in err and "kernel='emulated'" in err
    assert main(["train", "--recipe", "fp8", "--kernel", "torch", "--device", "cpu"] + TINY) == 2
    assert "use kernel='emulated'" in capsys.readouterr().err


def test_custom_data(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("hello moeq " * 200)
    assert main(["train", "--data", str(f)] + TINY) == 0


# ---- bad flags: one line naming the flag, exit status 2, no traceback --------------------

BAD_TRAIN_FLAGS = [
    (["--steps", "0"], r"steps \(--steps\) must be positive, got 0"),
    (["--steps", "-3"], r"steps \(--steps\) must be positive, got -3"),
    (["--batch-size", "0"], r"batch_size \(--batch-size\) must be positive, got 0"),
    (["--batch-size", "-1"], r"batch_size \(--batch-size\) must be positive, got -1"),
    (["--seq-len", "0"], r"seq_len \(--seq-len\) must be positive, got 0"),
    (["--heads", "0"], r"model.num_heads \(--heads\) must be positive, got 0"),
    (["--heads", "3"], r"model.dim \(--dim 64\) must be a multiple of 2 \* model.num_heads \(--heads 3\)"),
    (["--expert-hidden", "0"], r"model.expert_hidden_dim \(--expert-hidden\) must be positive, got 0"),
    (["--dim", "0"], r"model.dim \(--dim\) must be positive"),
    (["--layers", "0"], r"model.num_layers \(--layers\) must be positive"),
    (["--experts", "0"], r"model.num_experts \(--experts\) must be positive"),
    (["--top-k", "5"], r"model.top_k \(--top-k 5\) exceeds model.num_experts \(--experts 4\)"),
    (["--lr", "0"], r"lr \(--lr\) must be > 0"),
    (["--lr", "nan"], r"lr \(--lr\) must be finite"),
    (["--device", "gpu"], r"device \(--device\) 'gpu' is not a device"),
    (["--checkpoint-every", "2"], r"checkpoint_every \(--checkpoint-every 2\) needs out_dir \(--out-dir DIR\)"),
    (["--checkpoint-every", "-1", "--out-dir", "{tmp}/run"], r"checkpoint_every \(--checkpoint-every\) must be >= 0"),
    (["--resume"], r"resume \(--resume\) needs out_dir"),
    (["--out-dir", "{tmp}/a_file"], r"out_dir \(--out-dir\) .*a_file is a file, not a directory"),
    (["--resume", "--out-dir", "{tmp}/nothing_here"], r"--resume: no checkpoint at .*nothing_here/checkpoint.pt"),
]
if not torch.cuda.is_available():
    BAD_TRAIN_FLAGS.append((["--device", "cuda"], r"device \(--device\) 'cuda': no CUDA GPU is visible here"))


@pytest.mark.parametrize("flags,pattern", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_bad_train_flags_give_one_clear_line(capsys, tmp_path, flags, pattern):
    (tmp_path / "a_file").write_text("not a directory")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert main(["train"] + TINY + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moeq: error: ") and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_compare_checks_every_config_first(capsys, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(["compare", "--out-dir", str(f), "--recipes", "bf16"] + TINY) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["compare", "--out-dir", str(tmp_path / "c"), "--recipes", "bf16"] + _with(TINY, "--steps", "0")) == 2
    assert "steps (--steps) must be positive" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ---- resume: config mismatch, corrupt files, extension -----------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-step fp8 run: (its directory, the train args)."""
    d = tmp_path_factory.mktemp("finished") / "run"
    args = ["train", "--recipe", "fp8", "--out-dir", str(d), *_with(TINY, "--steps", "3")]
    assert main(args) == 0
    return d, args


RESUME_MISMATCHES = [
    (["--recipe", "mxfp8"], [r"recipe: 'fp8' in the checkpoint, 'mxfp8' now"]),
    (["--seed", "1"], [r"seed: 0 in the checkpoint, 1 now"]),
    (["--batch-size", "4"], [r"batch_size: 2 in the checkpoint, 4 now"]),
    (["--lr", "0.001"], [r"lr: 0.003 in the checkpoint, 0.001 now"]),
    (["--dtype", "bfloat16"], [r"dtype: 'auto' in the checkpoint, 'bfloat16' now"]),
    (["--experts", "8"], [r"model.num_experts: 4 in the checkpoint, 8 now"]),
    (["--recipe", "bf16", "--seed", "2"], [r"recipe: 'fp8' in the checkpoint, 'bf16' now", r"seed: 0 in the checkpoint, 2 now"]),
]


@pytest.mark.parametrize("change,patterns", RESUME_MISMATCHES, ids=[" ".join(c) for c, _ in RESUME_MISMATCHES])
def test_resume_refuses_another_config_naming_each_field(capsys, finished_run, change, patterns):
    d, args = finished_run
    before = (d / "checkpoint.pt").read_bytes()
    assert main(args + ["--resume"] + change) == 2
    err = capsys.readouterr().err
    assert "trained with another config" in err and "--allow-config-change" in err and err.count("\n") == 1, err
    for p in patterns:
        assert re.search(p, err), err
    assert (d / "checkpoint.pt").read_bytes() == before  # untouched


def test_resume_with_allow_config_change_continues(tmp_path, finished_run):
    d, args = finished_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "checkpoint.pt").write_bytes((d / "checkpoint.pt").read_bytes())
    changed = [a if a != str(d) else str(copy) for a in args]
    changed = _with(changed, "--steps", "4") + ["--lr", "0.001", "--resume", "--allow-config-change"]
    assert main(changed) == 0
    assert _losses(copy)[:3] == _losses(d) and len(_losses(copy)) == 4


def _flip_a_bit(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x10
    return bytes(b)


CORRUPT_CHECKPOINTS = [
    ("empty", lambda good, p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    ("random bytes", lambda good, p: p.write_bytes(os.urandom(4096)), r"is not a moeq checkpoint"),
    ("text", lambda good, p: p.write_text("step: 3\nloss: 1.0\n"), r"is not a moeq checkpoint"),
    ("plain torch.save", lambda good, p: torch.save({"model": {}}, p), r"is not a moeq checkpoint"),
    ("header only", lambda good, p: p.write_bytes(MAGIC + b"x" * 8), r"is truncated"),
    ("truncated", lambda good, p: p.write_bytes(good[: len(good) // 2]), r"is corrupt: its content does not match"),
    ("bit flipped", lambda good, p: p.write_bytes(_flip_a_bit(good)), r"is corrupt: its content does not match"),
    ("key-less", lambda good, p: save_checkpoint(p, {"step": 3}), r"lacks 'model', 'optimizer', 'losses', 'config'"),
    ("a list", lambda good, p: save_checkpoint(p, [1, 2]), r"holds a list, not a moeq train state"),
    ("directory", lambda good, p: p.mkdir(), r"is a directory, not a checkpoint file"),
]


@pytest.mark.parametrize("case,make,pattern", CORRUPT_CHECKPOINTS, ids=[c[0] for c in CORRUPT_CHECKPOINTS])
def test_corrupt_checkpoint_gives_one_clear_line(capsys, tmp_path, finished_run, case, make, pattern):
    d, args = finished_run
    run = tmp_path / "run"
    run.mkdir()
    make((d / "checkpoint.pt").read_bytes(), run / "checkpoint.pt")
    assert main([a if a != str(d) else str(run) for a in args] + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeq: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash between writing and renaming leaves the previous checkpoint whole (and no
    temporary file); the new file is fsynced before the rename."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(4)})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])

    def crash(src, dst):
        assert synced, "renamed before fsync"
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, {"step": 2, "w": torch.arange(4) * 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_finished_run_resumed_with_more_steps_continues_without_an_lr_jump(tmp_path, finished_run):
    d, args = finished_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((d / "checkpoint.pt").read_bytes())
    more = _with([a if a != str(d) else str(run) for a in args], "--steps", "5") + ["--resume"]
    assert main(more) == 0
    losses = _losses(run)
    assert len(losses) == 5 and losses[:3] == _losses(d)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 5 and state["lr_horizon"] == 3  # the schedule of the first run
    # the schedule: warm-up, cosine to 0.1 * lr at the first run's last step, then flat
    cfg = TrainConfig(lr=1.0, warmup_steps=20)
    horizon = 200
    lrs = [_lr_at(s, cfg, horizon) for s in range(400)]
    assert all(b <= a + 1e-12 for a, b in zip(lrs[20:], lrs[21:]))  # never up after warm-up
    assert max(abs(b - a) for a, b in zip(lrs[20:], lrs[21:])) < 0.02  # no jump anywhere
    assert lrs[horizon:] == [0.1] * (400 - horizon)


# ---- divergence -------------------------------------------------------------------------


@pytest.mark.parametrize("recipe,what", [("bf16", "gradient norm became nan"), ("fp8", "became non-finite")])
def test_diverging_lr_stops_with_step_and_last_good_loss(capsys, tmp_path, recipe, what):
    d = tmp_path / "run"
    args = ["train", "--recipe", recipe, "--lr", "1e6", "--checkpoint-every", "1", "--out-dir", str(d),
            *_with(TINY, "--steps", "8")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    m = re.search(
        r"training diverged at step (\d+) of 8 with recipe '\w+': .*" + what + r".*the last good loss was "
        r"(\d+\.\d+) at step (\d+); the last good checkpoint is .*checkpoint.pt \(after step (\d+)\), left as it was",
        err)
    assert m, err
    bad, last_loss, last_step, kept = int(m[1]), float(m[2]), int(m[3]), int(m[4])
    assert last_step == kept == bad - 1 and math.isfinite(last_loss)
    state = load_checkpoint(d / "checkpoint.pt")
    assert state["step"] == kept and len(state["losses"]) == kept
    assert abs(state["losses"][-1] - last_loss) < 1e-4
    assert all(torch.isfinite(t).all() for t in state["model"].values())  # the last good weights
    assert not (d / "metrics.json").exists()


def test_train_compile_with_default_flags_on_cpu():
    """`moeq train --compile` with the default dtype (float32 on CPU), recipe, kernel and
    backend: inductor compiles the float32 grouped GEMMs; losses match eager."""
    args = ["train", *_with(TINY, "--steps", "2")]
    from moeq.app.cli import _config, build_parser
    from moeq.app.train import train

    compiled = train(_config(build_parser().parse_args(args + ["--compile"])))
    eager = train(_config(build_parser().parse_args(args)))
    assert len(compiled.losses) == 2
    assert all(math.isfinite(x) for x in compiled.losses)
    assert max(abs(a - b) for a, b in zip(compiled.losses, eager.losses)) < 1e-3


def test_plan_command_on_a_transformers_config_and_a_moeq_model(capsys, tmp_path):
    """``moeq plan`` prints, per experts module, what convert_model would run on the device,
    for a config.json directory (built on the meta device) and for moeq's own model flags."""
    transformers = pytest.importorskip("transformers")
    from moeq.integrations.transformers.models import hf_config

    hf_config("qwen3_moe", vocab_size=128, dim=64, num_layers=2, num_experts=4, expert_hidden_dim=64).save_pretrained(tmp_path)
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), transformers.Qwen3MoeConfig)
    assert main(["plan", "--config", str(tmp_path), "--recipe", "fp8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.experts, model.layers.1.mlp.experts [transformers experts]" in out
    assert "recipe fp8" in out and "emulated" in out and "faster:" in out
    assert main(["plan", "--recipe", "mxfp8", "--device", "cpu", "--layers", "3"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.moe.experts, layers.1.moe.experts, layers.2.moe.experts [moeq.GroupedExperts]" in out
    assert "multiple of 32" in out
    assert main(["plan", "--config", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
