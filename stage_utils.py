"""What the omni stage scripts share beyond trainer.py: building the model (tiny preset, a previous stage's
output, or real Qwen3 / SigLIP2 / Whisper folders), choosing what trains, the datasets and their batch order
(instruction data, text-only data, the vision and audio warm-up data), and saving a stage's output.

A stage's output folder (`--out`) ends up holding config.json + model.safetensors + the tokenizer files, so it is
both the next stage's `--init` and `eval_omni.py --ckpt`. Its step_<N>/ subfolders are trainer.py's resumable
checkpoints (trainable weights only: everything frozen is rebuilt from --init, or from --seed for a random init).
"""
import json
import os
import random
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from dataset.build_toyworld import (ASK, char_columns, follow_up_questions, gen_asr, gen_ocr, gen_scene_qa, gen_video,
                                    render_text)
from dataset.chat import (MARKERS, fits_text_slots, lookup_targets, slot_standin_ids, spelled_answer, spelled_length,
                          spelling_targets, standin_ids, tokenize_conversation)
from dataset.media import (audio_features, image_pixels, image_to_tensor, load_image, normalize_pixels, read_video,
                           video_placeholder)
from dataset.omni_dataset import OmniDataset, collate, jsonl_samples, length_grouped_batches, pack_rows
from dataset.tokenizer import load_tokenizer
from dataset.toyworld_text import (describe_media, frame_objects, frame_slots, queried_slots, scene_slots,
                                   text_image_reading)
from model.lora import apply_lora, merge_lora
from model.model_omni import (AUDIO_END, AUDIO_PAD, AUDIO_START, IMAGE_END, IMAGE_PAD, IMAGE_START, VIDEO_END,
                              VIDEO_START, OmniConfig, OmniModel)
from model.warmup_heads import CELL_FIELDS, READ_COLUMNS_PER_PATCH
from trainer import cleanup_distributed, is_main

TOWERS = ("llm", "vision", "audio")  # components that can come from a pretrained folder


# ----------------------------------------------------------------------------- command line
def add_model_args(parser, data: list[str], tasks: str = ""):
    g = parser.add_argument_group("model and data")
    g.add_argument("--preset", default="tiny", choices=["tiny", "qwen3_0_6b"], help="shapes of a random-init model")
    g.add_argument("--init", default="", help="start from a stage output folder (config.json + weights + tokenizer)")
    g.add_argument("--graft", nargs="+", default=[], metavar="COMPONENTS=DIR",
                   help="after --init, take these components from another stage output, e.g. vision,resampler=out/slots"
                        " (warm-ups of different parts run side by side and meet here: scripts/demo.sh)")
    g.add_argument("--llm", default="", help="local Qwen3 folder (with --vision and --audio: real pretrained towers)")
    g.add_argument("--vision", default="", help="local SigLIP/SigLIP2 folder")
    g.add_argument("--audio", default="", help="local Whisper folder (its encoder is used)")
    g.add_argument("--tokenizer", default="", help="tokenizer folder for --preset (default: next to the data)")
    g.add_argument("--data", nargs="+", default=data, help="training jsonl files")
    g.add_argument("--tasks", default=tasks, help="comma-separated task filter on the samples' 'task' field")
    g.add_argument("--max_length", type=int, default=1024)
    g.add_argument("--standin_weight", type=float, default=1.0,
                   help="weight of the stand-in loss: ToyWorld image slots pulled towards their cells' word codes "
                        "(0 = off; only after the tiny text warm-up, whose LLM learned to read them)")
    g.add_argument("--reading_weight", type=float, default=0.05,
                   help="weight of the reading loss: a square ToyWorld text image's slots spell its text (0 = off; "
                        "once the model spells). Small: its gradient is ~50x the stand-in loss's, and at 1 the shared "
                        "resampler stopped reading scenes (docs/experiments.md)")
    g.add_argument("--lookup_weight", type=float, default=1.0,
                   help="weight of the lookup loss: at the answer to a ToyWorld colour/shape/position question, "
                        "attention of the LLM's middle layer pulled onto the slot of the object asked about (0 = off; "
                        "only where image slots stand for cells: the tiny recipe's text warm-up and later stages)")
    g.add_argument("--train", default="", help="comma-separated components that train: vision,audio,llm,resampler,"
                                                "audio_projector (projectors = both projectors)")
    return parser


