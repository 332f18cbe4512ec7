"""Eager calls of moeq's custom ops without the ``torch.library`` dispatcher's host cost.

A Python ``torch.library.custom_op`` costs about 35 us of host time per call on the
H100 machine's host (measured: permute-and-pad through the op 135 us, its Triton launchers
alone 99 us), which is a third of a small routing's whole step when nothing hides host
time. :func:`eager_fast_op` returns a callable that, in plain eager mode, runs the op's
implementation directly (through an ``autograd.Function`` built from the op's own
backward and setup functions when a gradient is needed), and otherwise calls the custom
op: under ``torch.compile`` / export tracing, under any dispatch or function mode, and
for tensor subclasses (DTensor, FakeTensor, ...). Both routes run the same functions, so
they give the same results; the custom op stays what the compiler sees.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["eager_fast_op"]


def _plain_eager(args) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(a) is Tensor for a in args if isinstance(a, Tensor))


def eager_fast_op(
    op: Callable[..., Any],
    impl: Callable[..., Any],
    backward: Optional[Callable[..., Any]] = None,
    setup_context: Optional[Callable[..., None]] = None,
) -> Callable[..., Any]:
    """Wrap a custom op for cheap eager calls.

    Args:
        op: the ``torch.library`` custom op (called whenever the fast route does not apply).
        impl: what the fast route runs: the function the op was built from, or one with
            the same arguments and the same results whose outputs may alias each other.
        backward, setup_context: the functions registered with ``op.register_autograd``,
            or None for an op without autograd (then a call that needs a gradient goes
            through ``op``).
    Returns:
        ``fn(*args)`` with the op's signature (positional arguments only).
    """
    function = None
    if backward is not None:

        # forward(ctx, ...) style on purpose: a Function with a separate setup_context binds
        # its arguments through inspect.signature on every call (55 us against 13 us per
        # apply, measured on this project's CPU machine); functorch transforms, which need
        # that style, take the custom op (see _plain_eager)
        class _Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = impl(*args)
                setup_context(ctx, args, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        _Function.__name__ = f"{getattr(impl, '__name__', 'op').lstrip('_')}_eager"
        function = _Function

    def call(*args):
        if not _plain_eager(args):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return function.apply(*args) if function is not None else op(*args)
        return impl(*args)

    call.__name__ = getattr(impl, "__name__", "op")
    call.__doc__ = f"Eager fast route of the custom op {op}."
    return call
