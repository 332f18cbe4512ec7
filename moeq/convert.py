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
from moeq.quant.grouped_mm import INPUT_DTYPES
from moeq.recipes import QuantizationType, RecipeLike, group_alignment, parse_recipe
from moeq.validation import check_convert_args

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

# Attributes a conversion sets on a module (ConvertedExperts' per-instance attributes).
_CONVERSION_ATTRS = ("moeq_recipe", "moeq_kernel", "group_alignment", "moeq_incoming_alignment")


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


def check_dtypes(fqn: str, adapter: ExpertsAdapter, module: nn.Module, qtype: QuantizationType) -> None:
    """Raise TypeError (naming the module, the tensor, its dtype and the supported ones) if
    an expert weight of ``module`` (``adapter.local_weights``) has a dtype moeq's grouped
    GEMMs do not take (float16, float64, ...): refused here rather than at the first
    forward."""
    for name, weight in adapter.local_weights(module).items():
        if weight.dtype not in INPUT_DTYPES:
            supported = " or ".join(str(d).removeprefix("torch.") for d in INPUT_DTYPES)
            raise TypeError(
                f"cannot convert {fqn or '<root>'} to {qtype.value}: its expert weight {name} is "
                f"{str(weight.dtype).removeprefix('torch.')}, and moeq's grouped GEMMs take {supported} weights. "
                f"Cast the model first (model.to(torch.bfloat16)), or leave this module out with filter_fqns."
            )


def check_convertible(fqn: str, adapter: ExpertsAdapter, module: nn.Module, qtype: QuantizationType) -> None:
    """Every check a conversion makes before changing anything: the family's own
    (``adapter.unconvertible``, TypeError), the dims (:func:`check_dims`, ValueError) and
    the weight dtypes (:func:`check_dtypes`, TypeError). Each error names the module."""
    reason = adapter.unconvertible(module)
    if reason:
        raise TypeError(f"cannot convert {fqn or '<root>'} ({type(module).__name__}): {reason}")
    check_dims(fqn, adapter, module, qtype)
    check_dtypes(fqn, adapter, module, qtype)


def _matches(fqn: str, module: nn.Module, filter_fqns: FilterLike) -> bool:
    if filter_fqns is None:
        return True
    if callable(filter_fqns):
        return bool(filter_fqns(fqn, module))
    return any(f in fqn for f in filter_fqns)


def parent_module(model: nn.Module, fqn: str) -> Optional[nn.Module]:
    """The module holding ``model``'s submodule ``fqn`` (None for the root itself)."""
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
        TypeError: an expert weight dtype moeq does not take, or a module its family
            cannot convert (``adapter.unconvertible``).
    """
    check_convertible(fqn, adapter, module, qtype)
    module.__class__ = adapter.converted_class(original_class(module))
    module.moeq_recipe = qtype
    module.moeq_kernel = kernel
    module.group_alignment = group_alignment(qtype)
    module.moeq_incoming_alignment = incoming_alignment
    return module


def unconvert_experts_module(module: nn.Module, fqn: str = "") -> nn.Module:
    """Undo :func:`convert_experts_module` in place: ``module`` gets its original class
    back and loses the conversion's attributes, so it computes exactly as before
    conversion (its parameters were never touched). A module that is not converted is
    returned as it is.

    Raises:
        RuntimeError: the module is sharded by ``moeq.apply_expert_parallel`` (its
            original forward cannot run on the shards).
    """
    if not isinstance(module, ConvertedExperts):
        return module
    if getattr(module, "moeq_expert_dispatcher", None) is not None:
        raise RuntimeError(
            f"cannot switch {fqn or '<root>'} back to its own implementation: moeq.apply_expert_parallel "
            f"sharded its experts, and only moeq's converted forward runs on the shards. Switch before "
            f"applying expert parallelism, or rebuild the model."
        )
    module.__class__ = original_class(module)
    for name in _CONVERSION_ATTRS:
        module.__dict__.pop(name, None)
    return module


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
    linears=False,
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
        linears: also put the dense ``nn.Linear`` layers (attention projections, shared
            experts, dense MLPs) in the recipe, through torchao's own training linears:
            False (default: experts only), True (moeq's default choice: no lm_head,
            router gates, tied weights, odd dims, or linears too small to gain), or
            ``f(fqn, module) -> bool`` among those the safety skips leave. See
            ``moeq.integrations.torchao_linears.convert_linears``.
    Returns:
        ``model``, with ``model.moeq_converted_fqns`` listing the converted modules
        (and, when ``linears`` is not False, ``model.moeq_linears``: a
        ``moeq.linears_plan.LinearsPlan`` naming each linear's class or skip reason).
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
    if linears is not False:
        from moeq.integrations.torchao_linears import plan_linears

        plan_linears(model, qtype, linears, kernel=kernel)  # a bad ``linears`` fails before anything changes
    convert_found(model, found, qtype, kernel)
    if linears is not False:
        from moeq.integrations.torchao_linears import convert_linears

        convert_linears(model, qtype, linears, kernel=kernel)
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