def component_lrs(args, defaults: dict[str, float]) -> dict[str, float]:
    """{component: lr} defaults -> trainer's {name prefix: lr}; --lr_for PREFIX=LR on the command line wins."""
    prefixes = {c: attr + "." for c, attr in OmniModel.COMPONENTS.items()}
    return {**{prefixes[c]: lr for c, lr in defaults.items()}, **dict(args.lr_for)}


# ----------------------------------------------------------------------------- the model
def build_model(args) -> tuple[OmniModel, object]:
    """-> (model, tokenizer). Seeded first, so a random init is rebuilt bit-identically when a run resumes."""
    torch.manual_seed(args.seed)
    if args.graft and not args.init:
        raise SystemExit("--graft adds parts to the --init checkpoint; give --init too")
    if args.init:
        model, tokenizer = OmniModel.from_pretrained(args.init), load_tokenizer(args.init)
        for spec in args.graft:
            components, _, folder = spec.partition("=")
            if not folder:
                raise SystemExit(f"--graft {spec!r}: expected COMPONENTS=DIR, e.g. vision,resampler=out/slots")
            model.graft(OmniModel.from_pretrained(folder), components.split(","), folder)
    elif args.llm or args.vision or args.audio:
        if not (args.llm and args.vision and args.audio):
            raise SystemExit("--llm, --vision and --audio go together (local Qwen3, SigLIP2 and Whisper folders)")
        model, tokenizer = OmniModel.from_hf_folders(args.llm, args.vision, args.audio), load_tokenizer(args.llm)
    else:
        tokenizer = load_tokenizer(args.tokenizer or os.path.join(os.path.dirname(args.data[0]), "tokenizer"))
        config = OmniConfig.preset(args.preset)
        if args.preset == "tiny":  # the demo's vocabulary is the ToyWorld tokenizer's, rounded up
            config.llm.vocab_size = -(-len(tokenizer) // 64) * 64
        model = OmniModel(config)
    if len(tokenizer) > model.config.llm.vocab_size:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens but the LLM only {model.config.llm.vocab_size} rows")
    model.config.set_token_ids(tokenizer)
    model.standin_weight, model.lookup_weight = args.standin_weight, args.lookup_weight
    model.reading_weight = args.reading_weight
    return model, tokenizer


def set_trainable(model: OmniModel, components: list[str], lora_rank: int = 0, lora_alpha: float = 0.0):
    """Freeze everything, then unfreeze `components`. With lora_rank the LLM trains through LoRA on q/k/v/o only.
    Towers that train no longer match their source folder, so they stop being external (they get saved)."""
    model.requires_grad_(False)
    llm_full = "llm" in components and not lora_rank
    model.unfreeze(*[c for c in components if c != "llm" or llm_full])
    if lora_rank:
        apply_lora(model, lora_rank, lora_alpha or lora_rank)
    model.audio_tower.embed_positions.requires_grad_(False)  # Whisper's sinusoids stay fixed
    for c in components:
        model.config.external_weights.pop(c, None)
    return model


def finish_stage(model: OmniModel, tokenizer, args):
    """After training: rank 0 writes the stage output to --out; every rank leaves the process group."""
    if is_main():
        save_stage(model.cpu(), tokenizer, args.out, args)
        print(f"saved the stage output to {args.out}")
    cleanup_distributed()


def save_stage(model: OmniModel, tokenizer, out: str, args):
    """The stage output: a plain OmniModel checkpoint (LoRA merged) + tokenizer + the arguments, rank 0 only.
    Towers still identical to their pretrained folders are not copied (config.external_weights points at them).
    stage_args.json is written last: it marks the stage as finished (finished_before)."""
    merge_lora(model)
    model.save_pretrained(out, exclude=tuple(c for c in TOWERS if c in model.config.external_weights))
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "stage_args.json"), "w") as f:
        json.dump(stage_args(args), f, indent=2)


