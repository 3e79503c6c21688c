"""Parameter counts of every preset, built on the meta device (no memory, no weights).

    python scripts/param_count.py
"""
import torch

from model.model_omni import OmniConfig, OmniModel


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied lm_head is the same Parameter: counted once


def main():
    print(f"{'preset':<12} {'component':<16} {'params':>15}")
    for preset in ("tiny", "qwen3_0_6b"):
        with torch.device("meta"):
            model = OmniModel(OmniConfig.preset(preset))
        for name, attr in OmniModel.COMPONENTS.items():
            print(f"{preset:<12} {name:<16} {count(getattr(model, attr)):>15,}")
        print(f"{preset:<12} {'total':<16} {count(model):>15,}")


if __name__ == "__main__":
    main()
