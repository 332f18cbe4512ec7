"""Run a callback when a module is imported (at once if it already is).

``import moeq`` uses it to register moeq's experts implementations in transformers
(moeq.integrations.transformers.interface) without importing transformers itself: the
registration runs right after ``transformers.modeling_utils`` is executed, whichever of
the two packages is imported first.
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings
from types import ModuleType
from typing import Callable

__all__ = ["when_imported"]


def _run(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    # A failing callback must never break the import it hooks into: warn instead.
    try:
        callback(module)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"moeq: the post-import hook for {module.__name__} failed: {type(e).__name__}: {e}", stacklevel=2)


class _CallbackLoader(importlib.abc.Loader):
    """The module's own loader, then the callback; everything else is the real loader's."""

    def __init__(self, loader, finder: "_PostImportFinder"):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        # from now on the module is the real loader's alone
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._finder.remove()
        _run(self._finder.callback, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds ``name`` through the other finders and wraps its loader."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CallbackLoader(spec.loader, self)
                return spec
        return None

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once module ``name`` is imported: now if it is in
    ``sys.modules``, else right after its code runs. An exception in the callback
    becomes a warning."""
    module = sys.modules.get(name)
    if module is not None:
        _run(callback, module)
    elif not any(isinstance(f, _PostImportFinder) and f.name == name and f.callback is callback for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder(name, callback))
