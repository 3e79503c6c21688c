"""ToyWorld: the offline, deterministic demo world every stage of the tutorial trains and is scored on.

A world of coloured shapes on a 3x3 grid, rendered words, espeak-ng speech and tiny GIF clips. Each sample is a
jsonl line (format in shared/DESIGN.md) whose `meta` is the full ground truth, so answers *and* hallucinations
(claims about objects, colours, counts, positions) can be scored later.

    python dataset/build_toyworld.py --out data/toyworld [--seed 0] [--size small|full] [--langs en,zh] [--workers 2]

writes pretrain.jsonl (caption/ocr/asr alignment data), sft.jsonl (every family), test.jsonl (every family, held out:
its own seed stream, and no scene, rendering or voice setting reused from training), media under img/ wav/ video/,
and a tiny BPE tokenizer under tokenizer/. Same seed -> byte-identical jsonl and media.

How: the main process draws every sample from seeded `random.Random` streams (one per split/task/language, so
changing one count never reshuffles another family) and emits *render specs*; a process pool turns specs into files.
A spec fully determines its file, so the result does not depend on the number of workers or their timing.
"""
import argparse
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import time
from collections import Counter
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dataset import toyworld_text as T

# ---------------------------------------------------------------------------------------------------------------------
# Sizes: samples per split and task, for each language. Tune these. ("think": questions; each question is written twice,
# with and without the <think> chain, so it yields 2 samples.) "full" costs ~80 CPU-seconds, most of it espeak-ng:
# measured 80-120 s wall on a shared 2-core box busy with other jobs (so ~45 s on 2 free cores); en,zh doubles it.
# ---------------------------------------------------------------------------------------------------------------------
TASKS = ["caption", "color", "shape", "count", "position", "ocr", "asr", "audio_qa", "video", "multi_image", "think"]
COUNTS = {
    "full": {
        "pretrain": {"caption": 1500, "ocr": 1500, "asr": 1500},
        "sft": {"caption": 300, "color": 300, "shape": 300, "count": 300, "position": 300, "ocr": 300, "asr": 300,
                "audio_qa": 300, "video": 300, "multi_image": 300, "think": 150},
        "test": {"caption": 60, "color": 60, "shape": 60, "count": 60, "position": 60, "ocr": 60, "asr": 60,
                 "audio_qa": 60, "video": 60, "multi_image": 60, "think": 30},
    },
    "small": {  # for tests: seconds to build, still every family (and every sub-kind: anyres OCR, appear clips, ...)
        "pretrain": {"caption": 6, "ocr": 4, "asr": 6},
        "sft": {"caption": 2, "color": 2, "shape": 2, "count": 2, "position": 2, "ocr": 4, "asr": 2, "audio_qa": 2,
                "video": 2, "multi_image": 3, "think": 4},
        "test": {"caption": 2, "color": 2, "shape": 2, "count": 2, "position": 2, "ocr": 4, "asr": 2, "audio_qa": 2,
                 "video": 2, "multi_image": 3, "think": 4},
    },
}
READ_ALOUD = {"full": 2000, "small": 3}  # --speak only: phrases to say back, in the sft split (gen_read_aloud)
SPLITS = ["pretrain", "sft", "test"]
TEST_SEED_OFFSET = 1000  # the test split draws from the stream of seed + 1000

IMG = 112  # the tiny model's image resolution; scenes are IMG x IMG, cells IMG/3 px
RADIUS = {"small": 8, "large": 13}  # shape "radius" in px; star/triangle tips reach 1.2x this
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down, for anti-aliased edges
FPS = 5  # video clips: 5 frames per second (0.2 s per frame), 4-8 frames
SAMPLE_RATE = 16000
SEP = {"en": " ", "zh": ""}  # how words join in each language
INSTALL_HINT = "install it with `apt-get install espeak-ng fonts-dejavu-core fonts-wqy-microhei`"
FONTS = {"en": ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf"],
         "zh": ["wqy-microhei.ttc"]}
FONT_DIRS = ["/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.local/share/fonts")]
TEXT_COLORS = {"black": (20, 20, 20), "navy": (20, 30, 110), "maroon": (130, 20, 20), "forest": (20, 90, 30),
               "gray": (70, 70, 70), "plum": (80, 20, 100)}
VOICES = {"en": ["en-us", "en-gb", "en+f3", "en+m3"],
          "zh": ["cmn-latn-pinyin", "cmn-latn-pinyin+f3", "cmn-latn-pinyin+m3"]}
# Held-out speech: training speaks at speeds 140,150,..190 and pitches 30,40,..70; the test split at the values in
# between (145..185, 35..65), so no test clip is a training clip while staying inside the trained range.
SPEEDS = {False: list(range(140, 191, 10)), True: list(range(145, 186, 10))}
PITCHES = {False: list(range(30, 71, 10)), True: list(range(35, 66, 10))}


class MissingDependency(RuntimeError):
    """A system tool or font that the builder needs is not installed."""


def check_tools(langs) -> None:
    """Fail fast, before any work, with the apt command that fixes it."""
    if shutil.which("espeak-ng") is None:
        raise MissingDependency(f"espeak-ng (speech synthesis for ASR and spoken questions) is not on PATH: "
                                f"{INSTALL_HINT}")
    for lang in langs:
        for name in FONTS[lang]:
            find_font(name)


@cache
def find_font(name: str) -> str:
    for root in FONT_DIRS:
        for dirpath, _, files in os.walk(root):
            if name in files:
                return os.path.join(dirpath, name)
    raise MissingDependency(f"font {name} not found under {', '.join(FONT_DIRS)}: {INSTALL_HINT}")


@cache
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(find_font(name), size)


