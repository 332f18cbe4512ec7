"""The MoE layer: router, permute-and-pad, routed experts, combine, optional shared expert."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moeq.experts import GroupedExperts
from moeq.router import TopKRouter, attach_aux_loss


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
        """(..., D) -> (..., D) in x.dtype."""
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
            out = attach_aux_loss(out, routing.aux_loss)
        self.last_aux_loss = routing.aux_loss.detach()
        return out.reshape(shape)

    def _local_experts(self, tokens: torch.Tensor, routing) -> torch.Tensor:
        """(T, D) -> (T, D): all experts on this device (no expert parallelism)."""
        # The experts lay tokens out in the alignment their GEMMs want, in one pass, so
        # they never pad again (moeq.convert_model sets it per recipe).
        return self.experts.routed_forward(tokens, routing.expert_indices, routing.expert_weights)
