"""Routed SwiGLU experts with 3D weights and three compute backends."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moeq.padding import combine_token_groups, permute_and_pad
from moeq.padding_policy import local_tensor
from moeq.validation import check_counts, check_counts_values, check_int, check_tensor

# The one place backend names live.
COMPUTE_BACKENDS = ("grouped_mm", "batched_mm_padded", "for_loop")


def check_compute_backend(compute_backend: str) -> str:
    """Return ``compute_backend`` if it is one of COMPUTE_BACKENDS, else raise ValueError."""
    if compute_backend not in COMPUTE_BACKENDS:
        raise ValueError(
            f"unknown compute_backend {compute_backend!r}: use one of {', '.join(map(repr, COMPUTE_BACKENDS))}"
        )
    return compute_backend


def round_up(x, multiple: int):
    """Smallest multiple of ``multiple`` >= x (ints or integer tensors)."""
    return (x + multiple - 1) // multiple * multiple


def group_end_offsets(num_tokens_per_expert: torch.Tensor, group_alignment: Optional[int] = None) -> torch.Tensor:
    """(E,) counts -> (E,) int32 cumulative end offsets for ``torch._grouped_mm``.

    With ``group_alignment=a`` each group occupies ``round_up(count, a)`` rows (the
    padded layout of moeq.padding), so every group starts at a multiple of ``a``.
    """
    counts = num_tokens_per_expert
    if group_alignment is not None and group_alignment > 1:
        counts = round_up(counts, group_alignment)
    return torch.cumsum(counts, 0, dtype=torch.int32)


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


def _check_grouped_mm_operand(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(
            f"compute_backend='grouped_mm' needs float32/bfloat16/float16 {name}, got {t.dtype}: "
            f"use compute_backend='for_loop' for other dtypes"
        )
    multiple = 16 // t.element_size()
    if t.shape[-1] % multiple:
        raise ValueError(
            f"compute_backend='grouped_mm' needs the last dim of {name} to be a multiple of {multiple} for "
            f"{t.dtype} (16-byte aligned rows), got {t.shape[-1]}: pad the model dim / hidden dim, or use "
            f"compute_backend='for_loop'"
        )


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


def _expert_row_index(offs: torch.Tensor, num_rows: int):
    """For grouped rows, the expert id of each row and its position inside the group.

    Rows in no group (slack past ``offs[-1]``) get expert id E (out of range)."""
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    expert = torch.searchsorted(offs, rows, right=True)
    padded_starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    pos = rows - padded_starts.gather(0, expert.clamp(max=offs.numel() - 1))
    return expert, pos


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(M, 2H) gate|up -> (M, H) ``silu(gate) * up``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _check_alignment(group_alignment) -> Optional[int]:
    if group_alignment is None:
        return None
    check_int("group_alignment", group_alignment, minimum=1,
              fix="pass None or a power of two (moeq.group_alignment(recipe))")
    if group_alignment & (group_alignment - 1):
        raise ValueError(
            f"group_alignment must be None or a power of two, got {group_alignment}: use "
            f"moeq.group_alignment(recipe) or the alignment passed to moeq.pad_token_groups"
        )
    return group_alignment


def check_experts_inputs(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    group_alignment: Optional[int] = None,
) -> None:
    """Host-only checks of :func:`swiglu_experts`' arguments (shapes, dtypes, devices).

    Raises TypeError/ValueError naming the argument and the fix; reads no device data."""
    check_tensor("x", x, dim=2, layout="(tokens, dim)")
    check_tensor("gate_up_proj", gate_up_proj, dim=3, layout="(experts, 2 * hidden, dim)")
    check_tensor("down_proj", down_proj, dim=3, layout="(experts, dim, hidden)")
    num_experts, two_h, dim = gate_up_proj.shape
    if two_h % 2 or tuple(down_proj.shape) != (num_experts, dim, two_h // 2):
        raise ValueError(
            f"expert weights do not fit together: gate_up_proj is {tuple(gate_up_proj.shape)} (E, 2H, D) and "
            f"down_proj {tuple(down_proj.shape)}, expected ({num_experts}, {dim}, {two_h // 2}) (E, D, H)"
        )
    if x.shape[1] != dim:
        raise ValueError(
            f"x has {x.shape[1]} features per token but the experts' dim is {dim}: pass (tokens, {dim}) "
            f"tokens, or build the experts with dim={x.shape[1]}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}: cast the tokens (x.float())")
    if gate_up_proj.dtype != down_proj.dtype:
        raise TypeError(
            f"gate_up_proj is {gate_up_proj.dtype} but down_proj is {down_proj.dtype}: keep the expert weights "
            f"in one dtype (experts.to(dtype))"
        )
    if x.dtype != gate_up_proj.dtype:
        raise TypeError(
            f"x is {x.dtype} but the expert weights are {gate_up_proj.dtype}: cast the tokens to the weights' "
            f"dtype (x.to({gate_up_proj.dtype})) or the module (experts.to({x.dtype}))"
        )
    if x.device != gate_up_proj.device or x.device != down_proj.device:
        raise ValueError(
            f"x is on {x.device} but the expert weights are on {gate_up_proj.device}: move the tokens or the "
            f"module to one device"
        )
    check_counts("num_tokens_per_expert", num_tokens_per_expert, num_experts, x)
    _check_alignment(group_alignment)


def swiglu_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    *,
    compute_backend: str = "grouped_mm",
    group_alignment: Optional[int] = None,
    validate_counts: bool = True,
) -> torch.Tensor:
    """Routed SwiGLU experts, functional form.

    Args:
        x: (M, D) tokens grouped in expert order, float32/bfloat16/float16 (float64
            with the fallback backends), the weights' dtype. Without ``group_alignment``
            the counts sum to M. With ``group_alignment=a`` the tokens are in the padded
            layout of :func:`moeq.pad_token_groups` (group e starts at a multiple of a,
            padding rows are zero) and rows past the last group are slack.
        gate_up_proj: (E, 2H, D); rows [0, H) gate, [H, 2H) up.
        down_proj: (E, D, H).
        num_tokens_per_expert: (E,) integer counts of real (unpadded) tokens, on x's device.
        compute_backend: one of COMPUTE_BACKENDS. ``grouped_mm`` is sync-free;
            ``batched_mm_padded`` and ``for_loop`` read the counts on the host once.
        validate_counts: check the counts' values (non-negative; summing to M, or with
            ``group_alignment`` their padded groups fitting in M): at once on CPU, with
            ``torch._assert_async`` on CUDA and under torch.compile (no sync). False
            skips only these value checks, for callers whose counts are right by
            construction (moeq's own routing); shapes, dtypes and devices are always checked.
    Returns:
        (M, D) in x.dtype; padding and slack rows are zero, and so is the gradient of
        slack rows of x.
    Raises:
        TypeError/ValueError naming the argument: x not 2-D, features != D, dtype not
        the weights', counts not an (E,) integer tensor on x's device, bad alignment,
        and (eager CPU, or any fallback backend) counts with wrong values.
    """
    check_compute_backend(compute_backend)
    check_experts_inputs(x, gate_up_proj, down_proj, num_tokens_per_expert, group_alignment)
    num_rows, num_experts = x.shape[0], gate_up_proj.shape[0]
    padded = group_alignment is not None and group_alignment > 1
    if validate_counts:
        # the fallbacks read the counts on the host anyway: check that copy (raises at once)
        counts = num_tokens_per_expert if compute_backend == "grouped_mm" else num_tokens_per_expert.cpu()
        check_counts_values("num_tokens_per_expert", counts, num_rows, group_alignment)
    if num_experts == 0 or num_rows == 0:
        # No expert or no token: an empty graph would drop the weights from autograd,
        # so multiply by zero to keep gradients (all zero) defined for every parameter.
        keep = x.sum() + (gate_up_proj.sum() + down_proj.sum()).to(x.dtype)
        return x.new_zeros(num_rows, down_proj.shape[1]) + 0 * keep

    offs = group_end_offsets(num_tokens_per_expert, group_alignment)
    if compute_backend == "grouped_mm":
        for name, t in (("x", x), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            _check_grouped_mm_operand(name, t)
        if padded:
            # Slack rows are in no group: torch._grouped_mm leaves their output and input
            # gradient unwritten. Select them to zero on both sides (a select: NaN never leaks).
            in_group = (torch.arange(num_rows, device=x.device) < offs[-1])[:, None]
            x = torch.where(in_group, x, 0)
        h = swiglu(grouped_mm(x, gate_up_proj, offs))
        out = grouped_mm(h, down_proj, offs)
        return torch.where(in_group, out, 0) if padded else out

    if compute_backend == "for_loop":
        return _for_loop(x, gate_up_proj, down_proj, num_tokens_per_expert, offs)
    return _batched_mm_padded(x, gate_up_proj, down_proj, num_tokens_per_expert, offs)


def _for_loop(x, gate_up_proj, down_proj, counts, offs):
    ends = offs.tolist()  # host read: the portable fallback trades one sync for simplicity
    counts_h = counts.tolist()
    pieces, start = [], 0
    for e, (end, n) in enumerate(zip(ends, counts_h)):
        if n > 0:
            pieces.append(swiglu(x[start : start + n] @ gate_up_proj[e].t()) @ down_proj[e].t())
        if end - start - n > 0:
            pieces.append(x.new_zeros(end - start - n, down_proj.shape[1]))
        start = end
    pieces.append(x.new_zeros(x.shape[0] - start, down_proj.shape[1]))
    # The zero-weighted sum keeps every parameter in the graph when some experts get no tokens.
    return torch.cat(pieces) + 0 * (gate_up_proj.sum() + down_proj.sum()).to(x.dtype)


def _batched_mm_padded(x, gate_up_proj, down_proj, counts, offs):
    num_rows, num_experts = x.shape[0], gate_up_proj.shape[0]
    capacity = int(counts.max())  # host read: the batch dim of bmm is the largest group
    expert, pos = _expert_row_index(offs, num_rows)
    real = (expert < num_experts) & (pos < counts.gather(0, expert.clamp(max=num_experts - 1)).to(pos.dtype))
    # Padding and slack rows scatter into a dump slot (expert E) that bmm never sees.
    e_idx = torch.where(real, expert, num_experts).long()
    p_idx = torch.where(real, pos, 0).long()
    batch = x.new_zeros(num_experts + 1, max(capacity, 1), x.shape[1])
    batch = batch.index_put((e_idx, p_idx), x)[:num_experts]
    h = swiglu(torch.bmm(batch, gate_up_proj.transpose(-2, -1)))
    y = torch.bmm(h, down_proj.transpose(-2, -1))
    y = torch.cat([y, y.new_zeros(1, *y.shape[1:])])  # zeros for padding/slack rows
    return y[e_idx, p_idx]


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
