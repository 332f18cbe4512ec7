"""Float64 references shared by the tests: plain loops, no moeq code."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = b.norm()
    num = (a - b).norm()
    if den == 0:
        return float(num)
    return float(num / den)


def experts_reference(x, gate_up_proj, down_proj, counts):
    """Float64 per-expert SwiGLU over contiguous groups (counts sum to x.shape[0])."""
    x, w13, w2 = x.double(), gate_up_proj.double(), down_proj.double()
    hidden = w2.shape[-1]
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xs = x[start : start + n]
        gu = xs @ w13[e].t()
        outs.append((F.silu(gu[:, :hidden]) * gu[:, hidden:]) @ w2[e].t())
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


def moe_reference(x, gate_weight, gate_up_proj, down_proj, top_k, *, score_func="softmax", route_norm=False):
    """Float64 token-by-token MoE: route, run the chosen experts, weighted sum."""
    x = x.double()
    logits = x @ gate_weight.double().t()
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    weights, idx = torch.topk(scores, top_k, dim=-1)
    if route_norm or (score_func == "sigmoid" and top_k > 1):
        weights = weights / weights.sum(-1, keepdim=True)
    w13, w2 = gate_up_proj.double(), down_proj.double()
    hidden = w2.shape[-1]
    out = torch.zeros_like(x) + 0 * (w13.sum() + w2.sum())  # keep the graph when T = 0
    for t in range(x.shape[0]):
        rows = []
        for j in range(top_k):
            e = int(idx[t, j])
            gu = x[t] @ w13[e].t()
            rows.append(weights[t, j] * ((F.silu(gu[:hidden]) * gu[hidden:]) @ w2[e].t()))
        out = out + torch.nn.functional.one_hot(torch.tensor(t), x.shape[0]).double()[:, None] * sum(rows)
    return out, idx
