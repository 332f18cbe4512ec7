"""moeq in transformers' own experts switch: ``experts_implementation="moeq_bf16" |
"moeq_fp8" | "moeq_mxfp8"``.

    import moeq                      # registers the three names (see below)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moeq_mxfp8")
    model.set_experts_implementation("grouped_mm")    # back to transformers' own kernels

What :func:`register_experts_implementations` does (once; ``import moeq`` runs its two
parts as soon as transformers imports ``transformers.integrations.moe`` and
``transformers.modeling_utils``, or at once if they already are):

* :func:`register_experts_functions` registers the names in
  ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``, so ``from_pretrained``,
  ``from_config`` and ``set_experts_implementation`` accept them;
* :func:`wrap_pretrained_model` wraps ``PreTrainedModel.post_init`` and
  ``PreTrainedModel.set_experts_implementation``
  so that the choice reaches every experts module (:func:`apply_experts_implementation`):
  while a model's config names a moeq implementation, each experts module it governs is
  converted exactly as ``moeq.convert_model(model, recipe)`` (kernel ``"auto"``) converts
  it, with the same checks (dims, dtypes: a float64 model is refused when it is built or
  switched); when the config names any other implementation, converted modules get their
  original class back, so they compute bitwise as the unconverted model. This also
  undoes ``convert_model``: after it, ``set_experts_implementation("grouped_mm")`` really
  switches. The families without ``@use_experts_implementation`` (Llama 4, DBRX,
  JetMoE, ...), which transformers' own switch does not reach, are converted too;
* writes the choice into the config as ``experts_implementation`` (a key transformers'
  config reads back), so ``save_pretrained`` keeps it and ``from_pretrained`` returns a
  converted model. Other implementations leave no key.

The registered functions themselves run only for a ``@use_experts_implementation``
module asking for moeq while not converted (built outside a ``PreTrainedModel``): they
convert it, then run it. transformers is imported only inside these functions.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterator, List, Optional, Tuple

from torch import nn

from moeq.integrations.versions import moved_internal
from moeq.ops.registry import KERNEL_AUTO
from moeq.numerics.recipes import QuantizationType

# The experts_implementation names, one per recipe (recipe names live in moeq.numerics.recipes).
IMPLEMENTATIONS: Dict[str, QuantizationType] = {f"moeq_{q.value}": q for q in QuantizationType}

# The config key the choice is saved under: transformers' config constructor reads it.
CONFIG_KEY = "experts_implementation"

_WRAPPED = "_moeq_wraps"  # marks a wrapped transformers method (registration is idempotent)

__all__ = ["IMPLEMENTATIONS", "apply_experts_implementation", "implementation_recipe",
           "register_experts_functions", "register_experts_implementations", "wrap_pretrained_model"]


def implementation_recipe(name) -> Optional[QuantizationType]:
    """The recipe of a moeq experts implementation name (``"moeq_mxfp8"``), else None."""
    return IMPLEMENTATIONS.get(name) if isinstance(name, str) else None


def _experts_forward(qtype: QuantizationType):
    def forward(module: nn.Module, *args, **kwargs):
        from moeq.integrations.conversion import convert_experts_module
        from moeq.integrations import find_adapter

        adapter = find_adapter(module)
        if adapter is None:
            raise TypeError(
                f"experts_implementation='moeq_{qtype.value}' cannot run {type(module).__name__}: moeq does not "
                f"know its layout. Use another experts_implementation for it."
            )
        convert_experts_module(module, qtype, KERNEL_AUTO, adapter=adapter, fqn=type(module).__name__)
        return module.forward(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = f"moeq_{qtype.value}_experts_forward"
    forward.__doc__ = (
        f"transformers experts forward for experts_implementation='moeq_{qtype.value}': converts the module "
        f"(recipe {qtype.value}, kernel 'auto') and runs it."
    )
    return forward


def _configs(config) -> Iterator:
    """``config`` and its sub-configs, recursively."""
    yield config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and sub is not config:
            yield from _configs(sub)


def _names_moeq(config) -> bool:
    return any(implementation_recipe(getattr(c, "_experts_implementation", None)) for c in _configs(config))


def _governed_experts(model: nn.Module) -> List[Tuple[str, nn.Module, object, object, Optional[object], Optional[str]]]:
    """``[(fqn, module, config, owner, adapter, unsupported_reason)]`` of every experts
    module, with the config that chooses its implementation (its own ``config``:
    transformers' decorated experts keep one; else that of ``owner``, the nearest
    enclosing ``PreTrainedModel``)."""
    from transformers import PreTrainedModel

    from moeq.integrations import find_adapter, unsupported_experts

    found = []

    def walk(module: nn.Module, prefix: str, owner) -> None:
        if isinstance(module, PreTrainedModel):
            owner = module
        adapter = find_adapter(module)
        reason = unsupported_experts(module) if adapter is None else None
        if adapter is not None or reason:
            own = getattr(module, "config", None)
            config = own if own is not None else getattr(owner, "config", None)
            found.append((prefix, module, config, owner, adapter, reason))
            return
        for name, child in module.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name, owner)

    walk(model, "", None)
    return found


def _pretrained_configs(model: nn.Module) -> List:
    """Every config of ``model``'s ``PreTrainedModel`` parts (sub-configs included), once."""
    from transformers import PreTrainedModel

    seen, configs = set(), []
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for config in _configs(module.config):
                if id(config) not in seen:
                    seen.add(id(config))
                    configs.append(config)
    return configs


