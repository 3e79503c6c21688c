"""RLAIF-V preference pairs: the model's own answers, ranked by the claim judge.

    python dataset/build_preferences.py --ckpt out/sft --data data/toyworld/sft.jsonl --out data/toyworld/dpo.jsonl

For every held-in prompt of the judged tasks (caption, count, position): sample k answers at a high temperature
from the checkpoint, score each with dataset/judge.py (minus its number of false claims), and keep at most
--max_pairs pairs whose scores differ by at least --min_gap: the best distinct answer against the worst, the
next best against the worst left, and so on (the two captions of a pair describe equally many shapes, see
select_pairs). The pairs are on-policy (the model's own phrasing on both
sides), so DPO moves probability from the model's false claims to its true ones rather than teaching new text.

One jsonl line per pair: the prompt's sample unchanged (conversation, media, meta; its final assistant turn is the
reference answer) plus "chosen" and "rejected" assistant turns that replace that final turn, and
"dpo": {"scores": [chosen, rejected], "rejected_false_claims": [...]} for inspection. Media paths are rewritten
relative to the output file.
"""
import argparse
import json
import os
import sys
import time
from collections import Counter

import torch
from tqdm import tqdm

from dataset.chat import conversation_messages
from dataset.judge import JUDGED_TASKS, caption_size, false_claims
from dataset.omni_dataset import collate, jsonl_samples, left_pad
from dataset.processor import OmniProcessor
from model.model_omni import OmniModel

MEDIA = ("images", "audios", "videos")


# ----------------------------------------------------------------------------- pairs
def select_pairs(answers: list[str], scores: list[int], max_pairs: int = 2, min_gap: int = 1,
                 sizes: list[int] | None = None) -> list[tuple]:
    """-> [(chosen, rejected, chosen score, rejected score)]: distinct answers ranked by score, the best against the
    worst, the next best against the worst left, ... while the gap is >= min_gap; each answer is used once.

    Fewer claims means fewer false claims, so pairs whose chosen answer simply says less teach DPO to stop early:
    tried on ToyWorld, every caption shrank to one shape. RLAIF-V balances the lengths of its pairs against this;
    ToyWorld can count instead: with `sizes` (how many shapes each caption describes) both answers of a pair
    describe the same number, so what DPO can learn from the pair is which claims are true."""
    sizes = sizes or [0] * len(answers)
    best = {}
    for a, s, n in zip(answers, scores, sizes):
        best.setdefault(a, (s, n))
    ranked = sorted(best.items(), key=lambda x: -x[1][0])  # stable: ties keep sampling order
    pairs, used = [], set()
    for good, (sg, ng) in ranked:
        if len(pairs) == max_pairs:
            break
        if good in used:
            continue
        for bad, (sb, nb) in reversed(ranked):
            if sg - sb < min_gap:
                break
            if bad not in used and ng == nb:
                pairs.append((good, bad, sg, sb))
                used |= {good, bad}
                break
    return pairs


def make_pairs(samples: list[dict], answer_fn, k: int, max_pairs: int = 2, min_gap: int = 1,
               prompts_per_call: int = 8) -> tuple[list[dict], Counter]:
    """answer_fn(samples, k) -> k answers per sample. Returns (pair records, statistics)."""
    records, stats = [], Counter()
    for start in tqdm(range(0, len(samples), prompts_per_call), desc="sampling", disable=not sys.stderr.isatty()):
        chunk = samples[start:start + prompts_per_call]
        for sample, answers in zip(chunk, answer_fn(chunk, k)):
            wrong = [false_claims(sample, a) for a in answers]
            caption = sample.get("task") == "caption"
            sizes = [caption_size(a, sample.get("lang", "en")) for a in answers] if caption else None
            pairs = select_pairs(answers, [-len(w) for w in wrong], max_pairs, min_gap, sizes)
            stats.update({"prompts": 1, "answers": len(answers), "false_claims": sum(map(len, wrong)),
                          "answers_with_false_claims": sum(map(bool, wrong)), "pairs": len(pairs),
                          f"pairs/{sample.get('task')}": len(pairs)})
            for j, (chosen, rejected, sc, sr) in enumerate(pairs):
                records.append(dict(sample, id=f"{sample.get('id')}-pair{j}",
                                    chosen={"role": "assistant", "content": chosen},
                                    rejected={"role": "assistant", "content": rejected},
                                    dpo={"scores": [sc, sr], "rejected_false_claims":
                                         [c.text for c in wrong[answers.index(rejected)]]}))
    return records, stats


