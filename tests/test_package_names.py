"""The repository's top-level ``kernels/`` folder never shadows another package.

It installs as ``moeq.kernels``; with the repository root on ``sys.path`` (the README's
``python -m pytest``, ``python -c`` in the clone) a bare ``import kernels`` must still give
the installed Hugging Face ``kernels`` package that transformers imports, or fail as if the
folder were not there.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_bare_kernels_from_repo_root_is_the_installed_package():
    from importlib import metadata

    try:
        metadata.version("kernels")
    except metadata.PackageNotFoundError:
        # covered by test_bare_kernels_without_the_package_is_an_empty_namespace, here too
        code = "import kernels; assert getattr(kernels, '__file__', None) is None; print('empty')"
        done = _run(code)
        assert done.returncode == 0 and done.stdout.strip() == "empty", done.stderr
        return
    code = (
        "import sys, os, kernels\n"
        "assert sys.path[0] == '', sys.path[0]\n"
        f"root = {str(ROOT)!r}\n"
        "assert not os.path.abspath(kernels.__file__).startswith(os.path.join(root, 'kernels')), kernels.__file__\n"
        "print(kernels.__file__)\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout


def test_transformers_hub_kernels_imports_from_repo_root():
    pytest.importorskip("transformers")
    done = _run("import transformers; from transformers.integrations import hub_kernels; print('ok')")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_bare_kernels_without_the_package_is_an_empty_namespace():
    # -S: no site-packages, so no Hugging Face kernels; the repo root is still on the path.
    # What a bare folder would give: an empty namespace package, no __file__, no names.
    code = (
        f"import sys, importlib.util; sys.path.insert(0, {str(ROOT)!r})\n"
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None, kernels.__file__\n"
        "assert not hasattr(kernels, '__version__') and not hasattr(kernels, 'padding')\n"
        "assert importlib.util.find_spec('kernels').origin is None\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError:\n"
        "    print('empty')\n"
    )
    done = _run(code, "-S")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "empty"


def test_moeq_kernels_is_this_folder():
    import moeq.kernels
    import moeq.kernels.padding

    assert Path(moeq.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert moeq.kernels.padding.__name__ == "moeq.kernels.padding"


def test_plain_install_ships_moeq_kernels(tmp_path):
    # A wheel (what `pip install .` installs) holds kernels/ as moeq/kernels, never a bare kernels/.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr[-3000:]
    import zipfile

    (wheel,) = tmp_path.glob("moeq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "moeq/kernels/__init__.py" in names and "moeq/kernels/padding.py" in names
    assert not any(n.startswith("kernels/") for n in names), sorted(n for n in names if n.startswith("kernels/"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # every layer's package is in the wheel: the CLI module imports the whole stack
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); import moeq.app.cli, moeq.convert, "
        "moeq.integrations.transformers.interface, moeq.integrations.torchtitan.experts; "
        "import moeq.kernels.padding as p; print(p.__file__)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith(str(site))