def stage_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "lr_for"} | {"lr_for": dict(args.lr_for)}


def finished_before(args) -> bool:
    """A --resume auto run whose --out already holds this stage's output, saved with the same arguments, has nothing
    left to do: it returns before loading the model or its data (a re-run of scripts/demo.sh skips its finished
    stages instead of, e.g., running the slots stage's frozen tower over every image again)."""
    path = os.path.join(args.out, "stage_args.json")
    if args.resume != "auto" or not os.path.isfile(path):
        return False
    with open(path) as f:
        saved = json.load(f) | {"resume": args.resume}  # the first run may have started without --resume
    if saved != json.loads(json.dumps(stage_args(args))):  # through JSON: tuples -> lists, as saved
        return False
    print(f"{args.out} already holds this stage's output, saved with these arguments: nothing to do")
    return True


# ----------------------------------------------------------------------------- instruction data
def _task_filter(dataset: OmniDataset, tasks: set[str]) -> list[int]:
    return [i for i, (_, s) in enumerate(dataset.records) if not tasks or s.get("task") in tasks]


def omni_data(args, config, tokenizer, codec=None):
    """-> (dataset, collate_fn, batches_fn) over every --data file, filtered by --tasks, length-grouped.
    With the talker's codec, samples with a speech target also yield its codes."""
    tasks = set(filter(None, args.tasks.split(",")))
    standins = args.standin_weight > 0 and config.reads_standins  # targets only for an LLM that learned to read them
    parts, lengths = [], []
    for path in args.data:
        full = OmniDataset(path, tokenizer, config, args.max_length, codec=codec, standins=standins)
        keep = _task_filter(full, tasks)
        parts.append(Subset(full, keep))
        lengths += [full.lengths[i] for i in keep]
    return (ConcatDataset(parts), partial(collate, pad_id=tokenizer.pad_token_id),
            partial(length_grouped_batches, lengths, args.batch_size, args.seed))


STANDIN_WRAP = {"image": (IMAGE_START, IMAGE_END), "audio": (AUDIO_START, AUDIO_END), "video": (VIDEO_START, VIDEO_END)}


class Standins(NamedTuple):
    """A ToyWorld sample's media as what the text warm-up reads instead (standin_expansions)."""
    expansions: dict[str, list[str]]  # per medium kind, each marker's stand-in (pads or text, with start/end tokens)
    slots: list[list[str]] | None     # per scene, its query_num image slots' texts (toyworld_text.scene_slots)
    frames: list[list[str]] | None    # per frame of the clip, its video slots' texts (toyworld_text.frame_slots)
    spelled: list[str]                # per clip of speech, the transcript its audio pads spell
    read: list[str] | None = None     # per square text image, the text its image pads spell


