"""ToyWorld speech targets (`build_toyworld.py --speak`): the assistant's answers spoken aloud, and the codec fitted
on them.

Which answers are spoken: the short ones, where a spoken reply is natural and a few seconds long: colour, shape,
count and position questions (asked in text or aloud: audio_qa), ASR (the assistant repeats what it heard) and,
in the sft split, READ_ALOUD phrases ("Say: three red cats"), the talker's reading practice.
Captions, OCR, video, multi-image and thinking answers stay text-only: long lists of objects or reasoning
chains would dominate the talker's training time on 2 CPU cores without teaching it anything new.

Voices: every spoken answer uses one of ASSISTANT_VOICES (fixed espeak-ng settings, never the ones the user
speaks with in ASR clips), "ava" for most answers and "max" for a fixed, hash-chosen share, so the talker
learns to speak in either and the voice can be selected at inference. The assistant turn records both:

    {"role": "assistant", "content": "Red.", "speech": "wav/say-1f0c....wav", "voice": "ava"}
"""
import hashlib
import json
import os

import soundfile as sf
import torch

from model.codec import MelCodec

ASSISTANT_VOICES = {"ava": {"voice": "en-us", "speed": 165, "pitch": 50},
                    "max": {"voice": "en+m3", "speed": 155, "pitch": 35}}
DEFAULT_VOICE = "ava"
SPOKEN_TASKS = {"color", "shape", "count", "position", "audio_qa", "asr", "read_aloud"}
SECOND_VOICE_PERCENT = 30  # share of spoken answers in the second voice


def voice_for(sample_id: str) -> str:
    """A stable voice per sample id (a hash, not an rng draw: adding speech must not shift any other stream)."""
    bucket = int(hashlib.sha1(sample_id.encode()).hexdigest(), 16) % 100
    return "max" if bucket < SECOND_VOICE_PERCENT else DEFAULT_VOICE


def speech_job(text: str, voice: str) -> tuple[str, dict]:
    """(path, render spec) of one spoken answer; named after its settings so a repeated answer is synthesised once."""
    spec = {"kind": "speech", "text": text, **ASSISTANT_VOICES[voice]}
    digest = hashlib.sha1(json.dumps([text, spec["voice"], spec["speed"], spec["pitch"]]).encode()).hexdigest()
    return f"wav/say-{digest[:16]}.wav", spec


def add_speech_targets(samples: list[dict]) -> dict[str, dict]:
    """Give the final assistant turn of every spoken-task English sample a speech target; returns the render jobs."""
    jobs = {}
    for s in samples:
        if s["task"] not in SPOKEN_TASKS or s["lang"] != "en":
            continue
        turn = s["conversations"][-1]
        voice = voice_for(s["id"])
        path, spec = speech_job(turn["content"], voice)
        turn.update(speech=path, voice=voice)
        jobs[path] = spec
    return jobs


def speech_paths(samples: list[dict]) -> list[str]:
    return sorted({t["speech"] for s in samples for t in s["conversations"] if "speech" in t})


def read_wav(path: str) -> torch.Tensor:
    return torch.from_numpy(sf.read(path, dtype="float32")[0])  # [S] (ToyWorld speech is 16 kHz mono)


def fit_codec(out: str, train_samples: list[dict], phonetic: bool = False, folder: str = "codec",
              **codec_args) -> MelCodec:
    """Fit the default codec on the training split's spoken answers and save it to out/folder.

    phonetic: its first codebook is phonetic, fitted on espeak-ng's own phoneme timings (dataset/phonemes.py)."""
    specs = {t["speech"]: speech_job(t["content"], t["voice"])[1]
             for s in train_samples for t in s["conversations"] if "speech" in t}
    paths = sorted(specs)
    wavs = [read_wav(os.path.join(out, p)) for p in paths]
    if not phonetic:
        codec = MelCodec(**codec_args).fit(wavs)
    else:
        from dataset.phonemes import frame_phonemes

        mel = MelCodec(**codec_args)  # unfitted: only its framing
        labels = [frame_phonemes(specs[p], mel.n_frames(len(w)), mel.hop_length * mel.group)
                  for p, w in zip(paths, wavs)]
        phonemes = sorted({name for clip in labels for name in clip})
        ids = [torch.tensor([phonemes.index(name) for name in clip]) for clip in labels]
        codec = MelCodec(**codec_args, phonemes=phonemes).fit(wavs, frame_phonemes=ids)
    codec.save(os.path.join(out, folder))
    kind = f"phonetic first codebook ({len(codec.phonemes)} phonemes) + k-means" if phonetic else "k-means"
    print(f"fitted the speech codec ({kind}) on {len(wavs)} spoken answers -> {out}/{folder}")
    return codec
