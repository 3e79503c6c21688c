"""Read a checkpoint's image slots back: do held-out scenes arrive as the cell stand-ins the LLM learned to read?

For each single-scene image the resampler's first 9 slots are compared with their cells' word stand-ins
(OmniModel.embed_standins) and decoded by nearest neighbour among the 49 descriptions a cell can have at its
position (empty, or one of 6 colours x 4 shapes x 2 sizes). Prints the relative squared error (the stand-in loss,
over cell slots and spare slots separately) and how often the decoded cell is right. For each square text image
(once the model spells: config.spelling_ids) its slots from TEXT_SLOTS_FROM on are read as the text warm-up's
spelled stand-ins are written: each slot's nearest spelling code (the image pad's code the blank), repeats merged,
blanks dropped; scored against the text by character accuracy (1 - CER, as eval_omni scores OCR).
With --answers it also asks the checkpoint's LLM to read those images (eval_omni's OCR prompts), once as the slots
come and once with every text slot snapped onto its nearest spelling code (the slots before them onto the pad's):
how much of the gap between the slots' spelling and the answer is the LLM reading vectors off its codes.

    python benchmarks/probe_slots.py --ckpt out/demo/slots out/demo/align --data data/toyworld/test.jsonl
"""
import argparse
import json

import torch

from dataset.omni_dataset import OmniDataset, collate
from dataset.tokenizer import load_tokenizer
from dataset.toyworld_text import COLORS, POSITIONS, SHAPES, SIZES, cell_texts
from eval_omni import char_accuracy, load, run_bench
from model.model_omni import TEXT_SLOTS_FROM, MediaInputs, OmniModel, relative_error

OBJECTS = [()] + [(c, s, z) for c in COLORS for s in SHAPES for z in SIZES]  # () = empty cell
SCENE_TASKS = ("caption", "color", "shape", "count", "position")


@torch.no_grad()
def probe(ckpt: str, data: str, limit: int) -> dict:
    model, tokenizer = OmniModel.from_pretrained(ckpt).eval(), load_tokenizer(ckpt)
    dataset = OmniDataset(data, tokenizer, model.config, 2048, standins=True)
    codes = model.word_codes()
    texts = [[" ".join([pos[0], *obj]) for obj in OBJECTS] for pos in POSITIONS]  # [9][49], cell_texts' wording
    candidates = torch.stack([torch.stack([codes[tokenizer(" " + t, add_special_tokens=False)["input_ids"]].sum(0)
                                           for t in row]) for row in texts])      # [9, 49, D]
    slots, standins, truth = [], [], []
    for k, (_, sample) in enumerate(dataset.records):
        scene = (sample.get("meta") or {}).get("scene")
        if sample.get("task") not in SCENE_TASKS or not scene or sample.get("lang", "en") != "en":
            continue
        item = dataset[k]
        if item is None or item.get("standin_ids") is None:
            continue
        batch = collate([item], tokenizer.pad_token_id)
        media = MediaInputs(**{key: v for key, v in batch.items() if key in MediaInputs.__dataclass_fields__})
        rows = batch["input_ids"][0] == model.config.image_pad_id
        slots.append(model.embed_inputs(batch["input_ids"], media)[0][rows])      # [Q, D]
        standins.append(model.embed_standins(batch["standin_ids"])[0][0][rows])   # [Q, D]
        truth.append([OBJECTS[row.index(t)] for row, t in zip(texts, cell_texts("en", scene["objects"]))])
        if len(truth) == limit:
            break
    slots, standins = torch.stack(slots), torch.stack(standins)                   # [N, Q, D]
    decoded = ((slots[:, :9, None] - candidates[None]) ** 2).sum(-1).argmin(-1)    # [N, 9]
    pairs = [(OBJECTS[d], t) for row, cells in zip(decoded.tolist(), truth) for d, t in zip(row, cells)]
    occupied = [(d, t) for d, t in pairs if t]
    out = {"images": len(truth), "rel_err_cells": relative_error(slots[:, :9], standins[:, :9]).item(),
           "rel_err_spare": relative_error(slots[:, 9:], standins[:, 9:]).item(),
           "cells_exact": sum(d == t for d, t in pairs) / len(pairs),
           "empty_read_empty": sum(not d for d, t in pairs if not t) / max(len(pairs) - len(occupied), 1)}
    for i, name in enumerate(["color", "shape", "size"]):
        out[name] = sum(bool(d) and d[i] == t[i] for d, t in occupied) / len(occupied)
    return out