def standin_expansions(sample: dict, config: OmniConfig) -> Standins | None:
    """Media markers -> their stand-ins, or None without ToyWorld truth. A scene becomes query_num image pads
    standing for its cells' words (one cell per slot: toyworld_text.scene_slots, chat.slot_standin_ids), the slots
    `align` then teaches the resampler to fill; a clip, where each frame has its own slots (video_group_size 1),
    becomes those frames read the same way; speech becomes audio pads spelling its transcript
    (chat.spelled_standin_ids), which the listen warm-up teaches the audio projector to write; a square text image
    becomes query_num image pads spelling its text the same way over the slots a scene leaves spare (from
    TEXT_SLOTS_FROM on; the slots warm-up teaches the resampler to write them; a longer text stays text); wide and
    tall text (and a clip under a grouping resampler) become text (toyworld_text.describe_media)."""
    described = describe_media(sample)
    if described is None:
        return None
    q = config.query_num
    slots = scene_slots(sample)
    if slots and len(slots[0]) <= q:
        described["image"] = [IMAGE_PAD * q] * len(slots)
    else:
        slots = None
    read = text_image_reading(sample)
    if read and fits_text_slots(read[0], q):
        described["image"] = [IMAGE_PAD * q]
    else:
        read = None
    frames = frame_slots(sample, config.video_max_frames) if config.frames_read_alone else None
    spelled = described["audio"]
    described["audio"] = [AUDIO_PAD * spelled_length(text) for text in spelled]
    expansions = {kind: [STANDIN_WRAP[kind][0] + text + STANDIN_WRAP[kind][1] for text in texts]
                  for kind, texts in described.items()}
    if frames:
        expansions["video"] = [video_placeholder([1] * len(frames), q)]
    return Standins(expansions, slots, frames, spelled, read)


def generated_scene_questions(n: int, seed: int, per_scene: int = 1) -> list[dict]:
    """n colour / shape / count / position questions (in turn) on fresh scenes, drawn by ToyWorld's own sample
    generators, each followed by per_scene - 1 more turns about the same scene; the scenes stay render specs,
    never images: text warm-up material beyond the dataset's ~1,200."""
    rng, tasks, samples = random.Random(seed), list(ASK), []
    for i in range(n):
        sample = gen_scene_qa(tasks[i % len(tasks)])(rng, "en", i, False)[0]
        turns = follow_up_questions(rng, "en", sample["meta"]["scene"], per_scene - 1)
        for question, answer, _ in turns:
            sample["conversations"] += [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}]
        sample["meta"]["follow_up_cells"] = [cell for _, _, cell in turns]
        samples.append(sample)
    return samples


def generated_transcriptions(n: int, seed: int) -> list[dict]:
    """n ASR samples drawn by ToyWorld's own generator (never a held-out combination), their speech left a render
    spec: spelling practice for the text warm-up over the whole ASR lexicon, where the dataset's clips say many
    words only once or twice."""
    rng = random.Random(seed)
    return [gen_asr(rng, "en", i, False)[0] for i in range(n)]


def generated_clips(n: int, seed: int) -> list[dict]:
    """n video questions (moves and appearances in turn) drawn by ToyWorld's own generator, their clips left render
    specs: text warm-up practice in reading a clip frame by frame, where the dataset has 300."""
    rng = random.Random(seed)
    return [gen_video(rng, "en", i, False)[0] for i in range(n)]


def generated_text_images(n: int, seed: int) -> list[dict]:
    """n render specs of square rendered-text images (a word or a number) drawn by ToyWorld's own OCR generator,
    never a held-out combination: reading practice for the vision and slots warm-ups."""
    rng = random.Random(seed)
    return [gen_ocr(rng, "en", 4 * i, False)[0]["images"][0] for i in range(n)]  # i % 4 != 3: the square layout


