"""moeq: quantization-aware Mixture-of-Experts training (FP8 / MXFP8 expert GEMMs).

    import moeq
    model = moeq.convert_model(model, recipe="mxfp8")   # or "fp8", "bf16"
    with moeq.quantized_weight_cache(model):            # gradient accumulation: quantize
        ...                                             # expert weights once per step

With transformers, ``import moeq`` also registers ``experts_implementation="moeq_bf16" |
"moeq_fp8" | "moeq_mxfp8"`` (moeq.integrations.transformers.interface).
"""
from moeq.experts.swiglu import COMPUTE_BACKENDS, swiglu_experts
from moeq.nn.experts import GroupedExperts
from moeq.nn.moe import MoE, set_aux_loss_scale
from moeq.post_import import when_imported as _when_imported
from moeq.ops.padding import (
    PaddedLayout,
    combine_token_groups,
    pad_token_groups,
    padded_rows,
    permute_and_pad,
    unpad_token_groups,
)
from moeq.numerics.recipes import GROUP_ALIGNMENT, RECIPE_NAMES, QuantizationType, group_alignment, parse_recipe
from moeq.nn.router import TopKRouter, fp32_linear
from moeq.experts.weight_cache import quantized_weight_cache


def _register_experts_functions(_module) -> None:
    from moeq.integrations.transformers.interface import register_experts_functions

    register_experts_functions()


def _wrap_pretrained_model(_module) -> None:
    from moeq.integrations.transformers.interface import wrap_pretrained_model

    wrap_pretrained_model()


# Each runs once transformers imports the module it needs (now, if it already has).
_when_imported("transformers.integrations.moe", _register_experts_functions)
_when_imported("transformers.modeling_utils", _wrap_pretrained_model)


def __getattr__(name):
    # The quantization stack imports torchao; load it only when asked for.
    if name == "convert_model":
        from moeq.convert import convert_model

        return convert_model
    if name == "plan":
        from moeq.convert import plan

        return plan
    if name == "convert_linears":
        from moeq.integrations.torchao.linears import convert_linears

        return convert_linears
    if name == "apply_expert_parallel":
        from moeq.parallel import apply_expert_parallel

        return apply_expert_parallel
    if name == "quantized_grouped_mm":
        from moeq.ops import quantized_grouped_mm

        return quantized_grouped_mm
    raise AttributeError(f"module 'moeq' has no attribute {name!r}")


__all__ = [
    "COMPUTE_BACKENDS",
    "GROUP_ALIGNMENT",
    "GroupedExperts",
    "MoE",
    "PaddedLayout",
    "QuantizationType",
    "RECIPE_NAMES",
    "TopKRouter",
    "apply_expert_parallel",
    "combine_token_groups",
    "convert_linears",
    "convert_model",
    "fp32_linear",
    "group_alignment",
    "pad_token_groups",
    "padded_rows",
    "parse_recipe",
    "permute_and_pad",
    "plan",
    "quantized_grouped_mm",
    "quantized_weight_cache",
    "set_aux_loss_scale",
    "swiglu_experts",
    "unpad_token_groups",
]
