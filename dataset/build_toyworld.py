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
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dataset import toyworld_text as T

# ---------------------------------------------------------------------------------------------------------------------
# Sizes: samples per split and task, for each language. Tune these. ("think": questions; each question is written twice,
# with and without the <think> chain, so it yields 2 samples.) "full" builds in about a minute on 2 cores.
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


@lru_cache(maxsize=None)
def find_font(name: str) -> str:
    for root in FONT_DIRS:
        for dirpath, _, files in os.walk(root):
            if name in files:
                return os.path.join(dirpath, name)
    raise MissingDependency(f"font {name} not found under {', '.join(FONT_DIRS)}: {INSTALL_HINT}")


@lru_cache(maxsize=None)
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
        return [(cx, cy - 0.75 * R), (cx + R * math.sqrt(3) / 2, cy + 0.75 * R), (cx - R * math.sqrt(3) / 2, cy + 0.75 * R)]
    pts = [((1.2 if k % 2 == 0 else 0.5) * r, -math.pi / 2 + k * math.pi / 5) for k in range(10)]  # star
    pts = [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in pts]
    dy = (min(y for _, y in pts) + max(y for _, y in pts)) / 2 - cy
    return [(x, y - dy) for x, y in pts]


def place(color: str, shape: str, size: str, cx: int, cy: int, width: int = IMG, height: int = IMG) -> dict:
    """An object record: attributes, grid cell and pixel box (the ground truth a caption must match)."""
    pts = shape_points(shape, cx, cy, RADIUS[size])
    row, col = min(2, cy * 3 // height), min(2, cx * 3 // width)
    box = [math.floor(min(x for x, _ in pts)), math.floor(min(y for _, y in pts)),
           math.ceil(max(x for x, _ in pts)), math.ceil(max(y for _, y in pts))]
    return {"color": color, "shape": shape, "size": size, "cell": [row, col], "position": T.POSITIONS[row * 3 + col][0],
            "center": [cx, cy], "box": box}


def object_in_cell(rng: random.Random, cell: int, color: str, shape: str, size: str) -> dict:
    """Place an object in a grid cell, jittered as far as the cell allows."""
    step = IMG / 3
    slack = max(0, int(step / 2 - 1.2 * RADIUS[size] - 1))
    cx = int(step * (cell % 3 + 0.5)) + rng.randint(-slack, slack)
    cy = int(step * (cell // 3 + 0.5)) + rng.randint(-slack, slack)
    return place(color, shape, size, cx, cy)


def random_object(rng: random.Random, cell: int, avoid: set = frozenset()) -> dict:
    """A random object in `cell` whose (colour, shape) is not in `avoid`."""
    while True:
        color, shape = rng.choice(list(T.COLORS)), rng.choice(list(T.SHAPES))
        if (color, shape) not in avoid:
            return object_in_cell(rng, cell, color, shape, rng.choice(list(T.SIZES)))


def background(rng: random.Random) -> dict:
    """White (half the time), a light tint, or white with light pixel noise."""
    kind = rng.choice(["white", "white", "tint", "noise"])
    rgb = [rng.randint(232, 250) for _ in range(3)] if kind == "tint" else [255, 255, 255]
    return {"kind": kind, "rgb": rgb, "noise": rng.choice([3, 4, 5, 6]) if kind == "noise" else 0}


def sample_scene(rng: random.Random, n_min: int, n_max: int) -> dict:
    cells = sorted(rng.sample(range(9), rng.randint(n_min, n_max)))
    return {"width": IMG, "height": IMG, "background": background(rng),
            "objects": [random_object(rng, c) for c in cells]}


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


def name(lang: str, key: str, table: dict) -> str:
    """The word for a colour/shape key in `lang` ('red' / '红色')."""
    return key if lang == "en" else table[key][1]


def ask_color(rng, lang):
    """'What color is the star?' (its shape unique) or 'What color is the shape in the center?'."""
    while True:
        scene = sample_scene(rng, 1, 5)
        objs = scene["objects"]
        shapes = Counter(o["shape"] for o in objs)
        by_shape = rng.random() < 0.7
        pool = [o for o in objs if shapes[o["shape"]] == 1] if by_shape else objs
        if pool:
            break
    target = rng.choice(pool)
    if by_shape:
        q, query = T.color_question(lang, rng, shape=target["shape"]), {"shape": target["shape"]}
    else:
        q, query = T.color_question(lang, rng, cell=cell_index(target)), {"position": target["position"]}
    return scene, q, T.answer(lang, name(lang, target["color"], T.COLORS)), {"query": query}


def ask_shape(rng, lang):
    """'What shape is the green object?' (its colour unique) or 'What shape is at the top left?'."""
    while True:
        scene = sample_scene(rng, 1, 5)
        objs = scene["objects"]
        colors = Counter(o["color"] for o in objs)
        by_color = rng.random() < 0.7
        pool = [o for o in objs if colors[o["color"]] == 1] if by_color else objs
        if pool:
            break
    target = rng.choice(pool)
    if by_color:
        q, query = T.shape_question(lang, rng, color=target["color"]), {"color": target["color"]}
    else:
        q, query = T.shape_question(lang, rng, cell=cell_index(target)), {"position": target["position"]}
    return scene, q, T.answer(lang, name(lang, target["shape"], T.SHAPES)), {"query": query}


def ask_count(rng, lang):
    """Count all shapes, one colour (sometimes an absent one: the answer 0 probes hallucination) or one shape."""
    scene = sample_scene(rng, 1, 6)
    objs = scene["objects"]
    mode = rng.choice(["all", "color", "color", "shape"])
    if mode == "all":
        q, query, n = T.count_question(lang, rng), {}, len(objs)
    elif mode == "color":
        color = rng.choice([o["color"] for o in objs] if rng.random() < 0.7 else list(T.COLORS))
        q, query, n = T.count_question(lang, rng, color=color), {"color": color}, sum(o["color"] == color for o in objs)
    else:
        shape = rng.choice([o["shape"] for o in objs] if rng.random() < 0.7 else list(T.SHAPES))
        q, query, n = T.count_question(lang, rng, shape=shape), {"shape": shape}, sum(o["shape"] == shape for o in objs)
    return scene, q, T.answer(lang, str(n)), {"query": query}


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
            return [str(rng.randint(0, 9999)) if rng.random() < 0.7 else f"{rng.randint(0, 99)}.{rng.randint(0, 9)}"], False
        word = rng.choice(T.WORDS)
        return [rng.choices([word, word.capitalize(), word.upper()], [6, 3, 1])[0]], False
    n = rng.randint(2, 4) if layout == "wide" else rng.randint(2, 3)
    if lang == "en" and layout == "wide" and rng.random() < 0.2:
        return [" ".join(str(rng.randint(10, 999)) for _ in range(n))], False
    words, unseen = pick_combo(rng, test, lambda: rng.sample(T.ZH_WORDS if lang == "zh" else T.WORDS, n))
    return ([SEP[lang].join(words)] if layout == "wide" else words), unseen


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
