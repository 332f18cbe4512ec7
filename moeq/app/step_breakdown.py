"""``StepBreakdown``: where a training step's time goes (routed experts, attention,
optimizer, the rest), measured with timing events around modules, no host sync.

Attached to a model and its optimizer, it records a timing event before and after every
forward and backward of the routed-experts modules (those a moeq adapter knows; for moeq's
own ``MoE`` the whole block) and of the attention modules, and around ``optimizer.step()``. A step is the interval between two
``optimizer.step()`` ends, so "other" (everything else: embeddings, norms, routers,
lm_head, loss, gradient clipping, the loop's own host work) is that interval minus the
three measured parts, and the four fractions sum to 1. CUDA events on a GPU (resolved
once, in :meth:`result`); ``time.perf_counter`` on CPU. Eager mode only: under
``torch.compile`` the hooks would be traced into the graph.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from moeq.integrations import find_adapter
from moeq.nn.moe import MoE

__all__ = ["CATEGORIES", "StepBreakdown", "attention_modules", "experts_modules"]

CATEGORIES = ("experts", "attention", "optimizer", "other")
_ATTENTION_NAMES = ("attn", "self_attn", "attention", "self_attention")


def experts_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The outermost routed-experts modules of ``model`` (converted or not). A ``moeq.MoE``
    calls its experts through ``routed_forward`` (no module call for hooks to see), so for
    moeq's own layer the whole ``MoE`` block (router, dispatch, experts, combine) is timed."""
    found: List[Tuple[str, nn.Module]] = []
    blocks = {id(m): fqn for fqn, m in model.named_modules() if isinstance(m, MoE)}
    for fqn, m in model.named_modules():
        if any(fqn.startswith(f + ".") for f, _ in found):
            continue
        if isinstance(m, MoE) or (find_adapter(m) is not None and id(_parent(model, fqn)) not in blocks):
            found.append((fqn, m))
    return found


def _parent(model: nn.Module, fqn: str) -> nn.Module:
    head = fqn.rpartition(".")[0]
    return model.get_submodule(head) if head else model


def attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The outermost attention modules (a class named ``*Attention`` or a child named
    ``attn`` / ``self_attn`` / ``attention``), outside any experts module."""
    experts = [f for f, _ in experts_modules(model)]
    found: List[Tuple[str, nn.Module]] = []
    for fqn, m in model.named_modules():
        name = fqn.rsplit(".", 1)[-1]
        is_attention = type(m).__name__.endswith("Attention") or name in _ATTENTION_NAMES
        inside = any(fqn.startswith(f + ".") for f in experts) or any(fqn.startswith(f + ".") for f, _ in found)
        if fqn and is_attention and not inside and not isinstance(m, nn.ModuleList):
            found.append((fqn, m))
    return found


class StepBreakdown:
    """Time per step spent in experts / attention / optimizer / other (see the module doc).

    Args:
        skip_steps: steps not counted at the start (warm-up: allocator, autotuning).
        max_steps: steps counted at most (bounds the events held).
    """

    def __init__(self, skip_steps: int = 3, max_steps: int = 50):
        self.skip_steps, self.max_steps = skip_steps, max_steps
        self._handles: list = []
        self._open: Dict[Tuple[int, str], list] = {}
        self._spans: List[Tuple[str, object, object]] = []
        self._steps: List[Tuple[object, object, list]] = []
        self._last_end = None
        self._seen = 0
        self._cuda = False
        self.counts: Dict[str, int] = {}

    def _now(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self._cuda else (end - start) * 1e3

    def _begin(self, key):
        self._open.setdefault(key, []).append(self._now())

    def _end(self, key, category):
        stack = self._open.get(key)
        if stack:
            self._spans.append((category, stack.pop(), self._now()))

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> "StepBreakdown":
        """Register the hooks on ``model``'s experts and attention modules and on ``optimizer``."""
        self._cuda = torch.device(device).type == "cuda"
        groups = {"experts": experts_modules(model), "attention": attention_modules(model)}
        self.counts = {k: len(v) for k, v in groups.items()}
        for category, modules in groups.items():
            for _, m in modules:
                fwd, bwd = (id(m), "fwd"), (id(m), "bwd")
                self._handles += [
                    m.register_forward_pre_hook(lambda *_, k=fwd: self._begin(k)),
                    m.register_forward_hook(lambda *_, k=fwd, c=category: self._end(k, c)),
                    m.register_full_backward_pre_hook(lambda *_, k=bwd: self._begin(k)),
                    m.register_full_backward_hook(lambda *_, k=bwd, c=category: self._end(k, c)),
                ]
        self._handles += [
            optimizer.register_step_pre_hook(lambda *_: self._begin("opt")),
            optimizer.register_step_post_hook(lambda *_: self._step_done()),
        ]
        return self

    def _step_done(self) -> None:
        self._end("opt", "optimizer")
        end = self._now()
        if self._last_end is not None:
            if self.skip_steps <= self._seen < self.skip_steps + self.max_steps:
                self._steps.append((self._last_end, end, self._spans))
            self._seen += 1
        self._last_end, self._spans = end, []

    def detach(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> Optional[dict]:
        """``{"fractions": {category: share of the step}, "ms_per_step": {category: ms},
        "steps": counted steps, "modules": {"experts": n, "attention": n}}``, or None when
        no step was counted. The fractions sum to 1 ("other" is the remainder)."""
        if not self._steps:
            return None
        if self._cuda:
            torch.cuda.synchronize()
        total = 0.0
        parts = {c: 0.0 for c in CATEGORIES[:3]}
        for start, end, spans in self._steps:
            total += self._elapsed_ms(start, end)
            for category, s, e in spans:
                parts[category] += self._elapsed_ms(s, e)
        n = len(self._steps)
        ms = {c: v / n for c, v in parts.items()}
        ms["other"] = total / n - sum(ms.values())
        return {
            "fractions": {c: ms[c] / (total / n) for c in CATEGORIES},
            "ms_per_step": ms,
            "steps": n,
            "modules": dict(self.counts),
        }
