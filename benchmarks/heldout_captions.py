r"""Caption sets of new scenes, for the hallucination numbers and the DPO prompts. The test split has 60 captions, too
few to see a 30% change in ~20 false claims. Builds a ToyWorld with another seed (new scenes, same world) and keeps
every caption sample of it whose caption text none of the captions to avoid has (so no scene is seen twice).

    # the held-out evaluation set: no caption text of the training ToyWorld
    python benchmarks/heldout_captions.py --avoid data/toyworld --seed 7 --out /tmp/tw7
    python eval_omni.py --ckpt out/demo/sft --bench /tmp/tw7/captions_heldout.jsonl
    # prompts for the DPO pairs: fresh scenes of the training splits, no caption text of the evaluation set
    python benchmarks/heldout_captions.py --avoid /tmp/tw7/captions_heldout.jsonl --seed 11 --splits pretrain,sft \
        --out /tmp/tw11 --name captions_fresh.jsonl
"""
import argparse
import json
import os

from dataset.build_toyworld import build
from dataset.omni_dataset import jsonl_samples

SPLITS = ("pretrain", "sft", "test")


def captions(paths: list[str]):
    """(caption sample's jsonl line as a dict, its caption text) for every caption sample of the jsonl files."""
    for _, sample in jsonl_samples(paths):
        if sample["task"] == "caption":
            yield sample, sample["conversations"][-1]["content"]


def jsonl_files(path: str, splits=SPLITS) -> list[str]:
    """A ToyWorld folder -> its split files; a jsonl file -> itself."""
    return [os.path.join(path, f"{split}.jsonl") for split in splits] if os.path.isdir(path) else [path]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--avoid", nargs="+", required=True,
                   help="ToyWorld folders (all splits) or jsonl files whose caption texts must not be kept")
    p.add_argument("--seed", type=int, default=7, help="seed of the new ToyWorld (the training one's is 0)")
    p.add_argument("--splits", default=",".join(SPLITS), help="the new ToyWorld's splits to take captions from")
    p.add_argument("--out", required=True, help="folder of the new ToyWorld")
    p.add_argument("--name", default="captions_heldout.jsonl", help="file written in --out")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.out, "test.jsonl")):
        build(args.out, seed=args.seed)
    seen = {text for path in args.avoid for _, text in captions(jsonl_files(path))}
    kept = dropped = 0
    path = os.path.join(args.out, args.name)
    with open(path, "w", encoding="utf-8") as f:
        for sample, text in captions(jsonl_files(args.out, args.splits.split(","))):
            if text in seen:
                dropped += 1
                continue
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
            kept += 1
    print(f"{kept} captions -> {path} ({dropped} dropped: a caption to avoid says the same)")


if __name__ == "__main__":
    main()