def apply_experts_implementation(model: nn.Module, requested=None) -> None:
    """Make every experts module of ``model`` compute what its config's
    ``_experts_implementation`` names: a moeq implementation converts it (recipe of the
    name, kernel ``"auto"``, as ``convert_model``), any other gives a converted module
    its original class back. Writes or removes the ``experts_implementation`` config key
    (what save_pretrained keeps) and updates ``model.moeq_converted_fqns``.

    Args:
        model: a transformers model (or a module holding some).
        requested: the argument of the ``set_experts_implementation`` call that led here,
            or None. transformers leaves the configs of models without
            ``@use_experts_implementation`` (Llama 4, DBRX, ...) unchanged; a str
            ``requested`` is written into every config of such a model.
    Raises:
        TypeError / ValueError: as convert_model, for a module a moeq implementation
            cannot convert (named); nothing is changed then.
        RuntimeError: switching a module sharded by moeq.apply_expert_parallel back.
    """
    from moeq.integrations.conversion import check_convertible, convert_experts_module, parent_module, unconvert_experts_module

    found = _governed_experts(model)
    if isinstance(requested, str) and any(
        owner is not None and not type(owner)._can_set_experts_implementation() for *_, owner, _, _ in found
    ):
        for config in _pretrained_configs(model):
            config._experts_implementation_internal = requested
    to_convert = []
    for fqn, module, config, _, adapter, reason in found:
        qtype = implementation_recipe(getattr(config, "_experts_implementation", None))
        if qtype is None:
            continue
        if reason:
            raise TypeError(
                f"experts_implementation='moeq_{qtype.value}' cannot convert {fqn or '<root>'}: it is {reason}. "
                f"Use another experts_implementation for this model, or convert_model with filter_fqns."
            )
        check_convertible(fqn, adapter, module, qtype)
        to_convert.append((fqn, module, adapter, qtype))
    converting = {id(m) for _, m, _, _ in to_convert}
    for fqn, module, *_ in found:
        if id(module) not in converting:
            unconvert_experts_module(module, fqn)
    for fqn, module, adapter, qtype in to_convert:
        incoming = adapter.incoming_alignment(module, parent_module(model, fqn))
        convert_experts_module(module, qtype, KERNEL_AUTO, adapter=adapter, fqn=fqn, incoming_alignment=incoming)
    _record_choice(model)
    if to_convert:
        model.moeq_converted_fqns = [fqn for fqn, _, _, _ in to_convert]
    else:
        model.__dict__.pop("moeq_converted_fqns", None)


def _record_choice(model: nn.Module) -> None:
    """The ``experts_implementation`` config key, on every config of the model naming a
    moeq implementation (removed from the others)."""
    for config in _pretrained_configs(model):
        name = getattr(config, "_experts_implementation", None)
        if implementation_recipe(name):
            config.__dict__[CONFIG_KEY] = name
        else:
            config.__dict__.pop(CONFIG_KEY, None)


def _implementations(model: nn.Module) -> List[Tuple[object, Optional[str]]]:
    """(config, the experts implementation it names) for every config of ``model``."""
    return [(c, c.__dict__.get("_experts_implementation_internal")) for c in _pretrained_configs(model)]


def _after(method, hook, *, restore_configs: bool):
    """``method`` followed by ``hook(self, *args)``, marked as moeq's wrapper. With
    ``restore_configs``, a failing hook first gives the configs back the
    implementations they had before the call (the hook changes no module when it fails),
    so a refused switch leaves the model as it was."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        before = _implementations(self) if restore_configs else []
        out = method(self, *args, **kwargs)
        try:
            hook(self, *args, **kwargs)
        except BaseException:
            for config, name in before:
                config._experts_implementation_internal = name
            raise
        return out

    setattr(wrapper, _WRAPPED, True)
    return wrapper


def _after_post_init(model) -> None:
    if _names_moeq(model.config):
        apply_experts_implementation(model)


def _after_set(model, experts_implementation) -> None:
    apply_experts_implementation(model, experts_implementation)


def register_experts_functions() -> None:
    """Register ``moeq_bf16`` / ``moeq_fp8`` / ``moeq_mxfp8`` in
    ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` (idempotent)."""
    try:
        from transformers.integrations.moe import ExpertsInterface

        register = ExpertsInterface.register
    except (ImportError, AttributeError) as e:
        raise moved_internal("transformers", "transformers.integrations.moe.ExpertsInterface.register", e) from e
    for name, qtype in IMPLEMENTATIONS.items():
        register(name, _experts_forward(qtype))


def wrap_pretrained_model() -> None:
    """Wrap ``PreTrainedModel.post_init`` / ``set_experts_implementation`` so a choice
    reaches every experts module (:func:`apply_experts_implementation`). Idempotent."""
    try:
        from transformers.modeling_utils import PreTrainedModel

        methods = {name: getattr(PreTrainedModel, name) for name in ("post_init", "set_experts_implementation")}
    except (ImportError, AttributeError) as e:
        raise moved_internal(
            "transformers", "PreTrainedModel.post_init / set_experts_implementation (transformers.modeling_utils)", e
        ) from e
    # a failed post_init fails the model's construction: nothing to restore there
    for name, hook, restore in (("post_init", _after_post_init, False), ("set_experts_implementation", _after_set, True)):
        method = methods[name]
        if not getattr(method, _WRAPPED, False):
            setattr(PreTrainedModel, name, _after(method, hook, restore_configs=restore))


def register_experts_implementations() -> None:
    """Both of the above (see the module docstring). ``import moeq`` runs each as soon as
    transformers imports the module it needs, so a user never needs to call this."""
    register_experts_functions()
    wrap_pretrained_model()
