"""``moeq.convert_model``: swap routed experts to FP8 / MXFP8 / BF16 grouped GEMMs.

Conversion changes a module's class (to a subclass made by its family's adapter,
moeq/integrations/) and sets a few plain attributes; parameters, their dtypes and
state_dict keys are untouched, so checkpoints load both ways and optimizers built before
conversion keep working. The converted forward reads the module's parameters on every
call, so a parallelizer may still replace them (DTensor shards) afterwards.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

from torch import nn

from moeq.experts.converted import ConvertedExperts
from moeq.integrations import family_names, find_adapter, unsupported_experts
from moeq.integrations.conversion import (
    check_convertible,
    check_dims,
    check_dtypes,
    convert_experts_module,
    parent_module,
    unconvert_experts_module,
)
from moeq.ops.registry import KERNEL_AUTO, KERNEL_TRITON, get_kernel, kernel_names
from moeq.numerics.recipes import QuantizationType, RecipeLike, parse_recipe
from moeq.numerics.validation import check_convert_args

FilterLike = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

__all__ = [
    "ConvertedExperts",
    "FilterLike",
    "check_convertible",
    "check_dims",
    "check_dtypes",
    "check_kernel",
    "convert_experts_module",
    "convert_found",
    "convert_model",
    "find_experts",
    "parent_module",
    "unconvert_experts_module",
]

def check_kernel(kernel: str) -> str:
    """Return ``kernel`` if convert_model knows it, else raise ValueError naming the choices."""
    if kernel not in (KERNEL_AUTO, KERNEL_TRITON):
        try:
            get_kernel(kernel)
        except ValueError:
            raise ValueError(
                f"unknown kernel {kernel!r}: use 'auto', 'triton' (fused SM90 experts) or a per-GEMM kernel "
                f"({', '.join(repr(k) for k in kernel_names() if k != KERNEL_AUTO)})"
            ) from None
    return kernel


def _matches(fqn: str, module: nn.Module, filter_fqns: FilterLike) -> bool:
    if filter_fqns is None:
        return True
    if callable(filter_fqns):
        return bool(filter_fqns(fqn, module))
    return any(f in fqn for f in filter_fqns)


def find_experts(model: nn.Module, filter_fqns: FilterLike = None):
    """The routed-experts modules of ``model`` that ``filter_fqns`` selects (see
    :func:`convert_model`), as ``[(fqn, module, adapter)]`` in ``named_modules`` order.

    Raises:
        TypeError: a selected module of a known framework's experts class but of no
            adapter's layout (named, with why).
    """
    found = []
    for fqn, module in model.named_modules():
        adapter = find_adapter(module)
        unsupported = unsupported_experts(module) if adapter is None else None
        # the filter is asked about experts modules only (a callable never sees the rest)
        if (adapter is None and not unsupported) or not _matches(fqn, module, filter_fqns):
            continue
        if unsupported:
            raise TypeError(
                f"convert_model cannot convert {fqn or '<root>'}: it is {unsupported}. Leave it out with filter_fqns."
            )
        found.append((fqn, module, adapter))
    return found


def convert_model(
    model: nn.Module,
    recipe: RecipeLike,
    *,
    filter_fqns: FilterLike = None,
    kernel: str = "auto",
) -> nn.Module:
    """Swap every routed-experts module of ``model`` to the recipe's grouped GEMMs, in place.

    Finds the experts of every family in ``moeq.integrations.ADAPTERS``: moeq
    ``GroupedExperts`` (also inside ``moeq.MoE``), transformers 5.x experts modules
    (``@use_experts_implementation``: Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, GPT-OSS, ...)
    and torchtitan's (0.3 ``GroupedExperts`` and ``GptOssGroupedExperts``, 0.2.x
    ``GroupedExperts``). Routers, shared experts, attention and embeddings are left
    alone. Converting again to the same recipe is a no-op; converting to another recipe
    switches it. For torchtitan models, ``moeq.torchtitan`` converts at config time.

    Args:
        model: any nn.Module.
        recipe: ``"bf16"``, ``"fp8"``, ``"mxfp8"`` or a QuantizationType.
        filter_fqns: None (all experts), a substring of module FQNs to convert (a str
            is one substring), a list of them, or ``f(fqn, module) -> bool``.
        kernel: ``"auto"`` (fastest path the device runs), ``"emulated"`` (plain-torch
            quantization numerics, any device), ``"triton"`` (fused Hopper
            kernels; SM90 only), or a per-GEMM kernel from
            ``moeq.ops.registry.kernel_names()``.
    Returns:
        ``model``, with ``model.moeq_converted_fqns`` listing the converted modules.
    Raises:
        ValueError: unknown recipe or kernel, nothing matched, or a dim not divisible by
            the recipe's alignment (names the module, the dim and the multiple).
        TypeError: an experts module of a layout moeq does not know or cannot convert
            (torchtitan's fused ``w13``, Doge's vector experts), or an expert weight
            dtype moeq's GEMMs do not take (float16): each names the module and why.
    """
    filter_fqns = check_convert_args(model, filter_fqns)  # a str is one FQN substring
    qtype = parse_recipe(recipe)
    check_kernel(kernel)
    found = find_experts(model, filter_fqns)
    if not found:
        what = "routed-experts modules" if filter_fqns is None else f"experts modules matching filter_fqns={filter_fqns!r}"
        raise ValueError(
            f"convert_model found no {what} in {type(model).__name__}: it converts {family_names()}"
        )
    convert_found(model, found, qtype, kernel)
    return model


def convert_found(model: nn.Module, found, qtype: QuantizationType, kernel: str) -> None:
    """Convert the modules :func:`find_experts` returned, all or none: every one is checked
    (:func:`check_convertible`) before any changes. Sets ``model.moeq_converted_fqns``."""
    for fqn, module, adapter in found:
        check_convertible(fqn, adapter, module, qtype)
    for fqn, module, adapter in found:
        incoming = adapter.incoming_alignment(module, parent_module(model, fqn))
        convert_experts_module(module, qtype, kernel, adapter=adapter, fqn=fqn, incoming_alignment=incoming)
    model.moeq_converted_fqns = [fqn for fqn, _, _ in found]
