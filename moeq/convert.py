"""``moeq.convert_model``: swap routed experts to FP8 / MXFP8 / BF16 grouped GEMMs.

Conversion changes a module's class (to a subclass made here) and two plain attributes;
parameters, their dtypes and state_dict keys are untouched, so checkpoints load both ways
and optimizers built before conversion keep working.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from moeq import padding as _padding
from moeq.experts import GroupedExperts, group_end_offsets, swiglu, swiglu_experts
from moeq.padding_policy import local_tensor as _local
from moeq.padding_policy import needs_padding
from moeq.quant.dispatch import KERNEL_AUTO, KERNEL_TRITON, get_kernel, kernel_names, select_kernel
from moeq.quant.grouped_mm import quantized_grouped_mm
from moeq.quant.groups import row_group_ids
from moeq.recipes import QuantizationType, RecipeLike, group_alignment, parse_recipe
from moeq.validation import check_convert_args
from moeq.weight_cache import module_weight_cache

FilterLike = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


class ConvertedExperts:
    """Mixin marking a converted experts module; holds its recipe and kernel choice."""

    moeq_recipe: QuantizationType
    moeq_kernel: str
    # group_alignment (rows), set per instance by convert_model from the recipe: what
    # moeq.MoE's permute-and-pad should produce for these experts.


def resolve_kernel(qtype: QuantizationType, kernel: str, device: torch.device) -> str:
    """The concrete per-GEMM kernel name ``kernel`` ("auto" or a name) means for qtype on device."""
    return select_kernel(kernel, qtype, device).name


def fused_experts_kernel(qtype: QuantizationType, kernel: str, device: torch.device) -> Optional[Callable]:
    """The whole-SwiGLU fused Hopper kernel for ``kernel`` ("auto" or "triton"), or None.

    Fused kernels quantize each activation once inside the passes that already touch it
    (see docs/fp8_hopper.md, docs/mxfp8_hopper.md); they exist for SM90. ``"auto"`` takes
    them there; ``"triton"`` insists and raises elsewhere, naming the kernel to use.
    """
    if kernel not in (KERNEL_AUTO, KERNEL_TRITON) or qtype is QuantizationType.BF16:
        return None
    sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    if not sm90:
        if kernel == KERNEL_TRITON:
            raise RuntimeError(
                f"kernel='triton' ({qtype.value} fused Hopper experts) needs an SM90 GPU, got {device}: "
                f"use kernel='auto' or kernel='emulated'"
            )
        return None
    if qtype is QuantizationType.FP8:
        from moeq.quant.fp8_hopper import fp8_swiglu_experts

        return fp8_swiglu_experts
    from moeq.quant.mxfp8_hopper import mxfp8_swiglu_experts

    return mxfp8_swiglu_experts


def _swiglu_experts_quantized(x, gate_up_proj, down_proj, offs, qtype, kernel, *, weight_cache=None):
    """SwiGLU experts through the recipe's GEMMs on an already aligned layout.

    ``kernel`` is the user's choice ("auto", "triton", or a per-GEMM kernel name).
    ``weight_cache``: the module's ``moeq.weight_cache.ExpertWeightCache`` (inside
    ``moeq.quantized_weight_cache``, eager only); the fused path takes its weights' quantized
    copies from it, the per-GEMM kernels ignore it."""
    fused = fused_experts_kernel(qtype, kernel, x.device)
    if fused is not None:
        qw = _cached_weights(weight_cache, qtype, x, gate_up_proj, down_proj)
        return fused(x, gate_up_proj, down_proj, offs, quantized_weights=qw)
    kernel = resolve_kernel(qtype, kernel, x.device)
    h = swiglu(quantized_grouped_mm(x, gate_up_proj, offs, qtype=qtype, kernel=kernel))
    return quantized_grouped_mm(h, down_proj, offs, qtype=qtype, kernel=kernel)


def _cached_weights(weight_cache, qtype, x, gate_up_proj, down_proj):
    """The fused path's quantized weights from the module's cache, or None (no cache)."""
    if weight_cache is None:
        return None
    need_dgrad = torch.is_grad_enabled() and (x.requires_grad or gate_up_proj.requires_grad or down_proj.requires_grad)
    return weight_cache.lookup(qtype, gate_up_proj, down_proj, need_dgrad)


def routed_swiglu_experts(
    tokens, expert_indices, expert_weights, gate_up_proj, down_proj, qtype, kernel, *, weight_cache=None
):
    """A routed SwiGLU experts block (permute-and-pad, experts, weighted combine) in qtype.

    Args:
        tokens: (T, D). expert_indices: (T, k) ids in [0, E). expert_weights: (T, k).
        gate_up_proj: (E, 2H, D) local tensor. down_proj: (E, D, H) local tensor.
        qtype: the recipe. kernel: the user's kernel choice.
        weight_cache: the module's ``ExpertWeightCache`` or None (see _swiglu_experts_quantized).
    Returns:
        (T, D) in tokens.dtype.
    Where a fused kernel can take the tokens straight from the routing (MXFP8 on SM90:
    the gather is fused into the fake-quant pass), it does; otherwise tokens are
    permuted and padded to the recipe's alignment in one pass.
    """
    num_experts = gate_up_proj.shape[0]
    align = group_alignment(qtype)
    fused = fused_experts_kernel(qtype, kernel, tokens.device)
    if qtype is QuantizationType.MXFP8 and fused is not None and tokens.dtype == torch.bfloat16:
        from moeq.quant.mxfp8_hopper import mxfp8_routed_swiglu_experts

        qw = _cached_weights(weight_cache, qtype, tokens, gate_up_proj, down_proj)
        return mxfp8_routed_swiglu_experts(
            tokens, expert_indices, expert_weights, gate_up_proj, down_proj, quantized_weights=qw
        )
    if qtype is QuantizationType.FP8 and fused is not None and tokens.dtype == torch.bfloat16:
        # routing weights folded into the down GEMM's epilogue, their gradient into the
        # SwiGLU backward pass (moeq/quant/fp8_hopper.py)
        from moeq.quant.fp8_hopper import fp8_routed_swiglu_experts

        qw = _cached_weights(weight_cache, qtype, tokens, gate_up_proj, down_proj)
        return fp8_routed_swiglu_experts(
            tokens, expert_indices, expert_weights, gate_up_proj, down_proj, quantized_weights=qw
        )
    grouped, counts, layout = _padding.permute_and_pad(tokens, expert_indices, num_experts, align)
    if qtype is QuantizationType.BF16:
        out = swiglu_experts(grouped, gate_up_proj, down_proj, counts)
    else:
        offs = group_end_offsets(counts, align)
        out = _swiglu_experts_quantized(grouped, gate_up_proj, down_proj, offs, qtype, kernel, weight_cache=weight_cache)
    out = _padding.combine_token_groups(out, layout, expert_weights)
    # Cast only on a real change: a no-op .to() on an autograd.Function output is
    # miscompiled by torch 2.11's torch.compile (zero gradients).
    return out if out.dtype == tokens.dtype else out.to(tokens.dtype)


class QuantizedGroupedExperts(ConvertedExperts, GroupedExperts):
    """moeq.GroupedExperts whose GEMMs follow ``moeq_recipe``; pads only when needed."""

    def forward(self, x, num_tokens_per_expert, *, group_alignment=None):
        """Same contract as :meth:`GroupedExperts.forward`; see moeq.padding_policy for padding."""
        qtype = self.moeq_recipe
        if qtype is QuantizationType.BF16:
            return super().forward(x, num_tokens_per_expert, group_alignment=group_alignment)
        w13, w2 = _local(self.gate_up_proj), _local(self.down_proj)
        kernel = self.moeq_kernel
        cache = module_weight_cache(self)
        if needs_padding(qtype, group_alignment):
            align = self.group_alignment
            padded, layout = _padding.pad_token_groups(x, num_tokens_per_expert, align)
            y = _swiglu_experts_quantized(padded, w13, w2, layout.padded_offsets, qtype, kernel, weight_cache=cache)
            return _padding.unpad_token_groups(y, layout)
        offs = group_end_offsets(num_tokens_per_expert, group_alignment)
        return _swiglu_experts_quantized(x, w13, w2, offs, qtype, kernel, weight_cache=cache)

    def routed_forward(self, tokens, expert_indices, expert_weights):
        """Same contract as :meth:`GroupedExperts.routed_forward`, in ``moeq_recipe``."""
        if self.moeq_recipe is QuantizationType.BF16:
            return super().routed_forward(tokens, expert_indices, expert_weights)
        w13, w2 = _local(self.gate_up_proj), _local(self.down_proj)
        return routed_swiglu_experts(
            tokens, expert_indices, expert_weights, w13, w2, self.moeq_recipe, self.moeq_kernel,
            weight_cache=module_weight_cache(self),
        )


def hf_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Forward of a converted transformers experts module (``@use_experts_implementation``).

    Args:
        hidden_states: (T, D). top_k_index: (T, k) int64. top_k_weights: (T, k).
    Returns:
        (T, D) in hidden_states.dtype.
    Honours the module's ``has_gate``, ``has_bias``, ``is_transposed`` and ``_apply_gate``
    (which knows concatenated vs interleaved gate/up) flags.
    """
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(
            "transformers' own expert parallelism is not supported by moeq-converted experts: "
            "use moeq.apply_expert_parallel instead"
        )
    if getattr(self, "moeq_expert_dispatcher", None) is not None:
        # moeq.apply_expert_parallel: tokens travel to the experts' ranks (moeq/parallel/hf_experts.py).
        from moeq.parallel.hf_experts import hf_expert_parallel_forward

        return hf_expert_parallel_forward(self, hidden_states, top_k_index, top_k_weights)
    qtype = self.moeq_recipe
    align = self.group_alignment
    num_experts = self.num_experts
    if _is_plain_swiglu(self):
        # Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3: exactly moeq's SwiGLU experts, so they
        # take the same (fused, on SM90) path as moeq.GroupedExperts.
        w13, w2 = _local(self.gate_up_proj), _local(self.down_proj)
        return routed_swiglu_experts(
            hidden_states, top_k_index, top_k_weights, w13, w2, qtype, self.moeq_kernel,
            weight_cache=module_weight_cache(self),
        )
    # Other activations, biases or layouts: per-GEMM kernels, not the fused SwiGLU.
    grouped, counts, layout = _padding.permute_and_pad(hidden_states, top_k_index, num_experts, align)
    out = hf_generic_experts(self, grouped, counts, align)
    # Padding and slack rows may hold bias/activation values: the combine reads real rows only.
    out = _padding.combine_token_groups(out, layout, top_k_weights)
    # Cast only on a real change: a no-op .to() on an autograd.Function output is
    # miscompiled by torch 2.11's torch.compile (zero gradients).
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def hf_generic_experts(self, grouped: torch.Tensor, counts: torch.Tensor, align) -> torch.Tensor:
    """A converted transformers experts module's math on an expert-major layout, per GEMM.

    For layouts the fused SwiGLU does not cover (biases, transposed or interleaved
    weights, other activations, post-expert norm: GPT-OSS). Works on the local shard
    under expert parallelism (E_l experts, DTensor weights).

    Args:
        grouped: (M, D) rows in expert order; with ``align`` each group starts at a
            multiple of it (the padded layout), rows past the last group are slack.
        counts: (E_l,) integer tokens per expert. align: None or the recipe's alignment.
    Returns:
        (M, D); padding and slack rows hold arbitrary values (never combined).
    """
    qtype = self.moeq_recipe
    kernel_choice = KERNEL_AUTO if self.moeq_kernel == KERNEL_TRITON else self.moeq_kernel
    kernel = resolve_kernel(qtype, kernel_choice, grouped.device) if align else None
    offs = group_end_offsets(counts, align)
    num_experts = offs.shape[0]
    need_ids = self.has_bias
    # Expert of each row, for the per-expert bias (slack rows borrow the last expert's).
    expert_ids = row_group_ids(offs, grouped.shape[0]).clamp(max=num_experts - 1) if need_ids else None

    def linear(inp, weight, bias):
        w = _local(weight)
        w = w.transpose(-2, -1) if self.is_transposed else w  # -> (E, N, K)
        if qtype is QuantizationType.BF16:
            out = torch._grouped_mm(inp, w.transpose(-2, -1), offs=offs)
        else:
            out = quantized_grouped_mm(inp, w, offs, qtype=qtype, kernel=kernel)
        if bias is not None:
            out = out + _local(bias)[expert_ids].to(out.dtype)
        return out

    if self.has_gate:
        h = self._apply_gate(linear(grouped, self.gate_up_proj, getattr(self, "gate_up_proj_bias", None)))
    else:
        h = self.act_fn(linear(grouped, self.up_proj, getattr(self, "up_proj_bias", None)))
    out = linear(h, self.down_proj, getattr(self, "down_proj_bias", None))
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    return out