# ---------------------------------------------------------------------------------------------------------------------
# Scenes: objects on a 3x3 grid. An object is a plain dict (it goes into `meta` as ground truth as-is).
# ---------------------------------------------------------------------------------------------------------------------
def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy), its bounding box centred too (a circle is a 48-gon)."""
    if shape == "circle":
        return [(cx + r * math.cos(2 * math.pi * k / 48), cy + r * math.sin(2 * math.pi * k / 48)) for k in range(48)]
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.2 * r
        half = R * math.sqrt(3) / 2
        return [(cx, cy - 0.75 * R), (cx + half, cy + 0.75 * R), (cx - half, cy + 0.75 * R)]
    pts = [((1.2 if k % 2 == 0 else 0.5) * r, -math.pi / 2 + k * math.pi / 5) for k in range(10)]  # star
    pts = [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in pts]
    dy = (min(y for _, y in pts) + max(y for _, y in pts)) / 2 - cy
    return [(x, y - dy) for x, y in pts]


def place(color: str, shape: str, size: str, cx: int, cy: int) -> dict:
    """An object record: attributes, grid cell and pixel box (the ground truth a caption must match)."""
    pts = shape_points(shape, cx, cy, RADIUS[size])
    row, col = min(2, cy * 3 // IMG), min(2, cx * 3 // IMG)
    box = [math.floor(min(x for x, _ in pts)), math.floor(min(y for _, y in pts)),
           math.ceil(max(x for x, _ in pts)), math.ceil(max(y for _, y in pts))]
    return {"color": color, "shape": shape, "size": size, "cell": [row, col],
            "position": T.POSITIONS[row * 3 + col][0], "center": [cx, cy], "box": box}


def object_in_cell(rng: random.Random, cell: int, color: str, shape: str, size: str) -> dict:
    """Place an object in a grid cell, jittered as far as the cell allows."""
    step = IMG / 3
    slack = max(0, int(step / 2 - 1.2 * RADIUS[size] - 1))
    cx = int(step * (cell % 3 + 0.5)) + rng.randint(-slack, slack)
    cy = int(step * (cell // 3 + 0.5)) + rng.randint(-slack, slack)
    return place(color, shape, size, cx, cy)


def random_object(rng: random.Random, cell: int, avoid: set = frozenset(), colors: list | None = None) -> dict:
    """A random object in `cell` (colour from `colors` if given) whose (colour, shape) is not in `avoid`."""
    while True:
        color, shape = rng.choice(colors or list(T.COLORS)), rng.choice(list(T.SHAPES))
        if (color, shape) not in avoid:
            return object_in_cell(rng, cell, color, shape, rng.choice(list(T.SIZES)))


def background(rng: random.Random) -> dict:
    """White (half the time), a light tint, or white with light pixel noise."""
    kind = rng.choice(["white", "white", "tint", "noise"])
    rgb = [rng.randint(232, 250) for _ in range(3)] if kind == "tint" else [255, 255, 255]
    return {"kind": kind, "rgb": rgb, "noise": rng.choice([3, 4, 5, 6]) if kind == "noise" else 0}


def sample_scene(rng: random.Random, n_min: int, n_max: int, colors: list | None = None) -> dict:
    cells = sorted(rng.sample(range(9), rng.randint(n_min, n_max)))
    return {"width": IMG, "height": IMG, "background": background(rng),
            "objects": [random_object(rng, c, colors=colors) for c in cells]}


def cell_index(obj: dict) -> int:
    return obj["cell"][0] * 3 + obj["cell"][1]


def scene_spec(rng: random.Random, scene: dict) -> dict:
    return {"kind": "scene", "scene": scene, "seed": rng.getrandbits(31)}


# ---------------------------------------------------------------------------------------------------------------------
# Samples. A draft sample holds render specs where the jsonl will hold paths; `build` swaps them.
# ---------------------------------------------------------------------------------------------------------------------
def make_sample(task: str, lang: str, prompt: str, reply: str, meta: dict, images=(), audios=(), videos=(),
                thinking: bool | None = None) -> dict:
    """One conversation; media markers come first, one line each, in the order the media lists hold them."""
    markers = ["<image>"] * len(images) + ["<video>"] * len(videos) + ["<audio>"] * len(audios)
    sample = {"id": None, "task": task, "lang": lang}
    if thinking is not None:
        sample["thinking"] = thinking
    sample.update({"conversations": [{"role": "user", "content": "\n".join(markers + ([prompt] if prompt else []))},
                                     {"role": "assistant", "content": reply}],
                   "images": list(images), "audios": list(audios), "videos": list(videos), "meta": meta})
    return sample


def word(lang: str, key: str, table: dict) -> str:
    """The word for a colour/shape key in `lang` ('red' / '红色')."""
    return key if lang == "en" else table[key][1]


def pick_target(rng, key: str):
    """A scene and one of its objects, named by its `key` ("shape"/"color") when that is unique in the scene
    (70%) or else by its grid cell -> (scene, target, named_by_key)."""
    while True:
        scene = sample_scene(rng, 1, 5)
        objs = scene["objects"]
        counts = Counter(o[key] for o in objs)
        by_key = rng.random() < 0.7
        pool = [o for o in objs if counts[o[key]] == 1] if by_key else objs
        if pool:
            return scene, rng.choice(pool), by_key


def ask_color(rng, lang):
    """'What color is the star?' (its shape unique) or 'What color is the shape in the center?'."""
    scene, target, by_shape = pick_target(rng, "shape")
    if by_shape:
        q, query = T.color_question(lang, rng, shape=target["shape"]), {"shape": target["shape"]}
    else:
        q, query = T.color_question(lang, rng, cell=cell_index(target)), {"position": target["position"]}
    return scene, q, T.answer(lang, word(lang, target["color"], T.COLORS)), {"query": query}


def ask_shape(rng, lang):
    """'What shape is the green object?' (its colour unique) or 'What shape is at the top left?'."""
    scene, target, by_color = pick_target(rng, "color")
    if by_color:
        q, query = T.shape_question(lang, rng, color=target["color"]), {"color": target["color"]}
    else:
        q, query = T.shape_question(lang, rng, cell=cell_index(target)), {"position": target["position"]}
    return scene, q, T.answer(lang, word(lang, target["shape"], T.SHAPES)), {"query": query}


def ask_count(rng, lang):
    """Count all shapes, one colour (sometimes an absent one: the answer 0 probes hallucination) or one shape."""
    few_colors = rng.sample(list(T.COLORS), rng.randint(1, 3)) if rng.random() < 0.5 else None  # counts above 1
    scene = sample_scene(rng, 1, 6, few_colors)
    q, ans, query = count_turn(rng, lang, scene["objects"])
    return scene, q, ans, {"query": query}


def count_turn(rng, lang: str, objs: list[dict]) -> tuple[str, str, dict]:
    """A count question on these objects -> (question, answer, query): of everything, of one colour (twice as
    often) or of one shape; 70% of the time a colour / shape the objects have, else any (the answer may be 0)."""
    mode = rng.choice(["all", "color", "color", "shape"])
    if mode == "all":
        return T.count_question(lang, rng), T.answer(lang, str(len(objs))), {}
    pool = list(T.COLORS) if mode == "color" else list(T.SHAPES)
    value = rng.choice([o[mode] for o in objs] if rng.random() < 0.7 else pool)
    return (T.count_question(lang, rng, **{mode: value}), T.answer(lang, str(sum(o[mode] == value for o in objs))),
            {mode: value})


def ask_position(rng, lang):
    """'Where is the blue triangle?' (that colour+shape unique) -> 'Top left.'."""
    while True:
        scene = sample_scene(rng, 1, 5)
        pairs = Counter((o["color"], o["shape"]) for o in scene["objects"])
        pool = [o for o in scene["objects"] if pairs[o["color"], o["shape"]] == 1]
        if pool:
            break
    t = rng.choice(pool)
    pos = T.POSITIONS[cell_index(t)]
    return (scene, T.position_question(lang, rng, t["color"], t["shape"]),
            T.answer(lang, pos[0] if lang == "en" else pos[2]), {"query": {"color": t["color"], "shape": t["shape"]}})


ASK = {"color": ask_color, "shape": ask_shape, "count": ask_count, "position": ask_position}


def unique_in(objs: list[dict], obj: dict, *keys: str) -> bool:
    """Whether no other object of the scene shares obj's values of `keys` (so a question can name it by them)."""
    return sum(all(o[k] == obj[k] for k in keys) for o in objs) == 1


