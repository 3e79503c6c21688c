"""Parity of model/model_llm.py with transformers' Qwen3ForCausalLM on a tiny random checkpoint (CPU, fp32)."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config
from transformers import Qwen3ForCausalLM as HFQwen3

from model.model_llm import KVCache, LLMConfig, Qwen3ForCausalLM

TOL = 1e-4
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=256)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def report(name, diff):
    print(f"\n[llm parity] {name}: max abs diff = {diff:.3e}")
    assert diff <= TOL, f"{name}: {diff}"


@pytest.fixture(scope="module", params=[(True, "sdpa"), (False, "eager")], ids=["tied-sdpa", "untied-eager"])
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained folder, folder)."""
    tie, attn = request.param
    torch.manual_seed(0)
    hf = HFQwen3(Qwen3Config(**SMALL, tie_word_embeddings=tie, attn_implementation=attn)).eval()
    folder = str(tmp_path_factory.mktemp(f"qwen3_{request.param_index}"))
    hf.save_pretrained(folder)
    return hf, Qwen3ForCausalLM.from_pretrained_hf(folder).eval(), folder


def padded_batch():
    """Two rows, the first left-padded by 3 tokens."""
    torch.manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


@torch.no_grad()
def test_full_forward(pair):
    hf, ours, _ = pair
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == hf.config.tie_word_embeddings
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12))
    report("full forward, no mask", max_diff(ours(ids).logits, hf(ids).logits))


@torch.no_grad()
def test_left_padding(pair):
    hf, ours, _ = pair
    ids, mask = padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = ours(ids, attention_mask=mask)
    ref = hf(ids, attention_mask=mask, position_ids=pos).logits
    assert torch.isfinite(out.logits).all()  # pad queries attend to themselves, never NaN
    real = mask.bool()
    report("left padding, real tokens", max_diff(out.logits[real], ref[real]))


@torch.no_grad()
def test_packed_row_keeps_its_sequences_apart(pair):
    """A packed row (attention_mask 1 1 1 1 1 2 2 2 2 0 0: pack_rows) gives each sequence the logits transformers
    gives it alone, and the watched attention weights of the second never fall on the first."""
    hf, ours, _ = pair
    torch.manual_seed(2)
    first, second = torch.randint(0, SMALL["vocab_size"], (1, 5)), torch.randint(0, SMALL["vocab_size"], (1, 4))
    row = torch.cat([first, second, torch.zeros(1, 2, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [2] * 4 + [0] * 2])
    out = ours(row, attention_mask=mask, watch_layer=1)
    report("packed row, first sequence", max_diff(out.logits[:, :5], hf(first).logits))
    report("packed row, second sequence", max_diff(out.logits[:, 5:9], hf(second).logits))
    assert out.attentions[0, :, 5:9, :5].abs().max() == 0
    alone = ours(second, watch_layer=1).attentions
    report("packed row, watched weights", max_diff(out.attentions[:, :, 5:9, 5:9], alone))


@torch.no_grad()
def test_watched_layer_attends_with_transformers_weights(pair):
    """watch_layer: that layer attends with explicit weights instead of SDPA's fused kernel; they are transformers'
    eager attention weights of that layer, and the logits stay transformers' (left padding included)."""
    hf, ours, _ = pair
    ids, mask = padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = ours(ids, attention_mask=mask, watch_layer=1)
    eager = HFQwen3(Qwen3Config(**SMALL, tie_word_embeddings=hf.config.tie_word_embeddings,
                                attn_implementation="eager")).eval()
    eager.load_state_dict(hf.state_dict())
    ref = eager(ids, attention_mask=mask, position_ids=pos, output_attentions=True)
    real = mask.bool()
    report("watched layer, logits", max_diff(out.logits[real], ref.logits[real]))
    weights, ref_weights = out.attentions.transpose(1, 2)[real], ref.attentions[1].transpose(1, 2)[real]  # [N, nh, T]
    report("watched layer, weights", max_diff(weights, ref_weights))


@torch.no_grad()
def test_kv_cache_decoding(pair):
    hf, ours, _ = pair
    ids, mask = padded_batch()
    full = ours(ids, attention_mask=mask).logits
    ref = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    cache, steps = KVCache(), []
    out = ours(ids[:, :4], attention_mask=mask[:, :4], cache=cache)  # prefill
    steps.append(out.logits)
    for t in range(4, ids.shape[1]):  # then one token at a time
        out = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache)
        steps.append(out.logits)
    inc = torch.cat(steps, dim=1)
    assert cache.seq_len == ids.shape[1] and len(cache.keys) == SMALL["num_hidden_layers"]
    report("kv-cache decode vs our full forward", max_diff(inc, full))
    real = mask.bool()
    report("kv-cache decode vs transformers", max_diff(inc[real], ref[real]))
    # no mask at all: the cache alone must offset positions and causality
    cache = KVCache()
    ours(ids[:, :5], cache=cache)
    last = ours(ids[:, 5:7], cache=cache).logits
    report("kv-cache decode, no mask", max_diff(last, ours(ids[:, :7]).logits[:, 5:7]))


