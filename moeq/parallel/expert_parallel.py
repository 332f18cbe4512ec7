"""Expert parallelism: experts sharded over an ``"ep"`` mesh dim, tokens moved by all-to-all.

``apply_expert_parallel(model, mesh)`` shards the routed experts of every ``moeq.MoE``
(converted by ``moeq.convert_model`` or not) and of every converted transformers experts
module (moeq/integrations/transformers/expert_parallel.py) over ``mesh["ep"]`` as DTensors
(``Shard(0)``: global expert ``e`` lives on EP rank ``e // (E / ep)``), and gives each MoE
an :class:`ExpertParallelDispatcher`. Per step and per MoE the dispatcher:

1. permutes the rank's routed copies into global-expert order (``permute_and_pad``, no
   padding): that order is also destination-rank order;
2. exchanges per-expert counts (``all_to_all_single``) and reads them on the host once
   (the split sizes; the only host sync, see docs/expert_parallel.md);
3. sends the rows with ``all_to_all_single`` and, in one gather pass over the received
   rows, writes them straight into the local experts' expert-major layout, padded to the
   recipe's ``GROUP_ALIGNMENT`` (the fused dispatch);
4. runs the local experts with ``group_alignment=a``, so converted experts do not pad
   again (moeq.experts.padding_policy);
5. gathers the outputs back to all-to-all order in one pass, sends them home with the
   reverse ``all_to_all_single`` and combines each token's k outputs, weighted.

Steps 3 and 5 are a differentiable pair of autograd functions: each one's backward is
the other's forward (gradients travel in the activations' precision).

With ``quantize_dispatch=True`` and FP8/MXFP8 experts, step 3 sends quantized rows: each
row is quantized along D with the experts' recipe and packed with its scales into one
uint8 row (moeq/ops/quantized_dispatch.py), one all-to-all moves them, and the
receiver's gather pass dequantizes them into the padded layout (exact values, which the
experts' own quantization along D reproduces), in the activations' dtype. Its backward is
step 3's, in the gradient's dtype.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moeq.ops import padding as _padding  # registers the torch.ops.moeq row ops
from moeq.nn.experts import GroupedExperts, run_on_trusted_counts
from moeq.nn.moe import MoE
from moeq.parallel.dispatch_plan import DispatchPlan, build_plan
from moeq.ops.quantized_dispatch import QUANTIZED_RECIPES, pack_rows, unpack_to_padded
from moeq.numerics.recipes import QuantizationType
from moeq.numerics.validation import check_int, check_module

EP_DIM = "ep"

__all__ = ["EP_DIM", "ExpertParallelDispatcher", "apply_expert_parallel"]


# ----------------------------------------------------------------------------------
# row movement (autograd functions)
# ----------------------------------------------------------------------------------


def _all_to_all(x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    """Rows of ``x`` (sum(in_splits), ...) to the group's ranks; (sum(out_splits), ...) back."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _to_padded(rows: Tensor, plan: DispatchPlan) -> Tensor:
    """(N_recv, D) rows in all-to-all order -> (P, D) padded expert-major; one gather pass."""
    return torch.ops.moeq.pad_rows(
        rows, plan.local_counts, plan.source_rows, plan.alignment, plan.num_padded_rows, 1
    )


def _from_padded(padded: Tensor, plan: DispatchPlan) -> Tensor:
    """(P, D) padded expert-major -> (N_recv, D) rows in all-to-all order; one gather pass."""
    return torch.ops.moeq.unpad_token_groups(
        padded.contiguous(), plan.local_counts, plan.dest_rows, None, plan.alignment, plan.num_recv
    )


class _DispatchToPadded(torch.autograd.Function):
    """all_to_all_single forward, then scatter-on-receive into the padded layout.

    Backward: gather the padded gradient back to all-to-all order, reverse all_to_all."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: DispatchPlan) -> Tensor:
        ctx.plan = plan
        recv = _all_to_all(x, plan.recv_splits, plan.send_splits, plan.group)
        return _to_padded(recv, plan)

    @staticmethod
    def backward(ctx, grad_padded: Tensor):
        plan = ctx.plan
        grad_recv = _from_padded(grad_padded, plan)
        return _all_to_all(grad_recv, plan.send_splits, plan.recv_splits, plan.group), None


class _QuantizedDispatchToPadded(torch.autograd.Function):
    """Quantize + pack rows, all_to_all_single the packed bytes, dequantize into the padded layout.

    The received rows come out in x's dtype (bfloat16 or float32), as the unquantized
    dispatch's do. Backward: :class:`_DispatchToPadded`'s, in the gradient's precision:
    straight through the quantization, as the recipes' GEMMs treat their own operand
    quantization."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: DispatchPlan, recipe: QuantizationType) -> Tensor:
        ctx.plan = plan
        packed = pack_rows(x, recipe)
        recv = _all_to_all(packed, plan.recv_splits, plan.send_splits, plan.group)
        return unpack_to_padded(recv, plan.source_rows, x.shape[1], recipe, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad_padded: Tensor):
        grad_x, _ = _DispatchToPadded.backward(ctx, grad_padded)
        return grad_x, None, None


