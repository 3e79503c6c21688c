"""Warm-up heads: give a randomly initialised tiny tower a short pretraining of its own before alignment.

The real recipe starts from towers that arrive pretrained (SigLIP on image-text pairs, Whisper on ASR). Training
a tiny omni model jointly from random init spends its budget learning to see and hear at the same time as
learning to talk. These heads reproduce "arrives pretrained" in a minute each: direct, dense targets read from
ToyWorld's ground truth, thrown away after the warm-up (only the tower's weights move on to `align`).

- VisionWarmup: per 3x3-cell colour / shape / size classification from the patches inside each cell (so every
  patch feature must describe what is under it, which is what the resampler's positional keys then route).
  (A CTC head reading rendered text over patch columns was tried: it stayed at the character prior in the budget
  and slowed shape down; see docs/experiments.md.)
- SlotWarmup: no head of its own: the resampler learns to write each scene cell's word stand-in into that cell's
  slot, from the frozen warmed-up tower's output (the stand-in loss of `align` without the LLM: ~20x cheaper per
  step, and it needs thousands of scenes before the queries pick out their cells). The tower runs once per image,
  before the first epoch (stage_utils.SlotWarmupData); so does the audio tower for ListenWarmup.
- AudioWarmup: a CTC head over the encoder frames (50/s) predicting the transcript's characters, as Whisper's
  encoder was shaped by ASR.
- ListenWarmup: no head of its own either: the audio projector learns, by CTC on the frozen tower, to write each
  clip's transcript SPELLED, one character's word code per token where it is heard and the pad's code elsewhere,
  as the text warm-up's spelled stand-ins read (chat.spelled_standin_ids). Spelled, because the tower hears letters
  well (held-out character accuracy 0.84) while many ToyWorld words are said in only one or two training clips:
  mapped straight to whole-word embeddings, held-out ASR stayed at 0.54.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.model_omni import OmniModel, relative_error, spelling_loss

CELL_FIELDS = {"color": 7, "shape": 5, "size": 3}  # class 0 = empty cell; ToyWorld has 6 colours, 4 shapes, 2 sizes
# Shape is learned last and slowest (colour and size are linear in a cell's mean pixel; shape needs the layout of
# its patches): weighted up, a tiny tower's held-out shape accuracy is 0.95 after 800 steps instead of 0.81.
FIELD_WEIGHTS = {"color": 1.0, "shape": 3.0, "size": 1.0}


def cell_pooling(grid: int, image_size: int, patch_size: int) -> torch.Tensor:
    """[9, grid*grid] averaging matrix: cell k pools the patches whose centres fall inside 3x3 cell k."""
    centres = torch.arange(grid) * patch_size + patch_size / 2            # [grid] pixel centre of each patch
    band = (centres * 3 // image_size).clamp(max=2).long()                # [grid] cell row/col of each patch
    cell = (band[:, None] * 3 + band[None, :]).flatten()                  # [grid*grid] row-major patches
    pool = F.one_hot(cell, 9).T.float()                                   # [9, grid*grid]
    return pool / pool.sum(1, keepdim=True)


class VisionWarmup(nn.Module):
    """vision tower + cell attribute heads. All images are square, image_size pixels."""

    def __init__(self, tower: nn.Module, image_size: int):
        super().__init__()
        cfg = tower.config
        self.vision_tower = tower
        self.grid = image_size // cfg.patch_size
        self.register_buffer("pool", cell_pooling(self.grid, image_size, cfg.patch_size), persistent=False)
        self.cell_head = nn.Linear(cfg.hidden_size, sum(CELL_FIELDS.values()))

    def forward(self, pixel_values, cells) -> dict:
        """pixel_values [N, 3, S, S] scenes, cells Long[N, 9, 3]: colour, shape, size class per cell."""
        n = pixel_values.shape[0]
        grid_hw = torch.tensor([[self.grid, self.grid]] * n, device=pixel_values.device)
        feats, _ = self.vision_tower(pixel_values, grid_hw)                      # [N, g*g, D]
        pooled = self.pool @ feats                                                # [N, 9, D]
        logits = self.cell_head(pooled).split(list(CELL_FIELDS.values()), -1)
        loss, out = pixel_values.new_zeros(()), {}
        for k, (name, field_logits) in enumerate(zip(CELL_FIELDS, logits)):
            ce = F.cross_entropy(field_logits.flatten(0, 1).float(), cells[..., k].flatten())
            loss = loss + FIELD_WEIGHTS[name] * ce
            out[f"acc_{name}"] = (field_logits.argmax(-1) == cells[..., k]).float().mean()
        return dict(out, loss=loss, num_tokens=torch.tensor(n * self.grid * self.grid))


class SlotWarmup(nn.Module):
    """The resampler (the only trainable part) on top of the frozen vision tower, fitted to the word stand-ins."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.model = model

    def forward(self, patch_features, standin_ids) -> dict:
        """patch_features [N, g*g, Dv] the frozen tower's output for N square scenes (stage_utils.SlotWarmupData runs
        it once per image), standin_ids Long[N, Q, W] the words each of their Q slots stands for."""
        n, length, _ = patch_features.shape
        grid_hw = torch.tensor([[math.isqrt(length)] * 2] * n, device=patch_features.device)
        mask = torch.ones(n, length, dtype=torch.bool, device=patch_features.device)
        slots = self.model.resampler(patch_features, mask, grid_hw)       # [N, Q, D]
        standins, _ = self.model.embed_standins(standin_ids)              # [N, Q, D]
        loss = relative_error(slots, standins)
        return {"loss": loss, "standin_loss": loss.detach(), "num_tokens": torch.tensor(slots.shape[:2].numel())}


class ListenWarmup(nn.Module):
    """The audio projector (the only trainable part) on the frozen audio tower, fitted to the spelled stand-ins of
    config.spelling_ids by spelling_loss (CTC onto the characters' word codes + the pull onto the nearest code)."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.model = model

    def forward(self, audio_states, audio_state_lens, text, text_lens) -> dict:
        """audio_states [N, T', Da] the frozen tower's output frames (stage_utils.ListenWarmupData runs it once per
        clip), audio_state_lens [N], text Long[N, L] (1-based spelling characters) -> the N clips' loss."""
        mask = torch.arange(audio_states.shape[1], device=audio_states.device) < audio_state_lens[:, None]  # [N, T']
        tokens, n_tokens = self.model.audio_projector.pooled(audio_states, mask)          # [N, T'', D], [N]
        loss = spelling_loss(tokens, n_tokens, self.model.spelling_codes(tokens.device), text, text_lens)
        return {"loss": loss, "num_tokens": n_tokens.sum()}


class AudioWarmup(nn.Module):
    """audio tower + a CTC head over its frames."""

    def __init__(self, tower: nn.Module, num_chars: int):
        super().__init__()
        self.audio_tower = tower
        self.head = nn.Linear(tower.config.d_model, num_chars + 1)  # + CTC blank (id 0)

    def forward(self, audio_features, audio_feature_lens, text, text_lens) -> dict:
        """audio_features [N, 80, T], text Long[N, L] (1-based char ids) -> CTC loss over T' = T/2 frames."""
        states, mask = self.audio_tower(audio_features, audio_feature_lens)   # [N, T', D], [N, T']
        logp = self.head(states).float().log_softmax(-1).transpose(0, 1)      # [T', N, C+1]
        loss = F.ctc_loss(logp, text, mask.sum(1), text_lens, zero_infinity=True)
        return {"loss": loss, "num_tokens": mask.sum()}
