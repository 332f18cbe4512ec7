"""The mark of an experts module converted by ``moeq.convert_model``.

A converted module's class is a subclass of its original class mixing in
:class:`ConvertedExperts` (made by its family's adapter, moeq/integrations/); the
instance carries the recipe and kernel choice as plain attributes and its plan
(``moeq_plan``, moeq/experts/plan.py), remade when ``.to()``/``.cuda()``/``to_empty``
move or cast its weights. Parameters, buffers and state_dict keys are the original
module's.

This module sits low in the import order (it imports only moeq.numerics.recipes) so that the
weight cache, the expert GEMMs, the adapters and convert_model can all name the marker
without importing each other.
"""
from __future__ import annotations

from typing import Optional

from moeq.numerics.recipes import QuantizationType


class ConvertedExperts:
    """Mixin marking a converted experts module.

    Attributes (set per instance by the conversion):
        moeq_recipe: the recipe of its GEMMs.
        moeq_kernel: the user's kernel choice ("auto", "triton", "emulated", or a
            per-GEMM kernel name).
        group_alignment: rows the recipe's GEMMs want each token group to start at
            (``moeq.group_alignment(moeq_recipe)``; None for BF16).
        moeq_plan: the :class:`moeq.experts.plan.ExpertsPlan` its forward, backward and
            the EP dispatch read.
        moeq_incoming_alignment: what the caller guarantees about the token groups it
            hands over (every group starts at a multiple of it), or None (packed): a
            torchtitan dispatcher that pads (``TorchAOTokenDispatcher.pad_multiple``)
            sets it. Callers that pass ``group_alignment=`` per call (moeq.MoE, the EP
            dispatch) leave it None.
    Class attribute:
        moeq_adapter: the :class:`moeq.integrations.base.ExpertsAdapter` of its family.
    """

    moeq_recipe: QuantizationType
    moeq_kernel: str
    group_alignment: Optional[int] = None
    moeq_incoming_alignment: Optional[int] = None

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half(), to_empty(): the weights may have a new device or dtype,
        # so the plan is made again now (forward would otherwise remake it on first use).
        out = super()._apply(fn, *args, **kwargs)
        if "moeq_plan" in self.__dict__:
            from moeq.experts.plan import module_plan

            module_plan(self)
        return out
