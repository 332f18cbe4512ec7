"""Adapters for torchtitan's experts modules: 0.3 ``GroupedExperts`` and ``GptOssGroupedExperts``,
0.2.x ``GroupedExperts``.

torchtitan's ``RoutedExperts`` calls ``inner_experts(x, num_tokens_per_expert)`` on the
rows its token dispatcher laid out in expert order. Which layout depends on the
dispatcher: the standard one (local or all-to-all) packs the groups back to back;
``TorchAOTokenDispatcher`` (what torchtitan's FP8/MXFP8 converters install) and
HybridEP pad each group to ``pad_multiple`` rows (the counts it passes include the
padding) inside a fixed-size buffer whose tail rows belong to no group. The converted
forward:

* treats rows past the last group as slack: they come out zero and get zero gradient;
* reads the dispatcher's ``pad_multiple`` at conversion (``moeq_incoming_alignment``) and
  pads only when the recipe needs more (moeq.experts.padding_policy);
* reads the module's parameters on every call (``to_local()`` of torchtitan's DTensor
  shards under its expert parallelism or FSDP), so torchtitan may swap them after
  conversion;
* runs its GEMMs in bfloat16 (recipe ``bf16``) or the recipe's FP8/MXFP8 numerics on
  bfloat16 operands, as torchtitan's own experts do, returning ``x``'s dtype.

Nothing here imports torchtitan (detection goes by class names and attributes): see
``moeq.torchtitan`` for the config-tree converter and ``--override.imports`` factories.
The moeq weight cache is not used for these experts (their gate|up weight is
concatenated per call), so ``moeq.quantized_weight_cache`` is a no-op for them.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from moeq.experts.gemms import align_token_groups, grouped_swiglu_experts, restore_token_groups
from moeq.experts.plan import module_plan
from moeq.integrations.base import ExpertsAdapter, local_parameters
from moeq.ops.grouped_mm import planned_grouped_mm
from moeq.numerics.groups import row_group_ids, zero_slack_rows

_EP_UNSUPPORTED = (
    "use torchtitan's own expert parallelism (parallelism.expert_parallel_degree): its token dispatcher "
    "moves the tokens, and the moeq-converted experts run on its local expert shards"
)


def _torchtitan_class(module: nn.Module, name: str, package: str = "torchtitan") -> bool:
    """True if a class named ``name`` from torchtitan module ``package...`` is in module's MRO."""
    return any(c.__name__ == name and c.__module__.startswith(package) for c in type(module).__mro__)


def _has_parameters(module: nn.Module, names: Sequence[str]) -> bool:
    return all(isinstance(getattr(module, n, None), torch.Tensor) for n in names)


def power_of_two_part(n: Optional[int]) -> Optional[int]:
    """Largest power of two dividing ``n`` (groups starting at multiples of n start at
    multiples of it); None for None or n < 1."""
    if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return None
    return n & -n


def dispatcher_alignment(token_dispatcher) -> Optional[int]:
    """Alignment the groups a torchtitan token dispatcher (or its config) hands out start
    at: its ``pad_multiple`` (TorchAOTokenDispatcher, HybridEP) as a power of two, or None."""
    return power_of_two_part(getattr(token_dispatcher, "pad_multiple", None))


def _bf16(t: Tensor) -> Tensor:
    return t if t.dtype == torch.bfloat16 else t.bfloat16()


def _like(out: Tensor, x: Tensor) -> Tensor:
    # Cast only on a real change: a no-op .to() on an autograd.Function output is
    # miscompiled by torch 2.11's torch.compile (zero gradients).
    return out if out.dtype == x.dtype else out.to(x.dtype)


class _TorchtitanAdapter(ExpertsAdapter):
    """What torchtitan's experts families share: call signature, slack rows, EP by torchtitan."""

    expert_parallel_unsupported = _EP_UNSUPPORTED
    parameters: Sequence[str] = ()

    def local_weights(self, module: nn.Module) -> Dict[str, Tensor]:
        return local_parameters(module, self.parameters)

    def incoming_alignment(self, module: nn.Module, parent: Optional[nn.Module]) -> Optional[int]:
        return dispatcher_alignment(getattr(parent, "token_dispatcher", None))


