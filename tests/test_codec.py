"""The offline speech codec: hand-written k-means, residual quantisation, encode/decode shapes and determinism."""
import math

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
