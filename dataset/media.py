"""Media preprocessing: LLaVA-UHD image slicing, audio -> log-mel chunks, video -> sampled frame groups.

Each `*_inputs` function returns the tensors for the model AND the placeholder string that replaces the media's
marker in the prompt; the counts in that string come from the same numbers the encoders will produce.
"""
import math
import os

import numpy as np
import torch
from PIL import Image, ImageSequence

from model.model_audio import load_audio, log_mel_spectrogram, split_mel
from model.model_omni import (AUDIO_END, AUDIO_PAD, AUDIO_START, IMAGE_END, IMAGE_PAD, IMAGE_START, SLICE_END,
                              SLICE_START, VIDEO_END, VIDEO_PAD, VIDEO_START, audio_token_count)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


# ----------------------------------------------------------------------------- LLaVA-UHD slicing
def ensure_divide(length: float, patch: int) -> int:
    """Nearest multiple of `patch` (Python round: half to even), at least one patch."""
    return max(round(length / patch) * patch, patch)


def best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int, upscale: bool = False):
    """(w, h) -> patch-aligned (w, h) of about scale_resolution^2 pixels, same aspect; small images only grow
    when `upscale`."""
    w, h = size
    if w * h > scale_resolution * scale_resolution or upscale:
        r = w / h
        h = int(scale_resolution / math.sqrt(r))
        w = int(h * r)
    return ensure_divide(w, patch_size), ensure_divide(h, patch_size)


def find_best_grid(size: tuple[int, int], scale_resolution: int, max_slice_nums: int):
    """(cols, rows) whose aspect is closest to the image's in log space, or None when one slice is enough."""
    w, h = size
    multiple = min(math.ceil(w * h / scale_resolution ** 2), max_slice_nums)
    if multiple <= 1:
        return None
    candidates = [(cols, i // cols) for i in (multiple - 1, multiple, multiple + 1) if 1 < i <= max_slice_nums
                  for cols in range(1, i + 1) if i % cols == 0]
    # min() keeps the first of equal errors: i ascending, then cols ascending
    return min(candidates, key=lambda g: abs(math.log(w / h) - math.log(g[0] / g[1])))


def slice_image(img: Image.Image, scale_resolution: int, patch_size: int, max_slice_nums: int):
    """-> (overview image, slices as rows of images [rows][cols], grid (cols, rows) or None)."""
    grid = find_best_grid(img.size, scale_resolution, max_slice_nums)
    if grid is None:
        size = best_resize(img.size, scale_resolution, patch_size, upscale=True)
        return img.resize(size, Image.Resampling.BICUBIC), [], None
    overview = img.resize(best_resize(img.size, scale_resolution, patch_size), Image.Resampling.BICUBIC)
    cols, rows = grid
    refine_w, refine_h = ensure_divide(img.size[0], cols), ensure_divide(img.size[1], rows)
    cell_w, cell_h = best_resize((refine_w / cols, refine_h / rows), scale_resolution, patch_size, upscale=True)
    refine = img.resize((cell_w * cols, cell_h * rows), Image.Resampling.BICUBIC)
    slices = [[refine.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h)) for c in range(cols)]
              for r in range(rows)]
    return overview, slices, grid


def image_placeholder(grid, query_num: int) -> str:
    """<image>+pads+</image> for the overview, then one line per grid row of <slice>+pads+</slice> cells."""
    text = IMAGE_START + IMAGE_PAD * query_num + IMAGE_END
    if grid is not None:
        cols, rows = grid
        row = (SLICE_START + IMAGE_PAD * query_num + SLICE_END) * cols
        text += "\n" + "\n".join([row] * rows)
    return text


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float with SigLIP's normalisation (x/255 - 0.5) / 0.5."""
    return normalize_pixels(image_pixels(img))


def image_pixels(img: Image.Image) -> torch.Tensor:
    """PIL -> Uint8[3, H, W], a quarter of the float tensor's memory: what a dataset keeps decoded."""
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)  # [3, H, W] view of [H, W, 3]


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Uint8[..., 3, H, W] -> float [..., 3, H, W], SigLIP's (x/255 - 0.5) / 0.5."""
    return (pixels.float() / 255.0 - 0.5) / 0.5


