"""The MoE layer: router, permute-and-pad, routed experts, combine, optional shared expert."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from moeq.nn.experts import GroupedExperts
from moeq.nn.router import TopKRouter, attach_aux_loss, check_router_args
from moeq.numerics.validation import check_float, check_int, check_module, check_tensor


class FeedForward(nn.Module):
    """Dense SwiGLU MLP (D -> H -> D), used as the shared expert."""

    def __init__(self, dim: int, hidden_dim: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.w1 = nn.Linear(dim, hidden_dim, **kw)
        self.w3 = nn.Linear(dim, hidden_dim, **kw)
        self.w2 = nn.Linear(hidden_dim, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward block.

    ``forward`` routes each token to ``top_k`` of ``num_experts`` SwiGLU experts, lays the
    routed copies out expert-major (padded to the experts' group alignment in the same
    pass, see :func:`moeq.permute_and_pad`), runs the experts, and combines the outputs
    weighted by the routing scores. The router's load-balancing loss, if any, is added
    to the backward pass automatically; ``self.last_aux_loss`` holds its detached value.

    The load-balancing term's gradient is ``aux_loss_scale`` (default 1.0): right for a
    plain ``loss.backward()``. When the backward scales the loss (gradient accumulation
    ``(loss / N).backward()``, ``GradScaler.scale(loss)``), scale the balancing term the
    same way with :func:`set_aux_loss_scale` (see its docstring), or it is reweighted
    relative to the loss it rides on.

    Args:
        dim: model width D. hidden_dim: expert hidden width H.
        num_experts: E routed experts. top_k: experts per token.
        compute_backend: experts backend, see ``moeq.COMPUTE_BACKENDS``.
        router_dtype: None or torch.float32 (FP32 gate GEMM, grads in input dtype).
        score_func, route_norm, load_balancing, aux_loss_coeff: see :class:`TopKRouter`.
        shared_expert_hidden_dim: hidden width of an always-on shared expert (None: none).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        *,
        compute_backend: str = "grouped_mm",
        router_dtype: Optional[torch.dtype] = None,
        score_func: str = "softmax",
        route_norm: bool = False,
        load_balancing: str = "aux_loss",
        aux_loss_coeff: float = 1e-2,
        shared_expert_hidden_dim: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        dim, num_experts, top_k = check_router_args(dim, num_experts, top_k)
        hidden_dim = check_int("hidden_dim", hidden_dim, minimum=1, fix="pass the experts' hidden width H")
        if shared_expert_hidden_dim is not None:
            check_int("shared_expert_hidden_dim", shared_expert_hidden_dim, minimum=0,
                      fix="pass None (or 0) for no shared expert, or its hidden width")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.router = TopKRouter(
            dim,
            num_experts,
            top_k,
            score_func=score_func,
            route_norm=route_norm,
            router_dtype=router_dtype,
            load_balancing=load_balancing,
            aux_loss_coeff=aux_loss_coeff,
            dtype=dtype,
            device=device,
        )
        self.experts = GroupedExperts(
            dim, hidden_dim, num_experts, compute_backend=compute_backend, dtype=dtype, device=device
        )
        self.shared_expert = (
            FeedForward(dim, shared_expert_hidden_dim, dtype=dtype, device=device)
            if shared_expert_hidden_dim
            else None
        )
        self.last_aux_loss: Optional[torch.Tensor] = None
        # Gradient of the load-balancing term: the factor the backward applies to the loss.
        self.aux_loss_scale: Union[float, torch.Tensor] = 1.0
        # Set by moeq.apply_expert_parallel: moves routed tokens to the experts' ranks.
        self.expert_dispatcher = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) init of router, experts and shared expert."""
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std)
        if self.shared_expert is not None:
            for lin in (self.shared_expert.w1, self.shared_expert.w3, self.shared_expert.w2):
                nn.init.normal_(lin.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) floating-point tokens in the MoE's dtype -> (..., D) in x.dtype."""
        self._check_input(x)
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens)
        if self.expert_dispatcher is not None:
            out = self.expert_dispatcher(tokens, routing.expert_indices, routing.expert_weights, self.experts)
        else:
            out = self._local_experts(tokens, routing)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        if self.router.load_balancing == "aux_loss" and self.training:
            out = attach_aux_loss(out, _scaled(routing.aux_loss, self.aux_loss_scale))
        self.last_aux_loss = routing.aux_loss.detach()
        return out.reshape(shape)

    def _check_input(self, x) -> None:
        check_tensor("x", x, layout="(..., dim)")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must be (..., {self.dim}) tokens (the MoE's dim), got shape {tuple(x.shape)}: the last dim "
                f"holds the features"
            )
        weight = self.router.gate.weight
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}: cast the tokens (x.float())")
        if x.dtype != weight.dtype and self.router.router_dtype is None:
            raise TypeError(
                f"x is {x.dtype} but the MoE's parameters are {weight.dtype}: cast the tokens "
                f"(x.to({weight.dtype})) or the module (moe.to({x.dtype}))"
            )

    def _local_experts(self, tokens: torch.Tensor, routing) -> torch.Tensor:
        """(T, D) -> (T, D): all experts on this device (no expert parallelism)."""
        # The experts lay tokens out in the alignment their GEMMs want, in one pass, so
        # they never pad again (moeq.convert_model sets it per recipe).
        return self.experts.routed_forward(tokens, routing.expert_indices, routing.expert_weights)