@torch.no_grad()
def read_text_images(ckpt: str, data: str, limit: int) -> dict | None:
    """Square text images' slots decoded as spelled text -> {"images", "char_accuracy", "examples"}; None when
    the checkpoint does not spell (no config.spelling_ids) or the data has no square text image."""
    model, tokenizer = OmniModel.from_pretrained(ckpt).eval(), load_tokenizer(ckpt)
    if not model.config.spelling_ids:
        return None
    dataset = OmniDataset(data, tokenizer, model.config, 2048, standins=True)
    codes = model.spelling_codes(blank_id=model.config.image_pad_id)               # [C+1, D]
    scores, examples = [], []
    for k, (_, sample) in enumerate(dataset.records):
        if sample.get("task") != "ocr" or (sample.get("meta") or {}).get("layout") != "square":
            continue
        batch = collate([dataset[k]], tokenizer.pad_token_id)
        media = MediaInputs(**{key: v for key, v in batch.items() if key in MediaInputs.__dataclass_fields__})
        slots = model.embed_inputs(batch["input_ids"], media)[0][batch["input_ids"][0] == model.config.image_pad_id]
        nearest = torch.cdist(slots[TEXT_SLOTS_FROM:], codes).argmin(-1).tolist()  # [Q - 9] 0 = blank
        merged = [c for i, c in enumerate(nearest) if c and (i == 0 or c != nearest[i - 1])]
        read = tokenizer.decode([t for c in merged for t in model.config.spelling_ids[c - 1]])
        scores.append(char_accuracy(read, sample["meta"]["text"]))
        examples.append((read, sample["meta"]["text"]))
        if len(scores) == limit:
            break
    if not scores:
        return None
    return {"images": len(scores), "char_accuracy": sum(scores) / len(scores), "examples": examples[:4]}


@torch.no_grad()
def answers_on_square_text(ckpt: str, data: str) -> tuple[float, float]:
    """OCR character accuracy of the checkpoint's answers on the square text images: (slots as they come, every text
    slot snapped onto its nearest spelling code and the slots before them onto the pad's)."""
    model, processor = load(ckpt, None, "cpu")
    codes = model.spelling_codes(blank_id=model.config.image_pad_id)               # [C+1, D]
    embed_images = model.embed_images

    def snapped(pixel_values, grid_hw):
        slots = embed_images(pixel_values, grid_hw).clone()                        # [N, Q, D]
        nearest = torch.cdist(slots[:, TEXT_SLOTS_FROM:], codes.expand(len(slots), -1, -1)).argmin(-1)
        slots[:, TEXT_SLOTS_FROM:], slots[:, :TEXT_SLOTS_FROM] = codes[nearest], codes[0]
        return slots
    with open(data, encoding="utf-8") as f:
        square = {s["id"] for s in map(json.loads, f) if (s.get("meta") or {}).get("layout") == "square"}
    scores = []
    for embed in (embed_images, snapped):
        model.embed_images = embed
        records = [r for r in run_bench(model, processor, data, tasks={"ocr"})[1] if r["id"] in square]
        scores.append(sum(r["score"] for r in records) / len(records))
    return scores[0], scores[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True)
    parser.add_argument("--data", default="data/toyworld/test.jsonl")
    parser.add_argument("--limit", type=int, default=200, help="scene images to read")
    parser.add_argument("--answers", action="store_true", help="also score the LLM's answers on the square texts")
    args = parser.parse_args()
    for ckpt in args.ckpt:
        r = probe(ckpt, args.data, args.limit)
        print(f"{ckpt}: {r['images']} scenes | relative error: cell slots {r['rel_err_cells']:.3f}, spare slots "
              f"{r['rel_err_spare']:.3f} | cells decoded exactly {r['cells_exact']:.3f} (empty ones "
              f"{r['empty_read_empty']:.3f}) | occupied cells: colour {r['color']:.3f}, shape {r['shape']:.3f}, "
              f"size {r['size']:.3f}")
        r = read_text_images(ckpt, args.data, args.limit)
        if r:
            print(f"{ckpt}: {r['images']} square text images | slots read back as spelled text: character accuracy "
                  f"{r['char_accuracy']:.3f} | e.g. " + ", ".join(f"{a!r} for {b!r}" for a, b in r["examples"]))
        if r and args.answers:
            plain, snapped = answers_on_square_text(ckpt, args.data)
            print(f"{ckpt}: the LLM's answers on them: character accuracy {plain:.3f} from the slots as they come, "
                  f"{snapped:.3f} with the text slots snapped onto their codes")


if __name__ == "__main__":
    main()
