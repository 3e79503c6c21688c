"""A SigLIP / SigLIP2 vision tower (ViT) that reads transformers' SiglipVisionModel checkpoints.

MiniCPM-o cuts an image into slices of different shapes (an overview plus a grid of crops), so the tower
takes a zero-padded batch of slices with their patch grids and returns one row of patch features per slice.
Position embeddings are learned for a square grid and interpolated to each slice's grid, exactly like
transformers' `interpolate_pos_encoding`; padded patches are masked out of attention, so every slice gets
the same features as if it were run alone.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from model.weights import load_state_dict_checked, read_hf_config, read_safetensors


@dataclass
class VisionConfig:
    """Field names (and defaults) of transformers' SiglipVisionConfig."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "VisionConfig":
        """Accepts a SiglipVisionConfig dict or a full SiglipConfig dict (which nests it in "vision_config")."""
        cfg = cfg.get("vision_config", cfg)
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu": F.gelu}


def pack_slices(slices: list[torch.Tensor], patch_size: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pads slices [3, h, w] into one batch; returns (pixel_values [N, 3, Hmax, Wmax], grid_hw Long[N, 2])."""
    if not slices:
        raise ValueError("pack_slices needs at least one slice")
    for s in slices:
        if s.dim() != 3 or s.shape[1] % patch_size or s.shape[2] % patch_size or min(s.shape[1:]) == 0:
            raise ValueError(f"slice of shape {tuple(s.shape)} is not [C, h, w] with h, w positive multiples "
                             f"of patch_size={patch_size}; resize it first")
    h_max = max(s.shape[1] for s in slices)
    w_max = max(s.shape[2] for s in slices)
    pixel_values = slices[0].new_zeros(len(slices), slices[0].shape[0], h_max, w_max)
    for i, s in enumerate(slices):
        pixel_values[i, :, :s.shape[1], :s.shape[2]] = s
    grid_hw = torch.tensor([[s.shape[1] // patch_size, s.shape[2] // patch_size] for s in slices])
    return pixel_values, grid_hw


class SiglipVisionEmbeddings(nn.Module):
    """Conv patchify + learned position embeddings resized to each slice's patch grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.side = cfg.image_size // cfg.patch_size  # native grid is side x side
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(self.side * self.side, cfg.hidden_size)
        # SigLIP's init (std 1/sqrt(D)); PyTorch's default N(0, 1) would swamp the patch content of a random tower
        nn.init.normal_(self.position_embedding.weight, std=cfg.hidden_size ** -0.5)

    def grid_positions(self, h: int, w: int) -> torch.Tensor:
        """[h*w, D] row-major: the square table resized bicubically (in fp32) as transformers does."""
        table = self.position_embedding.weight  # [side*side, D]
        if (h, w) == (self.side, self.side):
            return table
        grid = table.float().reshape(1, self.side, self.side, -1).permute(0, 3, 1, 2)  # [1, D, side, side]
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # [1, D, h, w]
        return grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, D, Hg, Wg]
        n, _, _, grid_w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # [N, Hg*Wg, D]
        h, w = grid_hw[:, 0:1], grid_hw[:, 1:2]  # [N, 1] each
        length = int((grid_hw[:, 0] * grid_hw[:, 1]).max())
        j = torch.arange(length, device=patches.device)  # packed index of a slice's patch
        mask = j < h * w  # [N, L]
        # packed index j -> (row j // w, col j % w) of the slice -> position in the padded Hg x Wg grid
        src = torch.where(mask, (j // w) * grid_w + j % w, 0)  # [N, L]
        x = patches.gather(1, src.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # [N, L, D]

        # one position table per distinct grid in the batch (few), scattered back to the slices
        shapes, which = torch.unique(grid_hw, dim=0, return_inverse=True)  # [G, 2], [N]
        tables = x.new_zeros(len(shapes), length, x.shape[-1])  # [G, L, D]
        for g, (gh, gw) in enumerate(shapes.tolist()):
            tables[g, :gh * gw] = self.grid_positions(gh, gw)
        return x + tables[which], mask


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])  # [B, H, T, hd]
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    """The `vision_model.*` part of SiglipVisionModel (no pooling head: MiniCPM-o resamples all patches)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [N, 3, Hmax, Wmax] zero padded, grid_hw Long[N, 2] patch (rows, cols)
        -> features [N, L, D] (each slice's patches row-major, zeros past its length), patch_mask Bool[N, L]."""
        p = self.config.patch_size
        grid_hw = grid_hw.to(pixel_values.device)
        if (grid_hw < 1).any() or (grid_hw[:, 0] * p > pixel_values.shape[2]).any() \
                or (grid_hw[:, 1] * p > pixel_values.shape[3]).any():
            raise ValueError(f"grid_hw {grid_hw.tolist()} does not fit pixel_values {tuple(pixel_values.shape)} "
                             f"with patch_size={p} (use pack_slices)")
        vm = self.vision_model
        x, mask = vm.embeddings(pixel_values, grid_hw)  # [N, L, D], [N, L]
        for layer in vm.encoder.layers:
            x = layer(x, mask)
        x = vm.post_layernorm(x)
        return x.masked_fill(~mask.unsqueeze(-1), 0.0), mask

    @classmethod
    def from_pretrained_hf(cls, folder: str) -> "SiglipVisionModel":
        """Loads a local SiglipVisionModel or full SiglipModel (text + vision) checkpoint folder, fp32 on CPU."""
        cfg = VisionConfig.from_hf_config(read_hf_config(folder))
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device="cpu")  # every tensor is then overwritten by the strict load below
        state = read_safetensors(folder)
        if not any(k.startswith("vision_model.") for k in state):  # transformers >= 5 saves SiglipVisionModel bare
            state = {f"vision_model.{k}": v for k, v in state.items()}
        load_state_dict_checked(model, state, f"SigLIP vision tower from {folder}",
                                ignore_unexpected=("vision_model.head.", "text_model.", "logit_scale", "logit_bias"))
        return model.eval()