class _CombineFromPadded(torch.autograd.Function):
    """Gather expert outputs from the padded layout, reverse all_to_all_single home.

    Backward: all_to_all the gradient to the experts' ranks, scatter into the padded layout."""

    @staticmethod
    def forward(ctx, y_padded: Tensor, plan: DispatchPlan) -> Tensor:
        ctx.plan = plan
        y_recv = _from_padded(y_padded, plan)
        return _all_to_all(y_recv, plan.send_splits, plan.recv_splits, plan.group)

    @staticmethod
    def backward(ctx, grad_home: Tensor):
        plan = ctx.plan
        grad_recv = _all_to_all(grad_home, plan.recv_splits, plan.send_splits, plan.group)
        return _to_padded(grad_recv, plan), None


class _AllToAll(torch.autograd.Function):
    """Plain differentiable all_to_all_single (the unfused baseline's transport)."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


# torch.compile: the host read of the counts and the all-to-alls with host split sizes
# run eagerly (graph breaks here); the permute, experts and combine around them compile.
@torch.compiler.disable
def _plan(
    counts: Tensor, group, alignment: Optional[int], recipe_name: Optional[str], quantized: bool = False
) -> DispatchPlan:
    return build_plan(counts, group, alignment, recipe_name, quantized)


@torch.compiler.disable
def _dispatch(x: Tensor, plan: DispatchPlan) -> Tensor:
    return _DispatchToPadded.apply(x, plan)


@torch.compiler.disable
def _dispatch_quantized(x: Tensor, plan: DispatchPlan, recipe: QuantizationType) -> Tensor:
    return _QuantizedDispatchToPadded.apply(x, plan, recipe)


@torch.compiler.disable
def _combine(y: Tensor, plan: DispatchPlan) -> Tensor:
    return _CombineFromPadded.apply(y, plan)


@torch.compiler.disable
def _all_to_all_autograd(x: Tensor, out_splits, in_splits, group) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


# ----------------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------------


def experts_recipe(experts: nn.Module):
    """(recipe name or None, alignment or None) of an experts module (converted or not),
    read from its plan (``moeq_plan``, made at conversion)."""
    plan = getattr(experts, "moeq_plan", None)
    if plan is None:
        return None, None
    return plan.recipe.value, plan.alignment


class ExpertParallelDispatcher:
    """Token dispatch/combine of one MoE layer across an EP process group.

    Args:
        ep_mesh: 1D DeviceMesh of the EP dim.
        num_experts: E global experts (divisible by the EP size).
        fused: True (default): received rows land in the padded expert-major layout in
            one pass. False: the unfused baseline (all-to-all, then permute, then
            ``pad_token_groups``), kept for benchmarks/ep.py and the tests.
        quantize_dispatch: send FP8/MXFP8 rows + scales instead of bf16 when the experts
            run the "fp8" / "mxfp8" recipe (decided per call from the experts, so
            ``convert_model`` may come later); ignored for BF16 / unconverted experts.
            Needs ``fused=True``.
    """

    def __init__(self, ep_mesh, num_experts: int, *, fused: bool = True, quantize_dispatch: bool = False):
        if quantize_dispatch and not fused:
            raise ValueError(
                "quantize_dispatch=True needs fused=True: quantized rows are dequantized straight into the "
                "experts' padded layout by the fused dispatch; the unfused baseline only moves bf16 rows"
            )
        num_experts = check_int("num_experts", num_experts, minimum=1, fix="pass the global number of experts E")
        if num_experts % ep_mesh.size():
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the EP size {ep_mesh.size()}: every EP rank "
                f"holds E / ep experts"
            )
        self.ep_mesh = ep_mesh
        self.group = ep_mesh.get_group()
        self.ep_size = ep_mesh.size()
        self.num_experts = num_experts
        self.fused = fused
        self.quantize_dispatch = quantize_dispatch
        self.last_plan: Optional[DispatchPlan] = None  # for inspection / benchmarks

    def __call__(self, tokens: Tensor, expert_indices: Tensor, expert_weights: Tensor, experts: nn.Module) -> Tensor:
        """Route ``tokens`` to their experts' ranks, apply the experts, combine.

        Args:
            tokens: (T, D) this rank's tokens.
            expert_indices: (T, k) global expert ids. expert_weights: (T, k) scores.
            experts: the MoE's experts module, weights sharded over EP.
        Returns:
            (T, D) in tokens.dtype: ``sum_j weights[t, j] * expert_{idx[t, j]}(tokens[t])``.
        """
        recipe_name, align = experts_recipe(experts)
        # Global-expert order is destination-rank order: this is the send buffer.
        send, counts, layout = _padding.permute_and_pad(tokens, expert_indices, self.num_experts, None)
        if self.fused:
            quantized = self.uses_quantized_dispatch(experts)
            plan = _plan(counts, self.group, align, recipe_name, quantized)
            x = _dispatch_quantized(send, plan, experts.moeq_plan.recipe) if quantized else _dispatch(send, plan)
            y = run_on_trusted_counts(experts, x, plan.local_counts, align)
            home = _combine(y, plan)
        else:
            home = self._unfused(send, counts, experts, align, recipe_name)
        self.last_plan = plan if self.fused else None
        return _padding.combine_token_groups(home, layout, expert_weights)

    def uses_quantized_dispatch(self, experts: nn.Module) -> bool:
        """True when a call with these experts sends quantized rows (FP8/MXFP8 experts and
        ``quantize_dispatch``)."""
        plan = getattr(experts, "moeq_plan", None)
        return bool(self.quantize_dispatch and plan is not None and plan.recipe in QUANTIZED_RECIPES)

    def _unfused(self, send, counts, experts, align, recipe_name):
        plan = _plan(counts, self.group, None, recipe_name)  # alignment 1: a pure permutation
        recv = _all_to_all_autograd(send, plan.recv_splits, plan.send_splits, self.group)
        grouped = recv.index_select(0, plan.source_rows.long())  # permute to expert-major
        padded, pad_layout = _padding.pad_token_groups(grouped, plan.local_counts, align)
        y = run_on_trusted_counts(experts, padded, plan.local_counts, align)
        y = _padding.unpad_token_groups(y, pad_layout)
        y_recv = y.index_select(0, plan.dest_rows.long())  # back to all-to-all order
        return _all_to_all_autograd(y_recv, plan.send_splits, plan.recv_splits, self.group)


# ----------------------------------------------------------------------------------
# apply_expert_parallel
# ----------------------------------------------------------------------------------


class ShardedGroupedExperts(GroupedExperts):
    """Marks a moeq.GroupedExperts whose weights are DTensors sharded over EP. Its forward
    is GroupedExperts' own, which computes on the local shard (E/ep experts);
    ``moeq.convert_model`` turns it into its quantized class like any GroupedExperts."""


def _ep_mesh(device_mesh):
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(
            f"device_mesh must be a torch.distributed DeviceMesh, got {type(device_mesh).__name__}: build one with "
            f"torch.distributed.device_mesh.init_device_mesh(device, (ep,), mesh_dim_names=('ep',))"
        )
    names = device_mesh.mesh_dim_names or ()
    if EP_DIM not in names:
        raise ValueError(
            f"device_mesh has no {EP_DIM!r} dim (its dims: {names or 'unnamed'}): name the expert-parallel dim "
            f"'ep', e.g. init_device_mesh(device, (dp, ep), mesh_dim_names=('dp', 'ep'))"
        )
    return device_mesh[EP_DIM] if len(names) > 1 else device_mesh


def _find_and_check(model: nn.Module, ep: int, fused: bool, quantize_dispatch: bool):
    """This rank's static checks: ``(moes, hf, hf_sharded)`` or TypeError/ValueError/NotImplementedError."""
    check_module("model", model)
    if quantize_dispatch and not fused:
        raise ValueError(
            "apply_expert_parallel(quantize_dispatch=True) needs fused=True: the quantized rows are "
            "dequantized straight into the experts' padded layout by the fused dispatch"
        )
    from moeq.integrations import find_adapter  # local: the adapters import torchao
    from moeq.integrations.transformers.expert_parallel import check_hf_experts, find_hf_experts

    moes = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, MoE)]
    inside = {id(m.experts) for _, m in moes}
    for fqn, m in model.named_modules():
        adapter = None if id(m) in inside else find_adapter(m)
        if adapter is not None and adapter.expert_parallel_unsupported:
            raise NotImplementedError(
                f"{fqn or '<root>'} is a {adapter.family} ({type(m).__name__}), which moeq.apply_expert_parallel "
                f"does not shard: {adapter.expert_parallel_unsupported}"
            )
    hf = [(fqn, m) for fqn, m in find_hf_experts(model) if id(m) not in inside and not isinstance(m, GroupedExperts)]
    if not moes and not hf:
        raise ValueError(
            f"apply_expert_parallel found no moeq.MoE layer and no transformers experts module in "
            f"{type(model).__name__}"
        )
    for fqn, moe in moes:
        E = moe.num_experts
        if E % ep:
            raise ValueError(
                f"{fqn or '<root>'} has {E} experts, not divisible by the EP size {ep}: pick an 'ep' mesh size "
                f"that divides the number of experts"
            )
        if getattr(moe, "expert_dispatcher", None) is not None:
            raise ValueError(f"{fqn or '<root>'}: apply_expert_parallel was already applied")
    hf_sharded = [check_hf_experts(fqn, m, ep) for fqn, m in hf]
    return moes, hf, hf_sharded


