"""Each converter on a tiny fixture in its source format; the output must load in OmniDataset."""
import importlib.util
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from PIL import Image

from dataset.converters import convert_asr, convert_llava, convert_minicpmv, convert_minimind, main
from dataset.omni_dataset import OmniDataset
from dataset.tokenizer import load_tokenizer, train_tokenizer
from model.model_omni import OmniConfig


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def load_all(path, tmp_path):
    """Every converted sample must survive OmniDataset (media found, markers match) with nothing skipped."""
    train_tokenizer([str(path)], str(tmp_path / "tok"), vocab_size=300)
    tok = load_tokenizer(str(tmp_path / "tok"))
    ds = OmniDataset(str(path), tok, OmniConfig.preset("tiny").set_token_ids(tok), strict=True)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "src"
    (root / "coco").mkdir(parents=True)
    for name, colour in [("coco/1.png", (255, 0, 0)), ("coco/2.png", (0, 255, 0)), ("3.png", (0, 0, 255))]:
        Image.new("RGB", (40, 30), colour).save(root / name)
    return root


def test_llava(images, tmp_path):
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([
        {"id": "a", "image": "coco/1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "b", "image": "coco/2.png", "conversations": [  # no marker: the image goes first
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Green."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]))
    out = tmp_path / "out" / "llava.jsonl"
    assert convert_llava(str(src), str(images), str(out)) == 3
    rows = read_jsonl(out)
    assert rows[0]["images"] == ["../src/coco/1.png"]
    assert [t["role"] for t in rows[0]["conversations"]] == ["user", "assistant"] * 2
    assert rows[1]["conversations"][0]["content"] == "<image>\nDescribe it." and rows[2]["images"] == []
    assert all(item is not None for item in load_all(out, tmp_path))


def test_minimind_jsonl(images, tmp_path):
    src = tmp_path / "sft_vlm.jsonl"
    src.write_text(json.dumps({"conversations": [
        {"role": "user", "content": "<image>\n<image>\n这两张图有什么不同？"},
        {"role": "assistant", "content": "颜色不同。"}], "image": "coco/1.png, 3.png"}, ensure_ascii=False))
    out = tmp_path / "mm.jsonl"
    assert convert_minimind(str(src), str(out), image_root=str(images)) == 1
    assert read_jsonl(out)[0]["images"] == ["src/coco/1.png", "src/3.png"]
    assert load_all(out, tmp_path)[0]["image_grid_hw"].shape[0] == 2


def test_minimind_parquet(tmp_path):
    blob = io.BytesIO()
    Image.new("RGB", (40, 30)).save(blob, format="JPEG")
    if importlib.util.find_spec("pyarrow") is None:  # the clear message is the whole contract here
        with pytest.raises(ImportError, match="pip install pyarrow"):
            convert_minimind(str(tmp_path / "x.parquet"), str(tmp_path / "o.jsonl"), image_out=str(tmp_path))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    conv = json.dumps([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Dark."}])
    pq.write_table(pa.table({"conversations": [conv], "image_bytes": [blob.getvalue()]}), tmp_path / "x.parquet")
    out = tmp_path / "o.jsonl"
    assert convert_minimind(str(tmp_path / "x.parquet"), str(out), image_out=str(tmp_path / "imgs")) == 1
    assert read_jsonl(out)[0]["images"] == ["imgs/00000000_0.jpg"]
    assert load_all(out, tmp_path)[0] is not None


def test_minicpmv(images, tmp_path):
    src = tmp_path / "finetune.json"
    src.write_text(json.dumps([
        {"id": "0", "image": "coco/1.png", "conversations": [
            {"role": "user", "content": "(<image>./</image>)\nHow many?"}, {"role": "assistant", "content": "One."}]},
        {"id": "1", "image": {"<image_00>": "coco/1.png", "<image_01>": "3.png"}, "conversations": [
            {"role": "user", "content": "First <image_01>, then <image_00>: same?"},
            {"role": "assistant", "content": "No."}]},
        {"id": "2", "image": "3.png", "conversations": [
            {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Blue."}]},
    ]))
    out = tmp_path / "cpm.jsonl"
    assert convert_minicpmv(str(src), str(images), str(out)) == 3
    rows = read_jsonl(out)
    assert rows[0]["conversations"][0]["content"] == "<image>\nHow many?"
    assert rows[1]["conversations"][0]["content"] == "First <image>, then <image>: same?"
    assert rows[1]["images"] == ["src/3.png", "src/coco/1.png"]  # in the order the text places them
    assert rows[2]["conversations"][0]["content"] == "<image>\nColour?"
    assert all(item is not None for item in load_all(out, tmp_path))


def test_asr_aishell_and_librispeech_layouts(tmp_path):
    wav = np.sin(np.arange(8000) / 8000 * 2 * np.pi * 220).astype(np.float32) * 0.2
    (tmp_path / "wav/S0002").mkdir(parents=True)
    (tmp_path / "wav/84/121123").mkdir(parents=True)
    soundfile.write(tmp_path / "wav/S0002/BAC009S0002W0122.wav", wav, 16000)
    soundfile.write(tmp_path / "wav/84/121123/84-121123-0000.flac", wav, 16000)
    (tmp_path / "aishell.txt").write_text("BAC009S0002W0122 而 对 楼市 成交 抑制\nBAC009S0002W9999 缺 音频\n",
                                          encoding="utf-8")
    (tmp_path / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n")
    out = tmp_path / "asr.jsonl"
    written, missing = convert_asr([str(tmp_path / "aishell.txt"), str(tmp_path / "84-121123.trans.txt")],
                                   str(tmp_path / "wav"), str(out))
    assert (written, missing) == (2, 1)
    rows = read_jsonl(out)
    assert rows[0]["conversations"] == [{"role": "user", "content": "<audio>\nTranscribe the audio."},
                                        {"role": "assistant", "content": "而对楼市成交抑制"}]
    assert rows[0]["audios"] == ["wav/S0002/BAC009S0002W0122.wav"]
    assert rows[1]["conversations"][1]["content"] == "GO DO YOU HEAR"
    assert all(item is not None for item in load_all(out, tmp_path))


def test_cli(images, tmp_path, capsys):
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([{"image": "3.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Blue."}]}]))
    main(["llava", "--input", str(src), "--image-root", str(images), "--output", str(tmp_path / "o.jsonl")])
    assert "wrote 1 samples" in capsys.readouterr().out
    help_text = subprocess.run([sys.executable, "-m", "dataset.converters", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert all(name in help_text for name in ("llava", "minimind", "minicpmv", "asr"))
