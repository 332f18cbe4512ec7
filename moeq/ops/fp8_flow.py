"""The FP8 routed block as one quantize-once dataflow (Hopper), with a per-GEMM precision choice.

``fp8_flow_routed_swiglu_experts(tokens, expert_indices, expert_weights, gate_up_proj,
down_proj, precisions=..., weight_copies=...)`` computes what
``moeq.ops.fp8_hopper.fp8_routed_swiglu_experts`` computes (same numerics contract: e4m3,
power-of-two scales along each GEMM's contraction dim, routing weight on the down GEMM's
rows, routing-weight gradient from the SwiGLU backward pass), with this dataflow:

* **tokens quantized once**: the permute-and-pad writes the FP8 row copy of the routed
  tokens directly (``kernels/fp8_flow.gather_quantize_rows``); the bf16 padded tokens are
  never written. The weight gradient's column copy of x is made from that FP8 row copy by
  the scaling-aware transpose (``kernels/fp8_flow.columns_from_rows``: an exponent shift,
  exact except underflow), not by re-reading bf16. The token gradient is combined inside
  the Function's backward.
* **per-GEMM precision** (:class:`GemmPrecisions`): the input gradient of h and the two
  weight gradients can each run as a BF16 ``torch._grouped_mm`` where FP8 loses at the
  shape and device (:func:`choose_gemm_precisions`); the column copies those FP8 GEMMs
  would need are then not made, and only what the BF16 GEMM needs is kept (nothing more
  than the FP8 path keeps: the BF16 operands are rebuilt in the backward from the saved
  gate_up and the input tokens, in bf16 ops without float32 (M, H) temporaries).
* **weight copies once per optimizer step** (:class:`Fp8WeightCopies`): both orientations
  of both weights are kept across micro-batches and refreshed only when a weight changed,
  eager and under ``torch.compile`` (see the class).
* **backward memory**: the weight gradients run last-in-first-out around the input
  gradient chain and every transient FP8 copy is dropped right after its GEMM.

Numerics relative to today's block: identical except (a) the x column copy carries the
row copy's rounding (see kernels/fp8_flow.py; measured in tests/test_fp8_flow.py), and (b)
GEMMs chosen BF16 run on bf16 operands computed in bf16 ops as the BF16 recipe computes them
(h = silu(g)*u times the routing weight, d gate_up), i.e. BF16 numerics for that GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from moeq.kernels import fp8_flow as _f
from moeq.kernels import fp8_gemm as _g
from moeq.kernels import fp8_rowwise as _k
from moeq.kernels import fp8_strips as _s
from moeq.ops import fp8_hopper as _h
from moeq.ops.slack_rows import zero_slack_rows_

FP8 = "fp8"
BF16 = "bf16"
_PRECISIONS = (FP8, BF16)
# GEMMs whose BF16 variant the dataflow implements (the others need a bf16 operand that the
# dataflow never writes: x, h in the forward, d gate_up for the input gradient)
_BF16_CAPABLE = ("dgrad_h", "wgrad_gate_up", "wgrad_down")

# Rows per expert (M / E) under which FP8 weight-gradient GEMMs lose to BF16 on Hopper.
# Measured: Qwen3-30B-A3B (E 128, D 2048, H 768, ~512 rows per expert): the FP8 down-weight
# gradient is slower than BF16 on H100 (0.55 vs 0.46 ms, docs/fp8_hopper.md) and H200 (432 vs
# 457 TFLOP/s, docs/fp8_gemm.md) while the gate_up one still wins on H200 (598 vs 509);
# DSV3 EP8 (1024 rows) and Mixtral (2048) win with both in FP8 on both devices. The
# gate_up threshold is half the down one (twice the output per expert amortises the FP8
# epilogue); it is not measured below 512 rows.
WGRAD_DOWN_BF16_BELOW_ROWS = 1024
WGRAD_GATE_UP_BF16_BELOW_ROWS = 256


@dataclass(frozen=True)
class GemmPrecisions:
    """Which precision each of the routed block's six GEMMs runs in: "fp8" or "bf16".

    gate_up / down: forward GEMMs; dgrad_h: grad_y @ down (the gradient of h); dgrad_x:
    d gate_up @ gate_up_proj; wgrad_gate_up / wgrad_down: the weight gradients. The
    dataflow implements BF16 for dgrad_h and both weight gradients (``_BF16_CAPABLE``).
    """

    gate_up: str = FP8
    down: str = FP8
    dgrad_h: str = FP8
    dgrad_x: str = FP8
    wgrad_gate_up: str = FP8
    wgrad_down: str = FP8

    def __post_init__(self):
        for name in ("gate_up", "down", "dgrad_h", "dgrad_x", "wgrad_gate_up", "wgrad_down"):
            v = getattr(self, name)
            if v not in _PRECISIONS:
                raise ValueError(f"GemmPrecisions.{name} must be one of {_PRECISIONS}, got {v!r}")
            if v == BF16 and name not in _BF16_CAPABLE:
                raise ValueError(
                    f"GemmPrecisions.{name}='bf16' is not implemented by the FP8 dataflow (it never writes the bf16 "
                    f"operand that GEMM needs); BF16 is available for {_BF16_CAPABLE}. Use the BF16 recipe for an "
                    f"all-BF16 block."
                )

    @property
    def bf16_gemms(self) -> Tuple[str, ...]:
        return tuple(n for n in _BF16_CAPABLE if getattr(self, n) == BF16)


def choose_gemm_precisions(device: Union[str, Tuple[int, int], torch.device], num_experts: int, rows: int,
                           dim: int, hidden: int) -> GemmPrecisions:
    """The per-GEMM precisions of the FP8 dataflow for a shape on a device (pure function).

    Args:
        device: a CUDA device, its name ("NVIDIA H100 80GB HBM3") or its capability (9, 0).
        num_experts: E (local experts). rows: M, the padded routed rows. dim: D. hidden: H.
    Returns:
        GemmPrecisions. Rule (Hopper, measured points in this module's constants): the
        weight gradients contract over each expert's rows, so with few rows per expert
        (M / E) the FP8 GEMM's fixed costs (operand column copies, scales, epilogue) are
        not amortised: the down weight's gradient runs in BF16 below
        ``WGRAD_DOWN_BF16_BELOW_ROWS`` rows per expert, the gate_up weight's below
        ``WGRAD_GATE_UP_BF16_BELOW_ROWS``. Everything else, and every non-SM90 device
        (where the block does not run), stays FP8. H100 and H200 share the rule (both
        measured in the same direction); ``dim`` and ``hidden`` are part of the signature
        so a per-device table can refine it.
    """
    del dim, hidden  # the measured rule depends on rows per expert only
    if isinstance(device, tuple):
        cap = device
    elif isinstance(device, str) and not device.startswith(("cuda", "cpu")):
        cap = (9, 0) if any(n in device for n in ("H100", "H200", "H800", "H20", "GH200")) else (0, 0)
    else:
        dev = torch.device(device)
        cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (0, 0)
    if cap != (9, 0) or num_experts <= 0:
        return GemmPrecisions()
    per_expert = rows / num_experts
    return GemmPrecisions(
        wgrad_gate_up=BF16 if per_expert < WGRAD_GATE_UP_BF16_BELOW_ROWS else FP8,
        wgrad_down=BF16 if per_expert < WGRAD_DOWN_BF16_BELOW_ROWS else FP8,
    )


# --------------------------------------------------------------------------------------
# Weight copies kept across micro-batches, refreshed once per weight change
# --------------------------------------------------------------------------------------

_STATE_LEN = 5  # [gate_up ptr, gate_up version, down ptr, down version, quantizations done]


def _refresh_impl(gate_up_proj, down_proj, copies, state) -> None:
    seen = (gate_up_proj.data_ptr(), gate_up_proj._version, down_proj.data_ptr(), down_proj._version)
    if tuple(state[:4].tolist()) == seen:  # state is a CPU tensor: no device sync
        return
    with torch.no_grad():
        for w, out in ((gate_up_proj, copies[:4]), (down_proj, copies[4:])):
            e, n, k = w.shape
            _s._dual_quantize_strips_impl(_k.MODE_PLAIN, w.contiguous().view(e * n, k), None, None, e, True, True,
                                          out=(out[0].view(e * n, k), out[1].view(e * n), out[2], out[3]))
    state[:4] = torch.tensor(seen, dtype=torch.int64)
    state[4] += 1


@torch.library.custom_op(
    "moeq::fp8_weight_copies_refresh_",
    mutates_args=("gu_row", "gu_row_inv", "gu_col", "gu_col_inv", "d_row", "d_row_inv", "d_col", "d_col_inv", "state"),
)
def _refresh_op(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, gu_row: torch.Tensor, gu_row_inv: torch.Tensor,
                gu_col: torch.Tensor, gu_col_inv: torch.Tensor, d_row: torch.Tensor, d_row_inv: torch.Tensor,
                d_col: torch.Tensor, d_col_inv: torch.Tensor, state: torch.Tensor) -> None:
    _refresh_impl(gate_up_proj, down_proj, (gu_row, gu_row_inv, gu_col, gu_col_inv, d_row, d_row_inv, d_col, d_col_inv),
                  state)


@_refresh_op.register_fake
def _(gate_up_proj, down_proj, gu_row, gu_row_inv, gu_col, gu_col_inv, d_row, d_row_inv, d_col, d_col_inv, state):
    return None


class Fp8WeightCopies(torch.nn.Module):
    """Both FP8 orientations of both expert weights, kept until a weight changes.

    Holds, as non-persistent buffers, exactly what ``quantize_fp8_expert_weights`` makes
    (forward copies scaled along D / H, input-gradient copies along 2H / D; bitwise the
    same bytes, written by the same strip kernels into these buffers): 2 bytes per weight
    element plus 4 bytes per scale, for the whole life of the module (``nbytes``).

    ``refresh(gate_up_proj, down_proj)`` re-quantizes only if either weight changed since
    the last refresh: it compares each weight's storage address and version counter
    (``tensor._version``, bumped by every in-place write: ``optimizer.step()``,
    ``load_state_dict``, ``with torch.no_grad(): w.add_(...)``) with the ones recorded at
    the last refresh. The comparison runs inside a custom op (``moeq::fp8_weight_copies_
    refresh_``), so it executes at run time also in compiled code: under
    ``torch.compile(fullgraph=True)`` the op is traced as an in-place update of the
    buffers (inductor calls it in place; no clone) and its Python body reads the real
    weights' version counters on every call. Guarantees, eager and compiled alike:

    * a copy is never served stale after any write that bumps the version counter or
      moves the weight to new memory; writes through ``weight.data`` (which bypass the
      version counter) are not seen;
    * with gradient accumulation the copies are made once per optimizer step (the first
      forward after the step, or the step itself with :meth:`refresh_after` on the
      optimizer) and reused by every micro-batch (``quantize_count`` counts the refreshes);
    * a refresh between a forward and its backward (a weight changed in between) bumps
      the copies' versions and that backward raises autograd's in-place modification
      error instead of using copies of other weights.

    The state (addresses, versions, count) is a small CPU int64 tensor, so the check never
    syncs with the device; it keeps CUDA graphs (``mode="reduce-overhead"``) from capturing
    the block.
    """

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        super().__init__()
        dev = gate_up_proj.device
        for prefix, w in (("gu", gate_up_proj), ("d", down_proj)):
            e, n, k = w.shape
            self.register_buffer(f"{prefix}_row", torch.empty((e, n, k), dtype=_k.FP8_DTYPE, device=dev), persistent=False)
            self.register_buffer(f"{prefix}_row_inv", torch.empty((e, n), dtype=torch.float32, device=dev),
                                 persistent=False)
            self.register_buffer(f"{prefix}_col", torch.empty((e, k, n), dtype=_k.FP8_DTYPE, device=dev), persistent=False)
            self.register_buffer(f"{prefix}_col_inv", torch.empty((e, k), dtype=torch.float32, device=dev),
                                 persistent=False)
        self.state = torch.full((_STATE_LEN,), -1, dtype=torch.int64)
        self.state[4] = 0

    def _buffers_tuple(self):
        return (self.gu_row, self.gu_row_inv, self.gu_col, self.gu_col_inv,
                self.d_row, self.d_row_inv, self.d_col, self.d_col_inv)

    def refresh(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> _h.Fp8ExpertWeights:
        """Current copies of (gate_up_proj (E, 2H, D), down_proj (E, D, H)), re-quantized only if they changed."""
        if tuple(gate_up_proj.shape) != tuple(self.gu_row.shape) or tuple(down_proj.shape) != tuple(self.d_row.shape):
            raise ValueError(f"Fp8WeightCopies was made for weights {tuple(self.gu_row.shape)} / "
                             f"{tuple(self.d_row.shape)}, got {tuple(gate_up_proj.shape)} / {tuple(down_proj.shape)}")
        bufs = self._buffers_tuple()
        if torch.compiler.is_compiling():
            torch.ops.moeq.fp8_weight_copies_refresh_(gate_up_proj, down_proj, *bufs, self.state)
        else:
            _refresh_impl(gate_up_proj, down_proj, bufs, self.state)
        return _h.Fp8ExpertWeights(_k.Fp8Dual(*bufs[:4]), _k.Fp8Dual(*bufs[4:]))

    def refresh_after(self, optimizer: torch.optim.Optimizer, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        """Refresh right after every ``optimizer.step()`` (a step post-hook), so the next
        forward finds the copies current. Returns the hook's removable handle."""
        return optimizer.register_step_post_hook(lambda *_: self.refresh(gate_up_proj, down_proj))

    @property
    def quantize_count(self) -> int:
        """How many times the copies were (re)made."""
        return int(self.state[4])

    @property
    def nbytes(self) -> int:
        """Bytes held by the copies and their scales."""
        return sum(b.numel() * b.element_size() for b in self._buffers_tuple())


# --------------------------------------------------------------------------------------
# The dataflow Function
# --------------------------------------------------------------------------------------


def _bf16_gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def _as_bf16(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bfloat16 else t.to(torch.bfloat16)


def _swiglu_bf16(gate_up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up (M, H) in bf16 ops (no float32 (M, H) temporaries)."""
    hdim = gate_up.shape[1] // 2
    return torch.nn.functional.silu(gate_up[:, :hdim]) * gate_up[:, hdim:]


def _swiglu_backward_bf16(gate_up: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
    """(M, 2H) gradient of silu(gate) * up w.r.t. gate_up given grad_h (M, H), in bf16 ops."""
    hdim = gate_up.shape[1] // 2
    g, u = gate_up[:, :hdim], gate_up[:, hdim:]
    sig = torch.sigmoid(g)
    # two halves written into one (M, 2H) buffer by copy_ (dynamo traces no out= into a view)
    out = torch.empty_like(gate_up)
    out[:, :hdim].copy_(grad_h * u * (sig * (1 + g * (1 - sig))))
    out[:, hdim:].copy_(grad_h * (g * sig))
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _Fp8FlowRoutedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, row_weights, gate_up_proj, down_proj, source_rows, dest_rows, offs, top_k, flags, prec,
                *copies):
        need_tok, need_w, need_gu, need_down = flags
        have_copies = bool(copies)
        if have_copies:
            wgu_row, wgu_row_inv, wgu_col, wgu_col_inv, wd_row, wd_row_inv, wd_col, wd_col_inv = copies
        else:
            wgu_row, wgu_row_inv = _s.quantize_weight_rows(gate_up_proj)
            wd_row, wd_row_inv = _s.quantize_weight_rows(down_proj)
        fp8_wgu = need_gu and prec[1] == FP8
        fp8_wd = need_down and prec[2] == FP8
        # tokens -> padded FP8 row copy in one pass; the column copy from it (exponent shift)
        x_row, x_row_inv = _f.gather_quantize_rows(tokens, source_rows, top_k)
        empty8 = x_row.new_empty((0,))
        empty32 = x_row_inv.new_empty((0,))
        x_col, x_col_inv = _f.columns_from_rows(x_row, x_row_inv, offs) if fp8_wgu else (empty8, empty32)
        gate_up = _h._gemm(x_row, wgu_row, x_row_inv, wgu_row_inv, offs)  # (M, 2H)
        del x_row, x_row_inv
        hq = _s.swiglu_quantize_strips(gate_up, offs, colwise=fp8_wd)
        y = _h._gemm(hq.row, wd_row, hq.row_inv * row_weights, wd_row_inv, offs)  # (M, D), routing weight applied
        ctx.flags, ctx.prec, ctx.top_k, ctx.have_copies = flags, prec, top_k, have_copies
        ctx.weight_dtypes = (gate_up_proj.dtype, down_proj.dtype)
        h_col = hq.col if fp8_wd else empty8
        h_col_inv = hq.col_inv if fp8_wd else empty32
        # the weights' input-gradient copies: kept (they live anyway) or made in backward
        wcols = (wgu_col, wgu_col_inv, wd_col, wd_col_inv) if have_copies else ()
        # the input tokens only for a BF16 gate_up weight gradient (x re-gathered in bf16)
        saved_tokens = tokens if need_gu and not fp8_wgu else tokens.new_empty((0,))
        ctx.save_for_backward(saved_tokens, row_weights, gate_up_proj, down_proj, source_rows, dest_rows, offs, gate_up,
                              x_col, x_col_inv, h_col, h_col_inv, *wcols)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (tokens, w, gate_up_proj, down_proj, source_rows, dest_rows, offs, gate_up,
         x_col, x_col_inv, h_col, h_col_inv, *wcols) = ctx.saved_tensors
        need_tok, need_w, need_gu, need_down = ctx.flags
        prec = ctx.prec
        need_h = need_tok or need_gu or need_w
        grad_y = _as_bf16(grad_y).contiguous()
        fp8_dh = prec[0] == FP8
        fp8_wd = need_down and prec[2] == FP8
        fp8_wgu = need_gu and prec[1] == FP8
        grad_tok = grad_w = grad_gu = grad_down = None
        # row copy: the unweighted gradient rows (grad_h, dw); column copy: the weighted ones
        if (need_h and fp8_dh) or fp8_wd:
            gq = _s.quantize_dual_strips(grad_y, offs, rowwise=need_h and fp8_dh, colwise=fp8_wd, row_weights=w,
                                         weight_col_copy=True)
        else:
            gq = _k.Fp8Dual(None, None, None, None)
        # the down weight's gradient first: its column copies are freed before the chain below
        if need_down:
            if fp8_wd:
                grad_down = _h._wgrad(gq.col, h_col, gq.col_inv, h_col_inv, offs, ctx.weight_dtypes[1])
            else:
                # sum over rows of (w g)^T h = g^T (w h): the routing weight rides on h (H < D
                # columns), computed in bf16 ops as the BF16 recipe computes h
                hw = _swiglu_bf16(gate_up) * w.to(torch.bfloat16)[:, None]
                grad_down = _cast(_bf16_gmm(grad_y.t(), hw, offs), ctx.weight_dtypes[1])  # (E, D, H)
                del hw
        gq_row, gq_row_inv = gq.row, gq.row_inv
        del gq, h_col
        if need_h:
            if fp8_dh:
                wd_col, wd_col_inv = (wcols[2], wcols[3]) if wcols else _s.quantize_weight_cols(down_proj)
                grad_h = _h._gemm(gq_row, wd_col, gq_row_inv, wd_col_inv, offs)  # (M, H), unweighted, slack zero
                del wd_col, wd_col_inv
            else:
                grad_h = _bf16_gmm(grad_y, _as_bf16(down_proj), offs)  # (M, H); slack rows unspecified
                zero_slack_rows_(grad_h, offs)
            del gq_row, gq_row_inv
            dgu_bf16 = None
            if need_gu and not fp8_wgu:
                dgu_bf16 = _swiglu_backward_bf16(gate_up, grad_h * w.to(torch.bfloat16)[:, None])
            ggq, dw = _s.swiglu_backward_quantize_strips(gate_up, grad_h, offs, row_weights=w, colwise=fp8_wgu)
            del grad_h
            grad_w = dw if need_w else None
            if need_tok:
                wgu_col, wgu_col_inv = (wcols[0], wcols[1]) if wcols else _s.quantize_weight_cols(gate_up_proj)
                grad_x = _h._gemm(ggq.row, wgu_col, ggq.row_inv, wgu_col_inv, offs)  # (M, D), slack rows zero
                del wgu_col, wgu_col_inv
                grad_tok = torch.ops.moeq.combine_token_groups(grad_x, dest_rows, source_rows, None, ctx.top_k)
                del grad_x
            ggq_col, ggq_col_inv = ggq.col, ggq.col_inv
            del ggq
            if need_gu:
                if fp8_wgu:
                    grad_gu = _h._wgrad(ggq_col, x_col, ggq_col_inv, x_col_inv, offs, ctx.weight_dtypes[0])
                else:
                    x_bf16 = _as_bf16(_f.gather_rows_reference(tokens, source_rows, ctx.top_k))
                    grad_gu = _cast(_bf16_gmm(dgu_bf16.t(), x_bf16, offs), ctx.weight_dtypes[0])  # (E, 2H, D)
        grad_tok = None if grad_tok is None else _cast(grad_tok, torch.bfloat16)
        n_copies = 8 if ctx.have_copies else 0
        return (grad_tok, grad_w, grad_gu, grad_down, None, None, None, None, None, None, *([None] * n_copies))


def _copies_tuple(weight_copies):
    if weight_copies is None:
        return ()
    if not isinstance(weight_copies, _h.Fp8ExpertWeights):
        raise TypeError(f"weight_copies must be Fp8ExpertWeights (Fp8WeightCopies.refresh or "
                        f"quantize_fp8_expert_weights), got {type(weight_copies).__name__}")
    if not weight_copies.has_dgrad:
        raise ValueError("weight_copies lack the input-gradient copies: make them with need_dgrad=True")
    return (*weight_copies.gate_up[:4], *weight_copies.down[:4])


def fp8_flow_routed_swiglu_experts(
    tokens: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    precisions: Optional[GemmPrecisions] = None,
    weight_copies: Optional[Union[Fp8WeightCopies, _h.Fp8ExpertWeights]] = None,
) -> torch.Tensor:
    """A routed MoE experts block in FP8 as one quantize-once dataflow (module docstring).

    Args:
        tokens: (T, D) bfloat16. expert_indices: (T, k) integer expert ids in [0, E).
        expert_weights: (T, k) routing scores (gradients come back in their dtype).
        gate_up_proj: (E, 2H, D) bfloat16/float32. down_proj: (E, D, H). D, H multiples of 16.
        precisions: the per-GEMM choice; None: ``choose_gemm_precisions`` for this
            device and shape (a module plan should choose once and pass it).
        weight_copies: an :class:`Fp8WeightCopies` of these weights (refreshed here: made
            once per weight change), or ``Fp8ExpertWeights`` the caller keeps current
            (e.g. from ``moeq.quantized_weight_cache``); None: quantized per call as today.
    Returns:
        (T, D) bfloat16. Differentiable w.r.t. tokens, expert_weights and both weights.
        No host sync; ``torch.compile(fullgraph=True)`` traces forward and backward.
    """
    from moeq.ops.padding import combine_token_groups, padded_rows, route_tokens

    if tokens.dtype != torch.bfloat16:
        raise TypeError(f"fp8_flow_routed_swiglu_experts needs bfloat16 tokens, got {tokens.dtype}: cast them")
    if expert_weights.shape != expert_indices.shape:
        raise ValueError(f"expert_weights {tuple(expert_weights.shape)} must match expert_indices "
                         f"{tuple(expert_indices.shape)}: one weight per (token, slot)")
    num_experts = gate_up_proj.shape[0]
    m_rows = padded_rows(expert_indices.numel(), num_experts, _k.ALIGN)
    _h._check_inputs(tokens, gate_up_proj, down_proj, torch.zeros(num_experts, dtype=torch.int32, device=tokens.device))
    if precisions is None:
        precisions = choose_gemm_precisions(tokens.device, num_experts, m_rows, tokens.shape[1], down_proj.shape[-1])
    if isinstance(weight_copies, Fp8WeightCopies):
        weight_copies = weight_copies.refresh(gate_up_proj, down_proj)
    copies = _copies_tuple(weight_copies)
    layout = route_tokens(expert_indices, num_experts, _k.ALIGN)
    src = layout.source_rows.long()
    flat = expert_weights.reshape(-1).float()
    # padding and slack rows (source -1) get weight 0 (their rows are zero anyway)
    row_weights = torch.where(src >= 0, flat[src.clamp(min=0)], flat.new_zeros(()))
    grad = torch.is_grad_enabled()
    flags = (grad and tokens.requires_grad, grad and row_weights.requires_grad,
             grad and gate_up_proj.requires_grad, grad and down_proj.requires_grad)
    y = _Fp8FlowRoutedExperts.apply(tokens.contiguous(), row_weights, gate_up_proj, down_proj, layout.source_rows,
                                    layout.dest_rows, layout.padded_offsets, layout.top_k, flags,
                                    (precisions.dgrad_h, precisions.wgrad_gate_up, precisions.wgrad_down), *copies)
    return combine_token_groups(y, layout, None)
