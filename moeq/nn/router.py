"""Top-k token router with an optional FP32 gate GEMM and load balancing."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moeq.numerics.validation import check_float, check_int, check_tensor

SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "expert_bias", "none")


class _FP32Linear(torch.autograd.Function):
    """``x @ w.T`` computed in float32; gradients returned in the inputs' own dtypes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).float()).to(
                weight.dtype
            )
        return grad_x, grad_w


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gate GEMM in float32.

    Args:
        x: (..., D) activations, any float dtype.
        weight: (E, D) gate weight, any float dtype.
    Returns:
        (..., E) float32 logits. The backward computes in float32 and returns the
        gradient of ``x`` in ``x.dtype`` and of ``weight`` in ``weight.dtype``, so a bf16
        model keeps bf16 gradients.
    """
    return _FP32Linear.apply(x, weight)


class _AuxLossInjector(torch.autograd.Function):
    """Identity on ``out`` whose backward also sends gradient 1 into ``aux_loss``.

    This adds the load-balancing loss to whatever loss the user backpropagates, without
    the user's training loop having to know the auxiliary loss exists. Gradient 1 is
    right only for an unscaled backward: ``moeq.MoE`` multiplies the aux loss by its
    ``aux_loss_scale`` first (``moeq.set_aux_loss_scale``: accumulation, GradScaler).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_out.device)


def attach_aux_loss(out: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    """Return ``out`` unchanged; backpropagating through it also backpropagates ``aux_loss``."""
    return _AuxLossInjector.apply(out, aux_loss)


class RouterOutput(NamedTuple):
    """What the router decided for T tokens.

    expert_indices: (T, k) int64, the chosen experts per token.
    expert_weights: (T, k) routing weights (after optional renormalisation), float32
        (float64 for a float64 model).
    num_tokens_per_expert: (E,) int64 count of (token, slot) pairs per expert.
    aux_loss: () float32 load-balancing loss (0 when aux loss is off).
    """

    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor


def check_router_args(dim: int, num_experts: int, top_k: int) -> tuple:
    """``(dim, num_experts, top_k)`` as ints; TypeError/ValueError unless D >= 1, E >= 1 and
    1 <= top_k <= E are integers."""
    dim = check_int("dim", dim, minimum=1, fix="pass the model width D")
    num_experts = check_int("num_experts", num_experts, minimum=1, fix="a router needs at least one expert to route to")
    top_k = check_int("top_k", top_k, fix="pass the number of experts per token, e.g. top_k=2")
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k={top_k} must be between 1 and num_experts={num_experts}: each token goes to top_k "
            f"distinct experts"
        )
    return dim, num_experts, top_k


def count_tokens_per_expert(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, k) int64 expert ids -> (E,) int64 counts, with a static output shape (no sync)."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_indices.device)
    flat = expert_indices.reshape(-1)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


