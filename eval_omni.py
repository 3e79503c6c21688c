"""Chat with a checkpoint, or score it on a held-out benchmark.

    python eval_omni.py --ckpt out/sft --image a.png --audio q.wav --video clip.gif "What is in the picture?"
    python eval_omni.py --ckpt out/sft --bench data/toyworld/test.jsonl --out results.json
    python eval_omni.py --ckpt out/talker --image a.png --speak answer.wav [--voice max] "What color is the star?"

Benchmark metrics: exact match (after normalising case, spaces and final punctuation, and dropping any
<think> block) for the short-answer tasks; character accuracy = 1 - CER for the transcription tasks.
"""
import argparse
import json
import os
import re
import sys
import time
import unicodedata
from collections import defaultdict

import soundfile as sf
import torch
from tqdm import tqdm

from dataset.chat import conversation_messages
from dataset.judge import hallucination_metrics
from dataset.omni_dataset import collate, left_pad
from dataset.processor import OmniProcessor
from model.model_omni import OmniModel
from stage_utils import standin_expansions

CHAR_TASKS = {"ocr", "asr"}  # scored by 1 - CER; every other task by exact match


# ----------------------------------------------------------------------------- metrics
def strip_think(text: str) -> str:
    return re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()


def normalize(text: str) -> str:
    """Lower case, NFKC (full-width -> ASCII), collapse spaces, drop trailing punctuation ('Red.' == 'red')."""
    text = unicodedata.normalize("NFKC", strip_think(text)).lower()
    return re.sub(r"\s+", " ", text).strip().rstrip(".。!！?？ ")


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def char_accuracy(prediction: str, reference: str) -> float:
    """1 - CER on normalised text, floored at 0 (a long hallucination cannot go negative)."""
    pred, ref = normalize(prediction), normalize(reference)
    return max(0.0, 1.0 - edit_distance(pred, ref) / max(1, len(ref)))


def score(task: str, prediction: str, reference: str) -> float:
    if task in CHAR_TASKS:
        return char_accuracy(prediction, reference)
    return float(normalize(prediction) == normalize(reference))


# ----------------------------------------------------------------------------- batched generation
def bench_prompts(path: str, tasks: set[str] | None, limit: int | None, standins: bool = False, config=None):
    """(sample, messages without the final answer, reference answer, media) for every benchmark line.
    standins: every medium is replaced by its stand-in (what the LLM's text warm-up reads: a scene as query_num
    slots of its cells' words, a clip frame by frame the same way, speech spelled, the rest as text; config: the
    model's OmniConfig), so the score is what the LLM can answer from a perfect description: the ceiling for
    reading the media themselves."""
    root = os.path.dirname(os.path.abspath(path))
    per_task = defaultdict(int)
    with open(path, encoding="utf-8") as f:
        for line in f:
            sample = json.loads(line)
            task = sample.get("task", "unknown")
            if (tasks and task not in tasks) or (limit and per_task[task] >= limit):
                continue
            per_task[task] += 1
            messages = conversation_messages(sample)
            media = {k: [os.path.join(root, p) for p in sample.get(k) or []] for k in ("images", "audios", "videos")}
            if standins:
                described = standin_expansions(sample, config)
                if described is None:
                    continue
                media = {k: [] for k in media} | {"standins": described}
            yield sample, messages[:-1], messages[-1]["content"], media


def standin_inputs(standins) -> dict:
    """stage_utils.Standins -> the stand-in keywords of OmniProcessor.sample (none without stand-ins)."""
    if standins is None:
        return {}
    return {"media_as_text": standins.expansions, "standin_slots": standins.slots,
            "standin_spelled": standins.spelled, "standin_frames": standins.frames, "standin_read": standins.read}


@torch.no_grad()
def run_bench(model, processor, path, batch_size=16, tasks=None, limit=None, max_new_tokens=128, standins=False):
    """-> (results {"tasks": {task: {metric, value, n}}}, per-sample records)."""
    device = next(model.parameters()).device
    items = list(bench_prompts(path, tasks, limit, standins, model.config))
    records, stop = [], processor.stop_ids
    for start in tqdm(range(0, len(items), batch_size), desc="bench", disable=not sys.stderr.isatty()):
        chunk = items[start:start + batch_size]
        singles = [processor.sample(prompt, media["images"], media["audios"], media["videos"],
                                    enable_thinking=bool(sample.get("thinking", False)),
                                    **standin_inputs(media.get("standins")))
                   for sample, prompt, _, media in chunk]
        batch = left_pad(collate(singles, processor.tokenizer.pad_token_id))
        batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, stop_ids=stop)
        for (sample, _, reference, _), ids in zip(chunk, out.tolist()):
            ids = ids[:min((ids.index(s) for s in stop if s in ids), default=len(ids))]  # up to the first stop
            prediction = processor.tokenizer.decode(ids, skip_special_tokens=False)
            task = sample.get("task", "unknown")
            records.append({"id": sample.get("id"), "task": task, "prediction": prediction, "reference": reference,
                            "score": score(task, prediction, reference)})
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r["score"])
    results = {"tasks": {task: {"metric": "char_acc" if task in CHAR_TASKS else "exact_match",
                                "value": sum(v) / len(v), "n": len(v)} for task, v in sorted(by_task.items())}}
    if "caption" in by_task:  # judged claim by claim, by the judge that ranks the DPO pairs (dataset/judge.py)
        results["hallucination"] = hallucination_metrics(records, [sample for sample, *_ in items])
    return results, records


