r"""Probe (not part of the demo): can the tiny recipe give rendered text a path to the LLM, as speech has one?

Speech reaches the tiny LLM spelled: the audio tower learns letters by CTC, then the audio projector learns to
write each clip's characters as fixed codes (warmup_heads.ListenWarmup). Before stop 26 OCR had no such path
(held-out ocr 0.04-0.08 in every demo), and a CTC head on the vision tower had not left the character prior. This
probe measures the two halves of a spelled path for ToyWorld's square OCR images (a word or a number, rotated up to
8 degrees, anywhere in the image; drawn fresh every step by the dataset's own generator and renderer):

1. reading: the tiny vision tower (random init) + a linear head over 16 columns of 7 px (two per patch column,
   attention-pooled over the rows). `--tower_loss dense`: each column's target is the character whose centre the
   renderer put in it (known exactly: build_toyworld.char_columns), as the vision warm-up's cell heads get each
   cell's colour (the head the vision warm-up now has); `--tower_loss ctc`: CTC over the same 16 columns.
2. spelling: the tower frozen, a fresh resampler (the tiny preset's: 16 queries, 8 heads, LLM width) learns by
   spelling_loss to write the text's characters as fixed random codes over all its 16 slots (the pad's code the
   blank), as the listen warm-up does for speech; read back by nearest code + CTC collapse.

Both are scored (character accuracy as eval_omni scores OCR: 1 - CER, floored at 0) on 200 freshly generated
images of another seed and on the square OCR images of a built test split (`--data DIR/test.jsonl`).

    python benchmarks/probe_ocr_reading.py --data /tmp/demo4_data/test.jsonl --tower_steps 3000 --slot_steps 1500

`--frozen_tower CKPT` measures how readable a trained checkpoint's tower already is: its vision tower is loaded and
frozen and only a fresh column head (dense loss) is trained on top, so the score is what the tower's output holds
about the characters, the most a resampler reading it can pass on (`--slot_steps 0` to stop there).
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataset import build_toyworld as toyworld
from dataset.media import image_to_tensor, load_image
from eval_omni import char_accuracy
from model.model_omni import OmniConfig, OmniModel, Resampler, spelling_loss
from model.model_vision import SiglipVisionModel

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789. "  # every character of ToyWorld's English OCR texts, lower-cased
COLUMNS = 16                                       # 7-px columns of a 112-px image: two per 14-px patch column


def column_targets(spec: dict) -> torch.Tensor:
    """Long[COLUMNS]: the 1-based CHARS index of the character centred in each column, 0 none (a later character
    in the same column wins)."""
    out = torch.zeros(COLUMNS, dtype=torch.long)
    for ch, column in zip(spec["lines"][0].lower(), toyworld.char_columns(spec, COLUMNS)):
        if column is not None and ch in CHARS:
            out[column] = CHARS.index(ch) + 1
    return out


def generated(n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """n fresh square OCR images: pixels [n, 3, 112, 112], texts, char_columns [n, COLUMNS]."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    images, texts, columns = [], [], []
    for i in range(n):
        sample = toyworld.gen_ocr(rng, "en", 4 * i, False)[0]  # i % 4 != 3: the square layout
        spec = sample["images"][0]
        images.append(image_to_tensor(toyworld.render_text(spec, noise)))
        texts.append(sample["meta"]["text"].lower())
        columns.append(column_targets(spec))
    return torch.stack(images), texts, torch.stack(columns)


def test_split(path: str) -> tuple[torch.Tensor, list[str]]:
    """The square OCR images of a built split (their pixels as the eval reads them) and their texts."""
    images, texts = [], []
    for line in open(path):
        sample = json.loads(line)
        if sample["task"] == "ocr" and sample["meta"]["layout"] == "square":
            images.append(image_to_tensor(load_image(os.path.join(os.path.dirname(path), sample["images"][0]))))
            texts.append(sample["meta"]["text"].lower())
    return torch.stack(images), texts