def load_image(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def image_inputs(img: Image.Image, config):
    """-> (slices [3, h, w] overview first then row-major, grid_hw Long[n, 2] in patches, placeholder string)."""
    p = config.vision.patch_size
    overview, slices, grid = slice_image(img, config.scale_resolution, p, config.max_slice_nums)
    tensors = [image_to_tensor(s) for s in [overview] + [cell for row in slices for cell in row]]
    grid_hw = torch.tensor([[t.shape[1] // p, t.shape[2] // p] for t in tensors], dtype=torch.long)
    return tensors, grid_hw, image_placeholder(grid, config.query_num)


# ----------------------------------------------------------------------------- audio
def audio_placeholder(n_tokens: int) -> str:
    return AUDIO_START + AUDIO_PAD * n_tokens + AUDIO_END


def audio_features(path_or_wav, config):
    """Audio file (any rate, mixed to mono, resampled to 16 kHz) or 16 kHz mono wav [S]
    -> (log-mel chunks [80, T <= 3000], total number of AUDIO_PAD tokens)."""
    wav = load_audio(path_or_wav) if isinstance(path_or_wav, (str, os.PathLike)) else path_or_wav
    mel = log_mel_spectrogram(wav)                                            # [80, S // 160]
    return split_mel(mel, config.audio_chunk_frames), audio_token_count(mel.shape[-1], config)


# ----------------------------------------------------------------------------- video
def uniform_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over n items (the centre of each of k equal segments); all of them if n <= k."""
    if n <= k:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]


def read_video(path: str, max_frames: int, folder_fps: float = 1.0):
    """Animated GIF/WebP, a folder of frame images, or (with PyAV) any video file
    -> (up to max_frames RGB frames sampled uniformly, their timestamps in seconds)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        keep = uniform_indices(len(names), max_frames)
        return [load_image(os.path.join(path, names[i])) for i in keep], [i / folder_fps for i in keep]
    if path.lower().endswith((".gif", ".webp")):
        with Image.open(path) as im:
            starts, t = [], 0.0
            for frame in ImageSequence.Iterator(im):
                starts.append(t)
                t += frame.info.get("duration", 100) / 1000.0  # GIF/WebP durations are in milliseconds
            keep = uniform_indices(len(starts), max_frames)
            frames = []
            for i in keep:
                im.seek(i)
                frames.append(im.convert("RGB"))
        return frames, [starts[i] for i in keep]
    try:
        import av
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyAV (pip install av); GIF/WebP and frame folders work "
                          f"without it") from e
    with av.open(path) as container:
        decoded = [(f.to_image(), float(f.time or 0.0)) for f in container.decode(video=0)]
    keep = uniform_indices(len(decoded), max_frames)
    return [decoded[i][0].convert("RGB") for i in keep], [decoded[i][1] for i in keep]


def video_placeholder(group_sizes: list[int], query_num: int) -> str:
    """One <video>+pads+</video> per group of frames (the frames of a group share query_num tokens)."""
    return "\n".join([VIDEO_START + VIDEO_PAD * query_num + VIDEO_END] * len(group_sizes))


def video_inputs(path: str, config, max_frames: int | None = None):
    """-> (frames [3, H, W], grid_hw Long[F, 2], temporal_ids Long[F] (0.1 s units), group_sizes Long[G],
    placeholder string). Frames are resized whole (no slicing) and grouped in runs of <= video_group_size."""
    frames, times = read_video(path, max_frames or config.video_max_frames)
    if not frames:
        raise ValueError(f"{path}: no frames")
    p, g = config.vision.patch_size, config.video_group_size
    size = best_resize(frames[0].size, config.scale_resolution, p, upscale=True)
    tensors = [image_to_tensor(f.resize(size, Image.Resampling.BICUBIC)) for f in frames]
    grid_hw = torch.tensor([[size[1] // p, size[0] // p]] * len(tensors), dtype=torch.long)
    temporal_ids = torch.tensor([round(t * 10) for t in times], dtype=torch.long)
    group_sizes = [g] * (len(tensors) // g) + ([len(tensors) % g] if len(tensors) % g else [])
    return (tensors, grid_hw, temporal_ids, torch.tensor(group_sizes, dtype=torch.long),
            video_placeholder(group_sizes, config.query_num))
