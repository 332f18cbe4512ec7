"""``moeq.convert_model``: swap routed experts to FP8 / MXFP8 / BF16 grouped GEMMs.

Conversion changes a module's class (to a subclass made by its family's adapter,
moeq/integrations/) and sets a few plain attributes; parameters, their dtypes and
state_dict keys are untouched, so checkpoints load both ways and optimizers built before
conversion keep working. The converted forward reads the module's parameters on every
call, so a parallelizer may still replace them (DTensor shards) afterwards.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from torch import nn

from moeq.converted import ConvertedExperts
from moeq.integrations import family_names, find_adapter, unsupported_experts
from moeq.integrations.base import ExpertsAdapter, original_class
from moeq.quant.dispatch import KERNEL_AUTO, KERNEL_TRITON, get_kernel, kernel_names
from moeq.recipes import QuantizationType, RecipeLike, group_alignment, parse_recipe
from moeq.validation import check_convert_args

FilterLike = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

__all__ = ["ConvertedExperts", "FilterLike", "check_dims", "check_kernel", "convert_experts_module", "convert_model"]


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


def check_dims(fqn: str, adapter: ExpertsAdapter, module: nn.Module, qtype: QuantizationType) -> None:
    """Raise ValueError (naming the module, the dim and the multiple) if a contraction dim
    of ``module`` (``adapter.dims``) is not a multiple of the recipe's alignment."""
    multiple = group_alignment(qtype)
    if multiple is None:
        return
    for name, size in adapter.dims(module).items():
        if size % multiple:
            raise ValueError(
                f"cannot convert {fqn or '<root>'} to {qtype.value}: its {name} is {size}, not a multiple of "
                f"{multiple} (the {qtype.value} GEMMs need every contraction dim to be one). Leave this module "
                f"out with filter_fqns, or use recipe='bf16'."
            )


def _matches(fqn: str, module: nn.Module, filter_fqns: FilterLike) -> bool:
    if filter_fqns is None:
        return True
    if callable(filter_fqns):
        return bool(filter_fqns(fqn, module))
    return any(f in fqn for f in filter_fqns)


def _parent(model: nn.Module, fqn: str) -> Optional[nn.Module]:
    if not fqn:
        return None
    parent_fqn = fqn.rpartition(".")[0]
    return model.get_submodule(parent_fqn) if parent_fqn else model


def convert_experts_module(
    module: nn.Module,
    qtype: QuantizationType,
    kernel: str,
    *,
    adapter: ExpertsAdapter,
    fqn: str = "",
    incoming_alignment: Optional[int] = None,
) -> nn.Module:
    """Convert one experts module in place (its family's adapter given).

    Args:
        module: an experts module ``adapter.matches``.
        qtype: the recipe. kernel: a kernel choice accepted by :func:`check_kernel`.
        fqn: its name, for messages.
        incoming_alignment: what its caller guarantees about the token groups it hands
            over (``adapter.incoming_alignment``), stored as ``moeq_incoming_alignment``.
    Returns:
        ``module``, now an instance of ``adapter.converted_class(original class)``.
    Raises:
        ValueError: a contraction dim not divisible by the recipe's alignment.
    """
    check_dims(fqn, adapter, module, qtype)
    module.__class__ = adapter.converted_class(original_class(module))
    module.moeq_recipe = qtype
    module.moeq_kernel = kernel
    module.group_alignment = group_alignment(qtype)
    module.moeq_incoming_alignment = incoming_alignment
    return module


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
            ``moeq.quant.dispatch.kernel_names()``.
    Returns:
        ``model``, with ``model.moeq_converted_fqns`` listing the converted modules.
    Raises:
        ValueError: unknown recipe or kernel, nothing matched, or a dim not divisible by
            the recipe's alignment (names the module, the dim and the multiple).
        TypeError: a torchtitan experts module of a layout moeq does not know (named).
    """
    filter_fqns = check_convert_args(model, filter_fqns)  # a str is one FQN substring
    qtype = parse_recipe(recipe)
    check_kernel(kernel)
    found = []
    for fqn, module in model.named_modules():
        adapter = find_adapter(module)
        # the filter is asked about experts modules only (a callable never sees the rest)
        if (adapter is None and not unsupported_experts(module)) or not _matches(fqn, module, filter_fqns):
            continue
        if adapter is not None:
            found.append((fqn, module, adapter))
        elif unsupported_experts(module):
            raise TypeError(
                f"convert_model cannot convert {fqn or '<root>'}: it is {unsupported_experts(module)}. "
                f"Leave it out with filter_fqns."
            )
    if not found:
        what = "routed-experts modules" if filter_fqns is None else f"experts modules matching filter_fqns={filter_fqns!r}"
        raise ValueError(
            f"convert_model found no {what} in {type(model).__name__}: it converts {family_names()}"
        )
    # Check every module before changing any: a failed conversion leaves the model as it was.
    for fqn, module, adapter in found:
        check_dims(fqn, adapter, module, qtype)
    for fqn, module, adapter in found:
        incoming = adapter.incoming_alignment(module, _parent(model, fqn))
        convert_experts_module(module, qtype, kernel, adapter=adapter, fqn=fqn, incoming_alignment=incoming)
    model.moeq_converted_fqns = [fqn for fqn, _, _ in found]
    return model