# ----------------------------------------------------------------------------- sampling from the model
def load_prompts(paths: list[str], tasks: set[str], limit: int = 0) -> list[dict]:
    """The samples of `tasks` in the jsonl files, media paths made absolute (at most `limit` per task when
    limit > 0), grouped by task so that a generate call holds answers of similar lengths (it runs until its longest
    answer ends)."""
    per_task, samples = Counter(), []
    for root, sample in jsonl_samples(paths):
        task = sample.get("task")
        if task not in tasks or (limit and per_task[task] >= limit):
            continue
        per_task[task] += 1
        samples.append(dict(sample, **{k: [os.path.join(root, p) for p in sample.get(k) or []] for k in MEDIA}))
    return sorted(samples, key=lambda s: s["task"])


class ModelSampler:
    """answer_fn for make_pairs: k sampled answers per prompt from a checkpoint, many prompts per generate call."""

    def __init__(self, model, processor, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=64, seed=0):
        self.model, self.processor = model, processor
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens}
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, samples: list[dict], k: int) -> list[list[str]]:
        tok, stop = self.processor.tokenizer, self.processor.stop_ids
        prompts = [self.processor.sample(conversation_messages(s)[:-1], s["images"], s["audios"], s["videos"],
                                         enable_thinking=bool(s.get("thinking", False))) for s in samples]
        batch = collate([p for p in prompts for _ in range(k)], tok.pad_token_id)  # k copies of each prompt
        batch.pop("labels")
        batch = {key: v.to(self.device) for key, v in left_pad(batch).items()}
        out = self.model.generate(**batch, stop_ids=stop, generator=self.generator, **self.sampling).tolist()
        answers = []
        for ids in out:
            ids = ids[:min((ids.index(s) for s in stop if s in ids), default=len(ids))]
            answers.append(tok.decode(ids, skip_special_tokens=False).strip())
        return [answers[i * k:(i + 1) * k] for i in range(len(samples))]


def write_pairs(records: list[dict], out: str):
    """jsonl with media paths relative to the output file, as the data format wants; written to a temporary file
    and renamed, so an existing output is always complete."""
    root = os.path.dirname(os.path.abspath(out))
    os.makedirs(root, exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            r = dict(r, **{k: [os.path.relpath(p, root) for p in r.get(k) or []] for k in MEDIA})
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(out + ".tmp", out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the checkpoint to sample from (the SFT stage output)")
    p.add_argument("--data", nargs="+", default=["data/toyworld/sft.jsonl"],
                   help="held-in prompts: jsonl files of the training split")
    p.add_argument("--out", default="data/toyworld/dpo.jsonl")
    p.add_argument("--tasks", default=",".join(JUDGED_TASKS), help="comma-separated subset of the judged tasks")
    p.add_argument("--limit", type=int, default=0, help="at most this many prompts per task (0 = all)")
    p.add_argument("--k", type=int, default=8, help="answers sampled per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=0.9, help="cuts the garbled tail of a small model's samples")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--max_pairs", type=int, default=2, help="pairs kept per prompt")
    p.add_argument("--min_gap", type=int, default=1, help="least score difference of a kept pair")
    p.add_argument("--batch_size", type=int, default=64, help="sequences per generate call (k per prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    unknown = set(args.tasks.split(",")) - set(JUDGED_TASKS)
    if unknown:
        p.error(f"the judge covers {JUDGED_TASKS}, not {sorted(unknown)}")
    t0 = time.time()
    model = OmniModel.from_pretrained(args.ckpt, device=args.device).eval()
    sampler = ModelSampler(model, OmniProcessor.from_pretrained(args.ckpt, model.config), args.temperature,
                           args.top_p, args.top_k, args.max_new_tokens, args.seed)
    samples = load_prompts(args.data, set(args.tasks.split(",")), args.limit)
    records, stats = make_pairs(samples, sampler, args.k, args.max_pairs, args.min_gap,
                                prompts_per_call=max(1, args.batch_size // args.k))
    write_pairs(records, args.out)
    print(f"{stats['prompts']} prompts x {args.k} answers in {time.time() - t0:.0f} s: "
          f"{stats['answers_with_false_claims'] / max(stats['answers'], 1):.1%} of the answers make a false claim "
          f"({stats['false_claims'] / max(stats['answers'], 1):.2f} per answer)")
    print(f"{stats['pairs']} pairs -> {args.out} (" + ", ".join(
        f"{t}: {stats[f'pairs/{t}']}" for t in args.tasks.split(",")) + ")")
    return stats


if __name__ == "__main__":
    main()
