"""OmniDataset on real tiny media files: collate shapes, placeholder counts, bad-line handling, length grouping."""
import copy
import json
import math
from functools import partial

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from dataset.media import video_inputs
from dataset.omni_dataset import LengthGroupedBatchSampler, OmniDataset, collate, length_grouped_batches
from dataset.tokenizer import load_tokenizer, train_tokenizer
from model.model_omni import VIDEO_PAD, OmniConfig, audio_token_count


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


GOOD = [
    {"conversations": [user("<image>\nWhat is this?"), assistant("A red box.")], "images": ["wide.png"]},
    {"conversations": [user("<audio>\nTranscribe the audio."), assistant("a tone")], "audios": ["tone.wav"]},
    {"conversations": [user("Compare <image> and <image>, then listen: <audio>"), assistant("Same.")],
     "images": ["small.png", "wide.png"], "audios": ["long.wav"]},
    {"conversations": [user("<video>\nWhat moves?"), assistant("A dot.")], "videos": ["clip.gif"]},
    {"conversations": [user("Just text."), assistant("Just text.")]},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    Image.new("RGB", (300, 100), (200, 40, 40)).save(root / "wide.png")   # tiny: 3x1 grid -> 4 slices
    Image.new("RGB", (60, 40), (40, 200, 40)).save(root / "small.png")    # tiny: unsliced 140x84
    (root / "broken.png").write_bytes(b"not a png at all")
    t = np.arange(16000) / 16000
    soundfile.write(root / "tone.wav", 0.3 * np.sin(2 * math.pi * 440 * t), 16000)   # 1 s
    t = np.arange(31 * 8000) / 8000
    soundfile.write(root / "long.wav", 0.3 * np.sin(2 * math.pi * 300 * t), 8000)    # 31 s at 8 kHz
    frames = [Image.new("RGB", (64, 48), (0, 0, 0)) for _ in range(8)]
    for k, f in enumerate(frames):
        f.paste((255, 255, 255), (k * 6, 20, k * 6 + 8, 28))
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good = root / "good.jsonl"
    good.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in GOOD) + "\n")
    train_tokenizer([str(good)], str(root / "tok"), vocab_size=400)
    tok = load_tokenizer(str(root / "tok"))
    cfg = OmniConfig.preset("tiny").set_token_ids(tok)
    cfg.video_group_size, cfg.video_max_frames = 6, 8  # the original's 3-D grouping (tiny reads frames alone)
    return root, tok, cfg


def test_items_and_collate(world):
    root, tok, cfg = world
    ds = OmniDataset(str(root / "good.jsonl"), tok, cfg)
    items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 5 and all(it is not None for it in items) and not ds.skipped
    batch = collate(items, tok.pad_token_id)
    B, T = batch["input_ids"].shape
    assert B == 5 and T == max(len(it["input_ids"]) for it in items)
    # right padding: real tokens first, pads after; labels -100 on padding
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert (batch["labels"][b, n:] == -100).all() and (batch["input_ids"][b, n:] == tok.pad_token_id).all()
    # images in prompt order: wide (4 slices), small (1), wide (4) -> 9 slices, each 16 pad tokens
    assert batch["pixel_values"].shape == (9, 3, 112, 196)
    assert batch["image_grid_hw"].tolist() == [[5, 14]] + [[8, 8]] * 3 + [[6, 10]] + [[5, 14]] + [[8, 8]] * 3
    assert int((batch["input_ids"] == cfg.image_pad_id).sum()) == 9 * cfg.query_num
    assert batch["pixel_values"][4, :, 84:].abs().sum() == 0  # the 140x84 slice is zero padded
    # audio: 1 s -> 100 mel frames; 31 s -> 3100 frames -> chunks 3000 + 100
    assert batch["audio_feature_lens"].tolist() == [100, 3000, 100]
    assert batch["audio_features"].shape == (3, 80, 3000)
    n_audio = audio_token_count(100, cfg) + audio_token_count(3100, cfg)
    assert n_audio == 25 + 775 and int((batch["input_ids"] == cfg.audio_pad_id).sum()) == n_audio
    # video: 8 frames at 100 ms -> groups of 6 + 2, one 16-token placeholder per group
    assert batch["video_pixel_values"].shape == (8, 3, 98, 126)
    assert batch["video_grid_hw"].tolist() == [[7, 9]] * 8
    assert batch["video_temporal_ids"].tolist() == list(range(8))
    assert batch["video_group_sizes"].tolist() == [6, 2]
    assert int((batch["input_ids"] == cfg.video_pad_id).sum()) == 2 * cfg.query_num
    assert collate([None, None], tok.pad_token_id) is None
    text_only = collate([items[4]], tok.pad_token_id)
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}


def test_video_sampling_and_timestamps(world):
    root, _, cfg = world
    frames, grid_hw, temporal_ids, group_sizes, text = video_inputs(str(root / "clip.gif"), cfg, max_frames=4)
    # 8 frames, 4 wanted: centres of 4 equal segments -> frames 1, 3, 5, 7 at 0.1 s each
    assert temporal_ids.tolist() == [1, 3, 5, 7] and group_sizes.tolist() == [4]
    assert text.count(VIDEO_PAD) == cfg.query_num and len(frames) == 4


