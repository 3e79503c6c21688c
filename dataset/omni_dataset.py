"""The training dataset: jsonl samples -> token ids, labels and media tensors; collate and length grouping.

Bad data never crashes an epoch. Structural problems (invalid JSON, bad turns, marker/media count mismatch)
are found when the file is read; problems only loading can reveal (missing or unreadable media, placeholder
mismatch, too long) are found in __getitem__, which then returns None and the collate drops the sample.
Every skip is counted by reason in `dataset.skipped` and warned with file:line; `strict=True` raises instead.
Speech targets (an assistant turn's "speech" wav) become talker codes when the dataset is given the talker's codec.
With standins=True, ToyWorld scenes (and clips, frame by frame) carry the word ids their slots stand for
(chat.standin_ids), the target of the stand-in loss (OmniModel.standin_loss), and the slots each question must read
(the lookup loss's target, OmniModel.lookup_loss); once the model spells speech (config.spelling_ids), each audio
clip also carries its transcript's characters (chat.spelling_targets, the listen loss's target,
OmniModel.listen_loss) and each square text image its text's (the reading loss's, OmniModel.reading_loss).
(With DataLoader workers, load-time skips are counted in the workers' copies; the warnings still show them.)
"""
import json
import os
import warnings
from collections import Counter

import soundfile as sf
import torch
from torch.utils.data import Dataset

from dataset.chat import (IGNORE_INDEX, MARKERS, SampleError, conversation_messages, count_markers,
                          fits_text_slots, lookup_targets, spelled_answer, spelling_targets, standin_ids,
                          tokenize_conversation)
from dataset.media import audio_features, audio_placeholder, image_inputs, load_image, video_inputs
from dataset.toyworld_text import describe_media, frame_slots, queried_slots, scene_slots, text_image_reading
from model.talker import answer_words

MEDIA_KEYS = {"image": "images", "audio": "audios", "video": "videos"}


