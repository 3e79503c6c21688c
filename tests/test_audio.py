"""Parity of our Whisper encoder and log-mel frontend with transformers (tiny random config, CPU, fp32)."""
import math

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from model.model_audio import AudioConfig, WhisperEncoder, load_audio, log_mel_spectrogram, split_mel

TOL = 1e-4
AUDIO = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=80,
             max_source_positions=1500)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = WhisperConfig(**AUDIO, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                        vocab_size=64, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None,
                        attn_implementation="eager")
    hf = WhisperForConditionalGeneration(cfg).eval()
    folder = str(tmp_path_factory.mktemp("whisper"))
    hf.save_pretrained(folder)
    return hf, WhisperEncoder.from_pretrained_hf(folder)


def test_full_chunk_matches_transformers(checkpoint):
    hf, ours = checkpoint
    assert ours.config == AudioConfig(**AUDIO)
    torch.manual_seed(1)
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        ref = hf.model.encoder(mel).last_hidden_state  # [1, 1500, 64]
        states, mask = ours(mel, torch.tensor([3000]))
    diff = (states - ref).abs().max().item()
    print(f"audio encoder full 3000-frame max abs diff: {diff:.3e}")
    assert mask.all() and states.shape == ref.shape and diff <= TOL


def test_whisper_model_and_encoder_only_checkpoints_load(checkpoint, tmp_path):
    hf, ours = checkpoint
    hf.model.save_pretrained(str(tmp_path / "whisper_model"))  # keys "encoder.*", "decoder.*"
    hf.model.encoder.save_pretrained(str(tmp_path / "encoder_only"))  # bare keys
    for name in ("whisper_model", "encoder_only"):
        loaded = WhisperEncoder.from_pretrained_hf(str(tmp_path / name)).state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in ours.state_dict().items())


def test_fresh_positions_are_whisper_sinusoids(checkpoint):
    hf, _ = checkpoint
    fresh = WhisperEncoder(AudioConfig(**AUDIO))
    diff = (fresh.embed_positions.weight - hf.model.encoder.embed_positions.weight).abs().max().item()
    assert diff <= 1e-5


def test_batched_equals_alone(checkpoint):
    _, ours = checkpoint
    torch.manual_seed(2)
    lens = [3000, 1234, 777]  # odd length: the stride-2 conv's last window reaches past the clip
    clips = [torch.randn(80, n) for n in lens]
    mel = torch.zeros(3, 80, 3000)
    for i, c in enumerate(clips):
        mel[i, :, :c.shape[1]] = c
    with torch.no_grad():
        states, mask = ours(mel, torch.tensor(lens))
        diffs = []
        for i, c in enumerate(clips):
            alone, _ = ours(c[None], torch.tensor([c.shape[1]]))
            n = (lens[i] - 1) // 2 + 1
            assert alone.shape[1] == n and mask[i].sum().item() == n and not states[i, n:].any()
            diffs.append((states[i, :n] - alone[0]).abs().max().item())
    print("audio batched vs alone max abs diffs (3000, 1234, 777 frames): " + ", ".join(f"{d:.3e}" for d in diffs))
    assert max(diffs) <= TOL


def test_too_long_and_split():
    enc = WhisperEncoder(AudioConfig(**AUDIO))
    with pytest.raises(ValueError, match="split_mel"):
        enc(torch.zeros(1, 80, 3001), torch.tensor([3001]))
    assert [c.shape[1] for c in split_mel(torch.zeros(80, 7000))] == [3000, 3000, 1000]
    with torch.device("meta"):
        assert next(WhisperEncoder(AudioConfig(**AUDIO)).parameters()).is_meta


def _test_wave(n_samples: int) -> torch.Tensor:
    """Noise + a tone under an envelope that peaks mid-clip, so the log-mel maximum is far from the edges."""
    g = torch.Generator().manual_seed(3)
    t = torch.arange(n_samples) / 16000
    envelope = torch.sin(math.pi * torch.arange(n_samples) / n_samples)
    return 0.05 * torch.randn(n_samples, generator=g) + 0.5 * envelope * torch.sin(2 * math.pi * 440 * t)


def test_log_mel_matches_whisper_feature_extractor():
    fe = WhisperFeatureExtractor(feature_size=80)
    # (i) exactly 30 s: no padding on either side, all 3000 frames must match
    wav = _test_wave(480000)
    ref = fe(wav.numpy(), sampling_rate=16000, return_tensors="np").input_features[0]  # [80, 3000]
    ours = log_mel_spectrogram(wav)
    diff_30s = np.abs(ours.numpy() - ref).max()
    assert ours.shape == (80, 3000)
    # (ii) ~3.7 s: the extractor zero-pads the waveform to 30 s first, so a frame whose 400-sample window
    # (centred on 160 t) reaches past the last sample sees zeros there, while ours (unpadded, like
    # torch.stft on the clip alone) sees reflect padding. Only frames t <= (S - 200) // 160 are untouched
    # by that difference (here all but the last one); the global max for the -8 floor lies mid-clip in both.
    n = 59213
    wav = _test_wave(n)
    ref = fe(wav.numpy(), sampling_rate=16000, return_tensors="np").input_features[0]
    ours = log_mel_spectrogram(wav)
    assert ours.shape == (80, n // 160)
    clean = (n - 200) // 160 + 1
    diff_short = np.abs(ours[:, :clean].numpy() - ref[:, :clean]).max()
    print(f"log-mel vs WhisperFeatureExtractor max abs diff: 30 s {diff_30s:.3e}, "
          f"3.7 s (first {clean}/{n // 160} frames) {diff_short:.3e}")
    assert diff_30s <= TOL and diff_short <= TOL


def test_load_audio_downmixes_and_resamples(tmp_path):
    sr = 22050
    t = np.arange(sr) / sr  # 1 s
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32)
    path = str(tmp_path / "tone.wav")
    soundfile.write(path, stereo, sr, subtype="FLOAT")  # float wav: no quantisation
    wav = load_audio(path)
    expected = AF.resample(torch.from_numpy(stereo.mean(axis=1)), sr, 16000)
    assert wav.dtype == torch.float32 and wav.shape == (16000,)
    diff = (wav - expected).abs().max().item()
    # sanity against the analytic 0.75 * sin at 16 kHz away from the edges (resampling filter ripple)
    t16 = torch.arange(16000) / 16000
    analytic = (wav - 0.75 * torch.sin(2 * math.pi * 440 * t16))[200:-200].abs().max().item()
    print(f"load_audio vs torchaudio resample max abs diff: {diff:.3e} (vs analytic tone: {analytic:.3e})")
    assert diff <= TOL and analytic <= 1e-2
