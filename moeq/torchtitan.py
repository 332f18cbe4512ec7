"""moeq for torchtitan 0.3: FP8 / MXFP8 routed experts from one line of torchtitan config.

Two routes, both working on torchtitan's model config tree before anything is built, so
torchtitan builds the converted experts itself (meta device, ``init_states``,
parallelize, per-block ``torch.compile``) and later swaps their weights for DTensor
shards without leaving anything stale:

* a model converter, in a ``config_registry`` function or your own script::

      import moeq.torchtitan
      model_spec = model_registry("debugmodel", converters=[moeq.torchtitan.Converter.Config(recipe="mxfp8")])

* an ``@override`` factory, on the command line of any stock config::

      --override.imports moeq.torchtitan.mxfp8      # or moeq.torchtitan.fp8, moeq.torchtitan.bf16
      --override.imports 'moeq.torchtitan.mxfp8={"kernel": "emulated"}'

Every ``GroupedExperts.Config`` (deepseek_v3, qwen3 MoE, llama4, ... and gpt_oss's
``GptOssGroupedExperts.Config``) becomes a config subclass that builds the same module
and converts it with ``moeq.convert_model``'s machinery (moeq/integrations/torchtitan/experts.py
says what the converted forward does). Parameter names, ``param_init``,
``sharding_config`` and state_dict keys are the stock ones. When the routed experts'
token dispatcher pads groups (``TorchAOTokenDispatcher`` / HybridEP ``pad_multiple``),
the experts are told, and pad again only if the recipe needs a larger alignment.

This is the one moeq module that imports torchtitan.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch
from torchtitan.components.quantization import QuantizationConverter
from torchtitan.components.quantization.utils import swap_token_dispatcher
from torchtitan.config import override
from torchtitan.models.common.moe import GroupedExperts, RoutedExperts

from moeq.convert import check_dims, check_kernel, convert_experts_module
from moeq.integrations import find_adapter
from moeq.integrations.torchtitan.experts import TORCHTITAN_ADAPTERS, dispatcher_alignment, unknown_torchtitan_experts
from moeq.numerics.recipes import RecipeLike, group_alignment, parse_recipe

__all__ = ["Converter", "bf16", "convert_model_config", "fp8", "moeq_experts_config", "mxfp8"]


def _stock_config_class(config_cls: type) -> type:
    """The torchtitan experts Config class a (possibly moeq) experts Config class builds."""
    return getattr(config_cls, "moeq_stock_config", config_cls)


@functools.lru_cache(maxsize=None)
def _moeq_config_class(stock: type) -> type:
    """``stock`` (a GroupedExperts.Config subclass) plus the moeq fields; builds converted."""

    @dataclass(kw_only=True, slots=True)
    class Config(stock):
        moeq_recipe: str = "mxfp8"
        """moeq recipe of the experts' GEMMs: "bf16", "fp8" or "mxfp8"."""
        moeq_kernel: str = "auto"
        """moeq kernel choice ("auto": the fastest the device runs; "emulated" on CPU)."""
        moeq_incoming_alignment: Optional[int] = None
        """Alignment the token dispatcher's groups start at (its pad_multiple), or None."""

        def build(self, **kwargs):
            # slots=True: no zero-argument super(); build the stock module explicitly.
            stock_cfg = stock(**{f.name: getattr(self, f.name) for f in fields(stock) if f.init})
            module = stock.build(stock_cfg, **kwargs)
            return convert_experts_module(
                module, parse_recipe(self.moeq_recipe), self.moeq_kernel,
                adapter=_torchtitan_adapter(module, "<built experts>"),
                incoming_alignment=self.moeq_incoming_alignment,
            )

    owner = stock._owner.__name__ if stock._owner is not None else stock.__name__
    Config.__name__ = "Config"
    Config.__qualname__ = f"Moeq{owner}.Config"
    Config.moeq_stock_config = stock
    return Config


def _torchtitan_adapter(module: torch.nn.Module, fqn: str):
    adapter = find_adapter(module)
    if adapter not in TORCHTITAN_ADAPTERS:
        why = unknown_torchtitan_experts(module) or f"a {type(module).__name__}, not torchtitan experts"
        raise TypeError(f"moeq cannot convert {fqn}: it is {why}. Leave this layer out with fqns=[...]")
    return adapter


def moeq_experts_config(
    experts_config: GroupedExperts.Config,
    *,
    recipe: RecipeLike,
    kernel: str = "auto",
    incoming_alignment: Optional[int] = None,
    fqn: str = "inner_experts",
) -> GroupedExperts.Config:
    """The config that builds ``experts_config``'s experts converted to ``recipe``.

    Args:
        experts_config: a torchtitan ``GroupedExperts.Config`` (or subclass, e.g.
            ``GptOssGroupedExperts.Config``; a moeq one is re-converted).
        recipe: "bf16" / "fp8" / "mxfp8". kernel: moeq's kernel choice.
        incoming_alignment: the token dispatcher's group alignment (None: packed).
        fqn: its place in the model, for messages.
    Returns:
        a config of a subclass of ``type(experts_config)`` with the same field values.
    Raises:
        ValueError: unknown recipe or kernel, or a dim not divisible by the recipe's
            alignment. TypeError: experts moeq has no adapter for.
    Builds the experts once on the meta device to check them now, not at model build.
    """
    qtype = parse_recipe(recipe)
    check_kernel(kernel)
    stock = _stock_config_class(type(experts_config))
    values = {f.name: getattr(experts_config, f.name) for f in fields(stock) if f.init}
    with torch.device("meta"):
        probe = stock.build(stock(**values))
    check_dims(fqn, _torchtitan_adapter(probe, fqn), probe, qtype)
    return _moeq_config_class(stock)(
        **values, moeq_recipe=qtype.value, moeq_kernel=kernel, moeq_incoming_alignment=incoming_alignment
    )


