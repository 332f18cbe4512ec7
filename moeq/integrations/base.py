"""The adapter interface: what moeq needs to know about one family of experts modules.

An adapter answers, for modules of its family (moeq's own ``GroupedExperts``,
transformers 5.x experts, torchtitan's ``GroupedExperts``, ...):

* :meth:`ExpertsAdapter.matches`: is this module one of ours (converted or not)?
* :meth:`ExpertsAdapter.dims`: the contraction dims the recipe's alignment must divide;
* :meth:`ExpertsAdapter.local_weights`: its expert tensors, local shards under DTensor;
* :meth:`ExpertsAdapter.incoming_alignment`: what its caller guarantees about the token
  groups it hands over (read once, at conversion);
* :meth:`ExpertsAdapter.forward`: the converted module's forward, through moeq's GEMMs
  (moeq.experts.gemms), with the family's own signature;
* :meth:`ExpertsAdapter.unconvertible`: why a module of the family cannot be converted
  (None when it can).

``moeq.convert_model`` walks a model and asks the registry (``moeq.integrations.ADAPTERS``,
first match wins) about each module. Adapters never import their framework at module
import: detection goes by class names, modules and attributes, so moeq runs without
transformers or torchtitan installed.
"""
from __future__ import annotations

import abc
import functools
import inspect
from typing import Callable, Dict, Optional

import torch
from torch import nn

from moeq.experts.converted import ConvertedExperts
from moeq.experts.padding_policy import local_tensor


class ExpertsAdapter(abc.ABC):
    """How moeq converts and runs one family of experts modules.

    Subclasses set ``family`` (a name for messages, e.g. ``"torchtitan GroupedExperts"``)
    and implement the abstract methods. A converted module's class is
    ``converted_class(original class)``; its forward calls :meth:`forward` with the module.
    """

    family: str = ""
    # None: moeq.apply_expert_parallel can shard this family. Otherwise the sentence it
    # raises NotImplementedError with (e.g. "use torchtitan's expert parallelism").
    expert_parallel_unsupported: Optional[str] = None
    # True when the converted forward takes routed tokens (top-k ids and weights) and lays
    # them out aligned in its own permute, so it never pads token groups separately.
    routes_tokens: bool = False

    @abc.abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """True if ``module`` is an experts module of this family, converted or not."""

    @abc.abstractmethod
    def dims(self, module: nn.Module) -> Dict[str, int]:
        """``{name: size}`` of every GEMM contraction dim (the model dim, the expert
        hidden dim): FP8/MXFP8 need each to be a multiple of the recipe's alignment."""

    @abc.abstractmethod
    def local_weights(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        """The module's per-expert tensors by parameter name, read now (never cached: a
        parallelizer may have swapped them for DTensors), as local shards."""

    def incoming_alignment(self, module: nn.Module, parent: Optional[nn.Module]) -> Optional[int]:
        """Alignment (rows, a power of two) every token group handed to ``module`` starts
        at, as far as the model's structure tells (``parent`` is the module holding it);
        None when groups arrive packed or a caller passes it per call. Read at conversion
        into ``module.moeq_incoming_alignment``."""
        return None

    @abc.abstractmethod
    def forward(self, module: nn.Module, *args, **kwargs) -> torch.Tensor:
        """The converted forward of ``module`` (the family's own signature)."""

    def plan_weight(self, module: nn.Module) -> torch.Tensor:
        """The expert weight (local shard) whose device and dtype key the module's plan."""
        return next(iter(self.local_weights(module).values()))

    def swiglu(self, module: nn.Module) -> bool:
        """True when ``module`` computes plain SwiGLU experts (no biases, SiLU gate): the
        fused experts kernels cover it. Read when its plan is made."""
        return False

    def unconvertible(self, module: nn.Module) -> Optional[str]:
        """Why ``module`` (one this adapter matches) cannot be converted, as a clause for
        the error ``convert_model`` raises (e.g. "all its experts are identity
        experts"); None when it can."""
        return None

    def converted_class(self, cls: type) -> type:
        """The class a converted module of class ``cls`` gets: ``Moeq<cls>``, a subclass of
        ``cls`` and :class:`ConvertedExperts` whose forward is :meth:`forward`. One class
        per (adapter, cls), so converting twice reuses it."""
        return _converted_class(self, cls)

    # Adapters hold no state: every instance of a class is the same adapter. So a copy (an
    # unpickled or deep-copied model's) finds the same converted classes as the original.
    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __reduce__(self):
        return (type(self), ())


@functools.lru_cache(maxsize=None)
def _converted_class(adapter: ExpertsAdapter, cls: type) -> type:
    def forward(self, *args, **kwargs):
        return adapter.forward(self, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle cannot find it by name: rebuild it from
        # (adapter, original class), both importable, and restore the instance's state.
        return (new_converted_module, (adapter, cls), self.__getstate__())

    forward.__doc__ = f"{cls.__name__}'s forward through moeq's grouped GEMMs ({adapter.family})."
    # Frameworks that bind arguments by name (torchtitan's Module.parallelize) see the
    # original signature.
    forward.__signature__ = inspect.signature(cls.forward)
    attrs = {
        "__module__": type(adapter).__module__,
        "forward": forward,
        "moeq_adapter": adapter,
        "__reduce_ex__": __reduce_ex__,
    }
    return type(f"Moeq{cls.__name__}", (ConvertedExperts, cls), attrs)


def new_converted_module(adapter: ExpertsAdapter, cls: type) -> nn.Module:
    """An empty instance of ``adapter.converted_class(cls)`` (pickle's constructor for a
    converted module: its state is set afterwards)."""
    converted = adapter.converted_class(cls)
    return converted.__new__(converted)


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before conversion (its own class if not converted)."""
    cls = type(module)
    if issubclass(cls, ConvertedExperts):
        return next(b for b in cls.__mro__[1:] if not issubclass(b, ConvertedExperts))
    return cls


def local_parameters(module: nn.Module, names) -> Dict[str, torch.Tensor]:
    """``{name: local shard}`` of the module's parameters ``names`` that exist."""
    return {n: local_tensor(getattr(module, n)) for n in names if getattr(module, n, None) is not None}


def is_silu(fn: Optional[Callable]) -> bool:
    """True if the activation ``fn`` computes SiLU: ``torch.nn.SiLU``, transformers'
    ``SiLUActivation`` (``ACT2FN["silu"]``, ``ACT2FN["swish"]``) or the function
    ``torch.nn.functional.silu`` itself (LFM2-MoE's ``act_fn``). A subclass that
    overrides ``forward`` is not taken for SiLU."""
    if fn is torch.nn.functional.silu:
        return True
    if isinstance(fn, torch.nn.SiLU):
        return type(fn).forward is torch.nn.SiLU.forward
    for cls in type(fn).__mro__:
        if cls.__name__ == "SiLUActivation" and cls.__module__.startswith("transformers."):
            # a subclass with its own forward is some other function
            return not any("forward" in c.__dict__ for c in type(fn).__mro__[: type(fn).__mro__.index(cls)])
    return False
