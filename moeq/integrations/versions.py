"""The framework versions moeq supports: the one place the ranges live.

pyproject.toml declares the same ranges (a test compares them) and the README repeats
them. The upper bounds are on the packages whose internals moeq hooks (transformers'
experts registry and ``PreTrainedModel`` methods, torchtitan's converter and dispatcher
classes); CI tests both ends of each range.
"""
from __future__ import annotations

from importlib import metadata

# package -> pip requirement specifier
SUPPORTED = {
    "transformers": ">=5.17,<5.26",
    "torchtitan": ">=0.3.0,<0.4",
}


def installed_version(package: str) -> str:
    """The installed version of ``package`` ("not installed" when it is not)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def moved_internal(package: str, what: str, error: BaseException) -> RuntimeError:
    """A RuntimeError saying that ``what`` (a name inside ``package``) is not where moeq
    hooks it, naming the installed version, the supported range and the fix."""
    spec = SUPPORTED[package]
    return RuntimeError(
        f"moeq supports {package}{spec}, found {package} {installed_version(package)}: {what} is not where moeq "
        f"hooks it ({type(error).__name__}: {error}). Install a supported version: pip install '{package}{spec}'"
    )
