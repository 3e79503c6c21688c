r"""Did a stage move a task, or is it noise? Compares two checkpoints' per-sample predictions on the same benchmark
samples (eval_omni.py --bench writes them next to --out as *.samples.jsonl) with a paired standard error.

    python benchmarks/compare_results.py --before out/demo/dpo_eval/sft_3.samples.jsonl \
        --after out/demo/dpo_eval/dpo_3.samples.jsonl          # what DPO=1 bash scripts/demo.sh prints

With 60 samples per task one answer is 1.7 points, and two independent runs of the same recipe differ by ~5; the
pairing (same samples, before vs after) leaves only the answers that changed. Several splits (--before A1 A2
--after B1 B2, matched by position) are pooled per task. The caption rows also give false claims per caption
(dataset/judge.py), the hallucination number of the DPO stage.
"""
import argparse
import json
import math
from collections import defaultdict


def load(paths: list[str]) -> dict:
    """(split index, sample id) -> the sample's result line."""
    out = {}
    for i, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                out[(i, row["id"])] = row
    return out


def paired(before: list[float], after: list[float]) -> tuple[float, float]:
    """-> (mean of after - before, its standard error)."""
    diffs = [a - b for a, b in zip(after, before)]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def compare(before: dict, after: dict) -> list[dict]:
    missing = before.keys() ^ after.keys()
    if missing:
        raise SystemExit(f"the two sides scored different samples, e.g. {sorted(missing)[:3]} (split index, id)")
    by_task = defaultdict(list)
    for key, row in before.items():
        by_task[row["task"]].append((row, after[key]))
    rows = []
    for task, pairs in sorted(by_task.items()):
        b, a = [p[0]["score"] for p in pairs], [p[1]["score"] for p in pairs]
        delta, se = paired(b, a)
        rows.append({"task": task, "n": len(pairs), "before": sum(b) / len(b), "after": sum(a) / len(a),
                     "delta": delta, "se": se, "unit": 100})
        if "false_claims" in pairs[0][0]:
            b, a = [len(p[0]["false_claims"]) for p in pairs], [len(p[1]["false_claims"]) for p in pairs]
            delta, se = paired(b, a)
            rows.append({"task": "false claims / caption", "n": len(pairs), "before": sum(b) / len(b),
                         "after": sum(a) / len(a), "delta": delta, "se": se, "unit": 1})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", nargs="+", required=True, help="*.samples.jsonl of the starting checkpoint")
    p.add_argument("--after", nargs="+", required=True, help="*.samples.jsonl of the trained one, same splits")
    args = p.parse_args()
    if len(args.before) != len(args.after):
        raise SystemExit("give one --after file per --before file (the same benchmark splits, in the same order)")
    print(f"{'task':<24}{'n':>5}{'before':>9}{'after':>9}{'change':>9}{'± s.e.':>9}   (scores: change in points)")
    for r in compare(load(args.before), load(args.after)):
        flag = "  <- beyond 2 s.e." if abs(r["delta"]) > 2 * r["se"] > 0 else ""
        u, counts = r["unit"], r["unit"] == 1  # scores in points; false claims as counts, with the relative change
        rel = f"  ({r['delta'] / r['before']:+.0%})" if counts and r["before"] else ""
        digits = 3 if counts else 1
        print(f"{r['task']:<24}{r['n']:>5}{r['before']:>9.3f}{r['after']:>9.3f}{u * r['delta']:>+9.{digits}f}"
              f"{u * r['se']:>9.{digits}f}{flag}{rel}")


if __name__ == "__main__":
    main()
