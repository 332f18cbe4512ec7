"""``grouped_mm``: plain ``torch._grouped_mm`` per expert group, differentiable and traceable
in float32/bfloat16/float16 (the BF16 recipe's GEMM and the unconverted experts')."""
from __future__ import annotations

import torch


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects expanded gradients (e.g. from ``y.sum()``).
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# torch._grouped_mm computes float32/float16 in eager mode, but its meta function (what
# torch.compile traces with) accepts only bfloat16. Under compile, other dtypes go
# through this custom op, opaque to the compiler, which runs the same ATen kernel.
@torch.library.custom_op("moeq::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:  # (M, K) x (E, K, N) -> (M, N)
        return a.new_empty((a.shape[0], b.shape[-1]))
    return a.new_empty((offs.shape[0], a.shape[0], b.shape[1]))  # (K, M) x (M, N) -> (E, K, N)


def _grouped_mm_setup(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors  # a (M, K), b (E, K, N): the only form differentiated here
    grad = grad.contiguous()
    grad_a = _grouped_mm_op(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_op(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-group ``x[group e] @ weight[e].T`` through ``torch._grouped_mm``.

    Args:
        x: (M, K) rows grouped by expert, float32/bfloat16/float16 (any strides).
        weight: (E, N, K) of x's dtype.
        offs: (E,) int32 cumulative end offsets; rows past ``offs[-1]`` are in no group
            and their output (and input gradient) is unspecified: callers with such
            slack rows mask them (:func:`swiglu_experts` does).
    Returns:
        (M, N) in x.dtype. Traceable by ``torch.compile`` in every one of those dtypes.
    """
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return _grouped_mm_op(x.contiguous(), weight.transpose(-2, -1), offs)
    return torch._grouped_mm(_ContiguousGrad.apply(x.contiguous()), weight.transpose(-2, -1), offs=offs)
