"""When do a converted experts layer's pad/unpad kernels run? One function decides."""
from __future__ import annotations

from typing import Optional

import torch

from moeq.numerics.recipes import QuantizationType, group_alignment


def is_expert_parallel(*params: torch.Tensor) -> bool:
    """True when any of the expert weights is a DTensor on a mesh with an ``"ep"`` dim."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    for p in params:
        if isinstance(p, DTensor):
            names = p.device_mesh.mesh_dim_names or ()
            if "ep" in names:
                return True
    return False


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an expert-parallel weight), or ``t`` itself."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return t
    # isinstance, not hasattr: dynamo answers hasattr(DTensor param, "to_local") wrongly.
    return t.to_local() if isinstance(t, DTensor) else t


def pads_for(alignment: Optional[int], incoming_alignment: Optional[int]) -> bool:
    """:func:`needs_padding` once the recipe's alignment is known (an experts plan holds
    it): groups handed over at ``incoming_alignment`` (None: packed) need padding to
    ``alignment`` (None: the recipe needs none). Both powers of two."""
    if alignment is None:
        return False
    # Powers of two: a multiple of the larger one is a multiple of the smaller.
    return incoming_alignment is None or incoming_alignment < alignment


def needs_padding(qtype: QuantizationType, incoming_alignment: Optional[int]) -> bool:
    """Whether the experts must pad their token groups before the recipe's GEMMs.

    ``incoming_alignment`` is what the caller guarantees about the tokens it hands over:
    ``None`` (groups packed back to back) or ``a`` (every group starts at a multiple of
    ``a``: moeq.MoE's permute-and-pad, moeq's EP dispatch, or torchtitan's
    ``TorchAOTokenDispatcher(pad_multiple=a)`` already padded them).
    ``moeq.experts.gemms.align_token_groups`` applies the decision (with the module plan's
    alignment, :func:`pads_for`) (torchtitan's slack
    tail rows included).

    The seven cases (pad = this layer runs pad before and unpad after its GEMMs):

    ======  =========================================  ============================
    recipe  expert parallelism                         experts pad?
    ======  =========================================  ============================
    BF16    none                                       no (BF16 never pads)
    BF16    EP, dispatch does not pad                  no
    BF16    EP, dispatch pads                          no
    FP8     none (tokens packed)                       yes, to 16
    FP8     EP, dispatch does not pad                  yes, to 16
    FP8     EP, dispatch pads to >= 16                 no
    MXFP8   none / EP without padding dispatch         yes, to 32
    MXFP8   EP, dispatch pads to >= 32                 no
    ======  =========================================  ============================

    (The MXFP8 row without EP and the one with a non-padding EP behave identically; with
    the FP8 pair and the three BF16 rows, that is seven distinct situations.) A
    ``moeq.MoE`` without EP is the "dispatch pads" case: its permute-and-pad writes the
    padded layout directly, so its experts never pad.

    Raises ValueError if ``incoming_alignment`` is not a power of two.
    """
    required = group_alignment(qtype)
    if incoming_alignment is not None and (incoming_alignment < 1 or incoming_alignment & (incoming_alignment - 1)):
        raise ValueError(f"group_alignment={incoming_alignment} must be a power of two")
    return pads_for(required, incoming_alignment)
