"""``moeq.quantized_weight_cache``: quantize expert weights once per optimizer step.

With gradient accumulation the expert weights do not change between micro-batches, yet the
fused Hopper experts (``fp8_swiglu_experts``, ``mxfp8_swiglu_experts``) quantize both of them
(forward and dgrad copies) on every forward: the largest single cost of the FP8 / MXFP8
experts (docs/fp8_hopper.md, docs/mxfp8_hopper.md). Inside this context each converted
experts module quantizes its weights on first use and reuses the copies afterwards::

    for step in range(steps):
        with moeq.quantized_weight_cache(model):
            for micro_batch in micro_batches:
                loss_fn(model(micro_batch)).backward()
        optimizer.step(); optimizer.zero_grad()

Safety: every cached entry records, for each source weight, its address, shape, strides,
dtype and version counter (``tensor._version``, bumped by every in-place op, including
``optimizer.step()`` and ``load_state_dict``), and keeps a reference to it (so its memory
cannot be reused by another tensor). A lookup that finds any of them changed raises
RuntimeError: stale copies are never used. Writes through ``weight.data`` bypass the
version counter and cannot be seen: don't modify weights inside the context.

Scope: the cache lives on the modules (an attribute set on entry, removed on exit), never in
a global. It is used by the fused Hopper path of ``moeq.GroupedExperts`` / ``moeq.MoE`` and
of transformers plain-SwiGLU experts converted with ``moeq.convert_model``; the per-GEMM
kernels (``quantized_grouped_mm``: kernel="torch", "emulated", ..., any non-SM90 device),
the BF16 recipe and torchtitan experts (their gate|up weight is concatenated per call)
quantize as before (the context is a no-op for them). Under ``torch.compile`` the lookup (which reads ``_version``) is skipped and the
weights are quantized in the graph as usual: the cache is an eager-mode optimization.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from moeq.experts.converted import ConvertedExperts
from moeq.numerics.recipes import QuantizationType

# Name of the attribute holding a module's cache while inside the context.
CACHE_ATTR = "_moeq_weight_cache"


def _fingerprint(t: torch.Tensor) -> Tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def _quantizer(qtype: QuantizationType) -> Callable:
    if qtype is QuantizationType.FP8:
        from moeq.ops.fp8_hopper import quantize_fp8_expert_weights

        return quantize_fp8_expert_weights
    if qtype is QuantizationType.MXFP8:
        from moeq.ops.mxfp8_hopper import quantize_mxfp8_expert_weights

        return quantize_mxfp8_expert_weights
    raise ValueError(f"no fused expert-weight quantization for recipe {qtype.value!r}")


class ExpertWeightCache:
    """The quantized copies of one experts module's weights, valid while the weights are unchanged.

    Made and dropped by ``quantized_weight_cache``; the fused experts path asks it through
    ``lookup``.
    """

    def __init__(self, name: str):
        self.name = name
        # qtype -> (source tensors, their fingerprints, quantized weights)
        self._entries: Dict[QuantizationType, Tuple[Tuple[torch.Tensor, ...], Tuple, Any]] = {}
        self.quantize_count = 0  # weight quantizations done (a diagnostic)

    def lookup(
        self, qtype: QuantizationType, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, need_dgrad: bool
    ) -> Any:
        """The recipe's quantized copies of (gate_up_proj (E, 2H, D), down_proj (E, D, H)).

        Quantizes on first use (and again only if the dgrad copies are needed but were not
        made). Raises RuntimeError if either weight changed since it was cached.
        """
        sources = (gate_up_proj, down_proj)
        prints = tuple(_fingerprint(t) for t in sources)
        entry = self._entries.get(qtype)
        if entry is not None:
            if entry[1] != prints:
                changed = [n for n, a, b in zip(("gate_up_proj", "down_proj"), entry[1], prints) if a != b]
                raise RuntimeError(
                    f"moeq.quantized_weight_cache: the expert weights {changed} of {self.name!r} changed inside the "
                    f"context (address/shape/version {entry[1]} -> {prints}), so their cached {qtype.value} copies "
                    f"are stale. Step the optimizer (and modify weights in any other way) outside "
                    f"`with moeq.quantized_weight_cache(model):`, e.g. one context per optimizer step around the "
                    f"micro-batches' forward/backward."
                )
            if entry[2].has_dgrad or not need_dgrad:
                return entry[2]
        quantized = _quantizer(qtype)(gate_up_proj, down_proj, need_dgrad=need_dgrad)
        self.quantize_count += 1
        self._entries[qtype] = (sources, prints, quantized)
        return quantized

    def clear(self) -> None:
        self._entries.clear()


def module_weight_cache(module: nn.Module) -> Optional[ExpertWeightCache]:
    """The active cache of ``module`` in eager mode; None outside the context or under torch.compile."""
    if torch.compiler.is_compiling():
        return None
    return module.__dict__.get(CACHE_ATTR)


def _cached_modules(model: nn.Module):
    return [(fqn or "<root>", m) for fqn, m in model.named_modules() if isinstance(m, ConvertedExperts)]


@contextlib.contextmanager
def quantized_weight_cache(model: nn.Module) -> Iterator[Dict[str, ExpertWeightCache]]:
    """Within the block, quantize each converted experts module's weights once and reuse them.

    Args:
        model: a model converted with ``moeq.convert_model`` (or a converted experts module).
    Yields:
        ``{module fqn: ExpertWeightCache}`` (for diagnostics: ``quantize_count``).
    Raises:
        ValueError: ``model`` has no converted experts modules (call convert_model first).
        RuntimeError: nested use on a module already inside a cache (one context per
            optimizer step, not nested), or, at a forward, a weight changed inside the
            context (step the optimizer outside it).

    The results are bitwise those without the cache. Exiting drops every cached copy.
    Which paths use it, and why compile bypasses it: see this module's docstring.
    """
    modules = _cached_modules(model)
    if not modules:
        raise ValueError(
            f"quantized_weight_cache: {type(model).__name__} has no experts converted by moeq.convert_model: "
            f"convert the model first (moeq.convert_model(model, recipe='fp8' or 'mxfp8'))"
        )
    nested = [fqn for fqn, m in modules if m.__dict__.get(CACHE_ATTR) is not None]
    if nested:
        raise RuntimeError(
            f"quantized_weight_cache is already active for {nested[:3]}: nesting is not supported; "
            f"enter it once per optimizer step around all micro-batches"
        )
    caches = {}
    try:
        for fqn, m in modules:
            caches[fqn] = m.__dict__[CACHE_ATTR] = ExpertWeightCache(fqn)
        yield caches
    finally:
        for fqn, m in modules:
            cache = m.__dict__.pop(CACHE_ATTR, None)
            if cache is not None:
                cache.clear()