def _replace(root, parent, attr, new):
    if parent is None:
        return new
    if isinstance(parent, list):
        parent[attr] = new
    else:
        setattr(parent, attr, new)
    return root


def convert_model_config(
    model_config,
    recipe: RecipeLike,
    *,
    kernel: str = "auto",
    fqns: Optional[List[str]] = None,
    pad_in_dispatch: bool = False,
):
    """Convert every routed-experts config in a torchtitan model config tree.

    Args:
        model_config: a torchtitan model config (e.g. ``model_registry(...).model``).
        recipe, kernel: as for ``moeq.convert_model``.
        fqns: substrings of the experts' FQNs to convert (e.g. ``["layers.3."]``); empty
            or None: all of them.
        pad_in_dispatch: FP8/MXFP8: swap the standard token dispatcher for
            ``TorchAOTokenDispatcher(pad_multiple=<recipe's alignment>)``, so the padding
            happens in the dispatch's permute instead of a pass in the experts. Its
            permute is a Triton kernel: CUDA only.
    Returns:
        the (possibly replaced) root config.
    Raises:
        ValueError: no experts config matched, unknown recipe/kernel, bad dims;
        TypeError: experts moeq cannot convert (named).
    """
    qtype = parse_recipe(recipe)
    matched = [
        m for m in model_config.traverse(GroupedExperts.Config)
        if not fqns or any(f in m[0] for f in fqns)
    ]
    if not matched:
        raise ValueError(
            f"moeq.torchtitan found no routed experts (GroupedExperts.Config) in {type(model_config).__qualname__}"
            + (f" matching fqns={fqns!r}" if fqns else "")
            + ": it converts MoE models (deepseek_v3, qwen3 MoE flavors, gpt_oss, llama4, ...)"
        )
    align = group_alignment(qtype)
    for fqn, cfg, parent, attr in matched:
        dispatcher = getattr(parent, "token_dispatcher", None)
        if pad_in_dispatch and align is not None and dispatcher_alignment(dispatcher) != align:
            swap_token_dispatcher(parent, align)
            dispatcher = parent.token_dispatcher
        new = moeq_experts_config(
            cfg, recipe=qtype, kernel=kernel, incoming_alignment=dispatcher_alignment(dispatcher), fqn=fqn
        )
        model_config = _replace(model_config, parent, attr, new)
    return model_config


class Converter(QuantizationConverter):
    """torchtitan model converter: ``model_registry(flavor, converters=[Converter.Config(...)])``.

    Runs before LoRA converters like torchtitan's own quantization converters.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(QuantizationConverter.Config):
        recipe: str = "mxfp8"
        """moeq recipe of the routed experts' GEMMs: "bf16", "fp8" or "mxfp8"."""
        kernel: str = "auto"
        """moeq kernel choice: "auto", "emulated", "triton" or a per-GEMM kernel name."""
        fqns: list[str] = field(default_factory=list)
        """Substrings of the experts FQNs to convert; empty: every MoE layer."""
        pad_in_dispatch: bool = False
        """Pad in the token dispatch (TorchAOTokenDispatcher, CUDA only) instead of in the experts."""

    def __init__(self, config: Config):
        parse_recipe(config.recipe)
        check_kernel(config.kernel)
        self.config = config

    def convert(self, model_config):
        """Return ``model_config`` with its routed experts converted (see :func:`convert_model_config`)."""
        c = self.config
        return convert_model_config(
            model_config, c.recipe, kernel=c.kernel, fqns=c.fqns, pad_in_dispatch=c.pad_in_dispatch
        )


def _routed_experts(cfg: RoutedExperts.Config, recipe: str, kernel: str) -> RoutedExperts.Config:
    inner = moeq_experts_config(
        cfg.inner_experts, recipe=recipe, kernel=kernel,
        incoming_alignment=dispatcher_alignment(cfg.token_dispatcher),
    )
    return dataclasses.replace(cfg, inner_experts=inner)


@override(target=RoutedExperts.Config, description="moeq: routed experts with BF16 grouped GEMMs")
def bf16(cfg: RoutedExperts.Config, *, kernel: str = "auto") -> RoutedExperts.Config:
    """``--override.imports moeq.torchtitan.bf16``: every MoE layer's experts through moeq, BF16."""
    return _routed_experts(cfg, "bf16", kernel)


@override(target=RoutedExperts.Config, description="moeq: routed experts with FP8 rowwise grouped GEMMs")
def fp8(cfg: RoutedExperts.Config, *, kernel: str = "auto") -> RoutedExperts.Config:
    """``--override.imports moeq.torchtitan.fp8``: every MoE layer's experts in moeq's FP8 recipe."""
    return _routed_experts(cfg, "fp8", kernel)


@override(target=RoutedExperts.Config, description="moeq: routed experts with MXFP8 grouped GEMMs")
def mxfp8(cfg: RoutedExperts.Config, *, kernel: str = "auto") -> RoutedExperts.Config:
    """``--override.imports moeq.torchtitan.mxfp8``: every MoE layer's experts in moeq's MXFP8 recipe."""
    return _routed_experts(cfg, "mxfp8", kernel)
