"""The omni model: a vision tower and an audio tower whose features are spliced into a Qwen3 decoder.

Read top to bottom: special tokens, config, placeholder counts, the Resampler (images and video),
the AudioProjector, then OmniModel (embedding splice, loss, generation, freezing, save/load, chat). The optional
talker (model/talker.py) speaks the answers; model/codec.py turns its codes into a waveform.
"""
import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from model.codec import MelCodec
from model.model_audio import AudioConfig, WhisperEncoder
from model.model_llm import KVCache, LLMConfig, Qwen3ForCausalLM
from model.model_vision import SiglipVisionModel, VisionConfig
from model.talker import SpokenFrames, Talker, TalkerConfig, answer_words
from model.weights import load_state_dict_checked, read_hf_config

# ----------------------------------------------------------------------------- special tokens
# `<image>` / `<audio>` / `<video>` in a user turn are media MARKERS; the data pipeline expands each one into
# start token + N pad tokens + end token, and the model overwrites the pad tokens' embeddings with media features.
IMAGE_START, IMAGE_END = "<image>", "</image>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_START, VIDEO_END = "<video>", "</video>"
VIDEO_PAD = "<|video_pad|>"
AUDIO_START, AUDIO_END = "<|audio_start|>", "<|audio_end|>"
AUDIO_PAD = "<|audio_pad|>"
MEDIA_TOKENS = [IMAGE_START, IMAGE_END, SLICE_START, SLICE_END, IMAGE_PAD,
                VIDEO_START, VIDEO_END, VIDEO_PAD, AUDIO_START, AUDIO_END, AUDIO_PAD]
# Tiny recipe: a square text image is spelled over the slots from this one on, the ones a ToyWorld scene leaves
# spare after its 9 cells (its first slots hold the pad's code), so the queries that read cells and the ones that
# spell never share a target. (What kept the scenes alive was weighting the reading loss down: docs/experiments.md.)
TEXT_SLOTS_FROM = 9


