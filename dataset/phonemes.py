"""Which phoneme is sounding in every code frame of a ToyWorld speech clip, straight from espeak-ng.

The codec's phonetic first codebook (model/codec.py, `MelCodec(phonemes=...)`) is fitted on these labels: the clips
are made by the espeak-ng command line (build_toyworld.synth_speech), and the espeak-ng C library, given the same
voice, speed and pitch, produces the same samples and reports the sample at which each phoneme starts. So the labels
are the synthesiser's own, not a recogniser's guess. The library is reached with ctypes (it ships with the
espeak-ng package ToyWorld already needs; no Python binding to install).

espeak-ng carries a little state from one utterance to the next: the same text can come out a few samples longer
or shorter depending on what was said before, so a label at a phoneme boundary can differ with the order clips are
labelled in. fit_codec labels them in one fixed (sorted) order.
"""
import ctypes
import ctypes.util
import re
from functools import cache

import numpy as np
import torch

from dataset.build_toyworld import SAMPLE_RATE, resampler, speech_bounds

SILENCE = "_"               # espeak-ng's pause phonemes ("_", "_:", "_!", ...) all become this one label
_SYNCHRONOUS, _PHONEME_EVENTS = 2, 1           # espeak_AUDIO_OUTPUT and espeak_Initialize option values
_EVENT_END, _EVENT_PHONEME = 0, 7              # espeak_EVENT_TYPE values
_RATE, _PITCH = 1, 3                           # espeak_PARAMETER values
_CHARS = 1                                     # espeak_POSITION_TYPE: POS_CHARACTER


class _Event(ctypes.Structure):  # espeak_EVENT from speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class Espeak:
    """The espeak-ng library in synchronous mode: speak(text) -> (int16 samples, [(phoneme, start sample)])."""

    def __init__(self):
        path = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        self.lib = ctypes.CDLL(path)
        self.rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, None, _PHONEME_EVENTS)
        if self.rate <= 0:
            raise RuntimeError(f"espeak-ng ({path}) did not initialise")
        self._chunks, self._phonemes = [], []
        self._callback = _Callback(self._collect)  # kept on self: the library holds only a raw pointer to it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != _EVENT_END:
            if events[i].type == _EVENT_PHONEME:
                self._phonemes.append((events[i].id.decode("ascii", "replace"), events[i].sample))
            i += 1
        return 0

    def speak(self, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
        self._chunks, self._phonemes = [], []
        self.lib.espeak_SetVoiceByName(voice.encode())
        self.lib.espeak_SetParameter(_RATE, speed, 0)
        self.lib.espeak_SetParameter(_PITCH, pitch, 0)
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, _CHARS, 0, 0, None, None)
        return np.concatenate(self._chunks), self._phonemes


@cache
def espeak() -> Espeak:
    return Espeak()


def frame_phonemes(spec: dict, n_frames: int, frame_samples: int) -> list[str]:
    """The phoneme sounding at the centre of each of a clip's n_frames code frames (frame_samples long at 16 kHz).

    spec: the clip's espeak-ng settings (text, voice, speed, pitch). The clip on disk was cut from the synthesiser's
    output by build_toyworld.speech_bounds; the same cut is found here on the library's output, so time 0 of the
    clip is known in the synthesiser's samples. Before the first phoneme starts, the frame is silence."""
    tts = espeak()
    samples, phonemes = tts.speak(spec["text"], spec["voice"], spec["speed"], spec["pitch"])
    with torch.no_grad():
        wav = resampler(tts.rate)(torch.from_numpy(samples.astype(np.float32) / 32768)).numpy()
    start = speech_bounds(wav)[0] / SAMPLE_RATE                                # s into the synthesiser's output
    starts = np.array([sample / tts.rate for _, sample in phonemes])          # s, ascending
    names = [SILENCE if name.startswith("_") else name for name, _ in phonemes]
    centres = start + (np.arange(n_frames) + 0.5) * frame_samples / SAMPLE_RATE
    index = np.searchsorted(starts, centres, side="right") - 1                # the last phoneme started by then
    return [names[i] if i >= 0 else SILENCE for i in index]


def token_sounds(tokenizer, phonemes: list[str], voice: str = "en-us", speed: int = 165,
                 pitch: int = 50) -> list[list[int]]:
    """The talker's sound table: every token's text as espeak-ng says it, as ids into `phonemes` (a phonetic
    codec's first codebook), pauses and phonemes outside that list left out; [] for markup such as <|im_end|>, for
    tokens without a letter or digit and for non-ASCII ones (the English voices cannot read them)."""
    index = {name: i for i, name in enumerate(phonemes)}
    table = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if not text.isascii() or not re.search(r"[A-Za-z0-9]", text) or re.fullmatch(r"\s*<.*>\s*", text):
            table.append([])
            continue
        said = espeak().speak(text.strip(), voice, speed, pitch)[1]
        table.append([index[name] for name, _ in said if name in index and not name.startswith("_")])
    return table
