"""Browser demo: chat with a checkpoint about pictures, sounds and clips (gradio, served on this machine only).

    bash scripts/demo.sh                        # trains the tiny demo model on CPU -> out/demo/sft
    python web_demo.py --ckpt out/demo/sft      # then open http://127.0.0.1:7860

The conversation lives in a per-tab state in the training format: messages with <image>/<audio>/<video> markers
plus the media lists. So media from earlier turns stay in the prompt ("and the first picture?" works) and the
model sees exactly what it was trained on. Every upload goes through the model's own preprocessing, alone, when it
is sent; a file the model cannot use (unknown type, corrupt) becomes a notice in the chat and never enters the
history. The server itself refuses uploads over --max_upload_mb. Nothing leaves the machine: 127.0.0.1 only, no
share link, no analytics. Generations run one at a time (a queue), each browser tab has its own conversation.
A checkpoint with a talker (model/talker.py) can also speak its answers: tick "Speak the answer" and pick a voice;
the waveform plays in the page when the answer is complete.
"""
import argparse
import json
import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check: the demo never phones home

import gradio as gr
import numpy as np
import torch
from PIL import Image

from eval_omni import load, strip_think

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")  # a GIF/WebP with several frames is a video
AUDIO_TYPES = (".wav", ".flac", ".ogg", ".mp3")  # what soundfile reads; microphone recordings arrive as .wav
VIDEO_TYPES = (".gif", ".webp", ".mp4", ".mov", ".webm", ".mkv", ".avi")  # all but GIF/WebP need PyAV
MARKERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}  # order of markers in a turn, as in ToyWorld
EXAMPLE_TASKS = ("color", "count", "ocr", "multi_image", "audio_qa", "asr", "video", "think")
NO_CHECKPOINT = ("**No checkpoint at `{ckpt}`** ({why}). Train the tiny demo model (a few minutes on a laptop CPU) "
                 "with `bash scripts/demo.sh`, which writes `out/demo/sft`, then restart: "
                 "`python web_demo.py --ckpt out/demo/sft`.")


class BadInput(ValueError):
    """Something a user sent that the model cannot use: shown in the chat, never raised to gradio."""


def new_conversation() -> dict:
    """What the model sees (messages with markers + media paths) and what the page shows (chat)."""
    return {"messages": [], "media": {kind: [] for kind in MARKERS}, "chat": []}


def notice(text: str) -> dict:
    """A chat bubble that is not part of the model's history."""
    return {"role": "assistant", "content": text, "metadata": {"title": "Notice"}}


def strip_markers(text: str) -> str:
    """Typed markers would shift every media item after them; media get their markers from the uploads."""
    for marker in MARKERS.values():
        text = text.replace(marker, "")
    return text.strip()


# ----------------------------------------------------------------------------- checking uploads
def media_kind(path: str) -> str:
    ext, name = os.path.splitext(path)[1].lower(), os.path.basename(path)
    if ext in (".gif", ".webp"):
        with Image.open(path) as im:
            return "video" if getattr(im, "n_frames", 1) > 1 else "image"
    for kind, types in (("image", IMAGE_TYPES), ("audio", AUDIO_TYPES), ("video", VIDEO_TYPES)):
        if ext in types:
            return kind
    raise BadInput(f"`{name}`: unsupported file type `{ext or 'none'}`. Send an image ({' '.join(IMAGE_TYPES)}), "
                   f"audio ({' '.join(AUDIO_TYPES)}) or video ({' '.join(VIDEO_TYPES)}).")


def check_media(path: str, processor) -> str:
    """-> 'image' | 'audio' | 'video', after running the model's own preprocessing on the file alone."""
    try:
        kind = media_kind(path)
        media = {k: [path] if k == kind else [] for k in MARKERS}
        processor.sample([{"role": "user", "content": MARKERS[kind]}], media["image"], media["audio"], media["video"])
        return kind
    except BadInput:
        raise
    except Exception as e:  # PIL, soundfile, PyAV and the mel frontend each raise their own types
        name = os.path.basename(path)
        raise BadInput(f"could not read `{name}`: {type(e).__name__}: {str(e).replace(path, name)}") from e