def _describe(moes, hf, hf_sharded, fused: bool, quantize_dispatch: bool) -> dict:
    """What every EP rank must agree on: per layer E, weight shapes (D, H) and dtypes, recipe."""
    def weights(module, names):
        return tuple((n, tuple(getattr(module, n).shape), str(getattr(module, n).dtype)) for n in names)

    layers = [
        (fqn, moe.num_experts, experts_recipe(moe.experts)[0], weights(moe.experts, ("gate_up_proj", "down_proj")))
        for fqn, moe in moes
    ]
    layers += [
        (fqn, m.num_experts, experts_recipe(m)[0], weights(m, names)) for (fqn, m), names in zip(hf, hf_sharded)
    ]
    return {"fused": fused, "quantize_dispatch": quantize_dispatch, "layers": layers}


def _differences(a: dict, b: dict) -> List[str]:
    out = [f"{k} {a[k]} vs {b[k]}" for k in ("fused", "quantize_dispatch") if a[k] != b[k]]
    if len(a["layers"]) != len(b["layers"]):
        out.append(f"{len(a['layers'])} vs {len(b['layers'])} expert layers")
    for (fa, ea, ra, wa), (fb, eb, rb, wb) in zip(a["layers"], b["layers"]):
        name = fa or "<root>"
        if fa != fb:
            out.append(f"layer {name!r} vs {fb or '<root>'!r}")
            continue
        if ea != eb:
            out.append(f"{name} num_experts {ea} vs {eb}")
        if ra != rb:
            out.append(f"{name} recipe {ra or 'unconverted'} vs {rb or 'unconverted'}")
        for (n, sa, da), (_, sb, db) in zip(wa, wb):
            if sa != sb or da != db:
                out.append(f"{name}.{n} {sa} {da} vs {sb} {db}")
    return out