class TextDataset(Dataset):
    """The LLM's warm-up on ToyWorld language, as a real LLM arrives knowing its language: the conversations with
    each medium replaced by a stand-in (standin_expansions: a scene by its cells' words, one vector per image
    slot; a clip frame by frame the same way; speech by its spelled transcript, ...), plus `scene_questions`
    generated scene questions (`questions_per_scene` turns each), `transcriptions` generated ASR samples and
    `clips` generated video questions. So the LLM first learns to answer from a DESCRIPTION in its context, and
    `align` then only has to make the media embeddings read like one.
    Samples without ToyWorld ground truth get their media markers removed; those left without a question are
    dropped."""

    def __init__(self, paths: list[str], tokenizer, config: OmniConfig, scene_questions: int = 0, seed: int = 0,
                 questions_per_scene: int = 1, transcriptions: int = 0, clips: int = 0):
        self.tokenizer, self.video_max_frames, self.samples = tokenizer, config.video_max_frames, []
        samples = ([sample for _, sample in jsonl_samples(paths)]
                   + generated_scene_questions(scene_questions, seed, questions_per_scene)
                   + generated_transcriptions(transcriptions, seed) + generated_clips(clips, seed))
        for sample in samples:
            standins = standin_expansions(sample, config)
            if standins is None:
                turns = [dict(t, content=self._strip(t["content"])) for t in sample["conversations"]]
                if not all(t["content"] for t in turns):
                    continue
                sample, standins = dict(sample, conversations=turns), Standins({}, None, None, [])
            self.samples.append((sample, standins))
        self.items = [self._tokenize(i) for i in range(len(self.samples))]  # once: the warm-up runs 2 epochs

    @staticmethod
    def _strip(text: str) -> str:
        for marker in MARKERS.values():
            text = text.replace(marker, "")
        return text.strip()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.items[i]

    def _tokenize(self, i) -> dict:
        sample, standins = self.samples[i]
        input_ids, labels = tokenize_conversation(sample, self.tokenizer, standins.expansions,
                                                  spelled_answer(standins.read, standins.spelled))
        words = standin_ids(input_ids, self.tokenizer, standins.slots, standins.spelled, standins.frames,
                            standins.read)
        if words is None:
            return {"input_ids": input_ids, "labels": labels}
        return {"input_ids": input_ids, "labels": labels, "standin_ids": words,
                "lookup_slots": lookup_targets(input_ids, labels, self.tokenizer,
                                               queried_slots(sample, self.video_max_frames))}


def text_data(args, tokenizer, config: OmniConfig):
    dataset = TextDataset(args.data, tokenizer, config, args.scene_questions, args.seed, args.questions_per_scene,
                          args.transcriptions, args.clips)
    lengths = [sum(len(t["content"]) for t in s["conversations"]) + sum(len(e) for es in x.expansions.values()
                                                                      for e in es)
               for s, x in dataset.samples]
    # mega_batches=1: plain shuffled batches. Grouping by length would sort the generated conversations into
    # batches of their own, and the LLM then no longer learns the lookups (docs/experiments.md). pack_rows instead
    # packs a batch's short samples into rows as long as its longest: the same loss on half the padded tokens.
    return (dataset, partial(pack_rows, pad_id=tokenizer.pad_token_id),
            partial(length_grouped_batches, lengths, args.batch_size, args.seed, mega_batches=1))


# ----------------------------------------------------------------------------- warm-up data (ToyWorld ground truth)
def charset(paths: list[str]) -> list[str]:
    """Every character of the OCR texts and transcripts (lower-cased: the benchmark ignores case)."""
    chars = set()
    for _, sample in jsonl_samples(paths):
        meta = sample.get("meta", {})
        chars.update((meta.get("text") or "").lower() + (meta.get("transcript") or "").lower())
    return sorted(chars)


def encode_chars(text: str, chars: list[str]) -> torch.Tensor:
    index = {c: i + 1 for i, c in enumerate(chars)}  # 0 is the CTC blank
    return torch.tensor([index[c] for c in text.lower() if c in index], dtype=torch.long)


def scene_cells(objects: list[dict]) -> torch.Tensor:
    """Ground-truth objects -> Long[9, 3]: (colour, shape, size) class of each 3x3 cell, 0 = empty."""
    from dataset.toyworld_text import COLORS, SHAPES, SIZES
    cells = torch.zeros(9, len(CELL_FIELDS), dtype=torch.long)
    for o in objects:
        cells[o["cell"][0] * 3 + o["cell"][1]] = torch.tensor(
            [list(COLORS).index(o["color"]) + 1, list(SHAPES).index(o["shape"]) + 1, list(SIZES).index(o["size"]) + 1])
    return cells


