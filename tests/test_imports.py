"""Imports run one way: no import circles among moeq's modules, lazy imports included.

Reads every module's import statements (function-level ones too: a circle hidden in a
function body is still a circle) and checks the graph of moeq-internal imports is
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
    assert "moeq.converted" in graph["moeq.weight_cache"]
    assert "moeq.padding" in graph["moeq.expert_gemms"]
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_formerly_circular_modules_import_first():
    """convert, weight_cache and parallel/hf_experts (once a circle) each import first
    in a fresh interpreter."""
    for name in ("moeq.weight_cache", "moeq.parallel.hf_experts", "moeq.convert"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"import {name} alone failed:\n{proc.stderr[-2000:]}"