def _scaled(aux_loss: torch.Tensor, scale: Union[float, torch.Tensor]) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return aux_loss * scale.to(device=aux_loss.device, dtype=aux_loss.dtype)
    return aux_loss if scale == 1.0 else aux_loss * scale


def set_aux_loss_scale(model: nn.Module, scale: Union[float, torch.Tensor]) -> int:
    """Set the gradient of every ``moeq.MoE`` load-balancing term in ``model`` to ``scale``.

    A ``moeq.MoE`` adds its auxiliary (load-balancing) loss to the backward pass itself,
    with gradient ``scale`` (default 1). That equals adding the aux loss to the loss you
    backpropagate only when the backward does not rescale that loss, so pass the factor it
    applies:

    * gradient accumulation over N micro-batches with ``(loss / N).backward()``:
      ``set_aux_loss_scale(model, 1 / N)`` (once);
    * ``torch.amp.GradScaler`` (``scaler.scale(loss).backward()``): each step, before the
      forward, ``set_aux_loss_scale(model, scaler.get_scale() / N)`` (``N = 1`` without
      accumulation); the scaler's unscale then divides the balancing term's gradient by
      the same factor as the loss's. A 0-d tensor holding the factor works too and costs
      no host read; under ``torch.compile`` prefer it (a float is a constant of the
      compiled graph, so a new value recompiles);
    * ``scale=0`` turns the balancing term's gradient off (``last_aux_loss`` is still set).

    It cannot be inferred: the gradient reaching the MoE's output is the loss's scale
    times the task gradient, and the two factors cannot be told apart from it.

    Args:
        model: a module containing ``moeq.MoE`` layers (or one itself).
        scale: a finite number >= 0, or a 0-d floating-point tensor (read at each forward).
    Returns:
        the number of MoE layers set. Raises ValueError if there is none, TypeError/
        ValueError for a bad ``scale``.
    """
    check_module("model", model)
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.dtype.is_floating_point:
            raise TypeError(
                f"scale must be a number or a 0-d floating-point tensor, got a {scale.dim()}-d {scale.dtype} "
                f"tensor: pass e.g. torch.tensor(1 / N)"
            )
    else:
        scale = check_float("scale", scale, minimum=0.0, fix="pass the factor your backward applies to the loss")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError(
            f"set_aux_loss_scale found no moeq.MoE layer in {type(model).__name__}: it sets the load-balancing "
            f"term of moeq.MoE layers (other MoE implementations add their aux loss to the loss themselves)"
        )
    for m in moes:
        m.aux_loss_scale = scale
    return len(moes)
