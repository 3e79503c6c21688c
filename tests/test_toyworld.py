"""ToyWorld builder: determinism, a truly held-out test split, well-formed samples and media, clear setup errors,
and the Chinese variant. Every build here is --size small (a few seconds)."""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from dataset import build_toyworld as B
from dataset import toyworld_text as T

MARKERS = {"images": "<image>", "audios": "<audio>", "videos": "<video>"}
CJK = re.compile(r"[\u4e00-\u9fff]")


def read(out, split):
    with open(os.path.join(out, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def media_files(out):
    return sorted(os.path.relpath(os.path.join(d, f), out) for folder in ("img", "wav", "video")
                  for d, _, files in os.walk(os.path.join(out, folder)) for f in files)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toyworld"))
    B.build(out, seed=0, size="small", langs="en", workers=1)
    return out


def test_same_seed_is_byte_identical_whatever_the_worker_count(world, tmp_path):
    B.build(str(tmp_path), seed=0, size="small", langs="en", workers=2)
    for split in B.SPLITS:
        with open(os.path.join(world, f"{split}.jsonl"), "rb") as a, open(tmp_path / f"{split}.jsonl", "rb") as b:
            assert a.read() == b.read(), split
    assert media_files(world) == media_files(str(tmp_path))
    for rel in media_files(world):
        with open(os.path.join(world, rel), "rb") as a, open(tmp_path / rel, "rb") as b:
            assert a.read() == b.read(), rel


def test_different_seed_differs(world, tmp_path):
    B.build(str(tmp_path), seed=1, size="small", langs="en", workers=1)
    for split in B.SPLITS:
        assert read(world, split) != read(str(tmp_path), split), split


def test_samples_are_well_formed(world):
    for split in B.SPLITS:
        samples = read(world, split)
        assert len({s["id"] for s in samples}) == len(samples)
        for s in samples:
            assert s["id"].startswith(split + "-")
            user, reply = s["conversations"]
            assert user["role"] == "user" and reply["role"] == "assistant" and reply["content"]
            for key, marker in MARKERS.items():
                assert user["content"].count(marker) == len(s[key]), (s["id"], key)
                for path in s[key]:
                    assert os.path.isfile(os.path.join(world, path)), path
            assert s["meta"]["answer"] in reply["content"]
        tasks = {s["task"] for s in samples}
        assert tasks == ({"caption", "ocr", "asr"} if split == "pretrain" else set(B.TASKS)), split


def test_answers_match_ground_truth(world):
    for s in read(world, "sft") + read(world, "test"):
        m, reply = s["meta"], s["conversations"][1]["content"]
        if s["task"] == "caption":
            assert reply.count(", ") + 1 == len(m["scene"]["objects"])
        if s["task"] == "count" and not m["query"]:
            assert reply == f"{len(m['scene']['objects'])}."
        if s["task"] in ("ocr", "asr"):
            assert reply == m.get("text", m.get("transcript"))
        if s["task"] == "position":
            target = [o for o in m["scene"]["objects"] if (o["color"], o["shape"]) ==
                      (m["query"]["color"], m["query"]["shape"])]
            assert len(target) == 1 and reply == target[0]["position"].capitalize() + "."
        if s["task"] == "audio_qa":
            assert s["conversations"][0]["content"] == "<image>\n<audio>" and m["transcript"]


def test_queried_cells_hold_the_answer(world):
    """The lookup loss's targets: a colour / shape / position question (typed or spoken) names the one cell whose
    words (cell_texts, what its slot stands for) contain the answer; other questions name none."""
    checked = 0
    for s in read(world, "sft") + read(world, "test"):
        cell, kind = T.queried_cell(s), s["meta"].get("question_type", s["task"])
        if kind not in ("color", "shape", "position") or s["task"] not in ("color", "shape", "position", "audio_qa"):
            assert cell is None and (T.queried_slots(s, 4) == [None] or s["task"] == "video")
            continue
        answer = s["conversations"][-1]["content"].rstrip(".").lower()
        words = T.cell_texts("en", s["meta"]["scene"]["objects"])[cell]
        where, what = " ".join(words.split()[:-3]), words.split()[-3:]   # 'top left', [colour, shape, size]
        assert where == answer if kind == "position" else answer in what
        assert T.queried_slots(s, 4) == [((0, cell), (0, cell))]
        checked += 1
    assert checked >= 12


def test_clip_frames_and_their_lookups(world):
    """A clip reads frame by frame (frame_slots, of the frames media.read_video samples): the mover's cell steps the
    way the answer says from the first frame to the last (where the lookup loss points; in rare clips it stays in
    one cell), the object that appears is missing from the first frame and in the last, where its lookup points."""
    step = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    clips, moved = [s for s in read(world, "sft") + read(world, "test") if s["task"] == "video"], 0
    for s in clips:
        m, frames = s["meta"], T.frame_slots(s, 4)
        assert len(frames) == min(4, m["num_frames"]) and all(len(f) == 9 for f in frames)
        (first, a), (last, b) = T.queried_slots(s, 4)[0]
        assert last == -1
        if m["kind"] == "move":
            obj = f"{m['object']['color']} {m['object']['shape']}"
            assert obj in frames[0][a] and obj in frames[-1][b] and first == 0
            dr, dc = b // 3 - a // 3, b % 3 - a % 3
            assert (dr, dc) == (0, 0) or (dr and dr // abs(dr), dc and dc // abs(dc)) == step[m["direction"]]
            moved += (dr, dc) != (0, 0)
        else:
            new = f"{m['object']['color']} {m['object']['shape']}"
            assert a == b and new in frames[-1][b] and new not in " ".join(frames[0])
    assert {s["meta"]["kind"] for s in clips} == {"move", "appear"} and moved


def test_think_pairs_share_question_and_answer(world):
    think = [s for s in read(world, "sft") if s["task"] == "think"]
    by_question = {}
    for s in think:
        by_question.setdefault((s["conversations"][0]["content"], s["images"][0]), []).append(s)
    assert all(sorted(x["thinking"] for x in pair) == [False, True] for pair in by_question.values())
    for s in think:
        reply = s["conversations"][1]["content"]
        if s["thinking"]:
            assert reply.startswith("<think>\n") and reply.endswith("\n</think>\n\n" + s["meta"]["answer"])
        else:
            assert reply == s["meta"]["answer"]


def test_test_split_is_held_out(world):
    train = read(world, "pretrain") + read(world, "sft")
    test = read(world, "test")
    assert not {s["id"] for s in train} & {s["id"] for s in test}
    train_sigs = {sig for s in train for sig in B.signatures(s)}
    assert not train_sigs & {sig for s in test for sig in B.signatures(s)}
    for s in train:  # training never hears a test speed/pitch nor sees a held-out word combination
        if "speed" in s["meta"]:
            assert s["meta"]["speed"] in B.SPEEDS[False] and s["meta"]["pitch"] in B.PITCHES[False]
        assert not s["meta"].get("unseen")
    for s in test:
        if "speed" in s["meta"]:
            assert s["meta"]["speed"] in B.SPEEDS[True] and s["meta"]["pitch"] in B.PITCHES[True]


def test_media_formats(world):
    samples = read(world, "sft") + read(world, "test")
    for s in samples:
        for path in s["audios"]:
            info = sf.info(os.path.join(world, path))
            assert (info.samplerate, info.channels) == (16000, 1)
            wav, _ = sf.read(os.path.join(world, path), dtype="float32")
            assert np.sqrt(np.mean(wav ** 2)) > 0.02 and 0.2 < len(wav) / 16000 < 10
        for path in s["videos"]:
            with Image.open(os.path.join(world, path)) as gif:
                assert gif.size == (B.IMG, B.IMG)
                assert gif.n_frames == s["meta"]["num_frames"]
                assert 4 <= gif.n_frames <= 8 and gif.info["duration"] == 1000 // s["meta"]["fps"]
        for path in s["images"]:
            with Image.open(os.path.join(world, path)) as im:
                size = (s["meta"]["width"], s["meta"]["height"]) if s["task"] == "ocr" else (B.IMG, B.IMG)
                assert im.size == size and im.mode == "RGB"
    ocr = [s["meta"] for s in samples if s["task"] == "ocr"]
    assert {m["layout"] for m in ocr} >= {"square"} and any(m["anyres"] for m in ocr)
    assert {s["meta"]["kind"] for s in samples if s["task"] == "video"} == {"move", "appear"}
    assert {s["meta"]["change"] for s in samples if s["task"] == "multi_image"} == {"color", "added", "removed"}


def test_missing_espeak_names_the_apt_package(monkeypatch, tmp_path):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "espeak-ng" else which(cmd, *a, **k))
    with pytest.raises(B.MissingDependency, match="apt-get install espeak-ng"):
        B.build(str(tmp_path), size="small")
    assert not os.listdir(tmp_path)  # failed before writing anything


def test_missing_font_names_the_apt_package():
    with pytest.raises(B.MissingDependency, match="fonts-dejavu-core fonts-wqy-microhei"):
        B.find_font("NoSuchFont.ttf")


def test_cli_without_espeak_exits_with_the_fix(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no espeak-ng on PATH
    r = subprocess.run([sys.executable, "-m", "dataset.build_toyworld", "--out", str(tmp_path / "tw"), "--size",
                        "small"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "apt-get install espeak-ng" in r.stderr and "Traceback" not in r.stderr


def test_every_spoken_chinese_template_has_pinyin():
    rng = random.Random(0)
    questions = [T.count_question("zh", rng), *(T.count_question("zh", rng, color=c) for c in T.COLORS),
                 *(T.count_question("zh", rng, shape=s) for s in T.SHAPES),
                 *(T.color_question("zh", rng, shape=s) for s in T.SHAPES),
                 *(T.color_question("zh", rng, cell=c) for c in range(9)),
                 *(T.shape_question("zh", rng, color=c) for c in T.COLORS),
                 *(T.shape_question("zh", rng, cell=c) for c in range(9)),
                 *(T.position_question("zh", rng, c, s) for c in T.COLORS for s in T.SHAPES)]
    words = T.ZH_WORDS + [n + T.ZH_MEASURE[w] + w for n in T.ZH_NUMBERS for w in T.ZH_MEASURE]
    words += [c + "的" + w for c in T.ZH_COLORS for w in T.ZH_THINGS] + ["大" + w for w in T.ZH_MEASURE]
    for text in questions + words:
        assert re.fullmatch(r"([a-z]+[1-5] ?)+", T.to_pinyin(text)), text
    with pytest.raises(KeyError, match="PINYIN"):
        T.to_pinyin("龙")


def test_chinese_build(tmp_path):
    B.build(str(tmp_path), seed=0, size="small", langs="en,zh", workers=1)
    for split in ("sft", "test"):
        samples = read(str(tmp_path), split)
        zh = [s for s in samples if s["lang"] == "zh"]
        assert {s["task"] for s in zh} == set(B.TASKS)
        assert all(CJK.search(s["conversations"][1]["content"]) or s["meta"]["answer"][0].isdigit() for s in zh)
        assert {s["lang"] for s in samples} == {"en", "zh"}
    pretrain = read(str(tmp_path), "pretrain")
    asr = [s for s in pretrain if s["task"] == "asr" and s["lang"] == "zh"]
    assert asr and all(s["meta"]["voice"].startswith("cmn-latn-pinyin") for s in asr)
    for s in asr:
        assert CJK.search(s["meta"]["transcript"]) and s["meta"]["spoken"] == T.to_pinyin(s["meta"]["transcript"])
        wav, rate = sf.read(tmp_path / s["audios"][0], dtype="float32")
        assert rate == 16000 and wav.ndim == 1 and np.sqrt(np.mean(wav ** 2)) > 0.02
    ocr = [s for s in pretrain if s["task"] == "ocr" and s["lang"] == "zh"]
    assert ocr and all(s["meta"]["font"] == "wqy-microhei.ttc" and CJK.search(s["meta"]["text"]) for s in ocr)


def test_scene_probe_guess_is_a_random_objects_attribute():
    """The scene probe's reference score: naming the attribute of a random object of the scene (hand-counted)."""
    from benchmarks.probe_scene_reading import scene_guess
    objs = [{"color": "red", "shape": "star", "cell": [0, 0]}, {"color": "red", "shape": "circle", "cell": [1, 1]},
            {"color": "blue", "shape": "star", "cell": [2, 2]}]
    scene = {"objects": objs}
    assert scene_guess("color", scene, "Red.") == pytest.approx(2 / 3)
    assert scene_guess("color", scene, "Green.") == 0.0
    assert scene_guess("shape", scene, "Circle.") == pytest.approx(1 / 3)
    assert scene_guess("position", scene, "Bottom right.") == pytest.approx(1 / 3)
    assert scene_guess("position", scene, "Top.") == 0.0


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_follow_up_questions_answer_from_their_scene(lang):
    """Several turns about one scene: on a one-object scene every colour / shape / position answer is that object's
    (by hand from the scene), and a count is 1 exactly when the question names the object's colour or shape or
    counts everything."""
    rng = random.Random(5)
    for _ in range(20):
        scene = B.sample_scene(rng, 1, 1)
        (obj,) = scene["objects"]
        expected = {
            "color": T.answer(lang, B.word(lang, obj["color"], T.COLORS)),
            "shape": T.answer(lang, B.word(lang, obj["shape"], T.SHAPES)),
            "position": T.answer(lang, T.POSITIONS[B.cell_index(obj)][0 if lang == "en" else 2])}
        for task, answer in expected.items():
            turns = B.follow_up_questions(rng, lang, scene, 3, tasks=[task])
            assert len(turns) == 3 and all(a == answer and cell == B.cell_index(obj) for _, a, cell in turns)
        for question, answer, cell in B.follow_up_questions(rng, lang, scene, 5, tasks=["count"]):
            shape_noun = {x: T.SHAPES[x][0 if lang == "en" else 1] for x in T.SHAPES}  # as count questions say it
            if any(B.word(lang, c, T.COLORS) in question for c in T.COLORS):
                named = B.word(lang, obj["color"], T.COLORS) in question
            elif any(noun in question for noun in shape_noun.values()):
                named = shape_noun[obj["shape"]] in question
            else:
                named = True  # every shape counted
            assert cell is None
            assert answer == T.answer(lang, "1" if named else "0")


def test_char_columns_point_at_the_ink_of_each_character():
    """The vision warm-up's reading targets: for square text images as ToyWorld renders them (any font, size,
    angle, offset), every character's column holds text-coloured pixels, the columns run left to right, and the
    first and last characters sit within an em of the two ends of the drawn text."""
    rng, noise = random.Random(3), np.random.default_rng(3)
    for i in range(40):
        spec = B.gen_ocr(rng, "en", 4 * i, False)[0]["images"][0]
        image = np.asarray(B.render_text(spec, noise), dtype=np.float32)                # [H, W, 3]
        to_text = np.linalg.norm(image - np.array(spec["color"]), axis=-1)
        to_background = np.linalg.norm(image - np.array(spec["background"]["rgb"]), axis=-1)
        ink = np.nonzero((to_text < to_background).any(0))[0]                          # x of text-coloured pixels
        columns = B.char_columns(spec, 16)
        width = spec["width"] / 16
        assert None not in columns and columns == sorted(columns), (spec["lines"], columns)
        for ch, column in zip(spec["lines"][0], columns):
            if ch != " ":
                assert ((ink >= column * width) & (ink < (column + 1) * width)).any(), (spec["lines"], ch, column)
        em = spec["font_size"]  # no glyph is wider than this: its centre lies within an em of the text's ends
        assert ink.min() < (columns[0] + 1) * width and columns[0] * width < ink.min() + em
        assert columns[-1] * width < ink.max() and ink.max() - em < (columns[-1] + 1) * width
