"""Warm-up heads: give a randomly initialised tiny tower a short pretraining of its own before alignment.

The real recipe starts from towers that arrive pretrained (SigLIP on image-text pairs, Whisper on ASR). Training
a tiny omni model jointly from random init spends its budget learning to see and hear at the same time as
learning to talk. These heads reproduce "arrives pretrained" in a minute each: direct, dense targets read from
ToyWorld's ground truth, thrown away after the warm-up (only the tower's weights move on to `align`).

- VisionWarmup: per 3x3-cell colour / shape / size classification from the patches inside each cell (so every
  patch feature must describe what is under it, which is what the resampler's positional keys then route), and
  READING on square rendered-text images: per 7-px column (two per patch column, pooled over the rows by a learned
  attention), the character whose centre the renderer put there (build_toyworld.char_columns). Told where each
  character is, the tower learns letters; a CTC head over the same columns sits at the character prior for ~700
  steps and reads 0.13 where this one reads 0.68 (benchmarks/probe_ocr_reading.py, docs/experiments.md).
- SlotWarmup: no head of its own: the resampler learns to write each scene cell's word stand-in into that cell's
  slot, from the frozen warmed-up tower's output (the stand-in loss of `align` without the LLM: ~20x cheaper per
  step, and it needs thousands of scenes before the queries pick out their cells), and to write a square text
  image's characters SPELLED over the slots a scene leaves spare (model_omni.TEXT_SLOTS_FROM), as ListenWarmup
  below does for speech (the image pad's code the blank; weighted down, --reading_weight). The tower runs once per
  image, before the first epoch (stage_utils.SlotWarmupData); so does the audio tower for ListenWarmup.
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
READ_COLUMNS_PER_PATCH = 2  # 7-px reading columns at patch 14: about one per character of ToyWorld's text sizes
READ_EMPTY_WEIGHT = 0.2     # most columns hold no character centre


def cell_pooling(grid: int, image_size: int, patch_size: int) -> torch.Tensor:
    """[9, grid*grid] averaging matrix: cell k pools the patches whose centres fall inside 3x3 cell k."""
    centres = torch.arange(grid) * patch_size + patch_size / 2            # [grid] pixel centre of each patch
    band = (centres * 3 // image_size).clamp(max=2).long()                # [grid] cell row/col of each patch
    cell = (band[:, None] * 3 + band[None, :]).flatten()                  # [grid*grid] row-major patches
    pool = F.one_hot(cell, 9).T.float()                                   # [9, grid*grid]
    return pool / pool.sum(1, keepdim=True)


class VisionWarmup(nn.Module):
    """vision tower + cell attribute heads + a column reading head. All images are square, image_size pixels."""

    def __init__(self, tower: nn.Module, image_size: int, num_chars: int):
        super().__init__()
        cfg = tower.config
        self.vision_tower = tower
        self.grid = image_size // cfg.patch_size
        self.register_buffer("pool", cell_pooling(self.grid, image_size, cfg.patch_size), persistent=False)
        self.cell_head = nn.Linear(cfg.hidden_size, sum(CELL_FIELDS.values()))
        self.row_score = nn.Linear(cfg.hidden_size, 1)
        self.read_head = nn.Linear(cfg.hidden_size, READ_COLUMNS_PER_PATCH * (num_chars + 1))  # + 0 = no character

    def forward(self, pixel_values, cells, columns) -> dict:
        """pixel_values [N, 3, S, S] scenes and text images, cells Long[N, 9, 3]: colour, shape, size class per cell
        of a scene (-100 for a text image), columns Long[N, 2g]: the character (1-based) centred in each column of
        a text image, 0 none (-100 for a scene)."""
        n = pixel_values.shape[0]
        grid_hw = torch.tensor([[self.grid, self.grid]] * n, device=pixel_values.device)
        feats, _ = self.vision_tower(pixel_values, grid_hw)                      # [N, g*g, D]
        loss, out = feats.sum() * 0.0, {}
        scenes = cells[:, 0, 0] != -100                                          # [N]
        if scenes.any():
            logits = self.cell_head(self.pool @ feats[scenes]).split(list(CELL_FIELDS.values()), -1)  # [n, 9, c]
            for k, (name, field_logits) in enumerate(zip(CELL_FIELDS, logits)):
                target = cells[scenes][..., k]
                ce = F.cross_entropy(field_logits.flatten(0, 1).float(), target.flatten())
                loss = loss + FIELD_WEIGHTS[name] * ce
                out[f"acc_{name}"] = (field_logits.argmax(-1) == target).float().mean()
        texts = ~scenes
        if texts.any():
            grid = feats[texts].view(-1, self.grid, self.grid, feats.shape[-1])             # [t, rows, cols, D]
            pooled = (self.row_score(grid).softmax(1) * grid).sum(1)                        # [t, cols, D]
            logits = self.read_head(pooled).view(len(grid), columns.shape[1], -1)           # [t, 2g, C+1]
            weight = torch.ones(logits.shape[-1], device=logits.device)
            weight[0] = READ_EMPTY_WEIGHT
            loss = loss + F.cross_entropy(logits.flatten(0, 1).float(), columns[texts].flatten(), weight=weight)
            out["acc_read"] = (logits.argmax(-1) == columns[texts]).float().mean()
        return dict(out, loss=loss, num_tokens=torch.tensor(n * self.grid * self.grid))


class SlotWarmup(nn.Module):
    """The resampler (the only trainable part) on top of the frozen vision tower, fitted to the word stand-ins."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.model = model

    def forward(self, patch_features, standin_ids, spelling, spelling_lens) -> dict:
        """patch_features [N, g*g, Dv] the frozen tower's output for N square scenes and text images
        (stage_utils.SlotWarmupData runs it once per image), standin_ids Long[N, Q, W] the words each scene's Q slots
        stand for, spelling Long[N, L] a text image's characters (1-based spelling classes; spelling_lens 0 for a
        scene)."""
        n, length, _ = patch_features.shape
        grid_hw = torch.tensor([[math.isqrt(length)] * 2] * n, device=patch_features.device)
        mask = torch.ones(n, length, dtype=torch.bool, device=patch_features.device)
        slots = self.model.resampler(patch_features, mask, grid_hw)       # [N, Q, D]
        texts, out = spelling_lens > 0, {}
        loss = slots.sum() * 0.0
        if (~texts).any():
            standins, _ = self.model.embed_standins(standin_ids[~texts])  # [n, Q, D]
            out["standin_loss"] = relative_error(slots[~texts], standins)
            loss = loss + out["standin_loss"]
        if texts.any():
            out["reading_loss"] = self.model.text_slots_loss(slots[texts], spelling[texts], spelling_lens[texts])
            loss = loss + self.model.reading_weight * out["reading_loss"]
        return {"loss": loss, **{k: v.detach() for k, v in out.items()},
                "num_tokens": torch.tensor(slots.shape[:2].numel())}


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
