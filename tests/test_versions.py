"""The supported framework ranges: one source (moeq.integrations.versions), the same in
pyproject.toml, the README and the CI constraints, and a moved transformers internal
gives one error naming the range, not an AttributeError."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from moeq.integrations.versions import SUPPORTED, installed_version, moved_internal

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return reqs


@pytest.mark.parametrize("package", sorted(SUPPORTED))
def test_pyproject_and_readme_declare_the_supported_range(package):
    spec = SUPPORTED[package]
    declared = {r.split(";")[0].strip() for r in _requirements() if re.match(rf"{package}\b", r)}
    assert declared == {f"{package}{spec}"}, declared
    assert f"{package}{spec}" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("package", sorted(SUPPORTED))
def test_ci_locks_pin_both_ends_inside_the_range(package):
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    spec = SpecifierSet(SUPPORTED[package])
    pins = {}
    for lock in ("ci.txt", "oldest.txt"):
        text = (ROOT / "constraints" / lock).read_text()
        found = re.search(rf"^{package}==(\S+)$", text, re.M)
        assert found, f"constraints/{lock} pins no {package}"
        pins[lock] = Version(found.group(1))
        assert pins[lock] in spec, (lock, pins[lock], spec)
    lower = min(s.version for s in spec if s.operator == ">=")
    if package == "transformers":  # the oldest stage tests the lower end
        assert pins["oldest.txt"] == Version(lower) or str(pins["oldest.txt"]).startswith(lower), pins
        assert pins["ci.txt"] > pins["oldest.txt"]


def test_installed_frameworks_are_in_range():
    from packaging.specifiers import SpecifierSet

    for package, spec in SUPPORTED.items():
        version = installed_version(package)
        if version != "not installed":
            assert version in SpecifierSet(spec), (package, version, spec)


def test_moved_transformers_internal_names_the_supported_range(monkeypatch):
    moe = pytest.importorskip("transformers.integrations.moe")
    from moeq.integrations.transformers import interface as transformers_interface

    monkeypatch.delattr(moe, "ExpertsInterface")
    with pytest.raises(RuntimeError) as info:
        transformers_interface.register_experts_functions()
    msg = str(info.value)
    assert f"moeq supports transformers{SUPPORTED['transformers']}, found transformers {installed_version('transformers')}" in msg
    assert "ExpertsInterface" in msg and f"pip install 'transformers{SUPPORTED['transformers']}'" in msg


def test_moved_internal_message_for_a_missing_method(monkeypatch):
    pytest.importorskip("transformers")
    from transformers import modeling_utils

    from moeq.integrations.transformers import interface as transformers_interface

    monkeypatch.delattr(modeling_utils.PreTrainedModel, "set_experts_implementation")
    with pytest.raises(RuntimeError, match=r"moeq supports transformers.*set_experts_implementation"):
        transformers_interface.wrap_pretrained_model()
    err = moved_internal("torchtitan", "x.y", AttributeError("gone"))
    assert "torchtitan>=0.3.0,<0.4" in str(err) and "AttributeError: gone" in str(err)
