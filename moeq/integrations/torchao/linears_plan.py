"""``LinearsPlan``: which dense ``nn.Linear`` layers a conversion put in low precision, and
why the others were left alone (``model.moeq_linears``).

Plain frozen data (no torch, no torchao): what ``moeq.convert_model(..., linears=...)``
decided, one entry per ``nn.Linear`` of the model, for printing and for tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

__all__ = ["LinearDecision", "LinearsPlan"]


@dataclass(frozen=True)
class LinearDecision:
    """One ``nn.Linear`` of the model.

    Attributes:
        fqn: its name in ``model.named_modules()``.
        in_features, out_features: its shape.
        converted_to: the class it became (e.g. torchao's ``Float8Linear``), or None.
        skip_reason: why it stayed as it was (a sentence), or None when converted.
    """

    fqn: str
    in_features: int
    out_features: int
    converted_to: Optional[type] = None
    skip_reason: Optional[str] = None

    @property
    def outcome(self) -> Union[type, str]:
        """The converted class, or the skip reason."""
        return self.converted_to if self.converted_to is not None else self.skip_reason


@dataclass(frozen=True)
class LinearsPlan:
    """What a conversion did to a model's dense linears.

    Attributes:
        recipe: the recipe's name ("bf16", "fp8", "mxfp8").
        backend: how the converted linears compute, e.g. ``"torchao Float8Linear
            (rowwise, native)"`` or ``"... (emulated)"``; "none" for bf16.
        emulated: True when the converted linears emulate the low-precision GEMMs.
        decisions: one per ``nn.Linear``, in ``named_modules`` order.
    """

    recipe: str
    backend: str
    emulated: bool
    decisions: Tuple[LinearDecision, ...]

    def items(self) -> Tuple[Tuple[str, Union[type, str]], ...]:
        """``(fqn, converted class or skip reason)`` per linear."""
        return tuple((d.fqn, d.outcome) for d in self.decisions)

    @property
    def converted(self) -> Tuple[str, ...]:
        """FQNs of the converted linears."""
        return tuple(d.fqn for d in self.decisions if d.converted_to is not None)

    @property
    def skipped(self) -> Dict[str, str]:
        """``{fqn: reason}`` of the linears left alone."""
        return {d.fqn: d.skip_reason for d in self.decisions if d.converted_to is None}

    def summary(self) -> str:
        """A printable table: one line per linear (converted class or skip reason)."""
        lines = [
            f"moeq linears: recipe={self.recipe}, {self.backend}: {len(self.converted)} converted, "
            f"{len(self.skipped)} left alone"
        ]
        width = max((len(d.fqn) for d in self.decisions), default=0)
        for d in self.decisions:
            shape = f"{d.in_features}->{d.out_features}"
            what = f"-> {d.converted_to.__name__}" if d.converted_to is not None else f"skip: {d.skip_reason}"
            lines.append(f"  {d.fqn:<{width}}  {shape:>11}  {what}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