def test_model_accepts_the_batch(world):
    from model.model_omni import OmniModel

    root, tok, cfg = world
    torch.manual_seed(0)
    model = OmniModel(cfg).eval()
    ds = OmniDataset(str(root / "good.jsonl"), tok, cfg)
    batch = collate([ds[0], ds[1], ds[3]], tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out["loss"])


BAD_LINES = [
    (json.dumps(GOOD[0]), None),
    ('{"conversations": [', "invalid_json"),
    (json.dumps({"conversations": GOOD[0]["conversations"], "images": ["nope.png"]}), "missing_media"),
    (json.dumps({"conversations": GOOD[2]["conversations"], "images": ["wide.png"], "audios": ["tone.wav"]}),
     "marker_mismatch"),
    (json.dumps({"conversations": [user("word " * 3000), assistant("ok")]}), "too_long"),
    (json.dumps({"conversations": [user("hi"), assistant("")]}), "empty_turn"),
    (json.dumps({"conversations": [user("hi")]}), "no_assistant"),
    (json.dumps({"conversations": GOOD[0]["conversations"], "images": ["broken.png"]}), "unreadable_media"),
    (json.dumps(GOOD[4]), None),
]


def test_bad_lines_are_skipped_counted_and_located(world):
    root, tok, cfg = world
    path = root / "bad.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_LINES) + "\n")
    with pytest.warns(UserWarning) as record:
        ds = OmniDataset(str(path), tok, cfg, max_length=1024)
        items = [ds[i] for i in range(len(ds))]
    messages = [str(w.message) for w in record]
    for lineno, (_, reason) in enumerate(BAD_LINES, start=1):
        if reason:
            assert any(m.startswith(f"{path}:{lineno}: skipped sample ({reason})") for m in messages), reason
    expected = {reason: 1 for _, reason in BAD_LINES if reason}
    assert dict(ds.skipped) == expected
    assert sum(it is not None for it in items) == 2
    batch = collate(items, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    assert "missing_media=1" in ds.summary()


def test_strict_mode_raises_with_location(world):
    root, tok, cfg = world
    path = root / "strict.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_LINES[:2]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: bad sample \\(invalid_json\\)"):
        OmniDataset(str(path), tok, cfg, strict=True)
    path.write_text(BAD_LINES[0][0] + "\n" + BAD_LINES[2][0] + "\n")
    ds = OmniDataset(str(path), tok, cfg, strict=True)
    assert ds[0] is not None
    with pytest.raises(ValueError, match=f"{path}:2: bad sample \\(missing_media\\)"):
        ds[1]


def test_length_grouped_batches():
    lengths = [int(x) for x in torch.randint(1, 1000, (103,), generator=torch.Generator().manual_seed(0))]
    a = length_grouped_batches(lengths, batch_size=4, seed=1, epoch=0, mega_batches=5)
    assert a == length_grouped_batches(lengths, batch_size=4, seed=1, epoch=0, mega_batches=5)
    assert a != length_grouped_batches(lengths, batch_size=4, seed=1, epoch=1, mega_batches=5)
    assert a != length_grouped_batches(lengths, batch_size=4, seed=2, epoch=0, mega_batches=5)
    assert sorted(i for b in a for i in b) == list(range(103)) and max(len(b) for b in a) == 4
    for b in a:  # sorted within each batch, longest first
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    shuffled = torch.randperm(103, generator=torch.Generator().manual_seed(1)).tolist()
    assert padding(a) < 0.5 * padding([shuffled[i:i + 4] for i in range(0, 103, 4)])
    sampler = LengthGroupedBatchSampler(lengths, batch_size=4, seed=1)
    sampler.set_epoch(3)
    assert list(sampler) == length_grouped_batches(lengths, 4, seed=1, epoch=3) and len(sampler) == 26


def test_dataloader_with_length_grouped_sampler(world):
    root, tok, cfg = world
    ds = OmniDataset(str(root / "good.jsonl"), tok, cfg)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=LengthGroupedBatchSampler(ds.lengths, 2, seed=0),
                                         collate_fn=partial(collate, pad_id=tok.pad_token_id))
    assert sum(batch["input_ids"].shape[0] for batch in loader) == 5


def test_chat_streams_the_same_answer_as_one_shot(world):
    """Inference path: processor -> OmniModel.chat with an image, an audio and a video; streaming == one shot."""
    from dataset.processor import OmniProcessor
    from model.model_omni import OmniModel
    root, tok, cfg = world
    cfg = copy.deepcopy(cfg)
    cfg.llm.vocab_size = len(tok)
    torch.manual_seed(0)
    model = OmniModel(cfg).eval()
    proc = OmniProcessor(tok, cfg)
    media = dict(images=[str(root / "wide.png")], audios=[str(root / "tone.wav")], videos=[str(root / "clip.gif")])
    whole = model.chat(proc, "What is this?", max_new_tokens=12, **media)
    pieces = list(model.chat(proc, "What is this?", max_new_tokens=12, stream=True, **media))
    assert isinstance(whole, str) and len(pieces) >= 1 and "".join(pieces) == whole
    batch = proc([user("<image>\nHi")], images=[str(root / "wide.png")])
    assert int((batch["input_ids"] == cfg.image_pad_id).sum()) == 4 * cfg.query_num  # overview + 3 slices