def _check_ranks_agree(ep_mesh, setup: Optional[dict], error: Optional[BaseException]) -> None:
    """Exchange (setup, error) over the EP group once; raise on every rank if any failed or differs."""
    group = ep_mesh.get_group()
    world = dist.get_world_size(group)
    gathered = [None] * world
    mine = (setup, None if error is None else (type(error).__name__, str(error)))
    dist.all_gather_object(gathered, mine, group=group)
    if error is not None:
        raise error

    def who(r: int) -> str:
        return f"EP rank {r} (global rank {dist.get_global_rank(group, r)})"

    for r, (_, err) in enumerate(gathered):
        if err is not None:
            kind = {"TypeError": TypeError, "NotImplementedError": NotImplementedError}.get(err[0], ValueError)
            raise kind(f"apply_expert_parallel failed on {who(r)}: {err[1]}")
    ref = gathered[0][0]
    for r, (other, _) in enumerate(gathered[1:], start=1):
        diff = _differences(ref, other)
        if diff:
            raise ValueError(
                f"expert-parallel ranks disagree: {who(r)} differs from {who(0)}: {'; '.join(diff)} "
                f"({who(0)}'s value first). Build the same model, convert it with the same recipe and call "
                f"apply_expert_parallel with the same arguments on every rank"
            )


def _shard_parameter(module: nn.Module, name: str, ep_mesh) -> None:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    p = getattr(module, name)
    if isinstance(p, DTensor):
        raise ValueError(f"{name} is already a DTensor: apply_expert_parallel was called twice on this model")
    sharded = distribute_tensor(p.detach(), ep_mesh, [Shard(0)])
    module.register_parameter(name, nn.Parameter(sharded, requires_grad=p.requires_grad))


