"""Speech output, measured: codec round trip and talker intelligibility (by an in-domain ASR judge), streaming speed.

    python benchmarks/bench_speech.py judge --data data/toyworld --out out/speech_judge
    python benchmarks/bench_speech.py measure --data data/toyworld --judge out/speech_judge --ckpt out/talker

The judge is IN-DOMAIN: a small CTC recogniser (Whisper-style encoder + CTC head, model/warmup_heads.py)
trained here on ToyWorld's clean speech only: the training split's spoken answers (both assistant voices) and
its ASR clips (the user voices). It never hears codec output, so a worse score on decoded speech is the codec's
(or the talker's) loss of intelligibility. `measure` scores the test split's spoken answers (held out: the
talker never trained on them; transcripts can be unseen word combinations) three ways, as character error rate
(edit distance / reference length, lower-cased, final punctuation dropped, numbers as words: "3." is said "three"):
  1. ground truth: the espeak-ng clip itself (the judge's own floor);
  2. codec round trip: decode(encode(ground truth));
  3. talker: the talker speaking the reference answer from the checkpoint's LLM states (teacher-forced text, so
     the LLM's own mistakes do not count here), greedy, decoded by the same codec (its finer codebooks as the
     codeword expected under the talker's distribution, as chat() decodes; --decode picked: the picked codes).
The same talker row on 60 two-word answers of the TRAINING split ("train_two_word_texts") separates not knowing a
word from not following the text while speaking freely. And, as in real use, OmniModel.chat(speak=True) on every
held-out prompt with a spoken answer: the talker speaking what the LLM itself wrote, judged against that text
("own_answers": mostly short answers the talker has said many times, so the easier measure). It also streams a
few answers through OmniModel.chat(speak=True, stream=True): first-audio latency (prompt in -> first audio chunk
out) and real-time factor (wall time / seconds of audio; below 1 = faster than real time).

--reference_codebooks 1 2 3 (diagnosis): in the teacher-forced talker rows those codebooks are fed from the reference
clip instead of generated, so the rest are judged on a right history ("0": what the fine codebooks lose alone).
"""
import argparse
import json
import os
import time
from contextlib import contextmanager

import soundfile as sf
import torch
import torchaudio

from dataset.omni_dataset import OmniDataset, collate
from dataset.processor import OmniProcessor
from dataset.toyworld_text import NUMBER_WORDS
from model.model_audio import AudioConfig, WhisperEncoder, log_mel_spectrogram
from model.model_omni import MediaInputs, OmniConfig, OmniModel
from model.talker import delay_grid
from model.warmup_heads import AudioWarmup
from stage_utils import encode_chars


def clean(text: str) -> str:
    """Lower-cased words without final punctuation, numbers as words: the answer "3." is SAID "three", so a clip
    heard as "three" (or as "3": the judge learned both, from spoken answers and from ASR clips) matches it."""
    words = " ".join(text.lower().split()).rstrip(".!? ").split(" ")
    return " ".join(NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(NUMBER_WORDS) else w for w in words)


def judge_items(data: str, split: str) -> list[tuple[str, str]]:
    """(wav path, transcript) of a split's spoken answers and (training splits) its ASR clips, unique by path
    (spoken answers are named after their text and voice, so an answer the training split also has is one file)."""
    items = {}
    with open(os.path.join(data, f"{split}.jsonl"), encoding="utf-8") as f:
        for line in f:
            s = json.loads(line)
            answer = s["conversations"][-1]
            if "speech" in answer:
                items[answer["speech"]] = answer["content"]
            if split != "test" and s["task"] == "asr":
                items[s["audios"][0]] = s["meta"]["transcript"]
    return [(os.path.join(data, p), clean(t)) for p, t in sorted(items.items())]