def follow_up_questions(rng, lang: str, scene: dict, k: int, tasks=tuple(ASK)) -> list[tuple[str, str, int | None]]:
    """k more (question, answer, cell) turns about the SAME scene, each of a random one of `tasks`: one conversation
    then trains k lookups on one scene (text warm-up's --questions_per_scene, the probe's --questions); a count is
    drawn like the dataset's (count_turn). cell: the grid cell of the object asked about, None for a count (as
    toyworld_text.queried_cell for a dataset sample)."""
    objs, turns = scene["objects"], []
    while len(turns) < k:
        task, o = rng.choice(list(tasks)), rng.choice(objs)
        if task == "color":
            q = (T.color_question(lang, rng, shape=o["shape"]) if unique_in(objs, o, "shape")
                 else T.color_question(lang, rng, cell=cell_index(o)))
            turns.append((q, T.answer(lang, word(lang, o["color"], T.COLORS)), cell_index(o)))
        elif task == "shape":
            q = (T.shape_question(lang, rng, color=o["color"]) if unique_in(objs, o, "color")
                 else T.shape_question(lang, rng, cell=cell_index(o)))
            turns.append((q, T.answer(lang, word(lang, o["shape"], T.SHAPES)), cell_index(o)))
        elif task == "count":
            turns.append((*count_turn(rng, lang, objs)[:2], None))
        elif unique_in(objs, o, "color", "shape"):
            pos = T.POSITIONS[cell_index(o)]
            turns.append((T.position_question(lang, rng, o["color"], o["shape"]),
                          T.answer(lang, pos[0] if lang == "en" else pos[2]), cell_index(o)))
    return turns


def gen_scene_qa(task):
    def gen(rng, lang, i, test):
        scene, q, ans, extra = ASK[task](rng, lang)
        meta = {"scene": scene, "question": q, **extra, "answer": ans}
        return [make_sample(task, lang, q, ans, meta, images=[scene_spec(rng, scene)])]
    return gen


def gen_caption(rng, lang, i, test):
    scene = sample_scene(rng, 1, 6)
    ans = T.caption(lang, scene["objects"])
    return [make_sample("caption", lang, rng.choice(T.PROMPTS[lang]["caption"]), ans,
                        {"scene": scene, "answer": ans}, images=[scene_spec(rng, scene)])]


def pick_combo(rng, test: bool, make) -> tuple[list[str], bool]:
    """Draw a word combination; training never sees a held-out one, the test split does half the time."""
    want = test and rng.random() < 0.5
    while True:
        words = make()
        if T.held_out(" ".join(words)) == want:
            return words, want