# ----------------------------------------------------------------------------- examples from ToyWorld
def find_examples(ckpt: str) -> str | None:
    """The test.jsonl beside the data the checkpoint was trained on (its stage_args.json names the --data files),
    else the ToyWorld that scripts/demo.sh builds by default (data/toyworld/test.jsonl in this repository)."""
    repo, candidates = os.path.dirname(os.path.abspath(__file__)), []
    if os.path.isfile(os.path.join(ckpt, "stage_args.json")):
        with open(os.path.join(ckpt, "stage_args.json")) as f:
            data = json.load(f).get("data") or []
        candidates += [os.path.join(base, os.path.dirname(p), "test.jsonl") for p in data for base in ("", repo)]
    candidates.append(os.path.join(repo, "data", "toyworld", "test.jsonl"))
    return next((p for p in candidates if os.path.isfile(p)), None)


def load_examples(path: str, per_task: int = 1) -> tuple[list[list], list[str]]:
    """The first `per_task` samples of each EXAMPLE_TASKS task -> (rows [input box value, thinking], labels that
    show the expected answer)."""
    root, picked = os.path.dirname(os.path.abspath(path)), {task: [] for task in EXAMPLE_TASKS}
    with open(path, encoding="utf-8") as f:
        for sample in map(json.loads, f):
            task = sample.get("task")
            if task not in picked or len(picked[task]) >= per_task:
                continue
            question = strip_markers(sample["conversations"][0]["content"])
            files = [os.path.join(root, p) for k in ("images", "videos", "audios") for p in sample.get(k) or []]
            answer = strip_think(sample["conversations"][1]["content"])
            picked[task].append(([{"text": question, "files": files}, bool(sample.get("thinking"))],
                                 f"{task}: {question or '(spoken question)'} → {answer}"))
    chosen = [item for task in EXAMPLE_TASKS for item in picked[task]]
    return [row for row, _ in chosen], [label for _, label in chosen]