class _SwiGLUAdapter(_TorchtitanAdapter):
    """SwiGLU experts with separate gate (w1), up (w3) and down (w2) weights."""

    gate, up, down = "", "", ""

    def dims(self, module: nn.Module) -> Dict[str, int]:
        hidden, dim = getattr(module, self.gate).shape[-2:]
        return {"dim": dim, "hidden_dim": hidden}

    def swiglu(self, module: nn.Module) -> bool:
        return True

    def forward(self, module, x: Tensor, num_tokens_per_expert: Tensor) -> Tensor:
        """Args: x (R, D) rows in expert order (tail rows past the last group are slack);
        num_tokens_per_expert (E_local,) integer. Returns (R, D) in x.dtype."""
        w = self.local_weights(module)
        plan = module_plan(module)
        # One gate|up GEMM: x is quantized and read once.
        gate_up = torch.cat([_bf16(w[self.gate]), _bf16(w[self.up])], dim=1)
        out = grouped_swiglu_experts(
            _bf16(x), gate_up, _bf16(w[self.down]), num_tokens_per_expert, plan,
            incoming_alignment=plan.incoming_alignment, tail_slack=True,
        )
        return _like(out, x)


class TorchtitanExpertsAdapter(_SwiGLUAdapter):
    """torchtitan 0.3 ``torchtitan.models.common.moe.GroupedExperts`` (w1_EFD (E, F, D),
    w2_EDF (E, D, F), w3_EFD (E, F, D)): deepseek_v3, qwen3, llama4, ... experts."""

    family = "torchtitan GroupedExperts"
    parameters = ("w1_EFD", "w2_EDF", "w3_EFD")
    gate, up, down = "w1_EFD", "w3_EFD", "w2_EDF"

    def matches(self, module: nn.Module) -> bool:
        return _torchtitan_class(module, "GroupedExperts", "torchtitan.models.common") and _has_parameters(
            module, self.parameters
        )


class TorchtitanLegacyExpertsAdapter(_SwiGLUAdapter):
    """torchtitan 0.2.x ``torchtitan.models.moe.GroupedExperts`` (w1 (E, H, D), w2 (E, D, H),
    w3 (E, H, D)). Its EP dispatch pads groups by a module-level setting moeq does not
    read, so the converted experts pad for the recipe themselves (a copy, never wrong)."""

    family = "torchtitan 0.2 GroupedExperts"
    parameters = ("w1", "w2", "w3")
    gate, up, down = "w1", "w3", "w2"

    def matches(self, module: nn.Module) -> bool:
        return _torchtitan_class(module, "GroupedExperts") and _has_parameters(module, self.parameters)

    def incoming_alignment(self, module: nn.Module, parent: Optional[nn.Module]) -> Optional[int]:
        return None


def gpt_oss_activation(h: Tensor, limit: float, alpha: float = 1.702) -> Tensor:
    """GPT-OSS's gated activation on interleaved gate/linear columns.

    Args:
        h: (M, 2F): even columns the gate, odd columns the linear part.
        limit: the gate is clamped above at it, the linear part to [-limit, limit].
    Returns:
        (M, F) ``g * sigmoid(alpha * g) * (linear + 1)``.
    """
    gate = h[..., 0::2].clamp(max=limit)
    linear = h[..., 1::2].clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(alpha * gate)
    return torch.addcmul(glu, glu, linear)


def _tp_degree(weight: Tensor) -> int:
    mesh = getattr(weight, "device_mesh", None)
    names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
    return mesh.size(names.index("tp")) if "tp" in names else 1


