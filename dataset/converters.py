"""Convert public dataset formats to our jsonl (see DESIGN.md): media paths relative to the output file.

    python -m dataset.converters llava    --input llava_v1_5_mix665k.json --image-root data/ --output sft.jsonl
    python -m dataset.converters minimind --input sft_vlm_data.jsonl --image-root images/ --output sft.jsonl
    python -m dataset.converters minimind --input sft_i2t.parquet --image-out images/ --output sft.jsonl
    python -m dataset.converters minicpmv --input finetune.json --image-root data/ --output sft.jsonl
    python -m dataset.converters asr      --transcript aishell_transcript.txt --audio-root wav/ --output asr.jsonl
"""
import argparse
import io
import json
import os
import re

from PIL import Image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
_CJK_SPACE = re.compile(r"(?<=[\u3400-\u9fff])\s+(?=[\u3400-\u9fff])")


def _write_jsonl(samples, output: str) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    n = 0
    with open(output, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
            n += 1
    return n


def _rel(path: str, root: str, output: str) -> str:
    """`path` (relative to `root`, or absolute) as a path relative to the output jsonl's folder."""
    return os.path.relpath(os.path.join(root, path), os.path.dirname(os.path.abspath(output)))


def _with_markers(turns: list[dict], n_images: int) -> list[dict]:
    """Images without an <image> marker go at the front of the first user turn (LLaVA / MiniCPM-V rule)."""
    missing = n_images - sum(t["content"].count("<image>") for t in turns)
    if missing > 0:
        first = next(i for i, t in enumerate(turns) if t["role"] == "user")
        turns[first] = dict(turns[first], content="<image>\n" * missing + turns[first]["content"])
    return turns


def _sample(turns: list[dict], images: list[str]) -> dict:
    system = [t["content"] for t in turns if t["role"] == "system"][:1]
    turns = [t for t in turns if t["role"] != "system"]
    sample = {"conversations": _with_markers(turns, len(images)), "images": images}
    return dict(sample, system=system[0]) if system else sample


def convert_llava(input_path: str, image_root: str, output: str) -> int:
    """LLaVA json: [{"image": "coco/x.jpg", "conversations": [{"from": "human"|"gpt", "value"}]}]."""
    with open(input_path, encoding="utf-8") as f:
        records = json.load(f)

    def samples():
        for r in records:
            paths = r.get("image") or []
            paths = [paths] if isinstance(paths, str) else paths
            turns = [{"role": ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]
            yield _sample(turns, [_rel(p, image_root, output) for p in paths])
    return _write_jsonl(samples(), output)


def _jsonl_rows(input_path: str):
    with open(input_path, encoding="utf-8") as f:
        yield from (json.loads(line) for line in f if line.strip())


def _parquet_rows(input_path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading minimind-v parquet needs pyarrow (pip install pyarrow); "
                          "the jsonl release needs nothing") from e
    yield from pq.read_table(input_path).to_pylist()


def convert_minimind(input_path: str, output: str, image_root: str = ".", image_out: str | None = None) -> int:
    """minimind-v: jsonl {"conversations": [{"role", "content"}], "image": "a.jpg, b.jpg"} with <image> markers,
    or parquet {"conversations": list or json string, "image_bytes": bytes or list} (images written to
    `image_out`)."""
    parquet = input_path.endswith(".parquet")
    if parquet and not image_out:
        raise ValueError("a parquet input needs --image-out, the folder to write its embedded images to")

    def samples():
        for k, row in enumerate(_parquet_rows(input_path) if parquet else _jsonl_rows(input_path)):
            turns = row["conversations"]
            turns = json.loads(turns) if isinstance(turns, str) else turns
            turns = [{"role": ROLES[t["role"]], "content": t["content"]} for t in turns]
            if parquet:
                blobs = row.get("image_bytes") or []
                paths = [_save_image(b, image_out, f"{k:08d}_{j}") for j, b in enumerate(
                    blobs if isinstance(blobs, list) else [blobs])]
                images = [_rel(p, ".", output) for p in paths]
            else:
                names = [n.strip() for n in (row.get("image") or "").split(",") if n.strip()]
                images = [_rel(n, image_root, output) for n in names]
            yield _sample(turns, images)
    return _write_jsonl(samples(), output)


def _save_image(blob: bytes, folder: str, stem: str) -> str:
    os.makedirs(folder, exist_ok=True)
    fmt = (Image.open(io.BytesIO(blob)).format or "png").lower()
    path = os.path.join(folder, f"{stem}.{'jpg' if fmt == 'jpeg' else fmt}")
    with open(path, "wb") as f:
        f.write(blob)
    return path


def convert_minicpmv(input_path: str, image_root: str, output: str) -> int:
    """MiniCPM-V finetune json: {"id", "image": path or {"<image_00>": path, ...}, "conversations": [{"role",
    "content"}]} with <image>, (<image>./</image>) or the dict's own keys as placeholders."""
    with open(input_path, encoding="utf-8") as f:
        records = json.load(f)

    def samples():
        for r in records:
            turns = [{"role": ROLES[t["role"]], "content": t["content"].replace("(<image>./</image>)", "<image>")}
                     for t in r["conversations"]]
            image = r.get("image") or {}
            if isinstance(image, str):
                paths = [image]
            else:  # each key marks its own image; order images by where their key appears in the text
                text = "\n".join(t["content"] for t in turns)
                used = sorted((k for k in image if k in text), key=text.index)
                paths = [image[k] for k in image if k not in used] + [image[k] for k in used]
                pattern = re.compile("|".join(re.escape(k) for k in used)) if used else None
                turns = [dict(t, content=pattern.sub("<image>", t["content"])) if pattern else t for t in turns]
            yield _sample(turns, [_rel(p, image_root, output) for p in paths])
    return _write_jsonl(samples(), output)


def convert_asr(transcripts: list[str], audio_root: str, output: str,
                prompt: str = "Transcribe the audio.") -> tuple[int, int]:
    """Kaldi-style transcripts ("utt_id text" per line; AISHELL, LibriSpeech *.trans.txt) + a folder searched
    recursively for utt_id.{wav,flac,...} -> ASR samples. Spaces between Chinese characters are removed.
    Returns (written, utterances without audio)."""
    audio = {}
    for folder, _, names in os.walk(audio_root):
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in AUDIO_EXTENSIONS:
                audio[stem] = os.path.join(folder, name)
    missing = 0

    def samples():
        nonlocal missing
        for transcript in transcripts:
            with open(transcript, encoding="utf-8") as f:
                for line in f:
                    parts = line.strip().split(maxsplit=1)
                    if len(parts) < 2:
                        continue
                    if parts[0] not in audio:
                        missing += 1
                        continue
                    yield {"conversations": [{"role": "user", "content": f"<audio>\n{prompt}"},
                                             {"role": "assistant", "content": _CJK_SPACE.sub("", parts[1])}],
                           "audios": [_rel(audio[parts[0]], ".", output)]}
    return _write_jsonl(samples(), output), missing


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dataset.converters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="format", required=True)
    for name in ("llava", "minimind", "minicpmv"):
        p = sub.add_parser(name)
        p.add_argument("--input", required=True)
        p.add_argument("--image-root", default=".", help="folder the source's image paths are relative to")
        p.add_argument("--output", required=True)
        if name == "minimind":
            p.add_argument("--image-out", help="parquet only: folder to write the embedded images to")
    p = sub.add_parser("asr")
    p.add_argument("--transcript", nargs="+", required=True)
    p.add_argument("--audio-root", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--prompt", default="Transcribe the audio.")
    args = parser.parse_args(argv)
    if args.format == "llava":
        n = convert_llava(args.input, args.image_root, args.output)
    elif args.format == "minimind":
        n = convert_minimind(args.input, args.output, args.image_root, args.image_out)
    elif args.format == "minicpmv":
        n = convert_minicpmv(args.input, args.image_root, args.output)
    else:
        n, missing = convert_asr(args.transcript, args.audio_root, args.output, args.prompt)
        if missing:
            print(f"{missing} utterances had no audio file under {args.audio_root} and were left out")
    print(f"wrote {n} samples to {args.output}")


if __name__ == "__main__":
    main()
