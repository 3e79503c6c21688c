"""The training dataset: jsonl samples -> token ids, labels and media tensors; collate and length grouping.

Bad data never crashes an epoch. Structural problems (invalid JSON, bad turns, marker/media count mismatch)
are found when the file is read; problems only loading can reveal (missing or unreadable media, placeholder
mismatch, too long) are found in __getitem__, which then returns None and the collate drops the sample.
Every skip is counted by reason in `dataset.skipped` and warned with file:line; `strict=True` raises instead.
(With DataLoader workers, load-time skips are counted in the workers' copies; the warnings still show them.)
"""
import json
import os
import warnings
from collections import Counter

import torch
from torch.utils.data import Dataset

from dataset.chat import (IGNORE_INDEX, MARKERS, SampleError, conversation_messages, count_markers,
                          tokenize_conversation)
from dataset.media import audio_features, audio_placeholder, image_inputs, load_image, video_inputs

MEDIA_KEYS = {"image": "images", "audio": "audios", "video": "videos"}


class OmniDataset(Dataset):
    def __init__(self, jsonl_path: str, tokenizer, config, max_length: int = 2048, strict: bool = False):
        self.path, self.root = jsonl_path, os.path.dirname(os.path.abspath(jsonl_path))
        self.tokenizer, self.config, self.max_length, self.strict = tokenizer, config, max_length, strict
        self.skipped = Counter()
        self.records = []   # (line number, sample) of the samples that passed the structural checks
        self.lengths = []   # cheap token-count estimate per record, for length grouping
        with open(jsonl_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    sample = self._parse(line)
                except SampleError as e:
                    self._skip(lineno, e)
                    continue
                self.records.append((lineno, sample))
                self.lengths.append(self._estimate_length(sample))

    @staticmethod
    def _parse(line: str) -> dict:
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as e:
            raise SampleError("invalid_json", str(e)) from None
        if not isinstance(sample, dict):
            raise SampleError("bad_structure", "a line must hold a JSON object")
        found = count_markers(conversation_messages(sample))
        for kind, key in MEDIA_KEYS.items():
            items = sample.get(key) or []
            if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
                raise SampleError("bad_structure", f"'{key}' must be a list of paths")
            if found[kind] != len(items):
                raise SampleError("marker_mismatch", f"{found[kind]} {MARKERS[kind]} markers but {len(items)} {key}")
        return sample

    def _estimate_length(self, sample: dict) -> int:
        """Tokens, roughly: ~3 characters per text token, one query_num block per image / video, 10 per audio s
        unknown so a flat 100. Only used to batch similar lengths together."""
        chars = sum(len(t["content"]) for t in sample["conversations"]) + len(sample.get("system") or "")
        media = len(sample.get("images") or []) + len(sample.get("videos") or [])
        return chars // 3 + media * self.config.query_num + 100 * len(sample.get("audios") or [])

    def _skip(self, lineno: int, error: SampleError):
        where = f"{self.path}:{lineno}"
        if self.strict:
            raise ValueError(f"{where}: bad sample ({error.reason}): {error.detail}") from error
        self.skipped[error.reason] += 1
        warnings.warn(f"{where}: skipped sample ({error.reason}): {error.detail}", stacklevel=2)

    def summary(self) -> str:
        total = len(self.records) + sum(self.skipped[r] for r in ("invalid_json", "bad_structure", "empty_turn",
                                                                   "no_assistant", "marker_mismatch"))
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.path}: {len(self.records)} of {total} samples passed the read-time checks; skipped: {reasons}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        lineno, sample = self.records[index]
        try:
            return self._load(sample)
        except SampleError as e:
            self._skip(lineno, e)
            return None

    def _media_path(self, rel: str) -> str:
        path = os.path.join(self.root, rel)
        if not os.path.exists(path):
            raise SampleError("missing_media", f"{rel} not found (paths are relative to the jsonl file)")
        return path

    def _load(self, sample: dict) -> dict:
        cfg, out, expansions = self.config, {}, {"image": [], "audio": [], "video": []}
        try:
            slices, grids = [], []
            for rel in sample.get("images") or []:
                tensors, grid_hw, text = image_inputs(load_image(self._media_path(rel)), cfg)
                slices += tensors
                grids.append(grid_hw)
                expansions["image"].append(text)
            if slices:
                out.update(pixel_values=slices, image_grid_hw=torch.cat(grids))
            chunks = []
            for rel in sample.get("audios") or []:
                mels, n_tokens = audio_features(self._media_path(rel), cfg)
                if n_tokens == 0:
                    raise SampleError("unreadable_media", f"{rel} is too short to give one audio token")
                chunks += mels
                expansions["audio"].append(audio_placeholder(n_tokens))
            if chunks:
                out.update(audio_features=chunks,
                           audio_feature_lens=torch.tensor([c.shape[-1] for c in chunks], dtype=torch.long))
            videos = [video_inputs(self._media_path(rel), cfg) for rel in sample.get("videos") or []]
            expansions["video"] = [v[4] for v in videos]
            if videos:
                out.update(video_pixel_values=[f for v in videos for f in v[0]],
                           video_grid_hw=torch.cat([v[1] for v in videos]),
                           video_temporal_ids=torch.cat([v[2] for v in videos]),
                           video_group_sizes=torch.cat([v[3] for v in videos]))
        except SampleError:
            raise
        except Exception as e:  # PIL, soundfile, PyAV all raise their own types for a broken file
            raise SampleError("unreadable_media", f"{type(e).__name__}: {e}") from e
        input_ids, labels = tokenize_conversation(sample, self.tokenizer, expansions)
        if len(input_ids) > self.max_length:
            raise SampleError("too_long", f"{len(input_ids)} tokens > max_length {self.max_length}")
        return dict(out, input_ids=input_ids, labels=labels)