def _is_plain_swiglu(module: nn.Module) -> bool:
    """True for transformers experts computing exactly ``silu(x W_gate) * (x W_up) W_down``
    with concatenated (E, 2I, D) / (E, D, I) weights and no biases or post-norm."""
    if not module.has_gate or module.has_bias or module.is_transposed or getattr(module, "has_post_expert_norm", False):
        return False
    act = getattr(module, "act_fn", None)
    if not getattr(module, "is_concatenated", True) or type(act).__name__ not in ("SiLU", "SiLUActivation"):
        return False
    from transformers.integrations.moe import _default_apply_gate

    return getattr(type(module)._apply_gate, "__wrapped__", type(module)._apply_gate) is _default_apply_gate


def _is_hf_experts(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("is_transposed", "has_gate", "has_bias", "config")) and hasattr(
        module, "down_proj"
    )


def _is_torchtitan_experts(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "GroupedExperts" and cls.__module__.startswith("torchtitan") and all(
        hasattr(module, w) for w in ("w1", "w2", "w3")
    )


def _torchtitan_forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """torchtitan GroupedExperts (w1 (E,H,D), w2 (E,D,H), w3 (E,H,D)) through moeq's GEMMs."""
    qtype = self.moeq_recipe
    w1, w2, w3 = _local(self.w1), _local(self.w2), _local(self.w3)
    w13 = torch.cat([w1, w3], dim=1)  # one fused gate|up GEMM: x is quantized and read once
    if qtype is QuantizationType.BF16:
        return swiglu_experts(x, w13, w2, num_tokens_per_expert)
    padded, layout = _padding.pad_token_groups(x, num_tokens_per_expert, self.group_alignment)
    y = _swiglu_experts_quantized(padded, w13, w2, layout.padded_offsets, qtype, self.moeq_kernel)
    return _padding.unpad_token_groups(y, layout)


def _expert_dims(module: nn.Module) -> dict:
    """{"dim": D, "hidden_dim": H} of an experts module, whatever its layout."""
    if isinstance(module, GroupedExperts):
        return {"dim": module.dim, "hidden_dim": module.hidden_dim}
    if _is_torchtitan_experts(module):
        return {"dim": module.w1.shape[-1], "hidden_dim": module.w1.shape[-2]}
    down = module.down_proj  # (E, D, I), or (E, I, D) when transposed
    d, i = (down.shape[-1], down.shape[-2]) if module.is_transposed else (down.shape[-2], down.shape[-1])
    return {"dim": d, "hidden_dim": i}


def _check_dims(fqn: str, module: nn.Module, qtype: QuantizationType) -> None:
    multiple = group_alignment(qtype)
    if multiple is None:
        return
    for name, size in _expert_dims(module).items():
        if size % multiple:
            raise ValueError(
                f"cannot convert {fqn or '<root>'} to {qtype.value}: its {name} is {size}, not a multiple of "
                f"{multiple} (the {qtype.value} GEMMs need every contraction dim to be one). Leave this module "
                f"out with filter_fqns, or use recipe='bf16'."
            )


def _matches(fqn: str, module: nn.Module, filter_fqns: FilterLike) -> bool:
    if filter_fqns is None:
        return True
    if callable(filter_fqns):
        return bool(filter_fqns(fqn, module))
    return any(f in fqn for f in filter_fqns)


_SUBCLASS_CACHE: dict = {}


def _converted_class(cls: type, forward: Optional[Callable]) -> type:
    """A subclass of ``cls`` mixing in ConvertedExperts (and overriding forward if given).

    Classes are cached per original class, so converting twice reuses the same class."""
    key = (cls, forward)
    if key not in _SUBCLASS_CACHE:
        attrs = {"__module__": __name__}
        if forward is not None:
            attrs["forward"] = forward
        _SUBCLASS_CACHE[key] = type(f"Moeq{cls.__name__}", (ConvertedExperts, cls), attrs)
    return _SUBCLASS_CACHE[key]


def _original_class(module: nn.Module) -> type:
    cls = type(module)
    if issubclass(cls, ConvertedExperts):
        return next(b for b in cls.__mro__[1:] if not issubclass(b, ConvertedExperts))
    return cls


def convert_model(
    model: nn.Module,
    recipe: RecipeLike,
    *,
    filter_fqns: FilterLike = None,
    kernel: str = "auto",
) -> nn.Module:
    """Swap every routed-experts module of ``model`` to the recipe's grouped GEMMs, in place.

    Finds moeq ``GroupedExperts`` (also inside ``moeq.MoE``), transformers 5.x experts
    modules (``@use_experts_implementation``: Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3,
    GPT-OSS, ...) and torchtitan ``GroupedExperts``. Routers, shared experts, attention
    and embeddings are left alone. Converting again to the same recipe is a no-op;
    converting to another recipe switches it.

    Args:
        model: any nn.Module.
        recipe: ``"bf16"``, ``"fp8"``, ``"mxfp8"`` or a QuantizationType.
        filter_fqns: None (all experts), a substring of module FQNs to convert (a str
            is one substring), a list of them, or ``f(fqn, module) -> bool``.
        kernel: ``"auto"`` (fastest path the device runs), ``"emulated"`` (plain-torch
            quantization numerics, any device), ``"triton"`` (fused Hopper
            kernels; SM90 only), or a per-GEMM kernel from
            ``moeq.quant.dispatch.kernel_names()``.
    Returns:
        ``model``, with ``model.moeq_converted_fqns`` listing the converted modules.
    Raises:
        ValueError: unknown recipe or kernel, nothing matched, or a dim not divisible by
            the recipe's alignment (names the module, the dim and the multiple).
    """
    filter_fqns = check_convert_args(model, filter_fqns)  # a str is one FQN substring
    qtype = parse_recipe(recipe)
    if kernel not in (KERNEL_AUTO, KERNEL_TRITON):
        try:
            get_kernel(kernel)
        except ValueError:
            raise ValueError(
                f"unknown kernel {kernel!r}: use 'auto', 'triton' (fused SM90 experts) or a per-GEMM kernel "
                f"({', '.join(repr(k) for k in kernel_names() if k != KERNEL_AUTO)})"
            ) from None
    converted = []
    for fqn, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            forward = None  # QuantizedGroupedExperts below
        elif _is_torchtitan_experts(module):
            forward = _torchtitan_forward
        elif _is_hf_experts(module):
            forward = hf_experts_forward
        else:
            continue
        if not _matches(fqn, module, filter_fqns):
            continue
        _check_dims(fqn, module, qtype)
        if isinstance(module, GroupedExperts):
            module.__class__ = QuantizedGroupedExperts
        else:
            module.__class__ = _converted_class(_original_class(module), forward)
        module.moeq_recipe = qtype
        module.moeq_kernel = kernel
        module.group_alignment = group_alignment(qtype)
        converted.append(fqn)
    if not converted:
        what = "routed-experts modules" if filter_fqns is None else f"experts modules matching filter_fqns={filter_fqns!r}"
        raise ValueError(
            f"convert_model found no {what} in {type(model).__name__}: it converts moeq.GroupedExperts/MoE, "
            f"transformers 5.x MoE experts and torchtitan GroupedExperts"
        )
    model.moeq_converted_fqns = converted
    return model