def apply_expert_parallel(
    model: nn.Module, device_mesh, *, fused: bool = True, quantize_dispatch: bool = False
) -> nn.Module:
    """Shard every ``moeq.MoE``'s and transformers experts module's routed experts over
    ``device_mesh["ep"]``, in place.

    Call it on every rank of the mesh, after building (and optionally converting) the
    model and before building the optimizer (expert parameters are replaced by DTensor
    parameters). For ``moeq.MoE`` layers ``moeq.convert_model`` may be called before or
    after; transformers 5.x experts modules (``@use_experts_implementation``) must be
    converted first (any recipe, ``"bf16"`` included; see moeq/integrations/transformers/expert_parallel.py):
    their weights and per-expert biases are sharded and their converted forward sends the
    tokens through the dispatcher. Each EP rank
    keeps E/ep experts (global expert e on EP rank ``e // (E / ep)``); routers and
    shared experts stay replicated: sum their gradients over the data-parallel ranks
    (which the EP ranks are) as usual, e.g. with FSDP2 over a mesh including "ep".

    Args:
        model: a module containing ``moeq.MoE`` layers and/or converted transformers
            experts modules.
        device_mesh: DeviceMesh with an ``"ep"`` dim (1D ``("ep",)`` or e.g.
            ``("dp", "ep")``); its device type must be the model's (NCCL on CUDA, gloo on CPU).
        fused: dispatch writes received tokens straight into the experts' padded layout
            (default). False selects the unfused baseline (for benchmarks).
        quantize_dispatch: for experts converted to "fp8" / "mxfp8", quantize the routed
            rows before the dispatch all-to-all (e4m3 + scales, about half of bf16's bytes)
            and dequantize them into the padded layout on arrival; the experts' forward then
            sees exactly the values it would have quantized itself. Ignored for BF16 /
            unconverted experts. Needs ``fused=True``. See docs/expert_parallel.md.
    Returns:
        ``model``; ``model.moeq_expert_parallel_fqns`` lists the sharded MoE layers and
        transformers experts modules.
    Raises:
        TypeError/ValueError: no DeviceMesh, no "ep" dim, experts not divisible by the EP
        size, no MoE layer found, already applied, or a transformers experts module not
        converted by ``moeq.convert_model`` (or running transformers' own EP).
        NotImplementedError: torchtitan experts (use torchtitan's expert parallelism), or a
        transformers experts module with parameters EP does not know how to shard.
        Every rank raises together: the ranks exchange their layers' E, weight shapes
        (D, H) and dtypes, recipes and ``fused``/``quantize_dispatch`` once at setup (one
        small ``all_gather_object`` over the EP group, not per step); a rank whose check
        failed, or that differs, is named in a ValueError (the failing rank's own error on
        itself). At run time, ranks whose experts run different recipes (converted after
        this call) raise RuntimeError on the first forward (checked with the count
        exchange, at no extra cost).

    Collective waits are bounded by the process group's timeout: pass a finite one,
    ``dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))``, so that
    when one rank fails mid-step the others raise after at most that long instead of
    waiting in the all-to-all (torch's default is 30 minutes on gloo; see
    docs/expert_parallel.md, "When a rank fails").
    """
    ep_mesh = _ep_mesh(device_mesh)
    try:
        moes, hf, hf_sharded = _find_and_check(model, ep_mesh.size(), fused, quantize_dispatch)
        setup, error = _describe(moes, hf, hf_sharded, fused, quantize_dispatch), None
    except (TypeError, ValueError, NotImplementedError) as e:
        setup, error = None, e
    # One small collective at setup: every rank learns every rank's layers, so all raise
    # together (never one rank in a collective the others skipped) and a rank that built
    # another model is named, instead of a hang or a crash in the first all-to-all.
    _check_ranks_agree(ep_mesh, setup, error)
    for fqn, moe in moes:
        experts = moe.experts
        if type(experts) is GroupedExperts:
            experts.__class__ = ShardedGroupedExperts
        _shard_parameter(experts, "gate_up_proj", ep_mesh)
        _shard_parameter(experts, "down_proj", ep_mesh)
        moe.expert_dispatcher = ExpertParallelDispatcher(
            ep_mesh, moe.num_experts, fused=fused, quantize_dispatch=quantize_dispatch
        )
    for (fqn, experts), names in zip(hf, hf_sharded):
        for name in names:
            _shard_parameter(experts, name, ep_mesh)
        experts.moeq_expert_dispatcher = ExpertParallelDispatcher(
            ep_mesh, experts.num_experts, fused=fused, quantize_dispatch=quantize_dispatch
        )
    model.moeq_expert_parallel_fqns = [fqn for fqn, _ in moes] + [fqn for fqn, _ in hf]
    return model
