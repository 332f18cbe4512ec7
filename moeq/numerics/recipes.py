"""Quantization recipes and their token-group alignment: the one source of truth.

Every other module asks this one for recipe names and alignment sizes; none of them
hard-codes 16 or 32.
"""
from __future__ import annotations

import enum
from types import MappingProxyType
from typing import Mapping, Optional, Union


class QuantizationType(enum.Enum):
    """Numerics of the routed-expert GEMMs."""

    BF16 = "bf16"
    FP8 = "fp8"  # e4m3 data, one power-of-two scale per row along the contraction dim
    MXFP8 = "mxfp8"  # e4m3 data, one e8m0 scale per 32 elements along the contraction dim


# Rows of each expert's token group must start at a multiple of this for the recipe's
# grouped GEMM (None: no constraint). It is one requirement seen from two sides: every
# contraction dim of the recipe's GEMMs must be a multiple of it, and in the weight-
# gradient GEMM the contraction dim is each expert's token group. FP8: fp8 rows must be
# 16-byte aligned for torch._scaled_grouped_mm (its 2D x 2D wgrad asserts groups of
# multiples of 16). MXFP8: 32-element scale blocks must not straddle two experts.
# The same numbers therefore bound the model dim D and expert hidden dim H.
GROUP_ALIGNMENT: Mapping[QuantizationType, Optional[int]] = MappingProxyType(
    {
        QuantizationType.BF16: None,
        QuantizationType.FP8: 16,
        QuantizationType.MXFP8: 32,
    }
)

RECIPE_NAMES = tuple(q.value for q in QuantizationType)

RecipeLike = Union[str, QuantizationType]


# Names (values and lower-case enum names) by dict lookup: dynamo (torch 2.11) cannot
# trace an iteration over the enum, so parse_recipe must not iterate it.
_RECIPES_BY_NAME = {
    **{q.value: q for q in QuantizationType},
    **{q.name.lower(): q for q in QuantizationType},
}


def parse_recipe(recipe: RecipeLike) -> QuantizationType:
    """Turn ``"bf16"``/``"fp8"``/``"mxfp8"`` (any case) or a QuantizationType into the enum.

    The one recipe parser: called where a user's choice enters (conversion, the public
    functional ops, the CLI), never per call of a converted module (its plan holds the
    enum). Raises ValueError naming the valid recipes for anything else.
    """
    if isinstance(recipe, QuantizationType):
        return recipe
    if isinstance(recipe, str) and recipe.strip().lower() in _RECIPES_BY_NAME:
        return _RECIPES_BY_NAME[recipe.strip().lower()]
    raise ValueError(
        f"unknown recipe {recipe!r}: use one of {', '.join(repr(n) for n in RECIPE_NAMES)} "
        f"or a moeq.QuantizationType"
    )


# A plain-dict view of GROUP_ALIGNMENT (same entries) for code that torch.compile
# traces: dynamo cannot index a mappingproxy keyed by enums.
_ALIGNMENT_BY_VALUE = {q.value: a for q, a in GROUP_ALIGNMENT.items()}


def group_alignment(recipe: RecipeLike) -> Optional[int]:
    """Token-group alignment (rows) the recipe's grouped GEMM needs; None when it needs none.

    Safe to call inside ``torch.compile(fullgraph=True)`` with a QuantizationType."""
    return _ALIGNMENT_BY_VALUE[parse_recipe(recipe).value]