def _pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    """[3, h_i, w_i] list -> [N, 3, Hmax, Wmax], zero padded at the bottom/right."""
    batch = images[0].new_zeros(len(images), 3, max(i.shape[1] for i in images), max(i.shape[2] for i in images))
    for k, img in enumerate(images):
        batch[k, :, :img.shape[1], :img.shape[2]] = img
    return batch


def collate(samples: list[dict | None], pad_id: int) -> dict | None:
    """Samples -> the batch of INTERFACES.md: right padding to the longest sample, media concatenated in prompt
    order across the batch. Skipped (None) samples are dropped; an all-skipped batch gives None."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    batch = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),        # [B, T]
             "attention_mask": torch.zeros(B, T, dtype=torch.long),            # [B, T]
             "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long)}     # [B, T]
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][b, :n], batch["labels"][b, :n], batch["attention_mask"][b, :n] = \
            s["input_ids"], s["labels"], 1
    for key in ("pixel_values", "video_pixel_values"):                         # [N, 3, Hmax, Wmax]
        images = [img for s in samples for img in s.get(key, [])]
        if images:
            batch[key] = _pad_images(images)
    chunks = [c for s in samples for c in s.get("audio_features", [])]
    if chunks:                                                                 # [N_chunks, 80, Tmax]
        batch["audio_features"] = torch.zeros(len(chunks), chunks[0].shape[0], max(c.shape[-1] for c in chunks))
        for k, c in enumerate(chunks):
            batch["audio_features"][k, :, :c.shape[-1]] = c
    for key in ("image_grid_hw", "video_grid_hw", "video_temporal_ids", "video_group_sizes", "audio_feature_lens"):
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           mega_batches: int = 16) -> list[list[int]]:
    """Index batches of similar lengths (little padding), a pure function of (lengths, batch_size, seed, epoch).

    Shuffle all indices, cut them into mega-batches of batch_size * mega_batches, sort each by length
    (descending) and cut it into batches, then shuffle the order of the batches.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    chunk, batches = batch_size * mega_batches, []
    for start in range(0, len(perm), chunk):
        group = sorted(perm[start:start + chunk], key=lambda i: -lengths[i])
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]


class LengthGroupedBatchSampler:
    """DataLoader(batch_sampler=...) wrapper around length_grouped_batches; call set_epoch each epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        return iter(length_grouped_batches(self.lengths, self.batch_size, self.seed, self.epoch))

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)
