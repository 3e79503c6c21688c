"""Inference-side preprocessing: one conversation + its media -> a model batch (the same rules as training)."""
import torch
from PIL import Image

from dataset.chat import build_prompt, standin_ids
from dataset.media import audio_features, audio_placeholder, image_inputs, load_image, video_inputs
from dataset.omni_dataset import collate
from dataset.tokenizer import load_tokenizer


class OmniProcessor:
    """Holds the tokenizer and the model config; turns (messages, images, audios, videos) into a batch."""

    def __init__(self, tokenizer, config):
        self.tokenizer, self.config = tokenizer, config

    @staticmethod
    def from_pretrained(tokenizer_dir: str, config) -> "OmniProcessor":
        return OmniProcessor(load_tokenizer(tokenizer_dir), config)

    @property
    def stop_ids(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    def __call__(self, messages: list[dict], images=(), audios=(), videos=(), enable_thinking=False) -> dict:
        """-> a batch of one prompt (what OmniModel.generate takes)."""
        batch = collate([self.sample(messages, images, audios, videos, enable_thinking)], self.tokenizer.pad_token_id)
        batch.pop("labels")
        return batch

    def sample(self, messages: list[dict], images=(), audios=(), videos=(), enable_thinking=False,
               media_as_text: dict[str, list[str]] | None = None, standin_slots: list[list[str]] | None = None,
               standin_spelled: list[str] | None = None, standin_frames: list[list[str]] | None = None,
               standin_read: list[str] | None = None) -> dict:
        """One prompt in the dataset's sample format (collate several for a batch).

        messages use <image>/<audio>/<video> markers in order; images are PIL images or paths, audios are paths
        or 16 kHz mono waveforms, videos are GIF/WebP/mp4 paths or frame folders. media_as_text fills the markers
        with text instead ({kind: [text per marker]}, e.g. stage_utils.standin_expansions); standin_slots,
        standin_spelled, standin_frames and standin_read give the word stand-ins of the image, audio, video and text
        image pads media_as_text put there (the same function's other results)."""
        sample, expansions = {}, {"image": [], "audio": [], "video": []} | (media_as_text or {})
        for img in images:
            tensors, grid_hw, text = image_inputs(img if isinstance(img, Image.Image) else load_image(img), self.config)
            sample.setdefault("pixel_values", []).extend(tensors)
            sample.setdefault("image_grid_hw", []).append(grid_hw)
            expansions["image"].append(text)
        for audio in audios:
            chunks, n_tokens = audio_features(audio, self.config)
            sample.setdefault("audio_features", []).extend(chunks)
            sample.setdefault("audio_feature_lens", []).extend(torch.tensor([c.shape[-1]]) for c in chunks)
            expansions["audio"].append(audio_placeholder(n_tokens))
        for video in videos:
            frames, grid_hw, temporal_ids, group_sizes, text = video_inputs(video, self.config)
            sample.setdefault("video_pixel_values", []).extend(frames)
            for key, value in (("video_grid_hw", grid_hw), ("video_temporal_ids", temporal_ids),
                               ("video_group_sizes", group_sizes)):
                sample.setdefault(key, []).append(value)
            expansions["video"].append(text)
        for key in ("image_grid_hw", "audio_feature_lens", "video_grid_hw", "video_temporal_ids", "video_group_sizes"):
            if key in sample:
                sample[key] = torch.cat(sample[key])
        ids = build_prompt(messages, self.tokenizer, enable_thinking, expansions)
        sample["input_ids"] = torch.tensor(ids, dtype=torch.long)
        sample["labels"] = torch.full_like(sample["input_ids"], -100)
        words = standin_ids(sample["input_ids"], self.tokenizer, standin_slots, standin_spelled, standin_frames,
                            standin_read)
        if words is not None:
            sample["standin_ids"] = words
        return sample
