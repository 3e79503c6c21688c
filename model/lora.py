"""LoRA for the LLM's attention projections, hand-written (the official MiniCPM-o fine-tune uses r = alpha = 64
on q/k/v/o). The base weight stays frozen; only the low-rank update B @ A trains, and `merge_lora` folds it back
so the saved checkpoint is a plain model that loads without this file.
"""
import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))), with B = 0 at init so training starts from the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)   # [r, in]
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)  # [out, r]
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.to(base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear holding W + scaling * B @ A."""
        with torch.no_grad():
            self.base.weight += (self.lora_B.weight @ self.lora_A.weight).to(self.base.weight.dtype) * self.scaling
        return self.base


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
               dropout: float = 0.0, under: str = "llm") -> nn.Module:
    """Wrap every nn.Linear named in `targets` inside `model.<under>` (the whole model if under is empty)."""
    root = model.get_submodule(under) if under else model
    wrapped = 0
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"no nn.Linear named {targets} under {under!r}")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear (the parameter names are the base model's again)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model