# ----------------------------------------------------------------------------- the judge
class Judge:
    """AudioWarmup (Whisper-style encoder + CTC head) + its character set; greedy CTC decoding."""

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.model = AudioWarmup(WhisperEncoder(OmniConfig.preset("tiny").audio), len(chars))

    @staticmethod
    def features(wavs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mels = [log_mel_spectrogram(w) for w in wavs]                              # [80, t_i]
        batch = torch.zeros(len(mels), 80, max(m.shape[1] for m in mels))
        for k, m in enumerate(mels):
            batch[k, :, :m.shape[1]] = m
        return batch, torch.tensor([m.shape[1] for m in mels])

    @torch.no_grad()
    def transcribe(self, wavs: list[torch.Tensor]) -> list[str]:
        self.model.eval()
        mels, lens = self.features(wavs)
        states, mask = self.model.audio_tower(mels, lens)
        best = self.model.head(states).argmax(-1)                                  # [N, T']
        texts = []
        for ids, valid in zip(best.tolist(), mask.sum(1).tolist()):
            ids = [a for i, a in enumerate(ids[:valid]) if a and (i == 0 or a != ids[i - 1])]  # collapse, drop blanks
            texts.append("".join(self.chars[i - 1] for i in ids))
        return texts

    def save(self, out: str):
        os.makedirs(out, exist_ok=True)
        torch.save(self.model.state_dict(), os.path.join(out, "judge.pt"))
        with open(os.path.join(out, "chars.json"), "w") as f:
            json.dump(self.chars, f)

    @staticmethod
    def load(folder: str) -> "Judge":
        with open(os.path.join(folder, "chars.json")) as f:
            judge = Judge(json.load(f))
        judge.model.load_state_dict(torch.load(os.path.join(folder, "judge.pt")))
        return judge


def read(path: str) -> torch.Tensor:
    return torch.from_numpy(sf.read(path, dtype="float32")[0])


def train_judge(args):
    items = judge_items(args.data, "pretrain") + judge_items(args.data, "sft")
    chars = sorted({c for _, t in items for c in t})
    judge, g = Judge(chars), torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    wavs = [read(p) for p, _ in items]
    targets = [encode_chars(t, chars) for _, t in items]
    opt = torch.optim.AdamW(judge.model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        pick = torch.randint(len(items), (args.batch_size,), generator=g).tolist()
        mels, lens = Judge.features([wavs[i] for i in pick])
        text = torch.nn.utils.rnn.pad_sequence([targets[i] for i in pick], batch_first=True)
        loss = judge.model(mels, lens, text, torch.tensor([len(targets[i]) for i in pick]))["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(judge.model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            print(f"judge step {step}/{args.steps} ctc loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    judge.save(args.out)
    print(f"in-domain judge trained on {len(items)} clean clips -> {args.out}")


# ----------------------------------------------------------------------------- measurements
def cer(judge: Judge, wavs: list[torch.Tensor], refs: list[str], batch: int = 32) -> float:
    hyps = [h for i in range(0, len(wavs), batch) for h in judge.transcribe(wavs[i:i + batch])]
    edits = sum(torchaudio.functional.edit_distance(clean(h), r) for h, r in zip(hyps, refs))
    return edits / sum(len(r) for r in refs)


@contextmanager
def reference_codebooks(talker, codes: torch.Tensor, books: list[int]):
    """Diagnosis only: while the talker generates, codebooks `books` take the reference clip's codes (Long[K, F],
    delay pattern applied) wherever the reference has one, so the other codebooks are judged on a right history."""
    if not books:                                                                  # the plain measurement: no wrapper
        yield
        return
    grid = delay_grid(codes, talker.fill, talker.stop)                             # [K, L]
    pick = talker.pick

    def forced(logits, step, stop_step, temperature, generator):
        column = pick(logits, step, stop_step, temperature, generator)
        for k in books:
            ref = int(grid[k, step]) if step < grid.shape[1] else talker.fill
            if ref != talker.fill and (k == 0 or column[k] != talker.fill):   # codebook 0 also takes the STOP
                column[k] = ref
        return column
    talker.pick = forced
    try:
        yield
    finally:
        del talker.pick


@torch.no_grad()
def talker_speech(model: OmniModel, processor, data: str, split: str = "test", keep=lambda sample: True,
                  limit: int | None = None, reference_books: list[int] = ()) -> dict[str, torch.Tensor]:
    """{wav path: the talker speaking that reference answer} (teacher-forced through the LLM), one sample per
    distinct spoken answer of the split (those `keep` accepts, at most `limit`). reference_books: codebooks fed
    from the reference clip instead of generated (reference_codebooks)."""
    dataset = OmniDataset(os.path.join(data, f"{split}.jsonl"), processor.tokenizer, model.config, codec=model.codec)
    spoken = {}
    for index, (_, sample) in enumerate(dataset.records):
        answer = sample["conversations"][-1]
        if "speech" not in answer or os.path.join(data, answer["speech"]) in spoken or not keep(sample):
            continue
        if len(spoken) == limit:
            break
        batch = collate([dataset[index]], processor.tokenizer.pad_token_id)
        media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")
                 and not k.startswith("speech_")}
        embeds = model.embed_inputs(batch["input_ids"], MediaInputs(**media))
        hidden = model.llm(inputs_embeds=embeds, logits_at="none").hidden_states[0]          # [T, D]
        words, at = batch["speech_text_ids"][0], batch["speech_text_at"][0]                  # [N], [N]
        with reference_codebooks(model.talker, batch["speech_codes"][0, :, :batch["speech_lens"][0]], reference_books):
            codes = model.talker.generate(words, model.llm.get_input_embeddings()(words), hidden[at],
                                          int(batch["speech_voices"][0]))
        spoken[os.path.join(data, answer["speech"])] = model.codec.decode(*codes)
    return spoken


def spoken_prompts(data: str) -> list[tuple[list[dict], list[str], list[str], list[str]]]:
    """(messages, images, audios, videos) of every held-out sample whose answer is spoken."""
    with open(os.path.join(data, "test.jsonl"), encoding="utf-8") as f:
        samples = [s for s in map(json.loads, f) if "speech" in s["conversations"][-1]]
    return [([{"role": "user", "content": s["conversations"][0]["content"]}],
             *([os.path.join(data, p) for p in s.get(k) or []] for k in ("images", "audios", "videos")))
            for s in samples]


@torch.no_grad()
def own_answers(model: OmniModel, processor, data: str) -> list[tuple[str, torch.Tensor]]:
    """(text, waveform) of chat(speak=True), greedy, on every held-out prompt with a spoken answer."""
    return [model.chat(processor, *prompt, speak=True, max_new_tokens=32) for prompt in spoken_prompts(data)]


def streaming(model: OmniModel, processor, data: str, n: int) -> dict:
    """First-audio latency and real-time factor of chat(speak=True, stream=True) over n held-out prompts."""
    latencies, walls, seconds = [], [], []
    for prompt in spoken_prompts(data)[:n]:
        t0, first, audio = time.perf_counter(), None, 0
        for _, chunk in model.chat(processor, *prompt, speak=True, stream=True, max_new_tokens=32):
            if len(chunk) and first is None:
                first = time.perf_counter() - t0
            audio += len(chunk)
        walls.append(time.perf_counter() - t0)
        latencies.append(first if first is not None else walls[-1])
        seconds.append(audio / model.codec.sample_rate)
    return {"first_audio_s": sum(latencies) / n, "rtf": sum(walls) / max(sum(seconds), 1e-9),
            "audio_s_per_answer": sum(seconds) / n, "n": n}


def phoneme_accuracy(codec, data: str) -> float:
    """Share of the held-out spoken answers' code frames whose phonetic code 0 is the phoneme espeak-ng was saying
    there (dataset/phonemes.py): how well the codec's classifier hears phonemes it was not fitted on."""
    from dataset.phonemes import frame_phonemes
    from dataset.speech_targets import speech_job

    with open(os.path.join(data, "test.jsonl"), encoding="utf-8") as f:
        answers = {t["speech"]: t for t in (json.loads(line)["conversations"][-1] for line in f) if "speech" in t}
    right = total = 0
    for path, turn in sorted(answers.items()):
        frames = codec.features(read(os.path.join(data, path)))
        said = frame_phonemes(speech_job(turn["content"], turn["voice"])[1], len(frames),
                              codec.hop_length * codec.group)
        heard = [codec.phonemes[i] for i in codec.classifier.predict(frames).tolist()]
        right, total = right + sum(a == b for a, b in zip(said, heard)), total + len(said)
    return right / total


def measure(args):
    """CER of ground truth / codec round trip / talker, on all held-out spoken answers and on those whose text
    no training answer has (the talker has never said that text; the judge never heard it)."""
    judge = Judge.load(args.judge)
    model = OmniModel.from_pretrained(args.ckpt).eval()
    if args.decode == "picked":                      # every row, chat() included, decodes the picked codes only
        decode = model.codec.decode
        model.codec.decode = lambda codes, probs=None: decode(codes)
    processor = OmniProcessor.from_pretrained(args.ckpt, model.config)
    trained = {split: dict(judge_items(args.data, split)) for split in ("pretrain", "sft")}   # {wav path: text}
    trained_texts = {t for items in trained.values() for t in items.values()}
    t0 = time.time()
    spoken = talker_speech(model, processor, args.data, reference_books=args.reference_codebooks)
    talker_seconds = time.time() - t0
    results = {"judge": "in-domain CTC (Whisper-style tiny encoder) trained on clean ToyWorld speech"}
    for subset, keep in (("all", lambda t: True), ("unseen_text", lambda t: t not in trained_texts)):
        items = [(p, t) for p, t in judge_items(args.data, "test") if keep(t)]
        truth, refs = [read(p) for p, _ in items], [t for _, t in items]
        row = {"n_clips": len(items), "cer_ground_truth": cer(judge, truth, refs),
               "cer_codec_round_trip": cer(judge, [model.codec.decode(model.codec.encode(w)) for w in truth], refs),
               "cer_talker": cer(judge, [spoken[p] for p, _ in items], refs)}
        row["talker_over_round_trip"] = row["cer_talker"] / max(row["cer_codec_round_trip"], 1e-9)
        results[subset] = row
    results["talker_seconds"] = talker_seconds
    if model.codec.phonemes is not None:
        results["codec_phoneme_accuracy"] = phoneme_accuracy(model.codec, args.data)
    two_words = talker_speech(model, processor, args.data, "sft", limit=60, keep=lambda s: s["task"] in (
        "read_aloud", "asr") and len(s["conversations"][-1]["content"].split()) == 2,   # texts it trained on
        reference_books=args.reference_codebooks)
    refs = [trained["sft"][p] for p in two_words]
    results["train_two_word_texts"] = {"n_clips": len(two_words), "cer_ground_truth": cer(judge, [read(p) for p in
                                       two_words], refs), "cer_talker": cer(judge, list(two_words.values()), refs)}
    said = [(clean(text), wav) for text, wav in own_answers(model, processor, args.data)]
    kept = [(text, wav) for text, wav in said if text]
    results["own_answers"] = {"n_answers": len(said), "n_empty": len(said) - len(kept),
                              "n_distinct_texts": len({t for t, _ in kept}),
                              "n_texts_not_in_training": len({t for t, _ in kept} - trained_texts),
                              "cer_talker": cer(judge, [w for _, w in kept], [t for t, _ in kept])}
    results["streaming"] = streaming(model, processor, args.data, args.stream_n)
    results["threads"], results["reference_codebooks"] = torch.get_num_threads(), args.reference_codebooks
    results["decode"] = args.decode
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["judge", "measure"])
    p.add_argument("--data", default="data/toyworld", help="a ToyWorld built with --speak")
    p.add_argument("--out", default="", help="judge: output folder; measure: results json")
    p.add_argument("--judge", default="out/speech_judge")
    p.add_argument("--ckpt", default="out/talker", help="a checkpoint with a talker and its codec")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream_n", type=int, default=10, help="answers streamed for latency / real-time factor")
    p.add_argument("--reference_codebooks", type=int, nargs="*", default=[],
                   help="diagnosis: these codebooks come from the reference clip in the teacher-forced talker rows")
    p.add_argument("--decode", choices=["expected", "picked"], default="expected",
                   help="talker speech: finer codebooks as their expected codeword (chat's way) or the picked code")
    args = p.parse_args()
    train_judge(args) if args.mode == "judge" else measure(args)


if __name__ == "__main__":
    main()
