"""The offline speech codec: hand-written k-means, residual quantisation, encode/decode shapes and determinism,
the phonetic first codebook and the espeak-ng phoneme timings it is fitted on."""
import math
import re
import subprocess

import pytest
import torch

from model.codec import MelCodec, kmeans, residual_quantize, squared_distances


def chirp(seconds: float, f0: float, sample_rate: int = 16000) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    return 0.5 * torch.sin(2 * math.pi * (f0 + 300 * t) * t)


def clips() -> list[torch.Tensor]:
    noise = 0.1 * torch.randn(8000, generator=torch.Generator().manual_seed(0))
    return [chirp(0.6, f) for f in (200, 450, 900)] + [noise]


def test_kmeans_recovers_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres[:, None] + 0.1 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)  # [200, 2]
    found = kmeans(x, 4, iters=10, seed=3)
    assert torch.equal(found, kmeans(x, 4, iters=10, seed=3))
    assert squared_distances(centres, found).min(1).values.max() < 0.05   # every true centre has a centroid on it


def test_residual_stage_reduces_error():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    first = kmeans(x, 16, seed=0)
    second = kmeans(x - first[squared_distances(x, first).argmin(1)], 16, seed=1)
    _, one = residual_quantize(x, first[None])
    codes, two = residual_quantize(x, torch.stack([first, second]))
    assert codes.shape == (2, 400)
    assert (two - x).pow(2).mean() < 0.8 * (one - x).pow(2).mean()


def test_encode_decode_shapes_determinism_and_save_load(tmp_path):
    codec = MelCodec(n_codebooks=2, vocab_size=8, griffin_lim_iters=4).fit(clips(), iters=3)
    wav = chirp(1.0, 300)
    codes = codec.encode(wav)
    frames = math.ceil((len(wav) // codec.hop_length + 1) / codec.group)
    assert codes.shape == (2, frames) and codes.dtype == torch.long and int(codes.max()) < codec.vocab_size
    assert codec.frame_rate == 25
    out = codec.decode(codes)
    assert out.shape == (frames * codec.group * codec.hop_length,)
    assert codec.decode(codes[:, :1]).shape == (codec.group * codec.hop_length,)   # a one-frame stream chunk
    assert torch.equal(out, codec.decode(codes))                         # Griffin-Lim starts from a fixed phase
    codec.save(str(tmp_path))
    loaded = MelCodec.load(str(tmp_path))
    assert torch.equal(loaded.encode(wav), codes) and torch.equal(loaded.decode(codes), out)
    assert torch.equal(MelCodec(n_codebooks=2, vocab_size=8).fit(clips(), iters=3).codebooks, codec.codebooks)


def test_decode_with_the_talkers_distributions_takes_the_expected_codeword_of_the_finer_codebooks():
    codec = MelCodec(n_codebooks=3, vocab_size=8, griffin_lim_iters=4).fit(clips(), iters=3)
    codes = codec.encode(chirp(0.5, 300))                                              # [3, F]
    one_hot = torch.nn.functional.one_hot(codes, codec.vocab_size).float()              # [3, F, 8]
    assert torch.equal(codec.decode(codes, one_hot), codec.decode(codes))               # sure of its codes: the same
    probs = torch.rand(*one_hot.shape, generator=torch.Generator().manual_seed(0)).softmax(-1)
    expected = (codec.codebooks[0][codes[0]] + probs[1] @ codec.codebooks[1]           # code 0 stays the picked one
                + probs[2] @ codec.codebooks[2])
    assert torch.equal(codec.decode(codes, probs), codec.synthesize(expected))
    assert not torch.allclose(codec.decode(codes, probs), codec.decode(codes))


def test_phonetic_first_codebook_hears_its_labels_and_saves_its_classifier(tmp_path):
    """Label every frame of each clip with the clip's index: code 0 must come out as that label, its codeword must be
    the mean frame of the frames given it, and the k-means codebooks after it quantise what is left."""
    wavs = clips()
    codec = MelCodec(n_codebooks=3, vocab_size=8, griffin_lim_iters=4, phonemes=["a", "b", "c", "_"])
    labels = [torch.full((len(codec.features(w)),), i) for i, w in enumerate(wavs)]
    codec.fit(wavs, iters=3, frame_phonemes=labels)
    for w, label in zip(wavs, labels):
        codes = codec.encode(w)
        assert codes.shape == (3, len(label)) and int(codes.max()) < codec.vocab_size
        assert (codes[0] == label).float().mean() > 0.9
    frames = torch.cat([codec.features(w) for w in wavs])
    heard = torch.cat([codec.classifier.predict(codec.features(w)) for w in wavs])
    for i in range(4):
        assert torch.allclose(codec.codebooks[0, i], frames[heard == i].mean(0), atol=1e-4)
    assert codec.codebooks[0, 4:].abs().max() == 0                      # codes no phoneme uses stay empty
    residual = frames - codec.codebooks[0][heard]
    _, one = residual_quantize(frames, codec.codebooks[:1])
    _, three = residual_quantize(residual, codec.codebooks[1:])
    assert (three - residual).pow(2).mean() < (one - frames).pow(2).mean()  # the acoustic books take the rest

    codec.save(str(tmp_path))
    loaded = MelCodec.load(str(tmp_path))
    assert loaded.phonemes == codec.phonemes
    assert all(torch.equal(loaded.encode(w), codec.encode(w)) for w in wavs)
    again = MelCodec(n_codebooks=3, vocab_size=8, phonemes=["a", "b", "c", "_"]).fit(wavs, iters=3,
                                                                                     frame_phonemes=labels)
    assert torch.equal(again.codebooks, codec.codebooks)                 # seeded: the same fit twice
    with pytest.raises(ValueError, match="frame_phonemes"):
        MelCodec(n_codebooks=2, vocab_size=8, phonemes=["a"]).fit(wavs)


def test_espeak_phoneme_timings_match_the_command_line_and_the_clip(tmp_path):
    """The library's phoneme events spell what `espeak-ng -x` prints, and the per-frame labels of a clip the build
    wrote put silence on its quiet frames (the sentence pause, the tail) and phonemes on its loud ones."""
    from dataset.build_toyworld import synth_speech
    from dataset.phonemes import SILENCE, espeak, frame_phonemes
    from dataset.speech_targets import read_wav

    text, spec = "Ball thirteen bed. Seven red cats.", {"voice": "en+m3", "speed": 155, "pitch": 35}
    _, phonemes = espeak().speak(text, **spec)
    printed = subprocess.run(["espeak-ng", "-q", "-x", "-v", spec["voice"], text], capture_output=True, text=True)
    assert "".join(n for n, _ in phonemes if not n.startswith("_")) == re.sub(r"[',\s]", "", printed.stdout)

    synth_speech({"kind": "speech", "text": text, **spec}, str(tmp_path / "clip.wav"))
    codec = MelCodec()
    level = codec.features(read_wav(str(tmp_path / "clip.wav"))).mean(1)   # [F] mean log-mel per code frame
    labels = frame_phonemes({"text": text, **spec}, len(level), codec.hop_length * codec.group)
    silent = torch.tensor([name == SILENCE for name in labels])
    assert labels[-1] == SILENCE and silent[len(labels) // 3:2 * len(labels) // 3].any()  # the pause between sentences
    quiet = level < level.min() + 0.25 * (level.max() - level.min())
    assert (silent == quiet).float().mean() > 0.85
