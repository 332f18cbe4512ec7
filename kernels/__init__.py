"""Triton kernels of moeq, installed as ``moeq.kernels``.

Every kernel module here has a plain-torch reference beside it (``*_reference`` functions)
that the tests compare against bitwise where the math allows.

This folder sits at the top of the repository, so with the repository root on
``sys.path`` (``python -m pytest``, ``python -c``, a notebook started in the clone) Python
finds it as a top-level package named ``kernels``, the name of Hugging Face's ``kernels``
package that transformers imports. Imported under that name, this file hands the import
over to the installed ``kernels`` package, so it never shadows it. Where that package is
not installed, ``kernels`` becomes what a bare folder would be: an empty namespace
package, with no ``__file__``, no version and nothing in it, which transformers' package
checks take for "not installed". Under its own name, ``moeq.kernels``, this is a plain
package.
"""
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _hand_over():
        here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

        def is_repo_root(entry):
            try:
                return _os.path.samefile(entry or _os.getcwd(), here)
            except OSError:
                return False

        search_path = [entry for entry in _sys.path if not is_repo_root(entry)]
        spec = _machinery.PathFinder.find_spec("kernels", search_path)
        del _sys.modules["kernels"]
        if spec is None:
            spec = _machinery.ModuleSpec("kernels", None, is_package=True)
            spec.submodule_search_locations = []
        module = _util.module_from_spec(spec)
        _sys.modules["kernels"] = module
        if spec.loader is None:
            return
        try:
            spec.loader.exec_module(module)
        except BaseException:
            _sys.modules.pop("kernels", None)
            raise

    _hand_over()