class TopKRouter(nn.Module):
    """Linear gate over ``num_experts``, softmax or sigmoid scores, top-k selection.

    Load balancing (``load_balancing``):
      - ``"aux_loss"``: the Switch-Transformer loss ``E * sum_e f_e * p_e`` (f_e: fraction
        of routed slots sent to expert e, p_e: mean score of e), scaled by
        ``aux_loss_coeff``. It is injected into the backward of the router's output, so a
        training loop that only backpropagates its own loss still trains against it.
      - ``"expert_bias"``: auxiliary-loss-free balancing (DeepSeek-V3): a non-learned
        per-expert bias is added to the scores for *selection only* (weights use the
        unbiased scores). The router accumulates per-expert counts in
        ``tokens_per_expert``; call :meth:`update_expert_bias` after each optimizer step
        to nudge the bias toward balance and reset the counts.
      - ``"none"``.

    Args:
        dim: model width D.
        num_experts: E.
        top_k: experts per token.
        score_func: ``"softmax"`` or ``"sigmoid"``.
        route_norm: renormalise the k chosen weights to sum to 1.
        router_dtype: ``None`` (gate GEMM in the input dtype) or ``torch.float32``
            (gate GEMM in FP32 through :func:`fp32_linear`, gradients in the input dtype).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        route_norm: bool = False,
        router_dtype: Optional[torch.dtype] = None,
        load_balancing: str = "aux_loss",
        aux_loss_coeff: float = 1e-2,
        bias_update_rate: float = 1e-3,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if score_func not in SCORE_FUNCTIONS:
            raise ValueError(f"score_func={score_func!r}: use one of {SCORE_FUNCTIONS}")
        if load_balancing not in LOAD_BALANCING:
            raise ValueError(f"load_balancing={load_balancing!r}: use one of {LOAD_BALANCING}")
        if router_dtype not in (None, torch.float32):
            raise ValueError(f"router_dtype={router_dtype!r}: use None or torch.float32")
        dim, num_experts, top_k = check_router_args(dim, num_experts, top_k)
        check_float("aux_loss_coeff", aux_loss_coeff, minimum=0.0, fix="pass a weight >= 0 (0 turns the loss off)")
        check_float("bias_update_rate", bias_update_rate, minimum=0.0, fix="pass a step size >= 0")
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.route_norm = route_norm
        self.router_dtype = router_dtype
        self.load_balancing = load_balancing
        self.aux_loss_coeff = aux_loss_coeff
        self.bias_update_rate = bias_update_rate
        self.gate = nn.Linear(dim, num_experts, bias=False, dtype=dtype, device=device)
        if load_balancing == "expert_bias":
            f32 = dict(dtype=torch.float32, device=device)
            self.register_buffer("expert_bias", torch.zeros(num_experts, **f32), persistent=True)
            self.register_buffer("tokens_per_expert", torch.zeros(num_experts, **f32), persistent=False)
        else:
            self.expert_bias = None
            self.tokens_per_expert = None

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) init of the gate weight."""
        nn.init.normal_(self.gate.weight, std=std)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route T tokens.

        Args:
            x: (T, D) floating-point tokens.
        Returns:
            RouterOutput (see its docstring); weights are float32.
        """
        check_tensor("x", x, dim=2, layout="(tokens, dim)")
        if x.shape[1] != self.gate.in_features:
            raise ValueError(
                f"x has {x.shape[1]} features per token but the router's dim is {self.gate.in_features}: "
                f"pass (tokens, {self.gate.in_features}) tokens"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}: cast the tokens (x.float())")
        if self.router_dtype == torch.float32:
            logits = fp32_linear(x, self.gate.weight)
        else:
            logits = self.gate(x)
        # Scores in at least float32 (a float64 model keeps float64 for gradcheck). Cast
        # only on a real change: torch 2.11's compile mishandles a no-op .to() on an
        # autograd.Function output.
        score_dtype = torch.promote_types(logits.dtype, torch.float32)
        if logits.dtype != score_dtype:
            logits = logits.to(score_dtype)
        if self.score_func == "softmax":
            scores = torch.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)

        if self.expert_bias is not None:
            _, indices = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)
            weights = scores.gather(-1, indices)
        else:
            weights, indices = torch.topk(scores, self.top_k, dim=-1)
        if self.route_norm or (self.score_func == "sigmoid" and self.top_k > 1):
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)

        counts = count_tokens_per_expert(indices, self.num_experts)
        if self.load_balancing == "aux_loss" and self.training:
            num_slots = max(indices.numel(), 1)
            frac = counts.to(torch.float32) / num_slots
            probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20) if self.score_func == "sigmoid" else scores
            mean_prob = probs.mean(0) if probs.shape[0] > 0 else probs.sum(0)
            aux = self.aux_loss_coeff * self.num_experts * (frac * mean_prob).sum()
        else:
            aux = logits.new_zeros(())
        if self.tokens_per_expert is not None and self.training:
            with torch.no_grad():
                self.tokens_per_expert.add_(counts.to(torch.float32))
        return RouterOutput(indices, weights, counts, aux)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower
        that of over-loaded ones by ``bias_update_rate * sign(mean - load)``, then reset
        the counts. No-op unless ``load_balancing="expert_bias"``."""
        if self.expert_bias is None:
            return
        load = self.tokens_per_expert
        self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        self.expert_bias.sub_(self.expert_bias.mean())
        load.zero_()
