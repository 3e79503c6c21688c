"""A Whisper audio encoder (reads transformers' Whisper checkpoints) and Whisper's log-mel frontend.

Whisper always pads audio to 30 s (3000 mel frames). MiniCPM-o does not: a clip keeps its own length,
positions are `embed_positions[:T']` and padded frames of a batch are masked out of attention. Padded mel
frames are zeros, and the conv stack sees zeros past the end of every clip, batched or alone; so a clip's
states never depend on what it is batched with. (Whisper's own padding is log-mel of silence, i.e. the
floor value, not zeros, so a short clip's last state differs slightly from Whisper-on-30-s; a full 30 s
chunk gives exactly Whisper's states.)
"""
import math
from dataclasses import dataclass, fields

import soundfile
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import nn

from model.weights import load_state_dict_checked, read_hf_config, read_safetensors

SAMPLE_RATE, N_FFT, HOP_LENGTH = 16000, 400, 160  # 25 ms windows every 10 ms


@dataclass
class AudioConfig:
    """Encoder field names (and defaults) of transformers' WhisperConfig."""
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    activation_function: str = "gelu"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "AudioConfig":
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def load_audio(path: str, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Any soundfile-readable file -> mono float32 waveform [S] at `sr` Hz."""
    data, rate = soundfile.read(path, dtype="float32", always_2d=True)  # [S, channels]
    wav = torch.from_numpy(data).mean(dim=1)  # [S]
    if rate != sr:
        wav = AF.resample(wav, rate, sr)
    return wav


def log_mel_spectrogram(wav: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper's exact recipe: 16 kHz waveform [S] -> log-mel [n_mels, S // 160], scaled to about [-1, 1]."""
    if wav.dim() != 1 or wav.shape[0] <= N_FFT // 2:
        raise ValueError(f"expected a 1-D waveform longer than {N_FFT // 2} samples, got shape {tuple(wav.shape)}")
    wav = wav.float()
    window = torch.hann_window(N_FFT, device=wav.device)  # periodic, as Whisper
    stft = torch.stft(wav, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # [201, S // 160 + 1]
    power = stft[:, :-1].abs() ** 2  # [201, S // 160]; Whisper drops the last frame
    filters = AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE,
                                 norm="slaney", mel_scale="slaney").to(wav.device)  # [201, n_mels]
    log_spec = (filters.T @ power).clamp(min=1e-10).log10()  # [n_mels, S // 160]
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)  # 80 dB dynamic range
    return (log_spec + 4.0) / 4.0


def split_mel(mel: torch.Tensor, max_frames: int = 3000) -> list[torch.Tensor]:
    """[n_mels, T] -> chunks of at most `max_frames` frames (30 s), the encoder's position limit."""
    return list(mel.split(max_frames, dim=-1))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed position table [length, channels]: sin half then cos half."""
    inv_timescales = torch.exp(-math.log(max_timescale) / (channels // 2 - 1) * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]  # [length, channels/2]
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class WhisperAttention(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.encoder_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)  # a key bias would cancel in softmax anyway
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])  # [B, H, T, hd]
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = WhisperAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Two convs (the second halves the frame rate: 100 Hz mel -> 50 Hz states) + a transformer encoder."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, cfg.d_model)
        with torch.no_grad():
            self.embed_positions.weight.copy_(sinusoids(cfg.max_source_positions, cfg.d_model))
        self.embed_positions.requires_grad_(False)  # fixed in Whisper, but stored in its checkpoints
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, mel: torch.Tensor, mel_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [N, n_mels, Tmax] zero padded, mel_lens Long[N]
        -> states [N, T', D] (zeros past each clip), mask Bool[N, T'], T' = (Tmax - 1) // 2 + 1."""
        t_max = mel.shape[-1]
        max_frames = 2 * self.config.max_source_positions
        if t_max > max_frames:
            raise ValueError(f"mel has {t_max} frames but the encoder takes at most {max_frames} (30 s); "
                             f"split longer audio with split_mel(mel, {max_frames})")
        mel_lens = mel_lens.to(mel.device)
        if (mel_lens < 1).any() or (mel_lens > t_max).any():
            raise ValueError(f"mel_lens {mel_lens.tolist()} must lie in [1, {t_max}]")
        frames = (torch.arange(t_max, device=mel.device) < mel_lens[:, None]).unsqueeze(1)  # [N, 1, Tmax]
        # zero everything past a clip's end before each conv, so its boundary sees the same zero padding
        # whether it is batched with longer clips or run alone
        x = mel.to(self.conv1.weight.dtype) * frames
        x = F.gelu(self.conv1(x)) * frames  # [N, D, Tmax]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [N, T', D]
        t_out = x.shape[1]
        x = x + self.embed_positions.weight[:t_out]
        mask = torch.arange(t_out, device=x.device) < ((mel_lens - 1) // 2 + 1)[:, None]  # [N, T']
        for layer in self.layers:
            x = layer(x, mask)
        x = self.layer_norm(x)
        return x.masked_fill(~mask.unsqueeze(-1), 0.0), mask

    @classmethod
    def from_pretrained_hf(cls, folder: str) -> "WhisperEncoder":
        """Loads the encoder of a local Whisper checkpoint folder (full model or encoder-only), fp32 on CPU."""
        cfg = AudioConfig.from_hf_config(read_hf_config(folder))
        state = read_safetensors(folder)
        # WhisperForConditionalGeneration, WhisperModel; encoder-only checkpoints have bare keys
        for prefix in ("model.encoder.", "encoder."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device="cpu")  # every tensor is then overwritten by the strict load below
        load_state_dict_checked(model, state, f"Whisper encoder from {folder}")
        return model.eval()