class VisionWarmupData(Dataset):
    """Items: a scene image, or the frames of a clip the model reads (at most max_frames), with per-cell targets;
    then `text_images` square rendered-text images drawn by ToyWorld's own OCR generator (seeded by their index)
    with the character centred in each reading column (build_toyworld.char_columns).

    Every image is decoded (or rendered) once, here, and kept as uint8 pixels (the demo's 11,400 images of 112 px:
    430 MB): decoding and rendering them again in each of 8 epochs was 12% of the warm-up's time on one core."""

    def __init__(self, paths: list[str], max_frames: int, chars: list[str], text_images: int = 0, seed: int = 0,
                 columns: int = 16):
        self.max_frames, self.chars, self.columns, self.seed, self.items = max_frames, chars, columns, seed, []
        self.char_index = {c: k + 1 for k, c in enumerate(chars)}  # 0 = no character
        for root, s in jsonl_samples(paths):
            m, images = s.get("meta", {}), [os.path.join(root, p) for p in s.get("images") or []]
            if "scenes" in m:
                self.items += [("scene", p, sc["objects"]) for p, sc in zip(images, m["scenes"])]
            elif "scene" in m and images:
                self.items.append(("scene", images[0], m["scene"]["objects"]))
            elif s.get("task") == "video":
                self.items.append(("video", os.path.join(root, s["videos"][0]), m))
        self.items += [("text", None, spec) for spec in generated_text_images(text_images, seed)]
        self.decoded = [self._decode(i) for i in range(len(self.items))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(normalize_pixels(pixels), cells, columns) for pixels, cells, columns in self.decoded[i]]

    def _decode(self, i) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """[(Uint8[3, S, S], cell targets Long[9, 3], column targets Long[columns])] of item i, -100 = no target."""
        kind, path, target = self.items[i]
        no_cells, no_columns = torch.full((9, len(CELL_FIELDS)), -100), torch.full((self.columns,), -100)
        if kind == "text":
            image = render_text(target, np.random.default_rng([self.seed, i]))
            columns = torch.zeros(self.columns, dtype=torch.long)
            for ch, column in zip(target["lines"][0].lower(), char_columns(target, self.columns)):
                if column is not None:
                    columns[column] = self.char_index.get(ch, 0)
            return [(image_pixels(image), no_cells, columns)]
        if kind == "scene":
            return [(image_pixels(load_image(path)), scene_cells(target), no_columns)]
        frames, _ = read_video(path, self.max_frames)
        return [(image_pixels(f), scene_cells(objs), no_columns)
                for f, objs in zip(frames, frame_objects(target, self.max_frames), strict=True)]


def collate_vision(items: list[list]) -> dict:
    images = [x for it in items for x in it]
    return {"pixel_values": torch.stack([px for px, _, _ in images]),   # [N, 3, S, S]
            "cells": torch.stack([c for _, c, _ in images]),             # [N, 9, 3]
            "columns": torch.stack([c for _, _, c in images])}           # [N, 2g]


