"""The moeq command: train, resume, compare, and its error messages."""
import json
import os

import pytest

from moeq.cli import main

TINY = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--dim", "64", "--layers", "1", "--experts", "4",
        "--expert-hidden", "64", "--no-progress"]


def test_train_checkpoint_and_resume_bitwise(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--recipe", "fp8", "--out-dir", str(full)] + TINY) == 0
    half = [a if a != "6" else "3" for a in TINY]
    assert main(["train", "--recipe", "fp8", "--out-dir", str(part)] + half) == 0
    assert main(["train", "--recipe", "fp8", "--out-dir", str(part), "--resume"] + TINY) == 0
    a = json.loads((full / "metrics.json").read_text())["losses"]
    b = json.loads((part / "metrics.json").read_text())["losses"]
    assert len(a) == len(b) == 6
    assert a == b  # resuming reproduces the uninterrupted run exactly


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