def ocr_lines(rng, lang, layout: str, test: bool) -> tuple[list[str], bool]:
    """Lines to render: one word or number (square), a longer line (wide) or stacked words (tall)."""
    if layout == "square":
        if lang == "zh":
            return [rng.choice(T.ZH_WORDS)], False
        if rng.random() < 0.25:
            number = str(rng.randint(0, 9999)) if rng.random() < 0.7 else f"{rng.randint(0, 99)}.{rng.randint(0, 9)}"
            return [number], False
        w = rng.choice(T.WORDS)
        return [rng.choices([w, w.capitalize(), w.upper()], [6, 3, 1])[0]], False
    n = rng.randint(2, 4) if layout == "wide" else rng.randint(2, 3)
    if lang == "en" and layout == "wide" and rng.random() < 0.2:
        return [" ".join(str(rng.randint(10, 999)) for _ in range(n))], False
    words, unseen = pick_combo(rng, test, lambda: rng.sample(T.ZH_WORDS if lang == "zh" else T.WORDS, n))
    return ([SEP[lang].join(words)] if layout == "wide" else words), unseen


def text_extent(lines: list[str], font: str, size: int, angle: float) -> tuple[int, int]:
    """Width and height of the text block once rotated by `angle` degrees (used to fit the font size)."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox(
        (0, 0), "\n".join(lines), font=load_font(font, size), spacing=4, align="center")
    w, h, a = right - left, bottom - top, math.radians(angle)
    return (math.ceil(w * abs(math.cos(a)) + h * abs(math.sin(a))),
            math.ceil(w * abs(math.sin(a)) + h * abs(math.cos(a))))


def gen_ocr(rng, lang, i, test):
    """Rendered text -> the text verbatim. Every 4th sample is the any-resolution variant (wide or tall image)."""
    layout = rng.choice(["wide", "tall"]) if i % 4 == 3 else "square"
    width, height = {"square": (IMG, IMG), "wide": (3 * IMG, IMG), "tall": (IMG, 5 * IMG // 2)}[layout]
    lines, unseen = ocr_lines(rng, lang, layout, test)
    font = rng.choice(FONTS[lang])
    color = rng.choice(list(TEXT_COLORS))
    angle = round(rng.uniform(-8, 8), 1)
    size = rng.randint(16, 34)
    while size > 10:  # shrink until the rotated text fits with a 6 px margin
        w, h = text_extent(lines, font, size, angle)
        if w <= width - 12 and h <= height - 12:
            break
        size -= 1
    w, h = text_extent(lines, font, size, angle)
    offset = [rng.randint(-max(0, (width - 12 - w) // 2), max(0, (width - 12 - w) // 2)),
              rng.randint(-max(0, (height - 12 - h) // 2), max(0, (height - 12 - h) // 2))]
    text = SEP[lang].join(lines)
    spec = {"kind": "text", "lines": lines, "font": font, "font_size": size, "color": list(TEXT_COLORS[color]),
            "angle": angle, "width": width, "height": height, "background": background(rng), "offset": offset,
            "seed": rng.getrandbits(31)}
    meta = {"text": text, "lines": lines, "anyres": layout != "square", "layout": layout, "width": width,
            "height": height, "font": font, "font_size": size, "text_color": color, "angle": angle,
            "background": spec["background"], "unseen": unseen, "answer": text}
    return [make_sample("ocr", lang, rng.choice(T.PROMPTS[lang]["ocr"]), text, meta, images=[spec])]


def speech_spec(rng, lang: str, text: str, test: bool) -> dict:
    """espeak-ng settings for one utterance; Chinese is spoken from its pinyin."""
    return {"kind": "speech", "text": text if lang == "en" else T.to_pinyin(text), "voice": rng.choice(VOICES[lang]),
            "speed": rng.choice(SPEEDS[test]), "pitch": rng.choice(PITCHES[test])}


def asr_transcript(rng, lang: str, test: bool) -> tuple[str, bool]:
    """A word, a set phrase, or a two-word combination (some combinations are test-only)."""
    r = rng.random()
    if lang == "en":
        if r < 0.55:
            return rng.choice(T.WORDS) if r < 0.4 else rng.choice(T.PHRASES), False
        combos = [lambda: [rng.choice(T.ADJECTIVES + T.COLOR_WORDS), rng.choice(T.NOUNS)],  # "red apple"
                  lambda: [rng.choice(T.NUMBER_WORDS[2:13]), T.plural_noun(rng.choice(T.COUNTABLE))]]  # "three cats"
    else:
        if r < 0.45:
            return rng.choice(T.ZH_WORDS), False

        def counted():  # 三只猫: number + the noun's measure word + noun
            noun = rng.choice(list(T.ZH_MEASURE))
            return [rng.choice(T.ZH_NUMBERS) + T.ZH_MEASURE[noun], noun]
        combos = [lambda: [rng.choice(T.ZH_COLORS) + "的", rng.choice(T.ZH_THINGS)],  # 红色的苹果
                  lambda: [rng.choice(["大", "小"]), rng.choice(list(T.ZH_MEASURE))], counted]  # 大狗
    words, unseen = pick_combo(rng, test, rng.choice(combos))
    return SEP[lang].join(words), unseen


def gen_asr(rng, lang, i, test):
    text, unseen = asr_transcript(rng, lang, test)
    spec = speech_spec(rng, lang, text, test)
    meta = {"transcript": text, "spoken": spec["text"], "voice": spec["voice"], "speed": spec["speed"],
            "pitch": spec["pitch"], "sample_rate": SAMPLE_RATE, "unseen": unseen, "answer": text}
    return [make_sample("asr", lang, rng.choice(T.PROMPTS[lang]["asr"]), text, meta, audios=[spec])]


def gen_read_aloud(rng, lang, i, test):
    """A phrase to say back (`--speak` builds only): reading practice for the talker. The other tasks' spoken
    answers are a few hundred distinct texts, too few to learn how each word sounds; these are new word sequences
    over the whole ASR lexicon, never one holding a held-out two-word combination (those stay test-only)."""
    makers = [lambda: [rng.choice(T.ADJECTIVES + T.COLOR_WORDS), rng.choice(T.NOUNS)],
              lambda: [rng.choice(T.NUMBER_WORDS[2:]), T.plural_noun(rng.choice(T.COUNTABLE))],
              lambda: [rng.choice(T.ADJECTIVES), rng.choice(T.COLOR_WORDS), rng.choice(T.NOUNS)],
              lambda: [rng.choice(T.WORDS) for _ in range(rng.randint(2, 3))]]
    while True:
        words = rng.choice(makers)()
        if not any(T.held_out(" ".join(pair)) for pair in zip(words, words[1:])):
            break
    text = " ".join(words)
    return [make_sample("read_aloud", lang, rng.choice(T.PROMPTS[lang]["read_aloud"]).format(text),
                        T.answer(lang, text), {"text": text, "answer": T.answer(lang, text)})]


def gen_audio_qa(rng, lang, i, test):
    """A scene question asked aloud: the model must listen to know what to look for."""
    kind = list(ASK)[i % len(ASK)]
    scene, q, ans, extra = ASK[kind](rng, lang)
    spec = speech_spec(rng, lang, q, test)
    meta = {"scene": scene, "question_type": kind, "transcript": q, "spoken": spec["text"], "voice": spec["voice"],
            "speed": spec["speed"], "pitch": spec["pitch"], "sample_rate": SAMPLE_RATE, **extra, "answer": ans}
    return [make_sample("audio_qa", lang, "", ans, meta, images=[scene_spec(rng, scene)], audios=[spec])]


def gen_video(rng, lang, i, test):
    """Even i: one shape slides left/right/up/down past 0-2 still ones. Odd i: a new shape appears mid-clip."""
    n = rng.randint(4, 8)
    bg = {"kind": "speckle", "rgb": [255, 255, 255], "noise": 16}  # speckle keeps still frames distinct in the GIF
    if i % 2 == 0:
        direction = rng.choice(list(T.DIRECTIONS))
        color, shape, size = rng.choice(list(T.COLORS)), rng.choice(list(T.SHAPES)), rng.choice(list(T.SIZES))
        margin = math.ceil(1.2 * RADIUS[size]) + 2
        dist = rng.randint(36, min(64, IMG - 2 * margin))
        lo = rng.randint(margin, IMG - margin - dist)
        start, end = (lo, lo + dist) if direction in ("right", "down") else (lo + dist, lo)
        lane = rng.randrange(3)  # the row (or column) it travels along
        across = int(IMG / 3 * (lane + 0.5)) + rng.randint(-2, 2)
        horizontal = direction in ("left", "right")
        track = []
        for t in range(n):
            p = round(start + (end - start) * t / (n - 1))
            track.append(place(color, shape, size, *((p, across) if horizontal else (across, p))))
        free = [c for c in range(9) if (c // 3 if horizontal else c % 3) != lane]
        still = [random_object(rng, c, avoid={(color, shape)}) for c in sorted(rng.sample(free, rng.randint(0, 2)))]
        frames = [still + [m] for m in track]
        q = T.move_question(lang, rng, color, shape)
        ans = T.answer(lang, direction if lang == "en" else T.DIRECTIONS[direction])
        meta = {"kind": "move", "direction": direction, "object": track[0], "track": [m["box"] for m in track],
                "objects": still}
    else:
        cells = rng.sample(range(9), rng.randint(2, 4))
        still = [random_object(rng, c) for c in sorted(cells[1:])]
        new = random_object(rng, cells[0], avoid={(o["color"], o["shape"]) for o in still})
        k = rng.randint(1, n - 1)
        frames = [still if t < k else sorted(still + [new], key=cell_index) for t in range(n)]
        q = rng.choice(T.PROMPTS[lang]["appear"])
        ans = T.a_obj(lang, new["color"], new["shape"])
        meta = {"kind": "appear", "appear_frame": k, "object": new, "objects": still}
    meta.update({"question": q, "fps": FPS, "num_frames": n, "width": IMG, "height": IMG, "background": bg,
                 "answer": ans})
    spec = {"kind": "video", "frames": frames, "fps": FPS, "background": bg, "seed": rng.getrandbits(31)}
    return [make_sample("video", lang, q, ans, meta, videos=[spec])]


def gen_multi_image(rng, lang, i, test):
    """Two scenes, one difference (cycling colour change / added / removed); the changed object is unambiguous."""
    change = ["color", "added", "removed"][i % 3]
    new_color = None
    while True:
        scene = sample_scene(rng, 2 if change == "removed" else 1, 5)
        objs = scene["objects"]
        pairs = Counter((o["color"], o["shape"]) for o in objs)
        if change == "added":
            free = [c for c in range(9) if c not in {cell_index(o) for o in objs}]
            target = random_object(rng, rng.choice(free), avoid=set(pairs))
            after = sorted(objs + [target], key=cell_index)
            break
        unique = [o for o in objs if pairs[o["color"], o["shape"]] == 1]
        if unique:
            target = rng.choice(unique)
            if change == "removed":
                after = [o for o in objs if o is not target]
            else:
                new_color = rng.choice([c for c in T.COLORS if (c, target["shape"]) not in pairs])
                after = [dict(o, color=new_color) if o is target else o for o in objs]
            break
    second = dict(scene, objects=after)
    seed = rng.getrandbits(31)  # same background noise in both: the one object is the only difference
    q = rng.choice(T.PROMPTS[lang]["multi_image"])
    ans = T.difference_answer(lang, change, target["color"], target["shape"], new_color)
    meta = {"scenes": [scene, second], "change": change, "object": target, "new_color": new_color, "question": q,
            "answer": ans}
    specs = [{"kind": "scene", "scene": scene, "seed": seed}, {"kind": "scene", "scene": second, "seed": seed}]
    return [make_sample("multi_image", lang, q, ans, meta, images=specs)]


def gen_think(rng, lang, i, test):
    """A two-step question, written once with its reasoning in <think> and once answer-only (same image)."""
    kind = ["more", "not", "or", "neighbor"][i % 4]
    while True:
        scene = sample_scene(rng, 3, 6)
        objs = scene["objects"]
        colors = Counter(o["color"] for o in objs)
        if kind == "more":
            c1 = rng.choice(sorted(colors))
            fewer = [c for c in T.COLORS if colors[c] < colors[c1]]
            present = [c for c in fewer if colors[c]]  # prefer a colour that is there (answer not just n1)
            if fewer:
                c2 = rng.choice(present if present and rng.random() < 0.7 else fewer)
                q, chain, ans = T.think_more(lang, c1, colors[c1], c2, colors[c2])
                break
        elif kind == "not":
            c = rng.choice([o["color"] for o in objs])
            q, chain, ans = T.think_not(lang, c, len(objs), colors[c])
            break
        elif kind == "or":
            c1, c2 = rng.sample(list(T.COLORS), 2)
            if colors[c1] + colors[c2]:
                q, chain, ans = T.think_or(lang, c1, colors[c1], c2, colors[c2])
                break
        else:
            shapes = Counter(o["shape"] for o in objs)
            at = {tuple(o["cell"]): o for o in objs}
            options = [(o, step) for o in objs if shapes[o["shape"]] == 1 for step in T.NEIGHBORS
                       if (o["cell"][0] + step[0], o["cell"][1] + step[1]) in at]
            if options:
                anchor, step = rng.choice(options)
                other = at[anchor["cell"][0] + step[0], anchor["cell"][1] + step[1]]
                q, chain, ans = T.think_neighbor(lang, step, anchor, other)
                break
    spec = scene_spec(rng, scene)
    meta = {"scene": scene, "question": q, "kind": kind, "reasoning": chain, "answer": ans}
    return [make_sample("think", lang, q, f"<think>\n{chain}\n</think>\n\n{ans}", meta, images=[spec], thinking=True),
            make_sample("think", lang, q, ans, dict(meta), images=[spec], thinking=False)]


GENERATORS = {"caption": gen_caption, **{t: gen_scene_qa(t) for t in ASK}, "ocr": gen_ocr, "asr": gen_asr,
              "audio_qa": gen_audio_qa, "video": gen_video, "multi_image": gen_multi_image, "think": gen_think,
              "read_aloud": gen_read_aloud}


def signatures(sample: dict) -> list[str]:
    """What 'the same example' means for the held-out check: a scene is its set of (cell, colour, shape, size)
    whatever the task; a rendering is its text with font or voice settings."""
    m = sample["meta"]

    def objects(objs):
        return sorted([cell_index(o), o["color"], o["shape"], o["size"]] for o in objs)

    if sample["task"] == "ocr":
        return ["ocr:" + json.dumps([m["text"], m["font"], m["font_size"], m["angle"], m["layout"]],
                                    ensure_ascii=False)]
    if sample["task"] == "asr":
        return ["asr:" + json.dumps([m["transcript"], m["voice"], m["speed"], m["pitch"]], ensure_ascii=False)]
    if sample["task"] == "read_aloud":
        return ["read_aloud:" + m["text"]]
    if sample["task"] == "video":
        return ["video:" + json.dumps([m["kind"], objects(m["objects"]), objects([m["object"]]), m.get("direction")])]
    scenes = m["scenes"] if "scenes" in m else [m["scene"]]
    return ["scene:" + json.dumps(objects(s["objects"])) for s in scenes]


def generate(task: str, lang: str, n: int, rng: random.Random, test: bool, exclude: set) -> list[dict]:
    """n draws of a task (a draw is 1 sample, 2 for think); a draw that repeats a training scene is redrawn."""
    out = []
    for i in range(n):
        while True:
            drafts = GENERATORS[task](rng, lang, i, test)
            if not any(sig in exclude for sig in signatures(drafts[0])):
                break
        out += drafts
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Rendering: spec -> file. Runs in worker processes; everything random comes from the spec's seed.
# ---------------------------------------------------------------------------------------------------------------------
def add_noise(img: Image.Image, bg: dict, rng: np.random.Generator) -> Image.Image:
    """'noise': light Gaussian pixel noise; 'speckle': sparse light-grey dots."""
    if bg["kind"] not in ("noise", "speckle"):
        return img
    arr = np.asarray(img, dtype=np.int16).copy()  # [H, W, 3]
    if bg["kind"] == "noise":
        arr += np.round(rng.normal(0, bg["noise"], arr.shape)).astype(np.int16)
    else:
        dots = rng.random(arr.shape[:2]) < 0.06  # [H, W]
        arr[dots] -= rng.integers(4, bg["noise"], int(dots.sum()), dtype=np.int16)[:, None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_objects(objects: list[dict], width: int, height: int, bg: dict, rng: np.random.Generator) -> Image.Image:
    big = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), tuple(bg["rgb"]))
    draw = ImageDraw.Draw(big)
    for o in objects:
        pts = shape_points(o["shape"], *o["center"], RADIUS[o["size"]])
        draw.polygon([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in pts], fill=T.COLORS[o["color"]][0])
    return add_noise(big.resize((width, height), Image.Resampling.BOX), bg, rng)


def render_text(spec: dict, rng: np.random.Generator) -> Image.Image:
    """Text drawn on a mask, rotated, then pasted in its colour (so rotation never leaves a box behind)."""
    font = load_font(spec["font"], spec["font_size"])
    text = "\n".join(spec["lines"])
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox(
        (0, 0), text, font=font, spacing=4, align="center")
    mask = Image.new("L", (math.ceil(right - left) + 8, math.ceil(bottom - top) + 8), 0)
    ImageDraw.Draw(mask).multiline_text((4 - left, 4 - top), text, font=font, fill=255, spacing=4, align="center")
    mask = mask.rotate(spec["angle"], resample=Image.Resampling.BICUBIC, expand=True)
    canvas = Image.new("RGB", (spec["width"], spec["height"]), tuple(spec["background"]["rgb"]))
    x = (spec["width"] - mask.width) // 2 + spec["offset"][0]
    y = (spec["height"] - mask.height) // 2 + spec["offset"][1]
    canvas.paste(Image.new("RGB", mask.size, tuple(spec["color"])), (x, y), mask)
    return add_noise(canvas, spec["background"], rng)


def char_columns(spec: dict, n_columns: int) -> list[int | None]:
    """Per character of a one-line text spec, the column (of n_columns equal ones across the image) that
    render_text puts its centre in, None outside the image: where to read each character (the vision warm-up's
    reading target). The same geometry as render_text: the centre of the character's advance in the unrotated
    mask, turned about the mask's centre by the spec's angle."""
    if len(spec["lines"]) != 1:
        raise ValueError(f"char_columns reads one line of text, got {len(spec['lines'])}")
    font, text = load_font(spec["font"], spec["font_size"]), spec["lines"][0]
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox(
        (0, 0), text, font=font, spacing=4, align="center")
    width, height = math.ceil(right - left) + 8, math.ceil(bottom - top) + 8
    angle = math.radians(spec["angle"])
    rotated = math.ceil(width * abs(math.cos(angle)) + height * abs(math.sin(angle)))  # PIL's expand=True width
    centre = (spec["width"] - rotated) // 2 + spec["offset"][0] + rotated / 2
    out = []
    for i in range(len(text)):
        x = (font.getlength(text[:i]) + font.getlength(text[:i + 1])) / 2 + 4 - left
        column = int((centre + (x - width / 2) * math.cos(angle)) // (spec["width"] / n_columns))
        out.append(column if 0 <= column < n_columns else None)
    return out


@cache
def resampler(orig_rate: int):
    """torchaudio's windowed-sinc resampler with its kernel built once per process (building it costs more than
    applying it)."""
    import torchaudio

    return torchaudio.transforms.Resample(orig_rate, SAMPLE_RATE)


def synth_speech(spec: dict, path: str) -> None:
    """espeak-ng (22.05 kHz) -> 16 kHz mono, silence trimmed (speech_bounds), peak 0.9, 16-bit wav."""
    import soundfile as sf
    import torch

    cmd = ["espeak-ng", "-v", spec["voice"], "-s", str(spec["speed"]), "-p", str(spec["pitch"]), "--stdout",
           spec["text"]]
    wav, sr = sf.read(io.BytesIO(subprocess.run(cmd, capture_output=True, check=True).stdout), dtype="float32")
    with torch.no_grad():
        wav = resampler(sr)(torch.from_numpy(wav)).numpy()  # [S]
    start, end = speech_bounds(wav)
    wav = wav[start:end]
    sf.write(path, 0.9 * wav / np.abs(wav).max(), SAMPLE_RATE, subtype="PCM_16")


def speech_bounds(wav: np.ndarray) -> tuple[int, int]:
    """[S] at 16 kHz -> (start, end) of the kept part: 50 ms before the first loud sample to 100 ms after the last."""
    loud = np.flatnonzero(np.abs(wav) > 0.02 * np.abs(wav).max())
    return max(0, loud[0] - SAMPLE_RATE // 20), loud[-1] + SAMPLE_RATE // 10


@cache
def gif_palette() -> Image.Image:
    """A fixed palette (greys + each colour blended with white) so every GIF frame quantizes the same way."""
    colors = [(g, g, g) for g in range(0, 256, 8)] + [(255, 255, 255)]
    colors += [tuple(round(255 + (c - 255) * k / 8) for c in rgb) for rgb, _ in T.COLORS.values() for k in range(1, 9)]
    pal = Image.new("P", (1, 1))
    pal.putpalette([v for c in colors for v in c] + [0] * 3 * (256 - len(colors)))
    return pal


def render_video(spec: dict, path: str) -> None:
    frames = [draw_objects(objs, IMG, IMG, spec["background"], np.random.default_rng([spec["seed"], t]))
              .quantize(palette=gif_palette(), dither=Image.Dither.NONE) for t, objs in enumerate(spec["frames"])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000 // spec["fps"], loop=0)
    with Image.open(path) as gif:  # Pillow merges identical consecutive frames: make sure none were
        if gif.n_frames != len(frames):
            raise RuntimeError(f"{path}: wrote {len(frames)} frames, GIF holds {gif.n_frames}")


def render(job: tuple[str, dict]) -> None:
    path, spec = job
    rng = np.random.default_rng(spec.get("seed", 0))
    if spec["kind"] == "scene":
        s = spec["scene"]
        draw_objects(s["objects"], s["width"], s["height"], s["background"], rng).save(path, compress_level=1)
    elif spec["kind"] == "text":
        render_text(spec, rng).save(path, compress_level=1)
    elif spec["kind"] == "speech":
        synth_speech(spec, path)
    else:
        render_video(spec, path)


def _init_worker() -> None:
    """One thread per worker: torch's thread pool spinning on a 0.1 s clip costs 4x the work itself."""
    import torch

    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------------------
