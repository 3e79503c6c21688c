"""Reading local Hugging Face-style weight folders and loading them with an explicit key check.

Nothing here downloads: a folder holds either `model.safetensors` or a sharded
`model.safetensors.index.json` + shards (any `*.safetensors` files are accepted as a fallback).
"""
import json
import os

import torch
from safetensors import safe_open
from torch import nn


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a local checkpoint folder, following a sharded index when present."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder} (pytorch_model.bin is not supported; convert it)")
    return [os.path.join(folder, f) for f in files]


def read_safetensors(folder: str, prefix: str = "", strip_prefix: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a folder whose key starts with `prefix` (prefix removed when `strip_prefix`)."""
    state = {}
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    state[key[len(prefix):] if strip_prefix else key] = f.get_tensor(key)
    return state


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {folder}")
    with open(path) as f:
        return json.load(f)


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], what: str,
                            ignore_missing: tuple[str, ...] = (), ignore_unexpected: tuple[str, ...] = ()):
    """Strict load whose error names every missing and unexpected key (and shape mismatch).

    `ignore_*` are key prefixes that are allowed to be absent/extra (e.g. a tied lm_head, a pooling head).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(ignore_missing or ("\0",))]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore_unexpected or ("\0",))]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"cannot load {what}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {shapes[:20]}")
        raise KeyError("\n".join(lines))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
