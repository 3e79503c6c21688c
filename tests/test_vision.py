"""Parity of our SigLIP tower with transformers' SiglipVisionModel (tiny random config, CPU, fp32)."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig
from transformers import SiglipVisionModel as HFSiglipVisionModel

from model.model_vision import SiglipVisionModel, VisionConfig, pack_slices

TOL = 1e-4
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              patch_size=14, image_size=56)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf = HFSiglipVisionModel(SiglipVisionConfig(**VISION, attn_implementation="eager")).eval()
    folder = str(tmp_path_factory.mktemp("siglip_vision"))
    hf.save_pretrained(folder)
    return hf, folder, SiglipVisionModel.from_pretrained_hf(folder)


def test_native_resolution_matches_transformers(checkpoint):
    hf, _, ours = checkpoint
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state  # [2, 16, 64]
        feats, mask = ours(pixels, torch.tensor([[4, 4], [4, 4]]))
    diff = (feats - ref).abs().max().item()
    print(f"vision native 56x56 max abs diff: {diff:.3e}")
    assert mask.all() and feats.shape == ref.shape and diff <= TOL


def test_mixed_slice_batch_matches_each_slice_alone(checkpoint):
    hf, _, ours = checkpoint
    torch.manual_seed(2)
    slices = [torch.randn(3, 42, 70), torch.randn(3, 84, 56), torch.randn(3, 56, 56)]  # grids 3x5, 6x4, 4x4
    pixels, grid_hw = pack_slices(slices, patch_size=14)
    assert pixels.shape == (3, 3, 84, 70) and grid_hw.tolist() == [[3, 5], [6, 4], [4, 4]]
    with torch.no_grad():
        feats, mask = ours(pixels, grid_hw)  # [3, 24, 64]
        diffs = []
        for i, s in enumerate(slices):
            ref = hf(pixel_values=s[None], interpolate_pos_encoding=True).last_hidden_state[0]  # [h*w, 64]
            n = ref.shape[0]
            assert mask[i].sum().item() == n and mask[i, :n].all()
            assert not feats[i, n:].any()  # padded rows are zeroed
            diffs.append((feats[i, :n] - ref).abs().max().item())
    print("vision mixed-slice batch max abs diffs (42x70, 84x56, 56x56): " + ", ".join(f"{d:.3e}" for d in diffs))
    assert max(diffs) <= TOL


def test_full_siglip_checkpoint_loads(tmp_path):
    torch.manual_seed(3)
    cfg = SiglipConfig(vision_config=VISION, attn_implementation="eager",
                       text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))
    hf = SiglipModel(cfg).eval()
    hf.save_pretrained(str(tmp_path))
    ours = SiglipVisionModel.from_pretrained_hf(str(tmp_path))
    assert ours.config == VisionConfig(**VISION)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=pixels).last_hidden_state
        feats, _ = ours(pixels, torch.tensor([[4, 4]]))
    diff = (feats - ref).abs().max().item()
    print(f"vision full SiglipModel checkpoint max abs diff: {diff:.3e}")
    assert diff <= TOL


def test_missing_key_is_named(checkpoint, tmp_path):
    _, folder, _ = checkpoint
    state = load_file(os.path.join(folder, "model.safetensors"))
    del state["encoder.layers.1.layer_norm2.weight"]  # transformers >= 5 saves SiglipVisionModel keys bare
    save_file(state, str(tmp_path / "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as src, open(tmp_path / "config.json", "w") as dst:
        dst.write(src.read())
    with pytest.raises(KeyError, match=r"vision_model\.encoder\.layers\.1\.layer_norm2\.weight"):
        SiglipVisionModel.from_pretrained_hf(str(tmp_path))


def test_meta_construction_and_bad_slices():
    with torch.device("meta"):
        model = SiglipVisionModel(VisionConfig(**VISION))
    assert next(model.parameters()).is_meta
    with pytest.raises(ValueError, match="multiples of patch_size"):
        pack_slices([torch.zeros(3, 50, 56)], patch_size=14)