class TorchtitanGptOssExpertsAdapter(_TorchtitanAdapter):
    """torchtitan 0.3 ``GptOssGroupedExperts``: mlp1_weight_EGD (E, 2F, D) with interleaved
    gate/linear rows and bias mlp1_bias_EG (E, 2F), mlp2_weight_EDF (E, D, F) and bias
    mlp2_bias_ED (E, D), the clamped GPT-OSS activation. Runs per GEMM (no fused SwiGLU)."""

    family = "torchtitan GptOssGroupedExperts"
    parameters = ("mlp1_weight_EGD", "mlp1_bias_EG", "mlp2_weight_EDF", "mlp2_bias_ED")

    def matches(self, module: nn.Module) -> bool:
        return _torchtitan_class(module, "GptOssGroupedExperts") and _has_parameters(module, self.parameters)

    def dims(self, module: nn.Module) -> Dict[str, int]:
        dim, hidden = module.mlp2_weight_EDF.shape[-2:]
        return {"dim": dim, "hidden_dim": hidden}

    def forward(self, module, x: Tensor, num_tokens_per_expert: Tensor) -> Tensor:
        """Args: x (R, D) rows in expert order (tail rows past the last group are slack);
        num_tokens_per_expert (E_local,) integer. Returns (R, D) in x.dtype; slack rows
        are zero (no bias leaks into them)."""
        w = self.local_weights(module)
        plan = module_plan(module)
        qtype, kernel = plan.recipe, plan.per_gemm
        aligned = align_token_groups(_bf16(x), num_tokens_per_expert, plan, plan.incoming_alignment, tail_slack=True)
        offs = aligned.offs
        expert = row_group_ids(offs, aligned.x.shape[0]).clamp(max=offs.shape[0] - 1)
        h = planned_grouped_mm(aligned.x, _bf16(w["mlp1_weight_EGD"]), offs, qtype, kernel)
        h = h + w["mlp1_bias_EG"][expert].to(h.dtype)
        h = gpt_oss_activation(h, module.swiglu_limit)
        y = planned_grouped_mm(h, _bf16(w["mlp2_weight_EDF"]), offs, qtype, kernel)
        bias = w["mlp2_bias_ED"]
        tp = _tp_degree(module.mlp2_weight_EDF)
        if tp > 1:
            # Tensor-parallel experts sum partial outputs over tp ranks: add 1/tp of the
            # bias on each, with the full gradient (straight through the scaling).
            bias = bias + (bias / tp - bias).detach()
        y = zero_slack_rows(y + bias[expert].to(y.dtype), offs)
        return _like(restore_token_groups(y, aligned), x)


TORCHTITAN_EXPERTS = TorchtitanExpertsAdapter()
TORCHTITAN_GPT_OSS_EXPERTS = TorchtitanGptOssExpertsAdapter()
TORCHTITAN_LEGACY_EXPERTS = TorchtitanLegacyExpertsAdapter()
TORCHTITAN_ADAPTERS = (TORCHTITAN_GPT_OSS_EXPERTS, TORCHTITAN_EXPERTS, TORCHTITAN_LEGACY_EXPERTS)


def is_torchtitan_experts(module: nn.Module) -> bool:
    """True for a torchtitan experts module of any family moeq knows, converted or not."""
    return any(a.matches(module) for a in TORCHTITAN_ADAPTERS)


def unknown_torchtitan_experts(module: nn.Module) -> Optional[str]:
    """Why moeq cannot convert ``module`` if it is a torchtitan ``GroupedExperts`` (subclass)
    of no family moeq knows (e.g. ``FusedGroupedExperts``' fused w13), else None."""
    if not _torchtitan_class(module, "GroupedExperts") or is_torchtitan_experts(module):
        return None
    params = [n for n, _ in module.named_parameters(recurse=False)]
    known = "; ".join(f"{a.family}: {', '.join(a.parameters)}" for a in TORCHTITAN_ADAPTERS)
    return f"a torchtitan {type(module).__name__} with parameters {params}, a layout moeq does not know ({known})"
