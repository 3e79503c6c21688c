"""A larger held-out caption set for the hallucination numbers: the test split has 60 captions, too few to see a
30% change in ~20 false claims. Builds a ToyWorld with another seed (new scenes, same world) and keeps every caption
sample of it whose caption text no caption of the training ToyWorld has (so no scene is seen twice).

    python benchmarks/heldout_captions.py --train_data data/toyworld --seed 7 --out /tmp/tw7
    python eval_omni.py --ckpt out/demo/sft --bench /tmp/tw7/captions_heldout.jsonl
"""
import argparse
import json
import os

from dataset.build_toyworld import build
from dataset.omni_dataset import jsonl_samples

SPLITS = ("pretrain.jsonl", "sft.jsonl", "test.jsonl")


def captions(folder: str):
    """(caption sample's jsonl line as a dict, its caption text) for every caption of every split."""
    for _, sample in jsonl_samples([os.path.join(folder, split) for split in SPLITS]):
        if sample["task"] == "caption":
            yield sample, sample["conversations"][-1]["content"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_data", required=True, help="the ToyWorld the model was trained on")
    p.add_argument("--seed", type=int, default=7, help="seed of the new ToyWorld (the training one's is 0)")
    p.add_argument("--out", required=True, help="folder of the new ToyWorld; writes captions_heldout.jsonl there")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.out, "test.jsonl")):
        build(args.out, seed=args.seed)
    seen = {text for _, text in captions(args.train_data)}
    kept = dropped = 0
    path = os.path.join(args.out, "captions_heldout.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for sample, text in captions(args.out):
            if text in seen:
                dropped += 1
                continue
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
            kept += 1
    print(f"{kept} held-out captions -> {path} ({dropped} dropped: a training caption says the same)")


if __name__ == "__main__":
    main()