def assign_paths(samples: list[dict], split: str) -> dict[str, dict]:
    """Give samples their ids and media paths; returns the render jobs {path: spec}.

    Images and clips are named after the sample (img/sft-000123.png); speech after its settings
    (wav/tts-<hash>.wav), so identical espeak requests (a spoken question asked twice) are synthesised once.
    """
    jobs = {}
    for k, s in enumerate(samples):
        s["id"] = f"{split}-{k:06d}"
        for key, folder, ext in (("images", "img", "png"), ("videos", "video", "gif"), ("audios", "wav", "wav")):
            for j, spec in enumerate(s[key]):
                if "path" not in spec:  # a spec shared by two samples (think pairs) keeps its first path
                    if key == "audios":
                        h = hashlib.sha1(json.dumps([spec[f] for f in ("text", "voice", "speed", "pitch")]).encode())
                        spec["path"] = f"wav/tts-{h.hexdigest()[:16]}.wav"
                    else:
                        spec["path"] = f"{folder}/{s['id']}{f'-{j + 1}' if len(s[key]) > 1 else ''}.{ext}"
                jobs[spec["path"]] = spec
            s[key] = [spec["path"] for spec in s[key]]
    return jobs


def build(out: str, seed: int = 0, size: str = "full", langs=("en",), workers: int | None = None,
          speak: bool = False, read_aloud: int | None = None, speech_codec: str = "phonetic") -> dict:
    """Build ToyWorld into `out`; returns {split: Counter((task, lang))}.
    speak: spoken answers + the speech codec (dataset/speech_targets.py); read_aloud: how many phrases to say back
    (default READ_ALOUD[size]); the first ones are the same for every count. speech_codec: "phonetic" (its first
    codebook from espeak-ng's phoneme timings) or "kmeans" (every codebook k-means over log-mel)."""
    t0 = time.time()
    langs = [lang for lang in (langs.split(",") if isinstance(langs, str) else langs) if lang]
    if not set(langs) <= {"en", "zh"} or size not in COUNTS:
        raise ValueError(f"langs must be a subset of en,zh (got {langs}); size one of {list(COUNTS)} (got {size})")
    check_tools(langs)
    phrases = READ_ALOUD[size] if read_aloud is None else read_aloud
    if speak:
        from dataset import speech_targets
    samples, jobs, train_signatures = {}, {}, set()
    for split in SPLITS:
        test = split == "test"
        stream = seed + TEST_SEED_OFFSET if test else seed
        samples[split] = []
        for task, n in COUNTS[size][split].items():
            for lang in langs:
                rng = random.Random(f"toyworld/{stream}/{split}/{task}/{lang}")
                samples[split] += generate(task, lang, n, rng, test, train_signatures if test else set())
        if speak and split == "sft":  # the talker's reading practice (English: the assistant voices are English)
            rng = random.Random(f"toyworld/{stream}/{split}/read_aloud/en")
            samples[split] += generate("read_aloud", "en", phrases, rng, False, set())
        if not test:
            train_signatures |= {sig for s in samples[split] for sig in signatures(s)}
        jobs.update(assign_paths(samples[split], split))
        if speak:
            jobs.update(speech_targets.add_speech_targets(samples[split]))
        if not test:  # training files in random order; the test file stays grouped by task
            random.Random(f"toyworld/{seed}/{split}/order").shuffle(samples[split])

    for folder in ("img", "wav", "video"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    todo = [(os.path.join(out, path), spec) for path, spec in sorted(jobs.items())]
    workers = workers or os.cpu_count() or 1
    if workers == 1:  # in this process: for tests and debugging
        for job in todo:
            render(job)
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            for _ in pool.imap_unordered(render, todo, chunksize=8):
                pass
    if speak:
        speech_targets.fit_codec(out, samples["sft"], phonetic=speech_codec == "phonetic")

    paths = []
    for split in SPLITS:
        paths.append(os.path.join(out, f"{split}.jsonl"))
        with open(paths[-1], "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples[split])
    from dataset.tokenizer import train_tokenizer
    train_tokenizer(paths, os.path.join(out, "tokenizer"))

    stats = {split: Counter((s["task"], s["lang"]) for s in samples[split]) for split in SPLITS}
    print_stats(stats, langs)
    print(f"built {len(jobs)} media files in {time.time() - t0:.1f} s with {workers} worker(s) -> {out}")
    return stats


def print_stats(stats: dict, langs: list[str]) -> None:
    columns = [(split, lang) for split in SPLITS for lang in langs]
    print(f"{'task':<12}" + "".join(f"{split + ('/' + lang if len(langs) > 1 else ''):>14}" for split, lang in columns))
    for task in TASKS + sorted({task for split in stats for task, _ in stats[split]} - set(TASKS)):
        print(f"{task:<12}" + "".join(f"{stats[split][task, lang]:>14}" for split, lang in columns))
    print(f"{'total':<12}" + "".join(f"{sum(n for (_, lg), n in stats[split].items() if lg == lang):>14}"
                                     for split, lang in columns))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=list(COUNTS), default="full")
    p.add_argument("--langs", default="en", help="comma-separated: en, zh")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    p.add_argument("--speak", action="store_true", help="spoken answers + the speech codec (dataset/speech_targets.py)")
    p.add_argument("--read_aloud", type=int, default=None,
                   help=f"--speak: phrases to say back in the sft split (default {READ_ALOUD['full']} for --size full)")
    p.add_argument("--speech_codec", choices=["phonetic", "kmeans"], default="phonetic",
                   help="--speak: the codec's first codebook from espeak-ng's phoneme timings, or k-means like the rest")
    args = p.parse_args()
    if args.read_aloud is not None and (args.read_aloud < 0 or not args.speak):
        p.error("--read_aloud takes a count >= 0 and goes with --speak")
    try:
        build(args.out, args.seed, args.size, args.langs, args.workers, args.speak, args.read_aloud,
              args.speech_codec)
    except MissingDependency as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
