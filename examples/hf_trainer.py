"""A transformers MoE model, converted with moeq, trained by the Hugging Face Trainer unchanged.

    python examples/hf_trainer.py --model qwen3_moe --recipe fp8 --steps 20
"""
import argparse
import tempfile

import torch

import moeq
from moeq.app.data import stdlib_corpus
from moeq.integrations.transformers.models import HF_MODEL_NAMES, hf_config


class ByteWindows(torch.utils.data.Dataset):
    """Fixed windows of a byte corpus as causal-LM examples."""

    def __init__(self, data: bytes, seq_len: int, count: int):
        self.buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.seq_len, self.count = seq_len, count
        self.stride = (self.buf.numel() - seq_len - 1) // count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        ids = self.buf[i * self.stride : i * self.stride + self.seq_len].long()
        return {"input_ids": ids, "labels": ids}


def main(argv=None):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3_moe", choices=HF_MODEL_NAMES)
    p.add_argument("--recipe", default="fp8")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(args.model, dim=64, expert_hidden_dim=64, num_experts=4))
    moeq.convert_model(model, recipe=args.recipe, kernel="auto" if on_gpu else "emulated")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=4,
                                   learning_rate=3e-3, logging_steps=5, report_to=[], save_strategy="no",
                                   bf16=on_gpu, use_cpu=not on_gpu, disable_tqdm=True),
            train_dataset=ByteWindows(stdlib_corpus(2**20), 64, 4 * args.steps),
        )
        result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"train loss {result.training_loss:.3f}; logged {losses}")
    return losses


if __name__ == "__main__":
    main()
