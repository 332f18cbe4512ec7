"""Expert parallelism: dispatch + experts + combine per step, fused vs unfused dispatch, EP vs 1 GPU.

Launch (2 GPUs, NCCL):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 benchmarks/ep.py --out $OUT

(the script also sets both variables itself if unset: NVLink multicast stays off). Also
``--ep 4``/``--ep 8`` on more GPUs (the mesh is ("dp", "ep") with dp = world / ep), and
on CPU for a smoke test: ``torchrun --nproc-per-node 2 benchmarks/ep.py --cpu-smoke``
(= ``--backend gloo --device cpu --tiny``).

Per recipe (bf16, fp8, mxfp8, each through ``moeq.convert_model``, kernel "auto" on GPU,
"emulated" on CPU), with the same weights, tokens and routing on every variant:

* **fused**: moeq's EP dispatch (all-to-all, then one gather pass straight into the
  experts' padded expert-major layout; the experts do not pad again);
* **unfused**: all-to-all, then permute to expert-major, then ``pad_token_groups``
  (and unpad, unpermute on the way back): one extra pass each way;
* **quantized** (fp8, mxfp8 only): the fused dispatch with ``quantize_dispatch=True``: rows
  are quantized along D with the experts' recipe and packed with their scales into one
  uint8 row (fp8: D + 16 bytes, mxfp8: round_up(D + D/32, 16)) before the all-to-all, and
  dequantized into the padded layout on arrival; combine and backward stay bf16;
* **1 GPU**: rank 0 alone runs the same global batch (all ranks' tokens) through the
  unsharded MoE (permute-and-pad + all experts + combine).

Timed: forward + backward of dispatch + experts + combine for fixed routing (router
excluded), median of --iters steps after --warmup, max over ranks. Checked first, on
fresh random data: fused == unfused (bitwise), EP == 1 GPU (relative error), and the
BF16 EP output against a float64 reference, quantized == fused (forward, bitwise: the
experts' own quantization of the dequantized rows reproduces them). Bytes: measured
by wrapping ``dist.all_to_all_single`` during one step: what each rank's token
all-to-alls send per step (forward dispatch + combine, backward both; the count
exchange apart), total and to other ranks, and the forward dispatch's share alone.
Also timed alone: the forward dispatch (bf16: all-to-all + gather into the padded layout;
quantized: pack + all-to-all + gather/dequantize).
Writes ep.json and ep.md under --out and prints the markdown tables.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import moeq  # noqa: E402
from moeq.numerics.recipes import RECIPE_NAMES  # noqa: E402

from moeq.ops.quantized_dispatch import QUANTIZED_RECIPES  # noqa: E402

QUANTIZED = tuple(q.value for q in QUANTIZED_RECIPES)  # recipes whose dispatch can send quantized rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ep", type=int, default=None, help="EP size (default: world size)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--recipes", nargs="+", default=list(RECIPE_NAMES), choices=RECIPE_NAMES)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backend", default=None, help="nccl (default on GPU) or gloo")
    p.add_argument("--device", default=None, help="cuda (default if available) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke test")
    p.add_argument("--cpu-smoke", action="store_true", help="--backend gloo --device cpu --tiny")
    p.add_argument("--out", default=None, help="directory for ep.json / ep.md")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="bound on every collective wait: a rank that fails turns into an error on the others "
                        "after this long (init_process_group(timeout=...); torch's default is 30 minutes)")
    p.add_argument("--no-fp64-reference", action="store_true",
                   help="skip the float64 reference (its fp64 weights do not fit beside EP=2 of a DSV3-sized layer)")
    a = p.parse_args()
    if a.cpu_smoke:
        a.backend, a.device, a.tiny = "gloo", "cpu", True
    if a.tiny:
        a.tokens, a.dim, a.hidden, a.experts, a.top_k, a.warmup, a.iters = 64, 64, 64, 8, 2, 1, 3
    return a


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_s(step, device, warmup, iters):
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_moe(args, recipe, device):
    torch.manual_seed(0)
    moe = moeq.MoE(args.dim, args.hidden, args.experts, args.top_k, load_balancing="none",
                   dtype=torch.bfloat16, device=device)
    kernel = "auto" if device.type == "cuda" else "emulated"
    moeq.convert_model(moe, recipe, kernel=kernel)
    return moe


def count_host_syncs(step, device):
    """Host syncs torch reports (cuda sync debug mode) in one fwd+bwd step; None off CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (the mode's own one-time "prototype feature" notice is not a sync: it once made the
    # first recipe measured look like it synced twice)
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    for w in syncs:
        print(f"[ep] host sync at {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}", flush=True)
    return len(syncs)


def routing(args, rank, device):
    """This rank's tokens, fixed routing (softmax top-k of random logits), output grad."""
    g = torch.Generator(device="cpu").manual_seed(1000 + rank)
    x = torch.randn(args.tokens, args.dim, generator=g).to(device, torch.bfloat16)
    logits = torch.randn(args.tokens, args.experts, generator=g).to(device)
    w, idx = logits.softmax(-1).topk(args.top_k, dim=-1)
    gout = torch.randn(args.tokens, args.dim, generator=g).to(device, torch.bfloat16)
    return x, idx, w, gout


def reference64(x, idx, w, w13, w2):
    """Float64 MoE output for fixed routing (loop over experts)."""
    x, w13, w2, w = x.double(), w13.double(), w2.double(), w.double()
    out = torch.zeros_like(x)
    hidden = w2.shape[-1]
    for e in range(w13.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel():
            gu = x[tok] @ w13[e].t()
            y = (F.silu(gu[:, :hidden]) * gu[:, hidden:]) @ w2[e].t()
            out.index_add_(0, tok, y * w[tok, slot, None])
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gather_rows(t, world):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class A2ABytes:
    """Counts the bytes ``dist.all_to_all_single`` sends from this rank while active.

    ``tokens``/``tokens_remote``: token all-to-alls (everything but the int64 count
    exchange), in total and to other ranks; ``first``/``first_remote``: the first token
    all-to-all of the step (the forward dispatch)."""

    def __init__(self):
        self.tokens = self.tokens_remote = 0
        self.first = self.first_remote = None
        self._orig = dist.all_to_all_single

    def __enter__(self):
        def spy(out, inp, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            if inp.dtype != torch.int64:
                n = inp.numel() * inp.element_size()
                me = dist.get_rank(group)
                if input_split_sizes:
                    own = input_split_sizes[me] * (n // max(inp.shape[0], 1))
                else:
                    own = n // dist.get_world_size(group)
                self.tokens += n
                self.tokens_remote += n - own
                if self.first is None:
                    self.first, self.first_remote = n, n - own
            return self._orig(out, inp, output_split_sizes, input_split_sizes, group=group, **kw)

        dist.all_to_all_single = spy
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig


def measured_bytes(step):
    with A2ABytes() as b:
        step()
    return b


def max_over_ranks(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def dispatch_only_ms(m, x, idx, args, device, quantized):
    """Forward dispatch alone (no grad): bf16 all-to-all + gather into the padded layout, or
    pack + all-to-all of packed rows + gather/dequantize. Uses the last step's plan."""
    from moeq.ops.padding import permute_and_pad
    from moeq.parallel import expert_parallel as epmod

    plan = m.expert_dispatcher.last_plan
    recipe = m.experts.moeq_recipe.value
    send = permute_and_pad(x, idx, args.experts, None)[0]

    def step():
        with torch.no_grad():
            if quantized:
                epmod._dispatch_quantized(send, plan, recipe)
            else:
                epmod._dispatch(send, plan)

    return median_step_s(step, device, args.warmup, args.iters) * 1e3


def a2a_only_ms(m, row_bytes, args, device):
    """One all_to_all_single of the forward dispatch's rows alone (uint8 rows of
    ``row_bytes``, the last step's split sizes): the transport's own time."""
    plan = m.expert_dispatcher.last_plan
    send = torch.randint(0, 255, (plan.num_send, row_bytes), dtype=torch.uint8, device=device)
    recv = torch.empty((plan.num_recv, row_bytes), dtype=torch.uint8, device=device)

    def step():
        dist.all_to_all_single(recv, send, plan.recv_splits, plan.send_splits, group=plan.group)

    return median_step_s(step, device, args.warmup, args.iters) * 1e3


def bench_recipe(args, recipe, mesh, rank, world, device):
    base = build_moe(args, recipe, device)
    x, idx, w, gout = routing(args, rank, device)
    variants = {}
    quantizable = recipe in QUANTIZED
    for name, fused, quantized in (("fused", True, False), ("unfused", False, False), ("quantized", True, True)):
        if quantized and not quantizable:
            continue
        m = copy.deepcopy(base)
        moeq.apply_expert_parallel(m, mesh, fused=fused, quantize_dispatch=quantized)
        variants[name] = m

    def ep_step(m):
        def step():
            xi = x.detach().requires_grad_()
            out = m.expert_dispatcher(xi, idx, w, m.experts)
            out.backward(gout)
            for p in m.parameters():
                p.grad = None
            return out.detach()

        return step

    # correctness on this data before any timing
    outs = {name: ep_step(m)() for name, m in variants.items()}
    syncs = count_host_syncs(ep_step(variants["fused"]), device)
    fused_eq_unfused = torch.equal(outs["fused"], outs["unfused"])
    gx, gidx, gw = (gather_rows(t, world) for t in (x, idx, w))
    gout_ep = gather_rows(outs["fused"], world)
    row = {"recipe": recipe, "fused_equals_unfused": fused_eq_unfused, "host_syncs_per_step": syncs}
    if quantizable:
        assert variants["quantized"].expert_dispatcher.uses_quantized_dispatch(variants["quantized"].experts)
        q_eq = torch.tensor([float(torch.equal(outs["quantized"], outs["fused"]))], device=device)
        dist.all_reduce(q_eq, op=dist.ReduceOp.MIN)
        row["quantized_equals_fused_fwd"] = bool(q_eq.item())
        row["host_syncs_per_step_quantized"] = count_host_syncs(ep_step(variants["quantized"]), device)
        gout_q = gather_rows(outs["quantized"], world)
    if rank == 0:
        one = base._local_experts(gx, _Routing(gidx, gw)).detach()
        row["rel_err_ep_vs_1gpu"] = rel_err(gout_ep, one)
        ref = None
        if not args.no_fp64_reference:
            ref = reference64(gx, gidx, gw, base.experts.gate_up_proj.detach(), base.experts.down_proj.detach())
        row["rel_err_ep_vs_fp64"] = rel_err(gout_ep, ref) if ref is not None else float("nan")
        if quantizable:
            row["rel_err_quantized_vs_1gpu"] = rel_err(gout_q, one)
            row["rel_err_quantized_vs_fp64"] = rel_err(gout_q, ref) if ref is not None else float("nan")
        del ref

    for name, m in variants.items():
        t = median_step_s(ep_step(m), device, args.warmup, args.iters)
        t_max = torch.tensor([t], dtype=torch.float64, device=device)
        dist.all_reduce(t_max, op=dist.ReduceOp.MAX)
        row[f"ep_{name}_ms"] = t_max.item() * 1e3
    mib = 2.0**20
    for name in [n for n in ("fused", "quantized") if n in variants]:
        b = measured_bytes(ep_step(variants[name]))
        key = "" if name == "fused" else "_quantized"
        tot, rem, first, first_rem = (v / mib for v in max_over_ranks(
            [b.tokens, b.tokens_remote, b.first, b.first_remote], device))
        row[f"a2a_mb_per_rank_step{key}"], row[f"a2a_remote_mb_per_rank_step{key}"] = tot, rem
        row[f"dispatch_fwd_mb{key}"], row[f"dispatch_fwd_remote_mb{key}"] = first, first_rem
        ms = dispatch_only_ms(variants[name], x, idx, args, device, quantized=name == "quantized")
        row[f"dispatch_fwd_ms{key}"] = max_over_ranks([ms], device)[0]
        # the all-to-all alone, and its achieved rate for the bytes leaving each rank
        if name == "quantized":
            from moeq.ops.quantized_dispatch import packed_row_bytes

            row_bytes = packed_row_bytes(args.dim, recipe)
        else:
            row_bytes = args.dim * x.element_size()
        a2a_ms = max_over_ranks([a2a_only_ms(variants[name], row_bytes, args, device)], device)[0]
        row[f"a2a_fwd_ms{key}"] = a2a_ms
        row[f"a2a_fwd_remote_GBps{key}"] = first_rem * mib / (a2a_ms * 1e-3) / 1e9 if a2a_ms > 0 else None
    if quantizable:
        from moeq.ops.quantized_dispatch import packed_row_bytes

        row["packed_row_bytes"] = packed_row_bytes(args.dim, recipe)
        row["bf16_row_bytes"] = args.dim * x.element_size()

    # one GPU, same global batch, same run: rank 0 alone
    dist.barrier()
    if rank == 0:
        def one_step():
            xi = gx.detach().requires_grad_()
            out = base._local_experts(xi, _Routing(gidx, gw))
            out.backward(gather_gout)
            for p in base.parameters():
                p.grad = None

        gather_gout = torch.randn_like(gx)
        row["one_gpu_ms"] = median_step_s(one_step, device, args.warmup, args.iters) * 1e3
    dist.barrier()
    del variants, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


class _Routing:
    """The two fields of RouterOutput that MoE._local_experts reads."""

    def __init__(self, expert_indices, expert_weights):
        self.expert_indices, self.expert_weights = expert_indices, expert_weights


def markdown(rows, args, world, device_name):
    lines = [
        f"EP={args.ep} on {world} x {device_name}; per rank T={args.tokens} tokens, D={args.dim}, "
        f"H={args.hidden}, E={args.experts}, k={args.top_k}; fwd+bwd of dispatch+experts+combine, "
        f"median of {args.iters}, max over ranks. 1 GPU: rank 0 alone on the global batch "
        f"({args.tokens * world} tokens).",
        "",
        "| recipe | EP fused ms | EP unfused ms | unfused/fused | 1 GPU ms | 1 GPU / EP fused | "
        "a2a MiB/rank/step (to other ranks) | host syncs/step | fused==unfused | rel err EP vs 1 GPU | rel err EP vs fp64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['ep_fused_ms']:.3f} | {r['ep_unfused_ms']:.3f} | "
            f"{r['ep_unfused_ms'] / r['ep_fused_ms']:.2f}x | {r['one_gpu_ms']:.3f} | "
            f"{r['one_gpu_ms'] / r['ep_fused_ms']:.2f}x | {r['a2a_mb_per_rank_step']:.4g} "
            f"({r['a2a_remote_mb_per_rank_step']:.4g}) | {r['host_syncs_per_step']} | {r['fused_equals_unfused']} | "
            f"{r['rel_err_ep_vs_1gpu']:.2e} | {r['rel_err_ep_vs_fp64']:.2e} |"
        )
    qrows = [r for r in rows if "ep_quantized_ms" in r]
    if qrows:
        lines += [
            "",
            "Quantized dispatch (FP8/MXFP8 rows + scales over the forward dispatch all-to-all; combine "
            "and backward in bf16), same run, same inputs. Bytes measured on the all-to-all calls of one "
            "step, max over ranks; dispatch fwd ms: the forward dispatch alone (no grad).",
            "",
            "| recipe | row bytes bf16 -> packed | EP fused ms | EP quantized ms | fused/quantized | "
            "dispatch fwd ms bf16 -> quantized | dispatch fwd MiB bf16 -> quantized (to other ranks) | "
            "token a2a MiB/rank/step bf16 -> quantized | host syncs/step | quantized==fused fwd | "
            "rel err quantized vs 1 GPU | rel err quantized vs fp64 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in qrows:
            lines.append(
                f"| {r['recipe']} | {r['bf16_row_bytes']} -> {r['packed_row_bytes']} | {r['ep_fused_ms']:.3f} | "
                f"{r['ep_quantized_ms']:.3f} | {r['ep_fused_ms'] / r['ep_quantized_ms']:.2f}x | "
                f"{r['dispatch_fwd_ms']:.3f} -> {r['dispatch_fwd_ms_quantized']:.3f} | "
                f"{r['dispatch_fwd_mb']:.4g} -> {r['dispatch_fwd_mb_quantized']:.4g} "
                f"({r['dispatch_fwd_remote_mb']:.4g} -> {r['dispatch_fwd_remote_mb_quantized']:.4g}) | "
                f"{r['a2a_mb_per_rank_step']:.4g} -> {r['a2a_mb_per_rank_step_quantized']:.4g} | "
                f"{r['host_syncs_per_step_quantized']} | {r['quantized_equals_fused_fwd']} | "
                f"{r['rel_err_quantized_vs_1gpu']:.2e} | {r['rel_err_quantized_vs_fp64']:.2e} |"
            )
    arows = [r for r in rows if r.get("a2a_fwd_ms") is not None]
    if arows:
        lines += [
            "",
            "The forward dispatch's all-to-all alone (same split sizes, uint8 rows of the dispatch's row "
            "size), median, max over ranks; rate = bytes each rank sends to OTHER ranks / time.",
            "",
            "| recipe | rows | a2a ms | MiB to other ranks | achieved GB/s per rank |",
            "|---|---|---|---|---|",
        ]
        for r in arows:
            for key, what in (("", "bf16"), ("_quantized", "packed")):
                if r.get(f"a2a_fwd_ms{key}") is None:
                    continue
                lines.append(
                    f"| {r['recipe']} | {what} | {r[f'a2a_fwd_ms{key}']:.3f} | {r[f'dispatch_fwd_remote_mb{key}']:.4g} | "
                    f"{r[f'a2a_fwd_remote_GBps{key}'] or 0:.1f} |"
                )
    return "\n".join(lines)


def main():
    args = parse_args()
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    args.ep = args.ep or world
    if world % args.ep:
        raise SystemExit(f"--ep {args.ep} must divide the world size {world}")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        device_name = torch.cuda.get_device_name(device)
    else:
        device, device_name = torch.device("cpu"), "CPU"
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // args.ep, args.ep), mesh_dim_names=("dp", "ep"))
    rows = []
    for recipe in args.recipes:
        rows.append(bench_recipe(args, recipe, mesh, rank, world, device))
        if rank == 0:
            print(f"[ep] {recipe}: {rows[-1]}", flush=True)
    if rank == 0:
        table = markdown(rows, args, world, device_name)
        print(table, flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            meta = {"world": world, "ep": args.ep, "device": device_name, "backend": backend,
                    "torch": torch.__version__, "args": vars(args)}
            with open(os.path.join(args.out, "ep.json"), "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)
            with open(os.path.join(args.out, "ep.md"), "w") as f:
                f.write(table + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