def print_table(results: dict):
    print(f"{'task':<14}{'metric':<13}{'value':>8}{'n':>6}")
    for task, r in results["tasks"].items():
        print(f"{task:<14}{r['metric']:<13}{r['value']:>8.3f}{r['n']:>6}")
    if "hallucination" in results:
        h = results["hallucination"]
        print(f"captions with a false claim {h['rate']:.3f}, false claims per caption {h['per_caption']:.3f}, "
              f"shapes per caption {h['shapes_per_caption']:.2f} (n {h['n']})")


def load(ckpt: str, tokenizer: str | None, device: str):
    model = OmniModel.from_pretrained(ckpt, device=device).eval()
    return model, OmniProcessor.from_pretrained(tokenizer or ckpt, model.config)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="folder written by a training stage (config.json + weights)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--audio", action="append", default=[])
    p.add_argument("--video", action="append", default=[], help="GIF/WebP, a folder of frames, or mp4 (needs PyAV)")
    p.add_argument("--think", action="store_true", help="let the model think (<think>...</think>) before answering")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=128, help="per answer, in chat and --bench")
    p.add_argument("--bench", help="jsonl to score (e.g. data/toyworld/test.jsonl)")
    p.add_argument("--out", help="where to write the benchmark results json")
    p.add_argument("--tasks", help="comma-separated subset of tasks")
    p.add_argument("--limit", type=int, help="at most this many samples per task")
    p.add_argument("--standins", action="store_true", help="bench with each medium replaced by its text stand-in "
                                                            "(the LLM's ceiling: answering from a perfect description)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--speak", metavar="WAV", help="also speak the answer (streamed) into this wav (needs a talker)")
    p.add_argument("--voice", help="talker voice (default: the first of config.talker.voices)")
    p.add_argument("question", nargs="?")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.ckpt, "config.json")):
        sys.exit(f"no checkpoint at {args.ckpt}: train one with `bash scripts/demo.sh` (writes out/demo/sft)")
    model, processor = load(args.ckpt, args.tokenizer, args.device)
    if args.bench:
        t0 = time.time()
        results, records = run_bench(model, processor, args.bench, args.batch_size,
                                     set(args.tasks.split(",")) if args.tasks else None, args.limit,
                                     args.max_new_tokens, args.standins)
        print_table(results)
        print(f"scored {len(records)} samples in {time.time() - t0:.0f} s")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
            with open(os.path.splitext(args.out)[0] + ".samples.jsonl", "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return results
    if not args.question:
        p.error("give a question (or --bench)")
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.speak:
        return speak(model, processor, args, sampling)
    for piece in model.chat(processor, args.question, args.image, args.audio, args.video, enable_thinking=args.think,
                            stream=True, max_new_tokens=args.max_new_tokens, **sampling):
        print(piece, end="", flush=True)
    print()


def speak(model, processor, args, sampling):
    """Stream the spoken answer: text as it comes, audio chunks into --speak; report first-audio latency and the
    real-time factor (wall time / audio seconds)."""
    if model.talker is None or model.codec is None:
        sys.exit(f"{args.ckpt} has no talker: train one with train_sft_omni.py --speech_weight 1")
    t0, first, chunks = time.perf_counter(), None, []
    for piece, audio in model.chat(processor, args.question, args.image, args.audio, args.video,
                                   enable_thinking=args.think, stream=True, max_new_tokens=args.max_new_tokens,
                                   speak=True, voice=args.voice, **sampling):
        print(piece, end="", flush=True)
        if len(audio) and first is None:
            first = time.perf_counter() - t0
        chunks.append(audio)
    wall, wav = time.perf_counter() - t0, torch.cat(chunks)
    sf.write(args.speak, wav.numpy(), model.codec.sample_rate)
    seconds = len(wav) / model.codec.sample_rate
    print(f"\nspoke {seconds:.2f} s of audio into {args.speak}: first audio after {first or wall:.2f} s, "
          f"real-time factor {wall / max(seconds, 1e-9):.2f} ({torch.get_num_threads()} threads)")
    return wav


if __name__ == "__main__":
    main()
