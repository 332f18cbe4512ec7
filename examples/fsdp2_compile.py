"""moeq with FSDP2 (fully_shard) and torch.compile, launched with torchrun.

    torchrun --nproc-per-node 2 examples/fsdp2_compile.py --recipe fp8
On CPU it runs on gloo; on GPUs on NCCL.
"""
import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import moeq
from moeq.app.data import batches, stdlib_corpus
from moeq.nn.model import MoEModelConfig, MoETransformer


def main(argv=None) -> list:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="fp8")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor", help="aot_eager traces without codegen (fast on CPU)")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    # a finite timeout: if one rank fails, the others raise within it instead of waiting 30 minutes
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = MoETransformer(MoEModelConfig(dim=64, num_layers=2, num_experts=4, expert_hidden_dim=64)).to(device, dtype)
    model = moeq.convert_model(model, recipe=args.recipe, kernel="auto" if on_gpu else "emulated")
    for layer in model.layers:  # shard each block, then the rest
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss_fn = model.loss if args.no_compile else torch.compile(model.loss, backend=args.compile_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    data = batches(stdlib_corpus(2**20), 4, 64, seed=rank, device=device)
    for step, tokens in zip(range(args.steps), data):
        loss = loss_fn(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if rank == 0:
        print(f"losses {[round(v, 3) for v in losses]}")
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
