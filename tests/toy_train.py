"""A tiny training run driven entirely by trainer.py; tests/test_trainer.py launches it as a subprocess.

    python -m tests.toy_train --out DIR --epochs 2 --grad_accum 2 [--kill_at_step N] [--kill_in_save_at N]
    torchrun --standalone --nproc_per_node 2 -m tests.toy_train --out DIR ...

The model classifies variable-length token sequences (label = sum of tokens mod 4) with one transformer block.
A frozen linear layer stands in for a pretrained tower: it is rebuilt from the seed, never checkpointed.
At the end rank 0 writes every weight to DIR/final.safetensors.
"""
import argparse
import os
import random
import signal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import trainer

VOCAB, CLASSES, N_SAMPLES = 32, 4, 48
BROKEN = N_SAMPLES  # the extra last index: a sample the collate drops


class ToyDataset:
    """Deterministic samples: sample i depends only on i."""

    def __len__(self):
        return N_SAMPLES + 1

    def __getitem__(self, i):
        if i == BROKEN:
            return {"idx": i, "broken": True}
        g = random.Random(i)
        x = [g.randrange(1, VOCAB) for _ in range(g.randint(3, 12))]
        return {"idx": i, "x": torch.tensor(x), "y": sum(x) % CLASSES}


def make_batches(epoch: int, batch_size: int, seed: int) -> list[list[int]]:
    """Pure epoch -> micro-batches: shuffle, group by length, shuffle the batches, and put the broken sample in a
    micro-batch of its own (it collates to None, exercising the empty-batch path)."""
    data = ToyDataset()
    order = list(range(N_SAMPLES))
    random.Random(seed * 1000 + epoch).shuffle(order)
    order.sort(key=lambda i: len(data[i]["x"]))
    batches = [order[i:i + batch_size] for i in range(0, N_SAMPLES, batch_size)]
    random.Random(seed * 1000 + epoch + 1).shuffle(batches)
    batches.insert((5 + epoch) % len(batches), [BROKEN])
    return batches


class Collate:
    """Pads to the longest sample; None when every sample was dropped. With log_dir, appends the indices of
    every micro-batch it sees to log_dir/seen.<pid>.txt (the tests check sample accounting with it)."""

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir

    def __call__(self, items):
        if self.log_dir:
            with open(os.path.join(self.log_dir, f"seen.{os.getpid()}.txt"), "a") as f:
                f.write(",".join(str(it["idx"]) for it in items) + "\n")
        items = [it for it in items if not it.get("broken")]
        if not items:
            return None
        T = max(len(it["x"]) for it in items)
        x = torch.zeros(len(items), T, dtype=torch.long)                  # [B, T]
        mask = torch.zeros(len(items), T, dtype=torch.bool)               # [B, T]
        for b, it in enumerate(items):
            x[b, :len(it["x"])], mask[b, :len(it["x"])] = it["x"], True
        return {"x": x, "mask": mask, "y": torch.tensor([it["y"] for it in items])}


class ToyModel(nn.Module):
    def __init__(self, dim: int = 16, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.frozen = nn.Linear(dim, dim).requires_grad_(False)
        self.block = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x, mask, y):
        h = self.block(self.frozen(self.embed(x)), src_key_padding_mask=~mask)      # [B, T, D]
        pooled = (self.norm(h) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, D]
        logits = self.head(pooled)                                                  # [B, C]
        return {"loss": F.cross_entropy(logits.float(), y), "num_tokens": mask.sum(),
                "acc": (logits.argmax(-1) == y).float().mean()}


class ToyTrainer(trainer.Trainer):
    """Test hooks: record each step's final (averaged, re-normalised) gradients; SIGKILL this process right after
    a given step, or in the middle of a checkpoint save (files written to the temporary folder, not published)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grads = []

    def on_step_end(self):
        if self.args.dump_grads:
            self.grads.append({n: p.grad.clone() for n, p in self.trainable.items()})
        if self.step == self.args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def commit_checkpoint(self, tmp, final):
        if self.step == self.args.kill_in_save_at:
            os.kill(os.getpid(), signal.SIGKILL)
        super().commit_checkpoint(tmp, final)


def parse_args(argv=None):
    parser = trainer.add_common_args(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--head_lr_scale", type=float, default=3.0, help="head.* trains at lr * this")
    parser.add_argument("--log_batches", action="store_true", help="record consumed micro-batches in --out")
    parser.add_argument("--dump_grads", action="store_true", help="write each step's gradients to --out/grads.pt")
    parser.add_argument("--kill_at_step", type=int, default=0)
    parser.add_argument("--kill_in_save_at", type=int, default=0)
    return parser.parse_args(argv)


def train(args) -> ToyTrainer:
    """The whole run; the tests also call it in-process."""
    trainer.seed_everything(args.seed)  # same initial (and frozen) weights in every run, like --init
    model = ToyModel(dropout=args.dropout)
    os.makedirs(args.out, exist_ok=True)
    run = ToyTrainer(args, model, ToyDataset(), Collate(args.out if args.log_batches else None),
                     lambda epoch: make_batches(epoch, args.batch_size, args.seed),
                     lr_for={"head.": args.lr * args.head_lr_scale})
    run.fit()
    if trainer.is_main():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(args.out, "final.safetensors"))
        if args.dump_grads:
            torch.save(run.grads, os.path.join(args.out, "grads.pt"))
    return run


if __name__ == "__main__":
    train(parse_args())
    trainer.cleanup_distributed()
