"""Each integration example runs and trains (tiny sizes, CPU)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def test_plain_loop_trains():
    import plain_loop

    losses = plain_loop.main(["--recipe", "mxfp8", "--steps", "30"])
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0


@pytest.mark.slow
def test_hf_trainer_trains_converted_model():
    pytest.importorskip("transformers")
    import hf_trainer

    losses = hf_trainer.main(["--model", "qwen3_moe", "--recipe", "fp8", "--steps", "15"])
    assert len(losses) >= 2 and losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_and_compile_two_processes():
    """torchrun, 2 gloo ranks, FSDP2 + torch.compile(aot_eager) of a converted model."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "examples", "fsdp2_compile.py"), "--recipe", "fp8", "--steps", "6",
         "--compile-backend", "aot_eager"],
        capture_output=True, text=True, timeout=420, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = eval(out.stdout.strip().splitlines()[-1].removeprefix("losses "))
    assert len(losses) == 6 and losses[-1] < losses[0]
