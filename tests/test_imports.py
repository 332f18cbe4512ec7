"""Imports run one way: every file imports only its own layer and the layers below it,
and there are no import circles among moeq's modules, lazy imports included.

Reads every module's import statements (function-level ones too: a circle or an upward
import hidden in a function body is still one) and checks them against the ordered layer
table below (docs/design.md draws it), then checks the graph of moeq-internal imports is
acyclic. ``from moeq.a import b`` counts as an import of ``moeq.a.b`` when that is a
module, else of ``moeq.a``; a package's ``__init__`` is its own node.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pyproject's package-dir: kernels/ installs as moeq.kernels.
PACKAGE_DIRS = {"moeq": ROOT / "moeq", "moeq.kernels": ROOT / "kernels"}


# Bottom to top. A module belongs to the layer of the longest prefix naming it; it may
# import its own layer and the ones below, never one above.
LAYERS = (
    ("numerics", ("moeq.numerics",)),
    ("kernels", ("moeq.kernels",)),
    ("ops", ("moeq.ops",)),
    ("experts", ("moeq.experts",)),
    ("nn", ("moeq.nn",)),
    ("integrations", ("moeq.integrations",)),
    ("convert", ("moeq.convert", "moeq.plan", "moeq.torchtitan")),
    ("parallel", ("moeq.parallel",)),
    ("app", ("moeq.app",)),
    ("api", ("moeq", "moeq.post_import")),
)


def layer_of(module: str) -> int:
    """Index in LAYERS of ``module``'s layer (longest matching prefix)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_imports.py")
    return best


def _modules():
    mods = {}
    for pkg, base in PACKAGE_DIRS.items():
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(path: Path, module: str, modules) -> set:
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules and n != module)
    return out


def _cycle(graph):
    state = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_no_import_circles():
    modules = _modules()
    graph = {m: _imports(p, m, modules) for m, p in modules.items()}
    # The graph really has the edges this test is about (a parser bug would pass vacuously).
    assert "moeq.integrations" in graph["moeq.convert"]
    assert "moeq.experts.converted" in graph["moeq.experts.weight_cache"]
    assert "moeq.ops.padding" in graph["moeq.experts.gemms"]
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)  # raises naming the module


def test_no_file_imports_a_layer_above_its_own():
    modules = _modules()
    upward = []
    for module, path in sorted(modules.items()):
        own = layer_of(module)
        for target in sorted(_imports(path, module, modules)):
            if layer_of(target) > own:
                upward.append(
                    f"{path.relative_to(ROOT)} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_kernels_import_nothing_from_moeq_but_numerics():
    modules = _modules()
    for module, path in modules.items():
        if module.startswith("moeq.kernels"):
            for target in _imports(path, module, modules):
                assert target.startswith(("moeq.kernels", "moeq.numerics")), f"{path} imports {target}"


def test_layer_rule_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an upward import inside a function body, and a relative one,
    are both found (a checker that reads only top-level imports would pass vacuously)."""
    body = "def f():\n    from moeq.convert import convert_model\n"
    path = tmp_path / "x.py"
    path.write_text(body)
    modules = {**_modules(), "moeq.numerics.x": path}
    assert "moeq.convert" in _imports(path, "moeq.numerics.x", modules)
    path.write_text("from ..ops import registry\n")
    assert "moeq.ops.registry" in _imports(path, "moeq.numerics.x", modules)
    assert layer_of("moeq.ops.registry") > layer_of("moeq.numerics.x")


def test_every_package_is_installed():
    """pyproject lists packages one by one (moeq.kernels maps to the top-level kernels/):
    a new subpackage must be listed there too, or a wheel would leave it out."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"moeq.kernels"} | {
        ".".join(("moeq", *p.parent.relative_to(ROOT / "moeq").parts)).rstrip(".")
        for p in (ROOT / "moeq").rglob("__init__.py")
    }
    assert found == listed, f"pyproject packages differ from the folders: missing {found - listed}, extra {listed - found}"


def test_formerly_circular_modules_import_first():
    """convert, weight_cache and parallel/hf_experts (once a circle) each import first
    in a fresh interpreter."""
    for name in ("moeq.experts.weight_cache", "moeq.integrations.transformers.expert_parallel", "moeq.convert"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"import {name} alone failed:\n{proc.stderr[-2000:]}"
