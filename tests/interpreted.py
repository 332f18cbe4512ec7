"""Run a check function of a test module under ``TRITON_INTERPRET=1`` (Triton kernels on CPU).

The variable must be set before triton is imported, so the check runs in a fresh
interpreter; its output is shown when it fails."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(module: str, check: str, timeout: int = 600) -> None:
    """Call ``tests.<module>.<check>()`` in a subprocess with the Triton interpreter on."""
    env = dict(os.environ, TRITON_INTERPRET="1", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import tests.{module} as t; t.{check}()"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{check} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