class AudioWarmupData(Dataset):
    """Every clip with a transcript (ASR clips and spoken questions) -> (log-mel, character ids)."""

    def __init__(self, paths: list[str], chars: list[str], config: OmniConfig):
        self.chars, self.config, self.items = chars, config, []
        for root, s in jsonl_samples(paths):
            if s.get("audios") and s.get("meta", {}).get("transcript"):
                self.items.append((os.path.join(root, s["audios"][0]), s["meta"]["transcript"]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, transcript = self.items[i]
        mels, _ = audio_features(path, self.config)
        return {"mel": mels[0], "text": encode_chars(transcript, self.chars)}  # clips are far below 30 s


def collate_audio(items: list[dict]) -> dict:
    mels = torch.zeros(len(items), items[0]["mel"].shape[0], max(it["mel"].shape[-1] for it in items))
    for k, it in enumerate(items):
        mels[k, :, :it["mel"].shape[-1]] = it["mel"]
    return {"audio_features": mels, "audio_feature_lens": torch.tensor([it["mel"].shape[-1] for it in items]),
            **_transcripts(items)}


def _transcripts(items: list[dict]) -> dict:
    return {"text": torch.nn.utils.rnn.pad_sequence([it["text"] for it in items], batch_first=True),
            "text_lens": torch.tensor([len(it["text"]) for it in items])}


@torch.no_grad()
def frozen(tower: torch.nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen tower's (output, mask) for one batch, run on the tower's device (eval mode), kept on the CPU."""
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError("only a frozen tower's output may be computed once and reused: this one trains")
    device, was_training = next(tower.parameters()).device, tower.training
    out = tower.eval()(*(x.to(device) for x in inputs))
    tower.train(was_training)
    return tuple(x.cpu() for x in out)


class ListenWarmupData(AudioWarmupData):
    """AudioWarmupData's clips as the frozen audio tower hears them: the listen stage trains only the projector on
    top, so each clip goes through the tower once, here, instead of once per epoch (the tower was 70% of a step)."""

    def __init__(self, paths: list[str], chars: list[str], config: OmniConfig, audio_tower: torch.nn.Module):
        super().__init__(paths, chars, config)
        self.states = []  # per clip [T'_i, Da]: the tower's output frames that are the clip's, not padding
        for start in range(0, len(self.items), 32):
            batch = collate_audio([AudioWarmupData.__getitem__(self, i)
                                   for i in range(start, min(start + 32, len(self.items)))])
            states, mask = frozen(audio_tower, batch["audio_features"], batch["audio_feature_lens"])
            self.states += [s[:n].clone() for s, n in zip(states, mask.sum(1).tolist())]

    def __getitem__(self, i):
        return {"states": self.states[i], "text": encode_chars(self.items[i][1], self.chars)}


def collate_listen(items: list[dict]) -> dict:
    return {"audio_states": torch.nn.utils.rnn.pad_sequence([it["states"] for it in items], batch_first=True),
            "audio_state_lens": torch.tensor([len(it["states"]) for it in items]), **_transcripts(items)}


class SlotWarmupData(Dataset):
    """Every ToyWorld scene image (single and multi-image samples), every clip's frames when each frame has its own
    slots (video_group_size 1), and once the model spells (config.spelling_ids) every square text image and
    `text_images` generated ones -> per image or frame (its patch features, the word ids of its query_num slots or
    the characters they spell). The vision tower is frozen in the slots stage, so each image goes through it once,
    here, instead of once per epoch (the tower was 60% of a step, and no image is decoded again)."""

    def __init__(self, paths: list[str], tokenizer, config: OmniConfig, vision_tower: torch.nn.Module,
                 text_images: int = 0, seed: int = 0):
        self.tokenizer, self.config, self.items = tokenizer, config, []
        for root, s in jsonl_samples(paths):
            for path, texts in zip(s.get("images") or [], scene_slots(s) or []):
                self.items.append((os.path.join(root, path), "scene", [texts]))
            frames = frame_slots(s, config.video_max_frames) if config.frames_read_alone else None
            if frames:
                self.items.append((os.path.join(root, s["videos"][0]), "clip", frames))
            read = text_image_reading(s) if config.spelling_ids else None
            if read and self._spellable(read[0]):
                self.items.append((os.path.join(root, s["images"][0]), "text", read[0]))
        noise = np.random.default_rng(seed)
        self.items += [(render_text(spec, noise), "text", spec["lines"][0])
                       for spec in generated_text_images(text_images if config.spelling_ids else 0, seed + 1)
                       if self._spellable(spec["lines"][0])]
        self.features = []  # per item [images, L, Dv]
        grid = config.scale_resolution // config.vision.patch_size
        for start in range(0, len(self.items), 32):
            pixels = [self._pixels(i) for i in range(start, min(start + 32, len(self.items)))]
            grid_hw = torch.tensor([[grid, grid]] * sum(map(len, pixels)))
            feats, _ = frozen(vision_tower, torch.cat(pixels), grid_hw)               # [N, L, Dv]
            self.features += feats.split([len(p) for p in pixels])

    def _spellable(self, text: str) -> bool:
        """Every character is one of config.spelling_ids and the slots have room for the spelled path."""
        return (fits_text_slots(text, self.config.query_num)
                and len(spelling_targets(self.tokenizer, text, self.config.spelling_ids)) == len(text))

    def _pixels(self, i) -> torch.Tensor:
        """[images, 3, S, S]: the scene or text image, or the frames of the clip the model reads."""
        image, kind, _ = self.items[i]
        images = (read_video(image, self.config.video_max_frames)[0] if kind == "clip"
                  else [image if isinstance(image, Image.Image) else load_image(image)])
        pixels = torch.stack([image_to_tensor(image) for image in images])
        if list(pixels.shape[2:]) != [self.config.scale_resolution] * 2:
            raise ValueError(f"{image}: a scene must be {self.config.scale_resolution}px square (one slice), "
                             f"got {tuple(pixels.shape[2:])}")
        return pixels

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i) -> list[dict]:
        _, kind, target = self.items[i]
        pads = torch.full((self.config.query_num,), self.config.image_pad_id, dtype=torch.long)
        if kind == "text":
            return [{"features": self.features[i][0], "standin_ids": torch.full((len(pads), 1), -1),
                     "spelling": spelling_targets(self.tokenizer, target, self.config.spelling_ids)}]
        return [{"features": feats, "standin_ids": slot_standin_ids(pads, self.tokenizer, [texts]),  # [L, Dv], [Q, W]
                 "spelling": torch.zeros(0, dtype=torch.long)}
                for feats, texts in zip(self.features[i], target, strict=True)]


def collate_slots(items: list[list[dict]]) -> dict:
    images = [x for it in items for x in it]
    width = max(x["standin_ids"].shape[1] for x in images)
    ids = torch.full((len(images), images[0]["standin_ids"].shape[0], width), -1, dtype=torch.long)  # [N, Q, W]
    for k, x in enumerate(images):
        ids[k, :, :x["standin_ids"].shape[1]] = x["standin_ids"]
    return {"patch_features": torch.stack([x["features"] for x in images]), "standin_ids": ids,  # [N, L, Dv]
            "spelling": torch.nn.utils.rnn.pad_sequence([x["spelling"] for x in images], batch_first=True),
            "spelling_lens": torch.tensor([len(x["spelling"]) for x in images])}


def warmup_data(args, stage: str, model: OmniModel, tokenizer=None):
    """-> (dataset, collate_fn, batches_fn) of the vision, slots, audio or listen warm-up (plain shuffled batches;
    audio and listen share the clips and their characters). slots and listen run the frozen tower here, once."""
    config = model.config
    if stage == "slots":
        dataset = SlotWarmupData(args.data, tokenizer, config, model.vision_tower, args.text_images, args.seed)
        collate_fn = collate_slots
    elif stage == "vision":
        columns = READ_COLUMNS_PER_PATCH * config.scale_resolution // config.vision.patch_size
        dataset = VisionWarmupData(args.data, config.video_max_frames, charset(args.data), args.text_images,
                                   args.seed, columns)
        collate_fn = collate_vision
    elif stage == "audio":
        dataset, collate_fn = AudioWarmupData(args.data, charset(args.data), config), collate_audio
    elif stage == "listen":
        dataset = ListenWarmupData(args.data, charset(args.data), config, model.audio_tower)
        collate_fn = collate_listen
    else:
        raise ValueError(f"no warm-up data for stage {stage!r}")
    return dataset, collate_fn, partial(length_grouped_batches, [0] * len(dataset), args.batch_size, args.seed)