# ----------------------------------------------------------------------------- config
@dataclass
class OmniConfig:
    llm: LLMConfig
    vision: VisionConfig
    audio: AudioConfig
    query_num: int = 64             # resampler queries = LLM tokens per image slice / per video frame group
    resampler_heads: int = 0        # 0 = the original's rule, width // 128 (only 2 heads at the tiny width)
    scale_resolution: int = 448     # LLaVA-UHD slicing: each slice is about scale_resolution^2 pixels
    max_slice_nums: int = 9
    video_group_size: int = 6       # frames that share one set of query_num tokens (3-D resampler)
    video_max_frames: int = 32
    audio_pool_step: int = 5        # 50 Whisper frames/s -> 10 tokens/s
    audio_chunk_frames: int = 3000  # Whisper sees at most 30 s (3000 mel frames) at once
    image_pad_id: int = -1          # the three pad ids come from the tokenizer (set_token_ids)
    video_pad_id: int = -1
    audio_pad_id: int = -1
    external_weights: dict = field(default_factory=dict)  # component -> local HF folder, for towers not saved with us
    talker: TalkerConfig | None = None  # speech output; None = a text-only model (and every config saved before it)
    reads_standins: bool = False    # the LLM learned ToyWorld's word stand-ins (tiny text warm-up): only then does
                                    # the stand-in loss pull image slots onto them
    spelling_ids: list | None = None  # token ids of each character speech is spelled with (set by the tiny listen
                                      # warm-up; class i + 1 of spelling_loss); None = no spelled audio stand-ins

    @staticmethod
    def preset(name: str) -> "OmniConfig":
        if name == "tiny":  # trains on 2 CPU cores in minutes; vocab_size is set from the ToyWorld tokenizer
            return OmniConfig(
                llm=LLMConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0,
                              max_position_embeddings=2048, tie_word_embeddings=True),
                # exact GELU, not SigLIP's tanh form: 2.6x faster on a CPU, the vision warm-up 10% (docs/experiments.md)
                vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=4, image_size=112, patch_size=14, hidden_act="gelu"),
                audio=AudioConfig(num_mel_bins=80, d_model=128, encoder_layers=3, encoder_attention_heads=4,
                                  encoder_ffn_dim=512, max_source_positions=1500),
                query_num=16, resampler_heads=8, scale_resolution=112, max_slice_nums=4,
                video_max_frames=4, video_group_size=1,  # each of 4 frames its own slots, read like a scene
                audio_pool_step=2)  # 25 tokens/s: enough rows to spell a transcript (see warmup_heads.ListenWarmup)
        if name == "qwen3_0_6b":  # Qwen3-0.6B + SigLIP2-so400m-patch14-384 + Whisper-medium encoder
            return OmniConfig(
                llm=LLMConfig(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                              max_position_embeddings=40960, tie_word_embeddings=True),
                vision=VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                    num_attention_heads=16, image_size=384, patch_size=14),
                audio=AudioConfig(num_mel_bins=80, d_model=1024, encoder_layers=24, encoder_attention_heads=16,
                                  encoder_ffn_dim=4096, max_source_positions=1500),
                query_num=64, scale_resolution=448, max_slice_nums=9)
        raise ValueError(f"unknown preset {name!r}; choose 'tiny' or 'qwen3_0_6b'")

    @staticmethod
    def from_hf_folders(llm: str, vision: str, audio: str, **overrides) -> "OmniConfig":
        """Tower shapes read from local checkpoint folders (config.json), the rest from the qwen3_0_6b preset."""
        base = asdict(OmniConfig.preset("qwen3_0_6b"))
        base.update(overrides)
        base["llm"] = asdict(LLMConfig.from_hf_config(read_hf_config(llm)))
        base["vision"] = asdict(VisionConfig.from_hf_config(read_hf_config(vision)))
        base["audio"] = asdict(AudioConfig.from_hf_config(read_hf_config(audio)))
        return OmniConfig.from_dict(base)

    def set_token_ids(self, tokenizer) -> "OmniConfig":
        """Record the placeholder ids; the tokenizer must already hold our special tokens."""
        for attr, token in (("image_pad_id", IMAGE_PAD), ("video_pad_id", VIDEO_PAD), ("audio_pad_id", AUDIO_PAD)):
            idx = tokenizer.convert_tokens_to_ids(token)
            if idx is None or idx == tokenizer.unk_token_id or idx >= self.llm.vocab_size:
                raise ValueError(f"tokenizer has no usable id for {token} (got {idx}, vocab_size {self.llm.vocab_size})")
            setattr(self, attr, idx)
        return self

    @property
    def frames_read_alone(self) -> bool:
        """Each video frame has its own query_num slots (the tiny preset): a frame is resampled like a scene, so
        ToyWorld clips get per-frame stand-ins (toyworld_text.frame_slots)."""
        return self.video_group_size == 1

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "OmniConfig":
        known = {f.name for f in fields(OmniConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown OmniConfig keys: {sorted(unknown)}")
        d = dict(d, llm=LLMConfig(**d["llm"]), vision=VisionConfig(**d["vision"]), audio=AudioConfig(**d["audio"]),
                 talker=TalkerConfig(**d["talker"]) if d.get("talker") else None)
        return OmniConfig(**d)

    def save(self, path: str):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @staticmethod
    def load(path: str) -> "OmniConfig":
        with open(path) as f:
            return OmniConfig.from_dict(json.load(f))


# ----------------------------------------------------------------------------- placeholder counts
def audio_chunk_token_count(mel_len: int, pool_step: int) -> int:
    """Tokens one <= 30 s chunk produces: conv2 halves the frames (stride 2), then AvgPool1d(k=s=pool_step)."""
    after_cnn = (mel_len - 1) // 2 + 1
    return max(0, (after_cnn - pool_step) // pool_step + 1)


def audio_token_count(mel_len: int, config: OmniConfig) -> int:
    """AUDIO_PAD tokens for an audio of mel_len frames; audio over 30 s is encoded in 30 s chunks."""
    chunk = config.audio_chunk_frames
    full, rest = divmod(mel_len, chunk)
    count = full * audio_chunk_token_count(chunk, config.audio_pool_step)
    return count + (audio_chunk_token_count(rest, config.audio_pool_step) if rest else 0)


# ----------------------------------------------------------------------------- sin-cos position tables
def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[...] positions -> [..., dim]: [sin(p * w_0..w_{dim/2-1}), cos(p * w_0..)] with w_i = 1 / 10000^(i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.to(torch.float64).unsqueeze(-1) * omega  # [..., dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """[grid_h, grid_w, dim] table: the first dim/2 channels encode the column, the last dim/2 the row."""
    rows = torch.arange(grid_h).unsqueeze(1).expand(grid_h, grid_w)
    cols = torch.arange(grid_w).unsqueeze(0).expand(grid_h, grid_w)
    return torch.cat([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], dim=-1)


# ----------------------------------------------------------------------------- resampler
class Resampler(nn.Module):
    """Perceiver resampler of MiniCPM-V/o: query_num learned queries, ONE cross-attention, nothing else.

    Positions enter through the KEYS only (2-D sin-cos of each patch's row/column, plus a 1-D sin-cos of the
    frame time for video), so one set of queries serves any slice size and any frame group.
    Parameter names follow the original so its weights load.
    """

    def __init__(self, query_num: int, embed_dim: int, kv_dim: int, num_heads: int | None = None):
        super().__init__()
        self.query_num, self.embed_dim = query_num, embed_dim
        num_heads = num_heads or max(1, embed_dim // 128)
        self.query = nn.Parameter(torch.zeros(query_num, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)

    def patch_positions(self, grid_hw: torch.Tensor, length: int) -> torch.Tensor:
        """[N, 2] grids -> [N, L, D] 2-D sin-cos of each packed (row-major) patch; padded patches get row/col 0."""
        max_h, max_w = int(grid_hw[:, 0].max()), int(grid_hw[:, 1].max())
        table = sincos_2d(max_h, max_w, self.embed_dim).to(grid_hw.device)  # [Hmax, Wmax, D]
        idx = torch.arange(length, device=grid_hw.device)                    # [L]
        width = grid_hw[:, 1:2]                                              # [N, 1]
        rows, cols = (idx // width).clamp(max=max_h - 1), idx % width        # [N, L]
        return table[rows, cols]                                             # [N, L, D]

    def attend(self, keys: torch.Tensor, values: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        """keys/values [N, L, D], key_padding [N, L] (True = ignore) -> [N, Q, D]."""
        n = keys.shape[0]
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, n, -1)              # [Q, N, D]
        out, _ = self.attn(q, keys.transpose(0, 1), values.transpose(0, 1),
                           key_padding_mask=key_padding, need_weights=False)  # [Q, N, D]
        return self.ln_post(out.transpose(0, 1)) @ self.proj                  # [N, Q, D]

    def forward(self, x: torch.Tensor, patch_mask: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Images: x [N, L, kv_dim] patch features of N slices, patch_mask [N, L] -> [N, Q, D]."""
        x = self.ln_kv(self.kv_proj(x))                                           # [N, L, D]
        pos = self.patch_positions(grid_hw, x.shape[1]).to(x.dtype)               # [N, L, D]
        return self.attend(x + pos, x, ~patch_mask)

    def forward_video(self, x: torch.Tensor, patch_mask: torch.Tensor, grid_hw: torch.Tensor,
                      temporal_ids: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        """Video: F frames [F, L, kv_dim] in G consecutive groups -> [G, Q, D]; a group's queries see all its patches."""
        x = self.ln_kv(self.kv_proj(x))                                               # [F, L, D]
        pos = self.patch_positions(grid_hw, x.shape[1]) + sincos_1d(temporal_ids, self.embed_dim)[:, None]
        keys = x + pos.to(x.dtype)                                                     # [F, L, D]
        # scatter frames into a [G, S, L, D] grid (S = largest group), then flatten each group's patches
        num_groups, frames, length = len(group_sizes), x.shape[0], x.shape[1]
        group = torch.repeat_interleave(torch.arange(num_groups, device=x.device), group_sizes)  # [F]
        first = torch.cumsum(group_sizes, 0) - group_sizes                                      # [G]
        slot = torch.arange(frames, device=x.device) - first[group]                             # [F]
        size = int(group_sizes.max())
        grouped_k = x.new_zeros(num_groups, size, length, self.embed_dim)
        grouped_v = x.new_zeros(num_groups, size, length, self.embed_dim)
        grouped_m = patch_mask.new_zeros(num_groups, size, length)
        grouped_k[group, slot], grouped_v[group, slot], grouped_m[group, slot] = keys, x, patch_mask
        flat = (num_groups, size * length)
        return self.attend(grouped_k.view(*flat, -1), grouped_v.view(*flat, -1), ~grouped_m.view(flat))


def relative_error(slots: torch.Tensor, standins: torch.Tensor) -> torch.Tensor:
    """[..., D] image slots vs their word stand-ins (targets only, detached): mean squared distance relative to the
    stand-ins' mean squared norm (0 = exact, 1 = as far as predicting zeros)."""
    target = standins.detach().float()
    return ((slots.float() - target) ** 2).sum(-1).mean() / (target ** 2).sum(-1).mean()


def spelling_loss(tokens: torch.Tensor, n_tokens: torch.Tensor, codes: torch.Tensor, targets: torch.Tensor,
                  target_lens: torch.Tensor, temperature: float = 8.0) -> torch.Tensor:
    """Audio tokens [N, T, D] (the first n_tokens[i] valid) vs their clips' spelled transcripts (targets [N, L]:
    rows of codes [C+1, D], 1-based; row 0, the audio pad's code, is the CTC blank): CTC with each token's logits
    its minus squared distances to the codes / temperature (distinct codes lie ~128 apart, squared), plus the pull
    of every token onto the code it is nearest to (relative_error). CTC alone rewards overshooting (a token twice
    its code's size is further from every other code); the LLM reads the codes themselves."""
    distances = torch.cdist(tokens.float(), codes.float().expand(len(tokens), -1, -1)) ** 2   # [N, T, C+1]
    logp = (-distances / temperature).log_softmax(-1).transpose(0, 1)                          # [T, N, C+1]
    ctc = F.ctc_loss(logp, targets, n_tokens, target_lens, zero_infinity=True)
    valid = torch.arange(tokens.shape[1], device=tokens.device) < n_tokens[:, None]          # [N, T]
    return ctc + relative_error(tokens[valid], codes[distances.argmin(-1)][valid])


# ----------------------------------------------------------------------------- audio projector
class AudioProjector(nn.Module):
    """Whisper states (50/s) -> LLM width, then average pooling (k = s = pool_step) -> 10 tokens/s by default."""

    def __init__(self, in_dim: int, out_dim: int, pool_step: int = 5):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(out_dim, out_dim)
        self.pool = nn.AvgPool1d(pool_step, stride=pool_step)
        self.pool_step = pool_step

    def pooled(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [N, T, Da], mask [N, T] -> ([N, T // pool, D] tokens per chunk, Long[N] how many are valid)."""
        x = self.linear2(self.relu(self.linear1(states)))             # [N, T, D]
        x = self.pool(x.transpose(1, 2)).transpose(1, 2)              # [N, T // pool, D]
        valid = mask.sum(1)                                           # [N] valid frames per chunk
        return x, ((valid - self.pool_step) // self.pool_step + 1).clamp(min=0)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states [N, T, Da], mask [N, T] -> the valid pooled tokens of all chunks, in order: [sum(n_i), D]."""
        x, n_tokens = self.pooled(states, mask)
        keep = torch.arange(x.shape[1], device=x.device) < n_tokens[:, None]  # [N, T // pool]
        return x[keep]


# ----------------------------------------------------------------------------- the omni model
@dataclass
class MediaInputs:
    """Everything the collate produces besides text (see dataset/omni_dataset.py); absent media are None."""
    pixel_values: torch.Tensor | None = None        # [N_slices, 3, H, W]
    image_grid_hw: torch.Tensor | None = None       # [N_slices, 2]
    video_pixel_values: torch.Tensor | None = None  # [N_frames, 3, H, W]
    video_grid_hw: torch.Tensor | None = None       # [N_frames, 2]
    video_temporal_ids: torch.Tensor | None = None  # [N_frames], 0.1 s units
    video_group_sizes: torch.Tensor | None = None   # [N_groups]
    audio_features: torch.Tensor | None = None      # [N_chunks, 80, T]
    audio_feature_lens: torch.Tensor | None = None  # [N_chunks]
    standin_ids: torch.Tensor | None = None         # [B, T, W] word ids a row stands for, -1 = none (see embed_inputs)
    audio_spelling: torch.Tensor | None = None      # [N_chunks, L] each chunk's spelled transcript (see listen_loss)
    audio_spelling_lens: torch.Tensor | None = None  # [N_chunks], 0 = no transcript
    image_spelling: torch.Tensor | None = None      # [N_slices, L] each slice's spelled text (see reading_loss)
    image_spelling_lens: torch.Tensor | None = None  # [N_slices], 0 = none


class OmniModel(nn.Module):
    """Vision tower + resampler and audio tower + projector feeding a Qwen3 decoder.

    The whole multimodal trick is `embed_inputs`: text is embedded as usual, then the rows at placeholder
    tokens (<|image_pad|>, <|video_pad|>, <|audio_pad|>) are overwritten, in order, with media embeddings.
    """
    COMPONENTS = {"vision": "vision_tower", "audio": "audio_tower", "llm": "llm",
                  "resampler": "resampler", "audio_projector": "audio_projector"}

    def __init__(self, config: OmniConfig):
        super().__init__()
        self.config = config
        width = config.llm.hidden_size
        self.llm = Qwen3ForCausalLM(config.llm)
        self.vision_tower = SiglipVisionModel(config.vision)
        self.resampler = Resampler(config.query_num, width, kv_dim=config.vision.hidden_size,
                                   num_heads=config.resampler_heads or None)
        self.audio_tower = WhisperEncoder(config.audio)
        self.audio_projector = AudioProjector(config.audio.d_model, width, config.audio_pool_step)
        self.talker = Talker(config.talker, width, config.llm.vocab_size) if config.talker else None
        self.codec = None          # the talker's codec (model/codec.py); loaded with the checkpoint when saved in it
        self.speech_weight = 1.0   # loss = text loss + speech_weight * talker loss (train_sft_omni.py --speech_weight)
        self.standin_weight = 0.0  # + standin_weight * stand-in loss (stage scripts' --standin_weight)
        self.lookup_weight = 0.0   # + lookup_weight * lookup loss (stage scripts' --lookup_weight)
        self.reading_weight = 0.0  # + reading_weight * reading loss (stage scripts' --reading_weight)
        self._word_codes = None    # the stand-ins' fixed word vectors, built on first use (word_codes)

    def add_talker(self, config: TalkerConfig) -> "OmniModel":
        """Give a text-only model a freshly initialised talker (its config is saved with the checkpoint)."""
        self.config.talker = config
        self.talker = Talker(config, self.config.llm.hidden_size, self.config.llm.vocab_size)
        self.talker.to(next(self.parameters()).device)
        return self

    # ---- media encoders: each returns embeddings in LLM width, in prompt order
    def embed_images(self, pixel_values, grid_hw) -> torch.Tensor:
        feats, mask = self.vision_tower(pixel_values, grid_hw)   # [N, L, Dv], [N, L]
        return self.resampler(feats, mask, grid_hw)              # [N, Q, D]

    def embed_video(self, pixel_values, grid_hw, temporal_ids, group_sizes) -> torch.Tensor:
        feats, mask = self.vision_tower(pixel_values, grid_hw)   # [F, L, Dv]
        return self.resampler.forward_video(feats, mask, grid_hw, temporal_ids, group_sizes)  # [G, Q, D]

    def embed_audio(self, features, lens) -> torch.Tensor:
        states, mask = self.audio_tower(features, lens)          # [N, T', Da], [N, T']
        return self.audio_projector(states, mask)                # [n_tokens, D]

    def embed_standins(self, standin_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, W] word ids -> ([B, T, D] the sum of their word codes, Bool[B, T] rows that have words).
        A ToyWorld image slot described by its cell's words ('top left red circle large') as ONE vector: what the
        text warm-up reads in place of an image, and what `align` pulls the resampler's slots towards."""
        has_word = standin_ids >= 0
        words = self.word_codes(standin_ids.device)[standin_ids.clamp(min=0)]      # [B, T, W, D]
        return (words * has_word.unsqueeze(-1)).sum(2), has_word.any(-1)

    def word_codes(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[V, D] one fixed random vector per token (seeded, never trained, not saved). Stand-ins are sums of these,
        not of the live embeddings: training pulls interchangeable words together (after the text warm-up the six
        colours' embeddings have a mean cosine of 0.77), and a sum of near-equal colours no longer tells them apart.
        Scale: std 0.5, so a 4-word cell sums to about sqrt(D), the norm of the resampler's LayerNorm-ed output at
        init; codes at the embeddings' std 0.02 left `align` most of its steps shrinking the resampler's output."""
        if self._word_codes is None or self._word_codes.device != torch.device(device):  # built once per device
            llm = self.config.llm
            generator = torch.Generator().manual_seed(0)
            codes = torch.randn(llm.vocab_size, llm.hidden_size, generator=generator) * 0.5
            self._word_codes = codes.to(device)
        return self._word_codes

    def spelling_codes(self, device: torch.device | str = "cpu", blank_id: int | None = None) -> torch.Tensor:
        """[C+1, D]: the blank's word code (the audio pad's unless blank_id says: the image pad's for text images),
        then each spelling character's (config.spelling_ids)."""
        codes = self.word_codes(device)
        blank = self.config.audio_pad_id if blank_id is None else blank_id
        return torch.stack([codes[blank]] + [codes[ids].sum(0) for ids in self.config.spelling_ids])

    def embed_inputs(self, input_ids: torch.Tensor, media: MediaInputs) -> torch.Tensor:
        """[B, T] ids -> [B, T, D] embeddings with every placeholder row replaced by its media embedding, or by
        its word stand-in (embed_standins) where the batch gives stand-ins but not the medium itself."""
        embeds = self.llm.get_input_embeddings()(input_ids)      # [B, T, D]
        described = torch.zeros_like(input_ids, dtype=torch.bool)
        if media.standin_ids is not None:
            standins, described = self.embed_standins(media.standin_ids)
            embeds = torch.where(described.unsqueeze(-1), standins.to(embeds.dtype), embeds)
        cfg = self.config
        branches = [
            ("image", cfg.image_pad_id, media.pixel_values,
             lambda: self.embed_images(media.pixel_values, media.image_grid_hw)),
            ("video", cfg.video_pad_id, media.video_pixel_values,
             lambda: self.embed_video(media.video_pixel_values, media.video_grid_hw,
                                      media.video_temporal_ids, media.video_group_sizes)),
            ("audio", cfg.audio_pad_id, media.audio_features,
             lambda: self.embed_audio(media.audio_features, media.audio_feature_lens)),
        ]
        for kind, pad_id, data, encode in branches:
            is_pad = input_ids == pad_id                          # [B, T]
            n_pads = int(is_pad.sum())
            if data is None:
                if n_pads and not described[is_pad].all():
                    raise ValueError(f"batch has {n_pads} {kind} placeholder tokens but no {kind} inputs")
                continue
            feats = encode().reshape(-1, embeds.shape[-1])        # [n_media_tokens, D]
            if feats.shape[0] != n_pads:
                raise ValueError(f"{kind} placeholder/embedding count mismatch: the prompt has {n_pads} "
                                 f"{kind} pad tokens but the {kind} inputs produce {feats.shape[0]} embeddings")
            embeds = embeds.masked_scatter(is_pad.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    def unused_branch_anchor(self, media: MediaInputs, spoke: bool = False) -> torch.Tensor:
        """0 * (sum of trainable params of branches this batch did not use): keeps every trainable parameter in
        the autograd graph so DDP does not hang waiting for gradients of a modality missing from one rank."""
        unused = [self.talker] if self.talker is not None and not spoke else []
        if media.pixel_values is None and media.video_pixel_values is None:
            unused += [self.vision_tower, self.resampler]
        if media.audio_features is None:
            unused += [self.audio_tower, self.audio_projector]
        params = [p for m in unused for p in m.parameters() if p.requires_grad]
        return sum((p.sum() * 0.0 for p in params), torch.zeros(()))

    def standin_loss(self, input_ids: torch.Tensor, embeds: torch.Tensor, media: MediaInputs) -> torch.Tensor | None:
        """Squared distance between the image (and video frame) embeddings and their word stand-ins, relative to the
        stand-ins' size, over the rows that have both (None if none): makes the resampler's slots read like the cell
        descriptions the LLM learned to answer from. The stand-ins are targets only (detached)."""
        pads = [pad for pad, data in ((self.config.image_pad_id, media.pixel_values),
                                      (self.config.video_pad_id, media.video_pixel_values)) if data is not None]
        if media.standin_ids is None or not pads:
            return None
        standins, described = self.embed_standins(media.standin_ids)
        rows = described & torch.isin(input_ids, torch.tensor(pads, device=input_ids.device))   # [B, T]
        if not rows.any():
            return None
        return relative_error(embeds[rows], standins[rows])

    def listen_loss(self, input_ids: torch.Tensor, embeds: torch.Tensor, media: MediaInputs) -> torch.Tensor | None:
        """spelling_loss of the audio rows of chunks that carry a spelled transcript (None if none): keeps the
        audio projector writing the spelled stand-ins the listen warm-up taught it, as standin_loss keeps the
        resampler's slots on their cells' words."""
        has = media.audio_spelling_lens > 0                                           # [N_chunks]
        if not has.any():
            return None
        counts = [audio_chunk_token_count(int(n), self.config.audio_pool_step) for n in media.audio_feature_lens]
        chunks = embeds[input_ids == self.config.audio_pad_id].split(counts)        # per chunk [n_i, D]
        tokens = nn.utils.rnn.pad_sequence([c for c, h in zip(chunks, has) if h], batch_first=True)
        return spelling_loss(tokens, torch.tensor(counts, device=tokens.device)[has],
                             self.spelling_codes(tokens.device), media.audio_spelling[has],
                             media.audio_spelling_lens[has])

    def reading_loss(self, input_ids: torch.Tensor, embeds: torch.Tensor, media: MediaInputs) -> torch.Tensor | None:
        """text_slots_loss of the slots of image slices that carry a spelled text (square text images; None if
        none): keeps the resampler writing the text's characters as the slots warm-up taught it, as listen_loss
        does for the audio projector."""
        has = media.image_spelling_lens > 0                                           # [N_slices]
        if not has.any():
            return None
        slots = embeds[input_ids == self.config.image_pad_id].view(len(has), -1, embeds.shape[-1])[has]  # [n, Q, D]
        return self.text_slots_loss(slots, media.image_spelling[has], media.image_spelling_lens[has])

    def text_slots_loss(self, slots: torch.Tensor, spelling: torch.Tensor, spelling_lens: torch.Tensor) -> torch.Tensor:
        """Square text images' slots [n, Q, D] vs their texts (spelling [n, L], 1-based classes of
        config.spelling_ids): spelling_loss over the slots from TEXT_SLOTS_FROM on, the image pad's code the blank,
        plus the pull of the slots before them onto that code."""
        codes = self.spelling_codes(slots.device, self.config.image_pad_id)            # [C+1, D]
        spelled = slots[:, TEXT_SLOTS_FROM:]                                           # [n, Q - 9, D]
        n_rows = torch.full((len(slots),), spelled.shape[1], device=slots.device)
        blank = codes[0].expand_as(slots[:, :TEXT_SLOTS_FROM])
        return (spelling_loss(spelled, n_rows, codes, spelling, spelling_lens)
                + relative_error(slots[:, :TEXT_SLOTS_FROM], blank))

    def forward(self, input_ids, attention_mask=None, labels=None, speech_codes=None, speech_lens=None,
                speech_voices=None, speech_text_ids=None, speech_text_at=None, lookup_slots=None, **media) -> dict:
        """Next-token loss over labelled positions only; logits are computed only where labels exist.
        With speech targets (speech_*: see speech_loss) the talker's loss is added, times speech_weight; with
        images and their word stand-ins and a resampler that trains, the stand-in loss, times standin_weight (and
        with spelled transcripts and an audio projector that trains, the listen loss, times the same; with spelled
        text images, the reading loss, times reading_weight); with
        lookup targets (lookup_slots: see lookup_loss), the lookup loss, times lookup_weight."""
        media = MediaInputs(**media)
        embeds = self.embed_inputs(input_ids, media)
        looks = bool(self.lookup_weight) and lookup_slots is not None and bool((lookup_slots >= 0).all(-1).any())
        llm_out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, logits_at="none",
                           watch_layer=self.lookup_layer if looks else None)
        hidden = llm_out.hidden_states
        real = attention_mask > 0 if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        out = {"num_tokens": real.sum()}                          # a packed row numbers its sequences 1, 2, ...
        if labels is None:
            return out
        targets = labels[:, 1:]                                   # position t predicts token t+1
        keep = targets != -100                                    # [B, T-1]
        logits = self.llm.lm_head(hidden[:, :-1][keep])           # [N, V] only at labelled positions
        loss = F.cross_entropy(logits.float(), targets[keep]) if keep.any() else hidden.sum() * 0.0
        learns = (self.standin_weight and self.config.reads_standins
                  and self.resampler.query.requires_grad)  # a frozen resampler has nothing to fit
        standin_loss = self.standin_loss(input_ids, embeds, media) if learns else None
        if standin_loss is not None:
            out["standin_loss"] = standin_loss
            loss = loss + self.standin_weight * standin_loss
        reads = learns and self.reading_weight and self.config.spelling_ids and media.image_spelling is not None
        reading_loss = self.reading_loss(input_ids, embeds, media) if reads else None
        if reading_loss is not None:
            out["reading_loss"] = reading_loss
            loss = loss + self.reading_weight * reading_loss
        listens = (self.standin_weight and self.config.spelling_ids and media.audio_spelling is not None
                   and self.audio_projector.linear1.weight.requires_grad)
        listen_loss = self.listen_loss(input_ids, embeds, media) if listens else None
        if listen_loss is not None:
            out["listen_loss"] = listen_loss
            loss = loss + self.standin_weight * listen_loss
        if looks:
            out["lookup_loss"] = self.lookup_loss(llm_out.attentions, lookup_slots)
            loss = loss + self.lookup_weight * out["lookup_loss"]
        spoke = self.talker is not None and speech_lens is not None and bool((speech_lens > 0).any())
        if spoke:
            out["speech_loss"] = self.speech_loss(hidden, speech_codes, speech_lens, speech_voices, speech_text_ids,
                                                  speech_text_at)
            loss = loss + self.speech_weight * out["speech_loss"]
        if self.training:
            loss = loss + self.unused_branch_anchor(media, spoke).to(loss.device)
        out.update(loss=loss, num_label_tokens=keep.sum())
        return out

    @property
    def lookup_layer(self) -> int:
        """The layer whose first heads lookup_loss steers: the middle one, so the layers below can gather the
        question at the answer position and the layers above can turn the slot they read into the answer word."""
        return self.config.llm.num_hidden_layers // 2

    def lookup_loss(self, attentions: torch.Tensor, lookup_slots: torch.Tensor) -> torch.Tensor:
        """-log of the attention that the heads sharing the first key/value head give, at the position that
        predicts an answer, to the slot it must be read from (lookup_slots Long[B, T, 2], -1 = none: the target of
        the first half of those heads, then of the second half; a scene question names one slot for both, a clip
        the mover's slot in its first and in its last frame; attentions [B, nh, T, T] of lookup_layer). The tiny
        recipe's stand-in for an LLM that arrives able to look things up: a 4-layer LLM from scratch learns content
        lookup only after a long plateau (docs/experiments.md), with this hint it is a direct target. Like the
        talker's guided attention, a training loss only."""
        rows, cols = torch.nonzero((lookup_slots >= 0).all(-1), as_tuple=True)  # supervised (sample, position)
        heads = self.config.llm.num_attention_heads // self.config.llm.num_key_value_heads
        half = torch.arange(heads, device=lookup_slots.device) * 2 // heads    # [heads]: 0 = first half, 1 = second
        targets = lookup_slots[rows, cols][:, half]                             # [N, heads]
        head = torch.arange(heads, device=lookup_slots.device)
        weight = attentions[rows[:, None], head, cols[:, None], targets]        # [N, heads]
        return -(weight.float() + 1e-6).log().mean()

    def speech_loss(self, hidden, speech_codes, speech_lens, speech_voices, speech_text_ids, speech_text_at):
        """The talker's loss on the rows with a speech target: speech_codes Long[B, K, F] (speech_lens Long[B],
        0 = no target), speech_voices Long[B], speech_text_ids Long[B, N] = the words it speaks (talker.answer_words)
        and speech_text_at Long[B, N] = the position of each one's LLM state (-1 = none). Each word gives the talker
        its id (spelling), input embedding and that hidden state; a frozen LLM's states are detached."""
        if not any(p.requires_grad for p in self.llm.parameters()):
            hidden = hidden.detach()
        rows = torch.nonzero(speech_lens > 0).flatten().tolist()
        at = [speech_text_at[b][speech_text_at[b] >= 0] for b in rows]        # [N_b] each
        words = [speech_text_ids[b][:len(a)] for b, a in zip(rows, at)]         # [N_b] each
        states = [hidden[b][a] for b, a in zip(rows, at)]                       # [N_b, D] each
        embed = self.llm.get_input_embeddings()
        return self.talker(words, [embed(w) for w in words], states,
                           [speech_codes[b, :, :speech_lens[b]] for b in rows], speech_voices[rows])

    # ---- generation
    @staticmethod
    def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, V] -> [B] next ids: greedy at temperature 0, else temperature + top-k + top-p sampling."""
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p               # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def stream_generate(self, input_ids, attention_mask=None, max_new_tokens=64, temperature=0.0, top_k=0,
                        top_p=1.0, stop_ids=(), use_cache=True, generator=None, with_hidden=False, **media):
        """Yields [B] next-token ids one step at a time. Prompts in a batch must be LEFT-padded.

        Rows that hit a stop id keep emitting the stop id; the loop ends when every row has stopped.
        with_hidden: yields (ids, [B, D] last hidden state of the token read at this step, i.e. the previous one)."""
        media = MediaInputs(**media)
        embeds = self.embed_inputs(input_ids, media)                       # [B, T, D]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        cache = KVCache() if use_cache else None
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        step_embeds = embeds
        for _ in range(max_new_tokens):
            out = self.llm(inputs_embeds=step_embeds if use_cache else embeds, attention_mask=mask,
                           cache=cache, logits_at="last")
            next_ids = self.sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)  # [B]
            next_ids = torch.where(done, stop[0] if len(stop) else next_ids, next_ids)
            yield (next_ids, out.hidden_states[:, -1]) if with_hidden else next_ids
            done |= torch.isin(next_ids, stop)
            if done.all():
                return
            step_embeds = self.llm.get_input_embeddings()(next_ids[:, None])  # [B, 1, D]
            embeds = torch.cat([embeds, step_embeds], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)

    def generate(self, input_ids, **kwargs) -> torch.Tensor:
        """[B, T] prompt -> [B, n_new] generated ids (including the stop token when one was produced)."""
        steps = list(self.stream_generate(input_ids, **kwargs))
        return torch.stack(steps, 1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)

    # ---- freezing
    def _component_modules(self, names) -> list[nn.Module]:
        names = [names] if isinstance(names, str) else list(names)
        expanded = []
        for name in names:
            expanded += ["resampler", "audio_projector"] if name == "projectors" else [name]
        unknown = [n for n in expanded if n not in self.components()]
        if unknown:
            raise ValueError(f"unknown components {unknown}; choose from {list(self.components())} or 'projectors' "
                             f"(a model has a talker only when config.talker is set)")
        return [getattr(self, self.components()[n]) for n in expanded]

    def components(self) -> dict[str, str]:
        """COMPONENTS, plus the talker when this model has one."""
        return {**self.COMPONENTS, "talker": "talker"} if self.talker is not None else self.COMPONENTS

    def freeze(self, *names):
        """model.freeze("vision", "audio", "llm") -> only the resampler and audio projector train."""
        for module in self._component_modules(names):
            module.requires_grad_(False)
        return self

    def unfreeze(self, *names):
        for module in self._component_modules(names):
            module.requires_grad_(True)
        return self

    def trainable_components(self) -> list[str]:
        return [n for n, attr in self.components().items()
                if any(p.requires_grad for p in getattr(self, attr).parameters())]

    # ---- weights
    def save_pretrained(self, out_dir: str, exclude: tuple[str, ...] = ()):
        """config.json + model.safetensors. `exclude` names towers (e.g. "vision", "audio") loaded from their
        original folders instead; those folders must be recorded in config.external_weights."""
        missing = [c for c in exclude if c not in self.config.external_weights]
        if missing:
            raise ValueError(f"cannot exclude {missing}: config.external_weights has no source folder for them")
        os.makedirs(out_dir, exist_ok=True)
        skip = tuple(self.COMPONENTS[c] + "." for c in exclude)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith(skip)}
        if self.config.llm.tie_word_embeddings:
            state.pop("llm.lm_head.weight", None)               # tied: shares storage with embed_tokens
        config = dict(self.config.to_dict(), excluded=list(exclude))
        save_file(state, os.path.join(out_dir, "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(out_dir, "model.safetensors.tmp"), os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if isinstance(self.codec, MelCodec):  # a plugged-in neural codec loads its own weights
            self.codec.save(os.path.join(out_dir, "codec"))

    @staticmethod
    def from_pretrained(ckpt_dir: str, device="cpu") -> "OmniModel":
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            raw = json.load(f)
        excluded = raw.pop("excluded", [])
        model = OmniModel(OmniConfig.from_dict(raw)).to(device)
        state = load_file(os.path.join(ckpt_dir, "model.safetensors"), device=str(device))
        for component in excluded:
            model.load_tower(component, model.config.external_weights[component])
            prefix = model.COMPONENTS[component] + "."
            state.update({k: v for k, v in model.state_dict().items() if k.startswith(prefix)})
        tied = ("llm.lm_head.",) if model.config.llm.tie_word_embeddings else ()
        load_state_dict_checked(model, state, f"OmniModel from {ckpt_dir}", ignore_missing=tied)
        if os.path.exists(os.path.join(ckpt_dir, "codec", "codec.json")):
            model.codec = MelCodec.load(os.path.join(ckpt_dir, "codec"))
        return model

    def load_tower(self, component: str, folder: str):
        """Load real pretrained weights for one tower from a local Hugging Face folder (no download)."""
        loaders = {"llm": Qwen3ForCausalLM, "vision": SiglipVisionModel, "audio": WhisperEncoder}
        if component not in loaders:
            raise ValueError(f"load_tower takes one of {list(loaders)}, got {component!r}")
        tower = loaders[component].from_pretrained_hf(folder)
        device = next(self.parameters()).device
        setattr(self, self.COMPONENTS[component], tower.to(device))
        self.config.external_weights[component] = os.path.abspath(folder)
        return self

    # config fields a stage sets; everything else must agree before two checkpoints' parts can meet in one model
    STAGE_FIELDS = ("external_weights", "reads_standins", "spelling_ids", "talker")

    def graft(self, donor: "OmniModel", components: list[str], what: str = "the donor") -> "OmniModel":
        """Take `components` (COMPONENTS names) from another checkpoint of the same config, so that warm-ups which
        train different parts can run side by side and meet in one model (scripts/demo.sh: the vision + slots
        warm-ups beside the audio + listen + text ones). What the config says about a part travels with it: the
        LLM's reads_standins, the projectors' spelling_ids (two different spellings are an error), a tower's
        source folder."""
        unknown = [c for c in components if c not in self.COMPONENTS]
        if unknown:
            raise ValueError(f"cannot graft {unknown} from {what}: choose from {list(self.COMPONENTS)}")
        mine, theirs = self.config.to_dict(), donor.config.to_dict()
        differ = [k for k in mine if k not in self.STAGE_FIELDS and mine[k] != theirs[k]]
        if differ:
            raise ValueError(f"cannot graft from {what}: its config differs in {differ}")
        spelling = donor.config.spelling_ids if {"resampler", "audio_projector"} & set(components) else None
        if spelling and self.config.spelling_ids and spelling != self.config.spelling_ids:
            raise ValueError(f"cannot graft {components} from {what}: it spells with other characters")
        for component in components:
            attr = self.COMPONENTS[component]
            load_state_dict_checked(getattr(self, attr), getattr(donor, attr).state_dict(), f"{component} from {what}")
            if component in donor.config.external_weights:
                self.config.external_weights[component] = donor.config.external_weights[component]
            else:
                self.config.external_weights.pop(component, None)
        if "llm" in components:
            self.config.reads_standins = donor.config.reads_standins
        self.config.spelling_ids = spelling or self.config.spelling_ids
        return self

    @staticmethod
    def from_hf_folders(llm: str, vision: str, audio: str, **config_overrides) -> "OmniModel":
        """A fresh omni model around real Qwen3 / SigLIP2 / Whisper checkpoints (projectors randomly initialised)."""
        model = OmniModel(OmniConfig.from_hf_folders(llm, vision, audio, **config_overrides))
        for component, folder in (("llm", llm), ("vision", vision), ("audio", audio)):
            model.load_tower(component, folder)
        return model

    # ---- chat
    def chat(self, processor, question: str | list[dict], images=(), audios=(), videos=(), enable_thinking=False,
             stream=False, max_new_tokens=128, speak=False, voice=None, **sampling):
        """One answer to a question (or a full message list). Media markers are added for a plain question.

        stream=True returns an iterator of text pieces as they are generated; otherwise the whole answer.
        speak=True (needs the talker and its codec) also speaks it, in `voice` (a name of config.talker.voices):
        -> (text, waveform [S]), or with stream=True an iterator of (text piece, audio chunk [s]) pairs whose audio
        starts after the first talker.text_chunk answer tokens, while the LLM is still writing the rest."""
        if isinstance(question, str):
            markers = "".join(["<image>\n"] * len(images) + ["<video>\n"] * len(videos) + ["<audio>\n"] * len(audios))
            question = [{"role": "user", "content": markers + question}]
        device = next(self.parameters()).device
        batch = {k: v.to(device) for k, v in processor(question, images, audios, videos, enable_thinking).items()}
        if speak:  # one step more: the LLM reads the last answer token back to give the talker its hidden state
            steps = self.stream_generate(**batch, max_new_tokens=max_new_tokens + 1, stop_ids=processor.stop_ids,
                                         with_hidden=True, **sampling)
            spoken = self.speak_stream(steps, processor.tokenizer, set(processor.stop_ids), voice, max_new_tokens)
            if stream:
                return ((text, self.codec.decode(*frames)) for text, frames in spoken)
            pieces = list(spoken)
            return "".join(t for t, _ in pieces), self.codec.decode(*SpokenFrames.cat([f for _, f in pieces]))
        steps = self.stream_generate(**batch, max_new_tokens=max_new_tokens, stop_ids=processor.stop_ids, **sampling)
        pieces = self._decode_stream(steps, processor.tokenizer, set(processor.stop_ids))
        return pieces if stream else "".join(pieces)

    def speak_stream(self, steps, tokenizer, stop_ids: set[int], voice: str | None = None, max_tokens: int = 128):
        """LLM steps (stream_generate with_hidden=True, one prompt) -> (text piece, new SpokenFrames [K, f]) pairs.

        The talker pulls the answer in chunks of text_chunk words (answer_words: an answer written a character per
        token is read as the words it spells, each once the next word has begun); pulling a chunk runs the LLM for
        those tokens, so text and speech are produced in turn. A token's hidden state exists once the LLM has read it
        back, one step after writing it."""
        talker = self.talker.config
        voice_id = talker.voices.index(voice or talker.voices[0])
        answer, states = [], []                                     # answer token ids so far, their hidden states

        def tokens():                                               # (token id, its last hidden state [D])
            previous, count = None, 0
            for next_ids, hidden in steps:
                if previous is not None:
                    yield previous, hidden[0]
                    count += 1
                previous = int(next_ids[0])
                if previous in stop_ids or count == max_tokens:
                    return

        def words():                                                # (word id, its hidden state): answer_words
            said = 0
            for token, hidden in tokens():
                answer.append(token)
                states.append(hidden)
                ids, at = answer_words(tokenizer, answer, complete=False)
                yield from ((i, states[k]) for i, k in zip(ids[said:], at[said:]))
                said = len(ids)
            ids, at = answer_words(tokenizer, answer)
            yield from ((i, states[k]) for i, k in zip(ids[said:], at[said:]))

        def chunks():                                               # (ids [n], input embeddings [n, D], hidden [n, D])
            buffer = []
            for word in words():
                buffer.append(word)
                if len(buffer) == talker.text_chunk:
                    yield self._talker_chunk(buffer)
                    buffer = []
            if buffer:
                yield self._talker_chunk(buffer)

        text_chunks, shown = chunks(), ""
        for frames in self.talker.stream(text_chunks, voice_id):
            text = tokenizer.decode(answer, skip_special_tokens=False)
            yield text[len(shown):], frames
            shown = text
        for _ in text_chunks:                                       # the speech ended first: finish the text
            pass
        text = tokenizer.decode(answer, skip_special_tokens=False)
        if len(text) > len(shown):
            yield text[len(shown):], SpokenFrames.empty(talker.n_codebooks, talker.vocab_size,
                                                   next(self.talker.parameters()).device)

    def _talker_chunk(self, tokens: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        ids = torch.tensor([t for t, _ in tokens], device=tokens[0][1].device)
        return ids, self.llm.get_input_embeddings()(ids), torch.stack([h for _, h in tokens])

    @staticmethod
    def _decode_stream(steps, tokenizer, stop_ids: set[int]):
        """Token ids -> text deltas; decodes the whole answer so far so multi-byte characters come out whole."""
        ids, shown, text = [], "", ""
        for step in steps:
            token = int(step[0])
            if token in stop_ids:
                break
            ids.append(token)
            text = tokenizer.decode(ids, skip_special_tokens=False)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text
        if len(text) > len(shown):            # an answer cut off mid-character still shows what it has
            yield text[len(shown):]
