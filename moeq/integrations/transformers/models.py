"""Small transformers 5.x MoE language models built from config (no download)."""
from __future__ import annotations

import torch
from torch import nn

HF_MODEL_NAMES = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "llama4", "dbrx", "jetmoe", "longcat_flash")


def hf_config(name: str, *, vocab_size: int = 256, dim: int = 128, num_layers: int = 2, num_heads: int = 4,
              num_experts: int = 8, top_k: int = 2, expert_hidden_dim: int = 128):
    """A transformers config of model family ``name`` with the given sizes.

    ``expert_hidden_dim`` is each routed expert's hidden size; families with zero-compute
    experts (longcat_flash) get ``num_experts // 2`` of them besides the ``num_experts``
    routed ones. Raises ValueError for an unknown name (listing HF_MODEL_NAMES),
    ImportError without transformers."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("--model needs transformers: pip install 'moeq[hf]'") from e
    head_dim = dim // num_heads
    common = dict(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=2 * expert_hidden_dim,
                                           moe_intermediate_size=expert_hidden_dim, num_key_value_heads=num_heads,
                                           head_dim=head_dim, num_experts=num_experts, num_experts_per_tok=top_k,
                                           decoder_sparse_step=1, mlp_only_layers=[])
    if name == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=expert_hidden_dim, num_key_value_heads=num_heads,
                                          head_dim=head_dim, num_local_experts=num_experts, num_experts_per_tok=top_k)
    if name == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=expert_hidden_dim, num_key_value_heads=num_heads,
                                        num_experts=num_experts, num_experts_per_tok=top_k)
    if name == "deepseek_v3":
        return transformers.DeepseekV3Config(**common, intermediate_size=2 * expert_hidden_dim,
                                             moe_intermediate_size=expert_hidden_dim, num_key_value_heads=num_heads,
                                             n_routed_experts=num_experts, num_experts_per_tok=top_k, n_group=1,
                                             topk_group=1, first_k_dense_replace=0, q_lora_rank=None,
                                             kv_lora_rank=dim // 2, qk_rope_head_dim=head_dim // 2,
                                             qk_nope_head_dim=head_dim // 2, v_head_dim=head_dim, n_shared_experts=1)
    if name == "gpt_oss":
        return transformers.GptOssConfig(**common, intermediate_size=expert_hidden_dim, num_key_value_heads=num_heads,
                                         head_dim=head_dim, num_local_experts=num_experts, num_experts_per_tok=top_k,
                                         layer_types=["full_attention"] * num_layers)
    if name == "llama4":
        return transformers.Llama4TextConfig(**common, intermediate_size=expert_hidden_dim,
                                             intermediate_size_mlp=2 * expert_hidden_dim, num_key_value_heads=num_heads,
                                             head_dim=head_dim, num_local_experts=num_experts, num_experts_per_tok=top_k)
    if name == "dbrx":
        return transformers.DbrxConfig(
            d_model=dim, n_heads=num_heads, n_layers=num_layers, vocab_size=vocab_size, bos_token_id=0, eos_token_id=1,
            pad_token_id=0, attn_config={"kv_n_heads": num_heads, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": expert_hidden_dim, "moe_num_experts": num_experts, "moe_top_k": top_k})
    if name == "jetmoe":
        # its attention heads are experts too (JetMoeMoA): kv_channels * heads is their width
        return transformers.JetMoeConfig(
            vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=num_layers, num_key_value_heads=num_heads,
            kv_channels=head_dim, intermediate_size=expert_hidden_dim, num_local_experts=num_experts,
            num_experts_per_tok=top_k, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if name == "longcat_flash":
        return transformers.LongcatFlashConfig(
            vocab_size=vocab_size, hidden_size=dim, num_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_heads, ffn_hidden_size=2 * expert_hidden_dim, q_lora_rank=dim // 2,
            kv_lora_rank=dim // 2, qk_nope_head_dim=head_dim, qk_rope_head_dim=head_dim, head_dim=head_dim,
            v_head_dim=head_dim, moe_topk=top_k, n_routed_experts=num_experts, zero_expert_num=num_experts // 2,
            expert_ffn_hidden_size=expert_hidden_dim, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(HF_MODEL_NAMES)}")


class HFCausalLM(nn.Module):
    """A transformers causal LM with moeq's ``loss(tokens)`` interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 -> (B, S, vocab) logits."""
        return self.model(input_ids=tokens).logits

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of a (B, S+1) batch (transformers shifts the labels)."""
        return self.model(input_ids=tokens, labels=tokens).loss


def build_hf_model(name: str, **sizes) -> HFCausalLM:
    """``HFCausalLM`` around ``AutoModelForCausalLM.from_config(hf_config(name, **sizes))``."""
    from transformers import AutoModelForCausalLM

    return HFCausalLM(AutoModelForCausalLM.from_config(hf_config(name, **sizes)))


def model_from_config_path(path: str, dtype: torch.dtype) -> nn.Module:
    """A transformers model built from a local ``config.json`` (or the directory holding
    it) in ``dtype``, with random weights on the current default device (pass
    ``torch.device("meta")`` as a context to allocate nothing). Causal LMs through
    ``AutoModelForCausalLM``, other architectures through ``AutoModel``.

    Raises FileNotFoundError naming the path when there is no config there."""
    import os

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    directory = os.path.dirname(path) if path.endswith(".json") else path
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"no config.json at {path}: pass a transformers model directory or its config.json")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError:  # not a causal LM architecture
        return AutoModel.from_config(config, dtype=dtype)