class OmniDataset(Dataset):
    def __init__(self, jsonl_path: str, tokenizer, config, max_length: int = 2048, strict: bool = False,
                 codec=None, standins: bool = False):
        self.path, self.root = jsonl_path, os.path.dirname(os.path.abspath(jsonl_path))
        self.standins = standins
        self.codec = codec if getattr(config, "talker", None) is not None else None  # None: speech targets unused
        self.tokenizer, self.config, self.max_length, self.strict = tokenizer, config, max_length, strict
        self.skipped = Counter()
        self.records = []   # (line number, sample) of the samples that passed the structural checks
        self.lengths = []   # cheap token-count estimate per record, for length grouping
        self.num_lines = 0
        with open(jsonl_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                self.num_lines += 1
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
        """Rough token count, only for batching similar lengths: ~3 characters per token, query_num per image or
        video, a flat 100 per audio (its duration is unknown until it is loaded)."""
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
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.path}: {self.num_lines} lines, {len(self.records)} samples passed the read-time checks; "
                f"skipped {sum(self.skipped.values())} ({reasons})")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        """-> {input_ids [T], labels [T], + this sample's media (lists of tensors that collate pads)}, or None
        when the sample has to be skipped."""
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

    def _images(self, paths: list[str]):
        """-> ({pixel_values: [3, h, w] overview then slices per image, image_grid_hw Long[n, 2]}, placeholders)."""
        loaded = [image_inputs(load_image(self._media_path(p)), self.config) for p in paths]
        if not loaded:
            return {}, []
        return ({"pixel_values": [t for item in loaded for t in item[0]],
                 "image_grid_hw": torch.cat([item[1] for item in loaded])}, [item[2] for item in loaded])

    def _audios(self, paths: list[str]):
        """-> ({audio_features: [80, t <= 3000] chunks, audio_feature_lens Long[n]}, placeholders)."""
        chunks, texts = [], []
        for p in paths:
            mels, n_tokens = audio_features(self._media_path(p), self.config)
            if n_tokens == 0:
                raise SampleError("unreadable_media", f"{p} is too short to give one audio token")
            chunks += mels
            texts.append(audio_placeholder(n_tokens))
        if not chunks:
            return {}, []
        lens = torch.tensor([c.shape[-1] for c in chunks], dtype=torch.long)
        return {"audio_features": chunks, "audio_feature_lens": lens}, texts

    def _videos(self, paths: list[str]):
        """-> ({video_pixel_values: [3, H, W] frames, video_grid_hw, video_temporal_ids, video_group_sizes},
        placeholders)."""
        loaded = [video_inputs(self._media_path(p), self.config) for p in paths]
        if not loaded:
            return {}, []
        return ({"video_pixel_values": [f for item in loaded for f in item[0]],
                 "video_grid_hw": torch.cat([item[1] for item in loaded]),
                 "video_temporal_ids": torch.cat([item[2] for item in loaded]),
                 "video_group_sizes": torch.cat([item[3] for item in loaded])}, [item[4] for item in loaded])

    def _load_media(self, sample: dict) -> tuple[dict, dict]:
        """-> (this sample's media tensors, placeholder strings per kind); a reader error becomes a skip reason."""
        out, expansions = {}, {}
        try:
            for kind, load in (("image", self._images), ("audio", self._audios), ("video", self._videos)):
                tensors, expansions[kind] = load(sample.get(MEDIA_KEYS[kind]) or [])
                out.update(tensors)
        except SampleError:
            raise
        except Exception as e:  # PIL, soundfile, PyAV all raise their own types for a broken file
            raise SampleError("unreadable_media", f"{type(e).__name__}: {e}") from e
        return out, expansions

    def _load(self, sample: dict) -> dict:
        out, expansions = self._load_media(sample)
        spelling = self.config.spelling_ids
        read = text_image_reading(sample) if spelling and self.standins else None
        if read and not (fits_text_slots(read[0], self.config.query_num) and len(out.get("pixel_values", [])) == 1):
            read = None  # a square text image is one slice, whose slots spell its text
        transcripts = (describe_media(sample) or {}).get("audio", []) if self.standins else []
        heard = transcripts if spelling and len(transcripts) == len(out.get("audio_features", [])) else []
        input_ids, labels = tokenize_conversation(sample, self.tokenizer, expansions,
                                                  spelled_answer(read, heard))  # [T], [T]
        if len(input_ids) > self.max_length:
            raise SampleError("too_long", f"{len(input_ids)} tokens > max_length {self.max_length}")
        speech = self._speech(sample["conversations"][-1], input_ids, labels) if self.codec is not None else {}
        slots = scene_slots(sample) if self.standins else None
        max_frames = self.config.video_max_frames
        frames = frame_slots(sample, max_frames) if self.standins and self.config.frames_read_alone else None
        standin = standin_ids(input_ids, self.tokenizer, slots, None, frames) if slots or frames else None
        if standin is not None:  # slots in cell order: the lookup loss may point at the one a question asks about
            out["standin_ids"] = standin
            out["lookup_slots"] = lookup_targets(input_ids, labels, self.tokenizer, queried_slots(sample, max_frames))
        if heard:  # one chunk per clip
            out["audio_spelling"] = [spelling_targets(self.tokenizer, text, spelling) for text in heard]
        if read:
            out["image_spelling"] = [spelling_targets(self.tokenizer, read[0], spelling)]
        return dict(out, **speech, input_ids=input_ids, labels=labels)

    def _speech(self, turn: dict, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
        """The final turn's speech target -> {speech_codes Long[K, F], speech_voice Long[], speech_text_ids Long[N],
        speech_text_at Long[N]}: the words the talker reads (talker.answer_words of that turn's trained tokens,
        end-of-turn tokens excluded) and the position in input_ids of each one's last hidden state."""
        if turn["role"] != "assistant" or "speech" not in turn:
            return {}
        voices = self.config.talker.voices
        if turn.get("voice", voices[0]) not in voices:
            raise SampleError("bad_structure", f"voice {turn['voice']!r} is not one of the talker's {voices}")
        path = self._media_path(turn["speech"])
        try:
            wav, rate = sf.read(path, dtype="float32")
        except Exception as e:  # soundfile raises its own types for a broken file
            raise SampleError("unreadable_media", f"{type(e).__name__}: {e}") from e
        if rate != self.codec.sample_rate or wav.ndim != 1:
            raise SampleError("unreadable_media", f"{turn['speech']}: need mono {self.codec.sample_rate} Hz")
        ends = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
        turn_start = int(torch.nonzero(input_ids == ends[0]).max())
        mask = (labels != IGNORE_INDEX) & ~torch.isin(input_ids, torch.tensor(ends))
        mask[:turn_start] = False
        answer = torch.nonzero(mask).flatten()                                  # [n] the answer's positions
        words, at = answer_words(self.tokenizer, input_ids[answer].tolist())
        return {"speech_codes": self.codec.encode(torch.from_numpy(wav)),
                "speech_voice": torch.tensor(voices.index(turn.get("voice", voices[0]))),
                "speech_text_ids": torch.tensor(words), "speech_text_at": answer[at]}


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
    if any("lookup_slots" in s for s in samples):                            # [B, T, 2], -1 = no lookup target
        batch["lookup_slots"] = torch.full((B, T, 2), -1, dtype=torch.long)
        for b, s in enumerate(samples):
            if "lookup_slots" in s:
                batch["lookup_slots"][b, :len(s["lookup_slots"])] = s["lookup_slots"]
    standins = [s.get("standin_ids") for s in samples]
    if any(x is not None for x in standins):                                   # [B, T, Wmax], -1 = no word
        batch["standin_ids"] = torch.full((B, T, max(x.shape[1] for x in standins if x is not None)), -1,
                                          dtype=torch.long)
        for b, x in enumerate(standins):
            if x is not None:
                batch["standin_ids"][b, :x.shape[0], :x.shape[1]] = x
    for kind, media in (("audio", "audio_features"), ("image", "pixel_values")):
        if any(f"{kind}_spelling" in s for s in samples):  # [N_chunks / N_slices, Lmax] + lengths, 0 = no text
            targets = [t for s in samples for t in s.get(f"{kind}_spelling", [torch.zeros(0, dtype=torch.long)] *
                                                         len(s.get(media, [])))]
            batch[f"{kind}_spelling"] = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
            batch[f"{kind}_spelling_lens"] = torch.tensor([len(t) for t in targets])
    spoken = [s["speech_codes"] for s in samples if "speech_codes" in s]
    if spoken:  # rows without a speech target keep speech_lens 0
        batch["speech_codes"] = torch.zeros(B, spoken[0].shape[0], max(c.shape[1] for c in spoken),
                                            dtype=torch.long)                  # [B, K, Fmax]
        batch["speech_lens"] = torch.zeros(B, dtype=torch.long)               # [B]
        batch["speech_voices"] = torch.zeros(B, dtype=torch.long)             # [B]
        N = max(len(s["speech_text_ids"]) for s in samples if "speech_codes" in s)
        batch["speech_text_ids"] = torch.zeros(B, N, dtype=torch.long)       # [B, N]
        batch["speech_text_at"] = torch.full((B, N), -1, dtype=torch.long)    # [B, N], -1 = no word
        for b, s in enumerate(samples):
            if "speech_codes" in s:
                n, frames = len(s["speech_text_ids"]), s["speech_codes"].shape[1]
                batch["speech_codes"][b, :, :frames], batch["speech_lens"][b] = s["speech_codes"], frames
                batch["speech_voices"][b] = s["speech_voice"]
                batch["speech_text_ids"][b, :n] = s["speech_text_ids"]
                batch["speech_text_at"][b, :n] = s["speech_text_at"]
    return batch


PACKABLE = {"input_ids", "labels", "lookup_slots", "standin_ids"}


def pack_rows(samples: list[dict | None], pad_id: int) -> dict | None:
    """Text-only samples -> the batch collate would give, in fewer rows: first-fit decreasing into rows as long as
    the longest sample. attention_mask numbers each row's sequences 1, 2, ... and the LLM keeps them apart (each
    token sees only its own sequence, positions restart at 0), so the per-token loss is collate's, on less padding.
    For the text warm-up, whose batches must mix short turns with long generated conversations."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    extra = {key for s in samples for key in s} - PACKABLE
    if extra:
        raise ValueError(f"pack_rows packs text-only samples ({sorted(PACKABLE)}), got {sorted(extra)}; use collate")
    capacity, rows, used = max(len(s["input_ids"]) for s in samples), [], []  # used[r]: tokens in row r
    for s in sorted(samples, key=lambda s: -len(s["input_ids"])):
        n = len(s["input_ids"])
        r = next((r for r, u in enumerate(used) if u + n <= capacity), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(s)
        used[r] += n
    batch = collate([_concatenate(row) for row in rows], pad_id)
    for r, row in enumerate(rows):                                           # [R, T]: 1, 1, 2, 2, 2, 0 (pad)
        batch["attention_mask"][r, :used[r]] = torch.cat(
            [torch.full((len(x["input_ids"]),), j + 1) for j, x in enumerate(row)])
    return batch


def _concatenate(row: list[dict]) -> dict:
    """One packed sequence. No sequence's first token is a target (in a row of its own it never is); lookup
    targets are column indices, shifted with their sequence."""
    out, offset = {"input_ids": [], "labels": [], "lookup_slots": [], "standin_ids": []}, 0
    width = max((s["standin_ids"].shape[1] for s in row if "standin_ids" in s), default=0)
    for s in row:
        n = len(s["input_ids"])
        out["input_ids"].append(s["input_ids"])
        out["labels"].append(torch.cat([s["labels"].new_full((1,), IGNORE_INDEX), s["labels"][1:]]))
        slots = s.get("lookup_slots", torch.full((n, 2), -1, dtype=torch.long))
        out["lookup_slots"].append(torch.where(slots >= 0, slots + offset, slots))
        standins = torch.full((n, width), -1, dtype=torch.long)
        if "standin_ids" in s:
            standins[:, :s["standin_ids"].shape[1]] = s["standin_ids"]
        out["standin_ids"].append(standins)
        offset += n
    packed = {key: torch.cat(parts) for key, parts in out.items()}
    if not any("lookup_slots" in s for s in row):
        del packed["lookup_slots"]
    if not width:
        del packed["standin_ids"]
    return packed


def left_pad(batch: dict) -> dict:
    """Right-padded batch -> left-padded (generation appends on the right, so every prompt must end at the last
    column). Rows are rolled, so the order of media placeholders is unchanged."""
    mask = batch["attention_mask"]
    shifts = mask.shape[1] - mask.sum(1)
    idx = (torch.arange(mask.shape[1], device=mask.device)[None] - shifts[:, None]) % mask.shape[1]  # [B, T]
    out = dict(batch, input_ids=batch["input_ids"].gather(1, idx), attention_mask=mask.gather(1, idx))
    if "standin_ids" in batch:
        out["standin_ids"] = batch["standin_ids"].gather(1, idx[..., None].expand_as(batch["standin_ids"]))
    return out


def jsonl_samples(paths: list[str]):
    """(folder of the file, sample) for every line of every jsonl: media paths in a sample are relative to it."""
    for path in paths:
        root = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield root, json.loads(line)


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
