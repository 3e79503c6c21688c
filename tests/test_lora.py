"""LoRA: starts as the base model, trains only A/B, and merging gives the same outputs with base parameter names."""
import torch

from model.lora import LoRALinear, apply_lora, merge_lora
from model.model_omni import OmniConfig, OmniModel


def tiny_model():
    cfg = OmniConfig.preset("tiny")
    cfg.llm.vocab_size, cfg.llm.num_hidden_layers = 64, 2
    cfg.vision.num_hidden_layers, cfg.audio.encoder_layers = 1, 1
    return OmniModel(cfg).eval()


def test_lora_merge_equals_unmerged():
    torch.manual_seed(0)
    model = tiny_model()
    base_names = set(model.state_dict())
    ids = torch.randint(0, 60, (2, 12))
    before = model.llm(input_ids=ids).logits
    model.freeze("vision", "audio", "llm", "projectors")
    apply_lora(model, rank=4, alpha=8)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 4   # q/k/v/o in 2 layers
    assert torch.allclose(model.llm(input_ids=ids).logits, before)            # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for m in model.modules():                                                 # pretend training moved B
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    unmerged = model.llm(input_ids=ids).logits
    assert (unmerged - before).abs().max() > 1e-3
    merge_lora(model)
    assert set(model.state_dict()) == base_names
    assert (model.llm(input_ids=ids).logits - unmerged).abs().max() < 1e-5
