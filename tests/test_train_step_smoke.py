"""benchmarks/train_step.py --device cpu --tiny: the whole-step benchmark's plumbing on CPU.

Runs the script as a user would (a subprocess), then checks its outputs: the JSON has one
row per planned run with finite losses and a tokens/s, the bf16 rows are the ratio's
base, the markdown table has the same rows, the plot exists, and the environment (commit,
date, device, versions) is recorded. A run that fails is recorded, not fatal: checked by
asking for a model/tokens mismatch through the script's own entry point.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_step  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_step")
    env = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", "cpu", "--tiny",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_tiny_sweep_rows_and_outputs(tiny_run):
    out, stdout = tiny_run
    data = json.loads((out / "train_step_cpu.json").read_text())
    expected = [(m, t, mode, v) for m, t, mode, variants in train_step.SWEEPS["tiny"] for v in variants]
    rows = data["rows"]
    assert [(r["model"], r["tokens"], r["mode"], r["variant"]) for r in rows] == expected
    for r in rows:
        assert r["status"] == "ok", r
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]), r
        assert r["tokens_per_s"] > 0 and len(r["step_ms"]) == data["args"]["steps"]
        assert r["vs_bf16"] is not None and r["loss_vs_bf16"] is not None
    by = {(r["model"], r["variant"]): r for r in rows}
    assert by[("tiny_qwen3", "bf16")]["vs_bf16"] == 1.0
    assert by[("tiny_qwen3", "moeq-fp8+linears")]["converted_linears"] == 2  # q_proj, o_proj; k/v (512->256) are too small
    assert by[("tiny_qwen3", "moeq-fp8+linears")]["converted_experts"] == 1
    assert by[("tiny_mixtral", "moeq-mxfp8")]["converted_linears"] == 0  # experts only
    assert by[("tiny_qwen3", "bf16+torchao-linears")]["converted_experts"] == 0
    # torchtitan: its Float8LinearConverter took wqkv and wo (not lm_head, router.gate); moeq the experts
    assert (by[("tt_tiny_qwen3", "moeq-fp8+linears")]["converted_linears"],
            by[("tt_tiny_qwen3", "moeq-fp8+linears")]["converted_experts"]) == (2, 1)
    env = data["environment"]
    assert env["device"] == "cpu" and env["date"] and env["versions"]["torch"] and env["versions"]["torchao"]
    assert len(env["commit"]) == 40
    md = (out / "train_step_cpu.md").read_text()
    assert sum(line.startswith(("| tiny_", "| tt_tiny_")) for line in md.splitlines()) == len(expected)
    assert md in stdout
    assert (out / "train_step_cpu.png").stat().st_size > 1000


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    calls = []
    real = train_step.run_one

    def run_one(model, tokens, mode, variant, args, device):
        calls.append(variant)
        return real(model, 48 if variant == "moeq-fp8" else tokens, mode, variant, args, device)  # 48 % 32 != 0

    monkeypatch.setattr(train_step, "run_one", run_one)
    monkeypatch.setenv("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    rc = train_step.main(["--device", "cpu", "--models", "tiny_mixtral", "--tokens", "64", "--modes", "eager",
                          "--variants", "moeq-fp8", "bf16", "--steps", "1", "--warmup", "1", "--out", str(tmp_path),
                          "--no-progress"])
    assert rc == 0 and calls == ["moeq-fp8", "bf16"]
    rows = json.loads((tmp_path / "train_step_cpu.json").read_text())["rows"]
    assert rows[0]["status"] == "error" and "not a multiple of the sequence length" in rows[0]["error"]
    assert rows[1]["status"] == "ok" and math.isfinite(rows[1]["loss_last"])
