"""A small byte-level MoE language model built from moeq.MoE blocks (the demo's model)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moeq.nn.moe import MoE


@dataclass
class MoEModelConfig:
    """Shape of :class:`MoETransformer`. Defaults give a ~1M-parameter CPU-friendly model."""

    vocab_size: int = 256  # bytes
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_hidden_dim: int = 128
    shared_expert_hidden_dim: Optional[int] = None
    max_seq_len: int = 256
    router_dtype: Optional[str] = None  # None or "float32"
    compute_backend: str = "grouped_mm"

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, S, D) -> (B, S, D)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).transpose(1, 3).unbind(2)
        q, k = _apply_rope(q, rope), _apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


def _rope_tables(seq_len: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def _apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: attention, then an MoE feed-forward."""

    def __init__(self, cfg: MoEModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.num_heads)
        self.ffn_norm = nn.RMSNorm(cfg.dim)
        self.moe = MoE(
            cfg.dim,
            cfg.expert_hidden_dim,
            cfg.num_experts,
            cfg.top_k,
            compute_backend=cfg.compute_backend,
            router_dtype=torch.float32 if cfg.router_dtype == "float32" else None,
            shared_expert_hidden_dim=cfg.shared_expert_hidden_dim,
        )

    def forward(self, x, rope):
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.moe(self.ffn_norm(x))


class MoETransformer(nn.Module):
    """Byte-level decoder-only LM whose feed-forward layers are moeq.MoE blocks."""

    def __init__(self, cfg: MoEModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 byte ids -> (B, S, vocab) float logits."""
        rope = _rope_tables(tokens.shape[1], self.cfg.dim // self.cfg.num_heads, tokens.device)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, rope)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-byte cross-entropy of a (B, S+1) batch; float32 scalar."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
