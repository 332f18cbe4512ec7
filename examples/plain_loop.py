"""moeq in a plain PyTorch training loop: build, convert, train. Nothing else changes.

    python examples/plain_loop.py --recipe mxfp8 --steps 50
"""
import argparse

import torch

import moeq
from moeq.app.data import batches, stdlib_corpus
from moeq.nn.model import MoEModelConfig, MoETransformer


def main(argv=None) -> list:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="mxfp8")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = MoETransformer(MoEModelConfig(dim=64, num_layers=2, num_experts=4, expert_hidden_dim=64)).to(device)
    model = moeq.convert_model(model, recipe=args.recipe, kernel="auto" if device == "cuda" else "emulated")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, tokens in zip(range(args.steps), batches(stdlib_corpus(2**20), 8, 64, device=device)):
        loss = model.loss(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"step {step:4d}  loss {losses[-1]:.3f}")
    return losses


if __name__ == "__main__":
    main()
