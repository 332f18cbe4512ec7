"""Dense ``nn.Linear`` layers (attention projections, shared experts, dense MLPs) through
torchao's own training linears, with moeq's safe default skips.

* fp8: ``torchao.float8.convert_to_float8_training`` with
  ``Float8LinearConfig.from_recipe_name("rowwise")`` (torchao's ``Float8Linear``;
  ``emulate=True`` where the device has no FP8 GEMMs: CPU, CUDA below SM89).
* mxfp8: torchao's ``MXFP8Linear`` (``torchao.prototype.moe_training.mxfp8_linear``, the
  class torchtitan's MXFP8 linear converter builds), swapped in with torchao's
  ``swap_linear_layers``; ``KernelPreference.AUTO`` on SM100+, ``EMULATED`` elsewhere.
* bf16: nothing changes.

Both keep the module's own ``weight`` / ``bias`` Parameters (same objects, same names),
so state_dict keys, tied weights and optimizers built before conversion are unchanged.
Module hooks registered on a swapped linear do not carry over (torchao builds a new module).

The one moeq module that imports torchao's linear training code.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, List, Optional, Set, Tuple, Union

import torch
from torch import nn

from moeq.integrations import find_adapter
from moeq.integrations.torchao.linears_plan import LinearDecision, LinearsPlan
from moeq.ops.device import DeviceInfo, device_info
from moeq.ops.registry import KERNEL_EMULATED, EmulatedKernelWarning
from moeq.numerics.recipes import QuantizationType, RecipeLike, group_alignment, parse_recipe

__all__ = ["MIN_FEATURES", "LinearsLike", "convert_linears", "plan_linears", "too_small"]

LinearsLike = Union[bool, Callable[[str, nn.Module], bool]]

# The default ``linears=True`` leaves out a linear whose smaller side is under this. A
# GEMM (T, K) x (K, N) moves about 2*T*(K + N) bytes for 2*T*K*N flops, so however many
# tokens T, its arithmetic intensity is at most K*N / (K + N) flop/byte: under 256 when
# min(K, N) < 512. An H100's ridge point is ~295 flop/byte (989 dense bf16 TFLOP/s over
# 3.35 TB/s), so such a GEMM is memory-bound in bf16 already; FP8 halves only its compute
# and adds the quantization passes' traffic, a net loss. (torchao's own rowwise heuristic,
# measured on H100, is stricter: it skips N <= 2048, K <= 1024, and N <= 4096 with
# K <= 2048; pass a callable to ``linears`` to use another rule.)
MIN_FEATURES = 512

# Names of the output projection (transformers ``lm_head``, torchtitan ``output``, moeq's
# ``head``) and of router linears (moeq ``TopKRouter.gate``, torchtitan ``router.gate``).
_HEAD_NAMES = frozenset({"lm_head", "output", "head"})
_ROUTER_NAMES = frozenset({"gate", "router"})


def too_small(module: nn.Linear) -> Optional[str]:
    """Why the default rule leaves ``module`` out as too small to gain (None if it is not)."""
    k, n = module.in_features, module.out_features
    if min(k, n) < MIN_FEATURES:
        return (
            f"too small to gain: min(in, out) = {min(k, n)} < MIN_FEATURES = {MIN_FEATURES} (memory-bound GEMM)"
        )
    return None


def _check_linears(linears) -> LinearsLike:
    if isinstance(linears, bool) or callable(linears):
        return linears
    raise TypeError(
        f"linears must be True, False or a callable f(fqn, module) -> bool, got {type(linears).__name__} "
        f"{linears!r}: pass True for moeq's default choice of dense linears"
    )


class _ModelFacts:
    """What the skip rules need to know about the whole model, read once."""

    def __init__(self, model: nn.Module):
        self.experts_prefixes: Tuple[str, ...] = tuple(
            f"{fqn}." for fqn, m in model.named_modules() if fqn and find_adapter(m) is not None
        )
        self.embedding_weights: Set[int] = {
            id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
        }
        self.output_embeddings: Set[int] = set()
        for m in model.modules():
            get = getattr(m, "get_output_embeddings", None)  # transformers PreTrainedModel
            if callable(get):
                try:
                    out = get()
                except (AttributeError, NotImplementedError):
                    out = None
                if isinstance(out, nn.Module):
                    self.output_embeddings.add(id(out))
        self.router_prefixes: Tuple[str, ...] = tuple(
            f"{fqn}." for fqn, m in model.named_modules()
            if fqn and ("router" in type(m).__name__.lower() or fqn.rsplit(".", 1)[-1] == "router")
        )


def _hard_skip(fqn: str, module: nn.Linear, facts: _ModelFacts, qtype: QuantizationType) -> Optional[str]:
    """Why ``module`` must stay as it is whatever the user's filter says, or None."""
    if fqn.startswith(facts.experts_prefixes):
        return "part of a routed-experts module (moeq's experts conversion owns it)"
    name = fqn.rsplit(".", 1)[-1]
    if id(module) in facts.output_embeddings or name in _HEAD_NAMES:
        return "output projection (lm_head): the logits stay in high precision"
    if id(module.weight) in facts.embedding_weights:
        return "weight tied to an input embedding"
    if name in _ROUTER_NAMES or fqn.startswith(facts.router_prefixes):
        return "router gate: routing decisions stay in high precision"
    multiple = group_alignment(qtype)
    if multiple and (module.in_features % multiple or module.out_features % multiple):
        return (
            f"in/out features {module.in_features}/{module.out_features} not multiples of {multiple} "
            f"({qtype.value} GEMMs need them)"
        )
    return None


