"""Argument checks shared by moeq's public entry points (bottom layer: imports torch only).

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind,
wrong value) with a message that names the argument, says what was wrong and how to fix
it. Checks on *shapes, dtypes and devices* are host-only and run everywhere. Checks on
*values* in device memory (a sum of counts, a sign) go through :func:`device_check`:
a host read that raises at once in eager mode on CPU (where it costs nothing), and
``torch._assert_async`` on CUDA and under ``torch.compile`` (no host sync; a failed
check stops the step with a device-side assert, so a wrong value never flows on).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "NonFiniteError",
    "check_float",
    "check_int",
    "check_module",
    "check_tensor",
    "checks_read_on_host",
    "check_counts",
    "check_counts_values",
    "check_convert_args",
    "device_check",
    "is_integer_dtype",
    "normalize_filter_fqns",
]

FilterLike = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


class NonFiniteError(ValueError):
    """A NaN or Inf reached an operation that checks for them (a ValueError)."""


def _is_int(value) -> bool:
    # numbers.Integral covers numpy ints; torch.SymInt is a size under torch.compile's
    # dynamic shapes (an int at run time)
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def check_int(name: str, value, *, minimum: Optional[int] = None, fix: str = ""):
    """Return ``value`` as an int if it is an integer (not a bool) >= ``minimum``, else raise.

    TypeError for floats, bools, strings, ...; ValueError below the minimum. ``fix`` is
    appended to the message (what to pass instead). Symbolic sizes pass unchecked.
    """
    if type(value) is int and (minimum is None or value >= minimum):
        return value  # the common case, cheap: this runs on every forward
    tail = f": {fix}" if fix else ""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}){tail}")
    if not isinstance(value, numbers.Integral):
        return value  # symbolic: a size, >= 0 by construction
    if minimum is not None and value < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}{tail}")
    return int(value)


def check_module(name: str, value) -> nn.Module:
    """Return ``value`` if it is an ``nn.Module``, else TypeError naming ``name``."""
    if not isinstance(value, nn.Module):
        raise TypeError(
            f"{name} must be a torch.nn.Module, got {type(value).__name__}: pass the model itself "
            f"(built, e.g. MoETransformer(cfg) or AutoModelForCausalLM.from_config(cfg))"
        )
    return value


def check_float(name: str, value, *, minimum: Optional[float] = None, fix: str = "") -> float:
    """Return ``value`` as a float if it is a finite real number >= ``minimum``, else raise.

    TypeError for bools, strings, tensors, ...; ValueError for NaN/Inf or below the minimum."""
    tail = f": {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}){tail}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}{tail}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{tail}")
    return float(value)


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for int8/16/32/64 and uint dtypes (not bool, float or complex)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_tensor(name: str, t, *, dim: Optional[int] = None, layout: str = "") -> torch.Tensor:
    """Return ``t`` if it is a tensor with ``dim`` dims, else TypeError/ValueError naming it.

    ``layout`` describes the expected shape in the message, e.g. ``"(tokens, dim)"``.
    """
    shape = f" {layout}" if layout else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{shape}, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        hint = "; flatten leading dims first (x.reshape(-1, x.shape[-1]))" if dim == 2 and t.dim() > 2 else ""
        raise ValueError(f"{name} must be {dim}-D{shape}, got shape {tuple(t.shape)}{hint}")
    return t


def check_counts(name: str, counts, num_groups: int, like: torch.Tensor, *, like_name: str = "x") -> torch.Tensor:
    """Static checks of a per-group count tensor (no device data read).

    Args:
        name: the argument's name in messages (e.g. ``"num_tokens_per_expert"``).
        counts: should be an (num_groups,) integer tensor on ``like``'s device.
        num_groups: E, the number of groups (experts) it must describe.
        like: the tensor whose rows are counted (its device is the counts' device).
    """
    if not isinstance(counts, torch.Tensor):
        raise TypeError(
            f"{name} must be a ({num_groups},) integer tensor on {like_name}'s device, got "
            f"{type(counts).__name__}: use torch.tensor(counts, device={like_name}.device)"
        )
    if not is_integer_dtype(counts.dtype):
        raise TypeError(
            f"{name} must have an integer dtype (int32/int64), got {counts.dtype}: fractional counts would "
            f"be truncated; pass whole token counts, e.g. counts.long() if they are whole"
        )
    if counts.dim() != 1 or counts.shape[0] != num_groups:
        raise ValueError(
            f"{name} must have shape ({num_groups},), one count per expert, got {tuple(counts.shape)}: "
            f"an expert without an entry would be silently unused"
        )
    if counts.device != like.device:
        raise ValueError(
            f"{name} is on {counts.device} but {like_name} is on {like.device}: keep the counts on "
            f"{like_name}'s device (counts.to({like_name}.device))"
        )
    return counts


def checks_read_on_host(t: torch.Tensor) -> bool:
    """Where value checks on ``t`` read it on the host: eager mode on CPU (True). On CUDA
    and under torch.compile they are ``torch._assert_async`` (False). The one switch the
    value checks consult (tests flip it to run CPU as CUDA would)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def device_check(
    cond: torch.Tensor, message: str, error: type = ValueError, *, detail: Optional[Callable[[], str]] = None
) -> None:
    """Raise ``error(message)`` unless the 0-d bool tensor ``cond`` is True.

    Eager mode on CPU: a host read, raises at once (with ``detail()`` as the message when
    given: it may read more of the data to say exactly what is wrong). On CUDA and under
    torch.compile: ``torch._assert_async(cond, message)`` (no host sync; the step fails
    with a device-side assert)."""
    if checks_read_on_host(cond):
        if not bool(cond):
            raise error(detail() if detail is not None else message)
    else:
        assert_on_device(cond, message)


# torch._assert_async refuses (RuntimeError, on CUDA) a message of 255 characters or more,
# even when the condition holds: a long message would crash right input.
DEVICE_MESSAGE_LIMIT = 254


def device_message(message: str) -> str:
    """``message`` cut to fit ``torch._assert_async`` (at most ``DEVICE_MESSAGE_LIMIT``
    characters): its start, which names the argument and the problem, is kept."""
    if len(message) <= DEVICE_MESSAGE_LIMIT:
        return message
    return message[: DEVICE_MESSAGE_LIMIT - 3].rstrip() + "..."


def assert_on_device(cond: torch.Tensor, message: str) -> None:
    """``torch._assert_async(cond, message)`` with the message cut to torch's limit
    (:func:`device_message`): no host sync; a false ``cond`` fails a device-side assert."""
    torch._assert_async(cond, device_message(message))


def check_counts_values(
    name: str, counts: torch.Tensor, num_rows: int, group_alignment: Optional[int] = None
) -> None:
    """Value checks of per-group counts of the rows of a (num_rows, ...) tensor.

    Without ``group_alignment`` the counts must be non-negative and sum to ``num_rows``.
    With ``group_alignment=a`` (the padded layout) the padded groups
    ``sum(round_up(counts, a))`` must fit in ``num_rows`` (the rest is slack). Eager CPU:
    two host reads, a specific ValueError each. CUDA / torch.compile: one
    ``torch._assert_async`` for both (no sync; its message covers both)."""
    negative = f"{name} has a negative count: pass the number of rows of each expert's group (>= 0)"
    if group_alignment is None or group_alignment <= 1:
        fits = counts.sum() == num_rows
        bad_sum = (
            "{name} does not sum to the number of rows of x{rows}: every row must belong to exactly one "
            "expert's group; pass the per-expert counts of x's rows, in expert order"
        )
    else:
        a = group_alignment
        fits = ((counts + (a - 1)) // a * a).sum() <= num_rows
        bad_sum = (
            "{name}, each rounded up to a multiple of group_alignment=" + str(a) + ", needs more rows than x "
            "has{rows}: pass the counts of x's padded layout (moeq.pad_token_groups)"
        )
    if checks_read_on_host(counts):
        device_check((counts >= 0).all(), negative)
        device_check(fits, bad_sum.format(name=name, rows=f" ({num_rows})"))
    else:
        # no size in the message: formatting a symbolic size under torch.compile would
        # specialise the graph on it
        short = (
            f"{name}: a count is negative or the counts do not fit x's rows; pass x's per-expert row counts"
            + ("" if group_alignment is None or group_alignment <= 1 else f" of its padded layout (alignment {group_alignment})")
        )
        assert_on_device((counts >= 0).all() & fits, short)


def normalize_filter_fqns(filter_fqns: FilterLike) -> Union[None, Tuple[str, ...], Callable]:
    """``filter_fqns`` of ``convert_model`` as None, a tuple of substrings, or a callable.

    A single str is ONE substring (``"layers.0"`` selects FQNs containing it), never a
    sequence of characters. Anything else (an int, a list holding non-strings) raises
    TypeError naming the accepted forms."""
    forms = "None, a str, a list/tuple of str (FQN substrings), or a callable f(fqn, module) -> bool"
    if filter_fqns is None or callable(filter_fqns):
        return filter_fqns
    if isinstance(filter_fqns, str):
        return (filter_fqns,)
    if isinstance(filter_fqns, (bytes, dict)) or not isinstance(filter_fqns, (list, tuple, set, frozenset)):
        raise TypeError(f"filter_fqns must be {forms}; got {type(filter_fqns).__name__} {filter_fqns!r}")
    bad = [f for f in filter_fqns if not isinstance(f, str)]
    if bad:
        raise TypeError(f"filter_fqns must be {forms}; it holds {bad[0]!r} ({type(bad[0]).__name__})")
    return tuple(filter_fqns)


def check_convert_args(model, filter_fqns: FilterLike):
    """``convert_model``'s ``model`` and ``filter_fqns`` checked; returns the normalized filter
    (see :func:`normalize_filter_fqns`)."""
    check_module("model", model)
    return normalize_filter_fqns(filter_fqns)