class ColumnReader(nn.Module):
    """Vision tower + per-column character logits."""

    def __init__(self, config: OmniConfig):
        super().__init__()
        self.tower = SiglipVisionModel(config.vision)
        self.grid = config.vision.image_size // config.vision.patch_size
        width = config.vision.hidden_size
        self.row_score = nn.Linear(width, 1)
        self.head = nn.Linear(width, COLUMNS // self.grid * (len(CHARS) + 1))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, g*g, Dv] patch features."""
        grid_hw = torch.tensor([[self.grid, self.grid]] * len(pixels))
        return self.tower(pixels, grid_hw)[0]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, COLUMNS, C+1] logits (class 0 = no character / the CTC blank)."""
        feats = self.features(pixels).view(len(pixels), self.grid, self.grid, -1)  # [N, rows, cols, Dv]
        pooled = (self.row_score(feats).softmax(1) * feats).sum(1)                 # [N, cols, Dv]
        return self.head(pooled).view(len(pixels), COLUMNS, -1)                     # [N, COLUMNS, C+1]


def collapse(classes: list[int]) -> str:
    """CTC greedy read-out: drop repeats, then blanks."""
    out, prev = [], 0
    for k in classes:
        if k and k != prev:
            out.append(CHARS[k - 1])
        prev = k
    return "".join(out)


def mean_char_accuracy(hyps: list[str], refs: list[str]) -> float:
    return sum(char_accuracy(h, r) for h, r in zip(hyps, refs)) / len(refs)


def targets(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """texts -> (1-based classes concatenated, lengths)."""
    ids = [[CHARS.index(c) + 1 for c in t if c in CHARS] for t in texts]
    return torch.tensor([k for t in ids for k in t]), torch.tensor([len(t) for t in ids])


def train(params, steps: int, lr: float, step_loss, report, every: int = 250) -> None:
    """AdamW, 100 warm-up steps then cosine; step_loss(step) -> loss; report(step) at every `every` steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = step_loss(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % every == 0 or step == steps:
            report(step, loss.item())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a built split's jsonl (its square OCR images are scored too)")
    p.add_argument("--tower_loss", choices=["dense", "ctc"], default="dense")
    p.add_argument("--tower_steps", type=int, default=3000)
    p.add_argument("--slot_steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frozen_tower", default="", help="a checkpoint whose vision tower is read, frozen (see above)")
    args = p.parse_args()
    if args.frozen_tower and args.tower_loss != "dense":
        p.error("--frozen_tower trains the dense column head")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = OmniConfig.preset("tiny")
    held_out = {"generated": generated(200, seed=10_000 + args.seed)[:2]}
    if args.data:
        held_out["test split"] = test_split(args.data)
    print("held-out square OCR images: " + ", ".join(f"{k} {len(v[1])}" for k, v in held_out.items()))

    reader, start = ColumnReader(config), time.time()
    if args.frozen_tower:
        reader.tower.load_state_dict(OmniModel.from_pretrained(args.frozen_tower).vision_tower.state_dict())
        reader.tower.requires_grad_(False)

    def reading_loss(step: int) -> torch.Tensor:
        pixels, texts, columns = generated(args.batch_size, seed=args.seed * 1_000_003 + step)
        logits = reader(pixels).float()                                              # [B, COLUMNS, C+1]
        if args.tower_loss == "dense":
            weight = torch.ones(logits.shape[-1])
            weight[0] = 0.2  # most columns hold no character
            return F.cross_entropy(logits.flatten(0, 1), columns.flatten(), weight=weight)
        classes, lengths = targets(texts)
        logp = logits.log_softmax(-1).transpose(0, 1)                                # [COLUMNS, B, C+1]
        return F.ctc_loss(logp, classes, torch.full((len(texts),), COLUMNS), lengths, zero_infinity=True)

    def report_reading(step: int, loss: float) -> None:
        with torch.no_grad():
            scores = {k: mean_char_accuracy([collapse(r) for r in reader(x).argmax(-1).tolist()], t)
                      for k, (x, t) in held_out.items()}
        print(f"reading {args.tower_loss} step {step} ({time.time() - start:.0f} s): loss {loss:.3f}, char accuracy "
              + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)

    train([p for p in reader.parameters() if p.requires_grad], args.tower_steps, args.lr, reading_loss, report_reading)

    reader.requires_grad_(False)
    width = config.llm.hidden_size
    resampler = Resampler(config.query_num, width, config.vision.hidden_size, config.resampler_heads)
    codes = torch.randn(len(CHARS) + 1, width, generator=torch.Generator().manual_seed(0)) * 0.5  # [C+1, D]
    grid_hw = torch.tensor([[reader.grid, reader.grid]])
    start = time.time()

    def slots(pixels: torch.Tensor) -> torch.Tensor:
        feats = reader.features(pixels)                                              # [N, g*g, Dv]
        mask = torch.ones(feats.shape[:2], dtype=torch.bool)
        return resampler(feats, mask, grid_hw.expand(len(pixels), -1))               # [N, Q, D]

    def spelling(step: int) -> torch.Tensor:
        pixels, texts, _ = generated(args.batch_size, seed=7 + args.seed * 1_000_003 + step)
        classes, lengths = targets(texts)
        tokens = slots(pixels)
        padded = torch.zeros(len(texts), int(lengths.max()), dtype=torch.long)       # [B, L]
        for i, part in enumerate(classes.split(lengths.tolist())):
            padded[i, :len(part)] = part
        return spelling_loss(tokens, torch.full((len(texts),), tokens.shape[1]), codes, padded, lengths)

    def report_spelling(step: int, loss: float) -> None:
        with torch.no_grad():
            scores = {k: mean_char_accuracy([collapse(r) for r in torch.cdist(slots(x), codes).argmin(-1).tolist()], t)
                      for k, (x, t) in held_out.items()}
        print(f"spelling step {step} ({time.time() - start:.0f} s): loss {loss:.3f}, slots read back "
              + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)

    if args.slot_steps:
        train(resampler.parameters(), args.slot_steps, args.lr, spelling, report_spelling)


if __name__ == "__main__":
    main()