def _runs_natively(qtype: QuantizationType, info: DeviceInfo) -> bool:
    if not info.nvidia_cuda:
        return False
    if qtype is QuantizationType.FP8:
        return info.capability >= (8, 9)  # torch._scaled_mm FP8 (torchao.float8's requirement)
    return info.capability >= (10, 0)  # MXFP8 block-scaled GEMMs: SM100+


def _target_device(model: nn.Module) -> torch.device:
    """The device the converted linears will run on: their weights', or CUDA for a meta model."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _backend(qtype: QuantizationType, kernel: str, info: DeviceInfo) -> Tuple[str, bool]:
    if qtype is QuantizationType.BF16:
        return "none (bf16 recipe: linears unchanged)", False
    emulated = kernel == KERNEL_EMULATED or not _runs_natively(qtype, info)
    what = "torchao Float8Linear (rowwise)" if qtype is QuantizationType.FP8 else "torchao MXFP8Linear"
    return f"{what}, {'emulated' if emulated else 'native'} on {info}", emulated


def plan_linears(
    model: nn.Module, recipe: RecipeLike, linears: LinearsLike = True, *, kernel: str = "auto"
) -> LinearsPlan:
    """Decide, without changing anything, which ``nn.Linear`` layers of ``model`` a
    conversion to ``recipe`` would put in low precision (see :func:`convert_linears`)."""
    qtype = parse_recipe(recipe)
    linears = _check_linears(linears)
    backend, emulated = _backend(qtype, kernel, device_info(_target_device(model)))
    facts = _ModelFacts(model)
    target = _target_class(qtype) if qtype is not QuantizationType.BF16 and linears is not False else None
    decisions: List[LinearDecision] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reason = None
        if qtype is QuantizationType.BF16:
            reason = "bf16 recipe: linears stay as they are"
        elif linears is False:
            reason = "linears=False"
        else:
            reason = _hard_skip(fqn, module, facts, qtype)
            if reason is None and linears is True:
                reason = too_small(module)
            elif reason is None and not linears(fqn, module):
                reason = "left out by the linears filter"
        if reason is None and type(module) is not nn.Linear and not isinstance(module, target):
            reason = (
                f"a {type(module).__module__}.{type(module).__qualname__}, not a plain nn.Linear: convert it through "
                f"its framework (torchtitan: its Float8LinearConverter / MXFP8LinearConverter, docs/torchtitan.md)"
            )
        decisions.append(LinearDecision(fqn, module.in_features, module.out_features,
                                        converted_to=target if reason is None else None, skip_reason=reason))
    return LinearsPlan(qtype.value, backend, emulated, tuple(decisions))


def _target_class(qtype: QuantizationType) -> type:
    if qtype is QuantizationType.FP8:
        from torchao.float8.float8_linear import Float8Linear

        return Float8Linear
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear

    return MXFP8Linear


def convert_linears(
    model: nn.Module, recipe: RecipeLike, linears: LinearsLike = True, *, kernel: str = "auto"
) -> LinearsPlan:
    """Swap ``model``'s dense ``nn.Linear`` layers to torchao's training linear of ``recipe``, in place.

    Args:
        model: any nn.Module (its routed experts, converted or not, are left to moeq).
        recipe: "fp8" (torchao ``Float8Linear``, rowwise), "mxfp8" (torchao
            ``MXFP8Linear``) or "bf16" (nothing changes).
        linears: True: every linear but the skips below, and those too small to gain
            (:func:`too_small`); a callable ``f(fqn, module) -> bool``: the linears it
            selects among those the skips leave; False: none.
            Always skipped: linears inside routed-experts modules, the output projection
            (``lm_head`` / ``output`` / ``head`` / transformers' output embeddings),
            weights tied to an embedding, router gates (``*.gate``, ``*.router``, anything
            under a ``*Router`` module), in/out features not multiples of the recipe's
            alignment (16 fp8, 32 mxfp8).
        kernel: ``"emulated"`` emulates the low-precision GEMMs anywhere; anything else
            runs them natively where the device can (fp8: CUDA SM89+; mxfp8: SM100+) and
            emulated elsewhere, with an ``EmulatedKernelWarning`` on a GPU. Decided once,
            here, from the device the weights are on (convert after ``model.to("cuda")``).
    Returns:
        the :class:`~moeq.integrations.torchao.linears_plan.LinearsPlan`, also set as ``model.moeq_linears``.
    Raises:
        TypeError: ``linears`` is not a bool or a callable.
    """
    qtype = parse_recipe(recipe)
    plan = plan_linears(model, qtype, linears, kernel=kernel)
    todo = {d.fqn for d in plan.decisions if d.converted_to is not None}
    todo -= {fqn for fqn, m in model.named_modules() if fqn in todo and type(m) is not nn.Linear}  # done before
    if todo:
        info = device_info(_target_device(model))
        if plan.emulated and info.type != "cpu" and kernel != KERNEL_EMULATED:
            warnings.warn(
                f"moeq: the {qtype.value} dense linears run emulated on {info} ({plan.backend}): slower than bf16. "
                f"Native {qtype.value} linears need "
                f"{'an NVIDIA GPU of SM89 or newer' if qtype is QuantizationType.FP8 else 'an NVIDIA SM100+ GPU'}; "
                f"pass kernel='emulated' to choose emulation explicitly (no warning), or linears=False.",
                EmulatedKernelWarning,
                stacklevel=3,
            )
        selected = lambda module, fqn: fqn in todo  # noqa: E731  (torchao's filter order)
        if qtype is QuantizationType.FP8:
            _to_float8(model, selected, plan.emulated)
        else:
            _to_mxfp8(model, selected, plan.emulated)
    model.moeq_linears = plan
    return plan


def _to_float8(model: nn.Module, selected, emulated: bool) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name("rowwise")
    if emulated:
        config = dataclasses.replace(config, emulate=True)
    convert_to_float8_training(model, module_filter_fn=selected, config=config)


def _to_mxfp8(model: nn.Module, selected, emulated: bool) -> None:
    from torchao.float8.float8_linear_utils import swap_linear_layers
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    preference = KernelPreference.EMULATED if emulated else KernelPreference.AUTO

    def from_linear(linear: nn.Linear) -> nn.Module:
        # as torchao's Float8Linear.from_float: an empty module that takes over the Parameters
        with torch.device("meta"):
            new = MXFP8Linear(linear.in_features, linear.out_features, bias=False, kernel_preference=preference)
        new.weight = linear.weight
        new.bias = linear.bias
        return new.train(linear.training)

    swap_linear_layers(model, from_linear, module_filter_fn=selected)
