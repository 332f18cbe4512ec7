"""``moeq.GroupedExperts``: SwiGLU routed experts with fused 3D weights, as an nn.Module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moeq.experts.padding_policy import local_tensor
from moeq.experts.swiglu import check_compute_backend, swiglu_experts
from moeq.numerics.validation import check_int
from moeq.ops.padding import combine_token_groups, permute_and_pad


class GroupedExperts(nn.Module):
    """SwiGLU routed experts with fused 3D weights (transformers 5.x layout).

    Parameters:
        gate_up_proj: (E, 2H, D); gate rows [0, H), up rows [H, 2H).
        down_proj: (E, D, H).

    Args:
        dim: D. hidden_dim: H. num_experts: E.
        compute_backend: one of ``COMPUTE_BACKENDS``: ``"grouped_mm"``
            (torch._grouped_mm, sync-free, the default), ``"batched_mm_padded"`` (pad
            to [E, max_tokens_per_expert, D], torch.bmm, gather back) or
            ``"for_loop"`` (per-expert matmuls; portable fallback, any dtype).
    """

    # Alignment (rows) this module's GEMMs want token groups to start at. None: any.
    # Quantized subclasses made by moeq.convert_model override it from GROUP_ALIGNMENT.
    group_alignment: Optional[int] = None

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        *,
        compute_backend: str = "grouped_mm",
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        dim = check_int("dim", dim, minimum=1, fix="pass the model width D")
        hidden_dim = check_int("hidden_dim", hidden_dim, minimum=1, fix="pass the experts' hidden width H")
        num_experts = check_int("num_experts", num_experts, minimum=0, fix="pass the number of routed experts E")
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.compute_backend = check_compute_backend(compute_backend)
        kw = dict(dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) init; the down projection is scaled by 1/sqrt(2) as is common."""
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std / 2**0.5)

    def forward(
        self,
        x: torch.Tensor,
        num_tokens_per_expert: torch.Tensor,
        *,
        group_alignment: Optional[int] = None,
        validate_counts: bool = True,
    ) -> torch.Tensor:
        """Apply each expert to its token group.

        Args:
            x: (M, D) tokens grouped in expert order (see :func:`swiglu_experts`).
            num_tokens_per_expert: (E,) integer counts on x's device, summing to M
                (checked: at once on CPU, device-side on CUDA; see :func:`swiglu_experts`).
            group_alignment: set by a caller (moeq.MoE, EP dispatch) whose tokens are
                already in the padded layout with groups starting at multiples of it.
            validate_counts: False only for counts moeq made itself (routing, an EP
                dispatch plan): skips their value checks (see :func:`run_on_trusted_counts`).
        Returns:
            (M, D) in x.dtype.
        """
        return self._experts(x, num_tokens_per_expert, group_alignment, validate_counts=validate_counts)

    def _experts(self, x, num_tokens_per_expert, group_alignment, *, validate_counts: bool) -> torch.Tensor:
        # Under expert parallelism the weights are DTensors: compute on the local experts.
        return swiglu_experts(
            x,
            local_tensor(self.gate_up_proj),
            local_tensor(self.down_proj),
            num_tokens_per_expert,
            compute_backend=self.compute_backend,
            group_alignment=group_alignment,
            validate_counts=validate_counts,
        )

    def routed_forward(
        self, tokens: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """All experts on this device: permute-and-pad, :meth:`forward`, weighted combine.

        Args:
            tokens: (T, D). expert_indices: (T, k) ids in [0, E). expert_weights: (T, k).
        Returns:
            (T, D) in tokens.dtype: ``sum_j weights[t, j] * expert_{idx[t, j]}(tokens[t])``.
        Tokens are laid out in this module's ``group_alignment`` in the same pass, so its
        GEMMs never pad again. Quantized subclasses may fuse more (see moeq.convert).
        """
        alignment = self.group_alignment
        grouped, counts, layout = permute_and_pad(tokens, expert_indices, self.num_experts, alignment)
        out = run_on_trusted_counts(self, grouped, counts, alignment)
        return combine_token_groups(out, layout, expert_weights)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"compute_backend={self.compute_backend!r}"
        )


def run_on_trusted_counts(
    experts: nn.Module, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, group_alignment: Optional[int]
) -> torch.Tensor:
    """``experts(x, num_tokens_per_expert, group_alignment=...)`` for counts moeq made itself
    (``permute_and_pad``'s, an EP dispatch plan's): right by construction, so a
    :class:`GroupedExperts` with the stock forward (converted ones included) skips their
    value checks (on CUDA they
    would cost a few kernel launches per call). The call goes through the module's
    ``__call__``, so wrappers' hooks (FSDP2's parameter all-gather) still run."""
    if isinstance(experts, GroupedExperts) and type(experts).forward is GroupedExperts.forward:
        return experts(x, num_tokens_per_expert, group_alignment=group_alignment, validate_counts=False)
    return experts(x, num_tokens_per_expert, group_alignment=group_alignment)