@torch.no_grad()
def test_logits_at(pair):
    _, ours, _ = pair
    ids, mask = padded_batch()
    full = ours(ids, attention_mask=mask)
    sel = torch.rand(ids.shape) > 0.5
    picked = ours(ids, attention_mask=mask, logits_at=sel)
    assert picked.logits.shape == (int(sel.sum()), SMALL["vocab_size"])
    report("logits_at rows vs full logits", max_diff(picked.logits, full.logits[sel]))
    report("logits_at='last' vs full logits", max_diff(ours(ids, attention_mask=mask, logits_at="last").logits,
                                                       full.logits[:, -1:]))
    none = ours(ids, attention_mask=mask, logits_at="none")
    assert none.logits is None and torch.equal(none.hidden_states, full.hidden_states)


def test_loader_names_bad_keys(pair, tmp_path):
    hf, _, folder = pair
    state = load_file(os.path.join(folder, "model.safetensors"))
    for name, edit in [("missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
                       ("unexpected", lambda s: s.__setitem__("model.layers.0.bogus.weight", torch.zeros(3)))]:
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        edited = dict(state)
        edit(edited)
        save_file(edited, str(bad / "model.safetensors"))
        key = "model.layers.1.mlp.up_proj.weight" if name == "missing" else "model.layers.0.bogus.weight"
        with pytest.raises(KeyError, match=key):
            Qwen3ForCausalLM.from_pretrained_hf(str(bad))
    if not hf.config.tie_word_embeddings:  # an untied head may not be silently left random
        bad = tmp_path / "no_head"
        shutil.copytree(folder, bad)
        save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(bad / "model.safetensors"))
        with pytest.raises(KeyError, match="lm_head.weight"):
            Qwen3ForCausalLM.from_pretrained_hf(str(bad))


@torch.no_grad()
def test_sharded_checkpoint(pair, tmp_path):
    hf, _, _ = pair
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    ours = Qwen3ForCausalLM.from_pretrained_hf(str(tmp_path)).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 8))
    report("sharded checkpoint", max_diff(ours(ids).logits, hf(ids).logits))


def test_gradient_checkpointing(pair):
    _, ours, _ = pair
    ids, mask = padded_batch()
    target = mask.bool()
    calls = []
    hook = ours.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def loss_and_grads(ckpt):
        ours.zero_grad()
        ours.gradient_checkpointing = ckpt
        out = ours(ids, attention_mask=mask, logits_at=target, watch_layer=1)  # a watched layer: its weights too
        loss = F.cross_entropy(out.logits, ids[target]) + out.attentions.diagonal(dim1=-2, dim2=-1).mean()
        calls.clear()
        loss.backward()
        assert len(calls) == int(ckpt)  # checkpointing re-runs the layer in backward
        return loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    ours.train()
    try:
        loss0, g0 = loss_and_grads(False)
        loss1, g1 = loss_and_grads(True)
    finally:
        hook.remove()
        ours.gradient_checkpointing = False
        ours.zero_grad()
        ours.eval()
    report("gradient checkpointing loss", max_diff(loss0, loss1))
    report("gradient checkpointing grads", max(max_diff(g0[n], g1[n]) for n in g0))


def test_config_and_meta_device():
    base = {k: v for k, v in SMALL.items() if k != "rope_theta"}
    assert LLMConfig.from_hf_config({**base, "rope_parameters": {"rope_theta": 5.0, "rope_type": "default"}}).rope_theta == 5.0
    assert LLMConfig.from_hf_config({**base, "rope_theta": 7.0, "rope_scaling": None}).rope_theta == 7.0
    assert LLMConfig.from_hf_config({**base, "head_dim": None}).head_dim == 16
    with pytest.raises(NotImplementedError):
        LLMConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with torch.device("meta"):
        model = Qwen3ForCausalLM(LLMConfig(**SMALL))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_meta