# ----------------------------------------------------------------------------- the app
def build_demo(ckpt: str, tokenizer: str | None = None, device: str = "cpu", examples: str | None = None):
    try:
        model, processor = load(ckpt, tokenizer, device)
        status = f"Model: `{ckpt}` ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {device})."
        voices = model.config.talker.voices if model.talker is not None and model.codec is not None else []
    except Exception as e:  # missing folder, half-written or mismatched checkpoint: the page says what to do
        model = processor = None
        voices = []
        why = "folder not found" if not os.path.isdir(ckpt) else f"{type(e).__name__}: {e}"
        status = NO_CHECKPOINT.format(ckpt=ckpt, why=why)

    def respond(box, conv, thinking, temperature, top_p, max_new_tokens, speak=False, voice=None):
        """One turn: check the uploads, then stream the answer into the chat token by token (and, with `speak`,
        collect the talker's audio chunks as they come; the page gets the waveform with the last piece)."""
        text, files = strip_markers((box or {}).get("text") or ""), (box or {}).get("files") or []
        try:
            if model is None:
                raise BadInput(status)
            if not text and not files:
                raise BadInput("Type a question, attach a file or record one.")
            if speak and voices and voice not in voices:
                raise BadInput(f"Unknown voice {voice!r}: this model speaks with {', '.join(voices)}.")
            kinds = [check_media(path, processor) for path in files]
        except BadInput as e:
            conv["chat"].append(notice(str(e)))
            yield conv["chat"], conv, {"text": text, "files": []}, None
            return
        # the turn in training format: one marker line per file (images, videos, audios), then the text
        ordered = [(path, kind) for k in MARKERS for path, kind in zip(files, kinds) if kind == k]
        lines = [MARKERS[kind] for _, kind in ordered] + ([text] if text else [])
        messages = conv["messages"] + [{"role": "user", "content": "\n".join(lines)}]
        media = {k: conv["media"][k] + [path for path, kind in ordered if kind == k] for k in MARKERS}
        conv["chat"] += [{"role": "user", "content": {"path": path}} for path, _ in ordered]
        if text:
            conv["chat"].append({"role": "user", "content": text})
        conv["chat"].append({"role": "assistant", "content": ""})
        yield conv["chat"], conv, None, None
        speak = bool(speak and voices)
        answer, audio = "", []
        try:
            for out in model.chat(processor, messages, media["image"], media["audio"], media["video"],
                                  enable_thinking=thinking, stream=True, max_new_tokens=int(max_new_tokens),
                                  temperature=temperature, top_p=top_p, speak=speak, voice=voice):
                piece, chunk = out if speak else (out, None)
                if chunk is not None:
                    audio.append(chunk)
                answer += piece
                conv["chat"][-1]["content"] = answer
                yield conv["chat"], conv, None, gr.skip()
        except Exception as e:  # e.g. a conversation longer than the model's context: this turn is dropped
            conv["chat"][-1] = notice(f"The model could not answer ({type(e).__name__}: {e}). Press Clear to "
                                      f"start a new conversation.")
            yield conv["chat"], conv, None, None
            return
        conv["messages"], conv["media"] = messages + [{"role": "assistant", "content": answer}], media
        conv["chat"][-1]["content"] = answer or "*(empty answer: the model stopped at once)*"
        yield conv["chat"], conv, None, spoken(audio)

    def spoken(chunks: list[torch.Tensor]):
        """Audio chunks -> what gr.Audio plays: (sample rate, int16 samples), or None for no speech."""
        if not chunks:
            return None
        wav = torch.cat(chunks).clamp(-1, 1).numpy()
        return model.codec.sample_rate, (wav * 32767).astype(np.int16)

    with gr.Blocks(title="Omni chat (MiniCPM-o from scratch)") as demo:
        gr.Markdown("## Omni chat — ask about images, sounds and short clips\n" + status)
        conv = gr.State(new_conversation())
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(elem_id="chat", label="Chat", height=460, buttons=["copy", "copy_all"],
                                  reasoning_tags=[("<think>", "</think>")],  # thinking folds into "Reasoning"
                                  placeholder="Attach a picture, a recording or a clip and ask about it, "
                                              "or pick an example below.")
                box = gr.MultimodalTextbox(elem_id="input", show_label=False, sources=["upload", "microphone"],
                                           file_count="multiple", submit_btn=False,
                                           placeholder="Ask something. Attach images, audio or a clip with the "
                                                       "paperclip, or record a question. Enter sends.")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
                speech = gr.Audio(label="Spoken answer", elem_id="speech", autoplay=True, interactive=False,
                                  visible=bool(voices))
            with gr.Column(scale=1, min_width=220):
                thinking = gr.Checkbox(label="Think before answering", elem_id="thinking")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (when temperature > 0)")
                max_new_tokens = gr.Slider(8, 512, value=128, step=8, label="Max new tokens")
                speak = gr.Checkbox(label="Speak the answer", value=bool(voices), visible=bool(voices),
                                    elem_id="speak")
                voice = gr.Dropdown(voices, value=voices[0] if voices else None, label="Voice", visible=bool(voices),
                                    elem_id="voice", allow_custom_value=True)  # respond() checks it
        inputs = [box, conv, thinking, temperature, top_p, max_new_tokens, speak, voice]
        outputs = [chat, conv, box, speech]
        send.click(respond, inputs, outputs, api_name="chat")
        box.submit(respond, inputs, outputs, api_visibility="private")
        clear.click(lambda: ([], new_conversation(), None, None), None, [chat, conv, box, speech], api_name="clear")
        chat.clear(new_conversation, None, conv, api_visibility="private")  # the chat's own trash icon
        rows, labels = load_examples(examples) if examples else ([], [])
        if rows:
            shown = gr.Examples(rows, [box, thinking], example_labels=labels, examples_per_page=len(rows),
                                label=f"Held-out ToyWorld samples ({examples}), with the expected answer: "
                                      f"click one to ask it")
            shown.load_input_event.then(respond, inputs, outputs, api_visibility="private")
    return demo


def main(argv=None, block: bool = True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/demo/sft", help="folder written by a training stage")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--examples", help="jsonl of clickable examples (default: test.jsonl beside the checkpoint's "
                                     "training data, else data/toyworld/test.jsonl)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max_upload_mb", type=float, default=20.0, help="the server refuses larger uploads")
    args = p.parse_args(argv)
    if args.examples and not os.path.isfile(args.examples):
        p.error(f"--examples {args.examples}: no such file")
    examples = args.examples or find_examples(args.ckpt)
    demo = build_demo(args.ckpt, args.tokenizer, args.device, examples)
    demo.queue(default_concurrency_limit=1)  # one generation at a time: they would only slow each other down
    demo.launch(server_name=args.host, server_port=args.port, share=False, theme=gr.themes.Soft(),
                max_file_size=int(args.max_upload_mb * 2**20), prevent_thread_lock=not block,
                allowed_paths=[os.path.dirname(os.path.abspath(examples))] if examples else None)  # example media
    return demo


if __name__ == "__main__":
    main()
