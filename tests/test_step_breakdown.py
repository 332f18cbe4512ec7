"""Where ``moeq compare``'s step time goes: experts, attention, optimizer, other.

On CPU (wall-clock timers, synchronous), per recipe: every recipe has a breakdown, the
four fractions sum to 1, each measured part is positive and "other" is not negative (the
parts are disjoint spans inside the step), the hooks found one experts and one attention
module per layer (moeq's model and a transformers one), and the table shows it. Also:
the table's numerics-demo / speed line, and the GPU model ``moeq compare`` picks when no
size flag is given.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import moeq.app.compare as compare
from moeq.app.cli import GPU_COMPARE_SIZES, main
from moeq.app.step_breakdown import CATEGORIES, StepBreakdown, attention_modules, experts_modules
from moeq.app.train import TrainConfig, TrainResult
from tests.test_cli import TINY


def _check(breakdown, layers):
    assert breakdown is not None and breakdown["steps"] >= 2
    fractions = breakdown["fractions"]
    assert set(fractions) == set(CATEGORIES)
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-9)
    for c in ("experts", "attention", "optimizer"):
        assert 0 < fractions[c] < 1, (c, fractions)
    assert fractions["other"] >= 0, fractions
    assert breakdown["modules"] == {"experts": layers, "attention": layers}


@pytest.mark.parametrize("model", ["moeq", "qwen3_moe"])
def test_compare_breaks_every_recipes_step_down(tmp_path, model):
    if model != "moeq":
        pytest.importorskip("transformers")
    args = ["compare", "--out-dir", str(tmp_path), "--recipes", "bf16", "fp8", "mxfp8", "--model", model,
            "--layers", "2"] + [a for a in TINY if a != "--layers" and a != "1"]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["recipe"] for r in results] == ["bf16", "fp8", "mxfp8"]
    for r in results:
        _check(r["time_breakdown"], layers=2)
    table = (tmp_path / "results.md").read_text()
    assert "Numerics demo: on CPU" in table
    assert " | ".join(f"{c} %" for c in CATEGORIES) in table
    for r in results:
        row = next(line for line in table.splitlines() if line.startswith(f"| {r['recipe']} |"))
        shares = [float(x) for x in row.strip("| \n").split(" | ")[-4:]]
        assert sum(shares) == pytest.approx(100, abs=2.5)  # rounded to whole percents


def test_modules_found_and_hooks_removed():
    from moeq.nn.model import MoEModelConfig, MoETransformer

    model = MoETransformer(MoEModelConfig(num_layers=3))
    assert [f for f, _ in experts_modules(model)] == [f"layers.{i}.moe" for i in range(3)]
    assert [f for f, _ in attention_modules(model)] == [f"layers.{i}.attn" for i in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b = StepBreakdown(skip_steps=1, max_steps=2).attach(model, opt, torch.device("cpu"))
    tokens = torch.randint(0, 256, (2, 17))
    for _ in range(5):
        model.loss(tokens).backward()
        opt.step()
        opt.zero_grad()
    result = b.result()
    assert result["steps"] == 2  # 4 step intervals, 1 skipped, at most 2 counted
    b.detach()
    assert not model.layers[0].attn._forward_hooks and not model.layers[0].moe._backward_hooks
    assert StepBreakdown().result() is None


def test_table_without_breakdown_and_size_notes():
    cfg = TrainConfig(device="cuda", batch_size=16, seq_len=512)
    r = TrainResult("bf16", [1.0], 1.0, 1.0, 1.0, 1, [], time_breakdown=None)
    table = compare.results_table([r], dataclasses.replace(cfg, compile=True))
    assert "| n/a | n/a | n/a | n/a |" in table and "needs eager mode" in table
    assert compare.size_note(cfg).startswith("Numerics demo: at dim 128")
    big = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=2048, expert_hidden_dim=1024))
    assert compare.size_note(big).startswith("Speed comparison")


def test_compare_on_a_gpu_without_size_flags_picks_the_large_model(monkeypatch, tmp_path):
    seen = []

    def fake_compare(base, recipes, out_dir):
        seen.append(base)
        (tmp_path / "results.md").write_text("table")
        return []

    monkeypatch.setattr(compare, "compare_recipes", fake_compare)
    monkeypatch.setattr("moeq.app.train.resolve_device", lambda d: torch.device("cuda"))
    assert main(["compare", "--out-dir", str(tmp_path), "--device", "auto", "--no-progress"]) == 0
    m = seen[-1].model
    assert (m.dim, m.expert_hidden_dim, seen[-1].batch_size * seen[-1].seq_len) == (2048, 1024, 8192)
    assert compare.size_note(dataclasses.replace(seen[-1], device="cuda")).startswith("Speed comparison")
    assert main(["compare", "--out-dir", str(tmp_path), "--device", "auto", "--dim", "256", "--no-progress"]) == 0
    assert seen[-1].model.dim == 256 and seen[-1].model.expert_hidden_dim == 128  # a size flag: the user's sizes
    assert set(GPU_COMPARE_SIZES) <= {a.option_strings[0] for a in __import__("moeq.app.cli").app.cli.build_parser()
                                      ._subparsers._group_actions[0].choices["compare"]._actions if a.option_strings}
