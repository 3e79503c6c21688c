"""Qwen3 decoder-only language model, hand-written, with the parameter names of transformers' Qwen3ForCausalLM.

The LLM is the backbone of the omni model: vision and audio features are projected into its embedding
space and spliced into `inputs_embeds`. Identical key names mean an official Qwen3 checkpoint folder loads
directly with `Qwen3ForCausalLM.from_pretrained_hf(folder)`.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.weights import load_state_dict_checked, read_hf_config, read_safetensors


@dataclass
class LLMConfig:
    """Field names are those of transformers' Qwen3Config (defaults: Qwen3-0.6B)."""
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128  # Qwen3 decouples it from hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02

    @classmethod
    def from_hf_config(cls, d: dict) -> "LLMConfig":
        """Pick our fields from a config.json dict; transformers 5 nests rope_theta in `rope_parameters`."""
        kw = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"only default RoPE is implemented, config asks for {rope_type!r}")
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if d.get("head_dim") is None:  # older configs: head_dim implied by hidden_size / heads
            kw["head_dim"] = kw.get("hidden_size", cls.hidden_size) // kw.get("num_attention_heads", cls.num_attention_heads)
        kw.setdefault("tie_word_embeddings", False)  # a missing key means HF Qwen3Config's default (False)
        return cls(**kw)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 so bf16 stays stable (same numerics as HF)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # [..., dim]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos/sin tables for the given positions, computed on the fly (cheap) so the model can be built on meta."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta ** exponent)                   # [hd/2]
    freqs = position_ids[..., None].float() * inv_freq     # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                # [B, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):  # [..., hd] -> [..., hd]: (x1, x2) -> (-x2, x1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x [B, nh, T, hd], cos/sin [B, T, hd]
    cos, sin = cos[:, None], sin[:, None]                  # [B, 1, T, hd], broadcast over heads
    return x * cos + rotate_half(x) * sin


def build_attention_mask(attention_mask, T: int, past: int, device):
    """Bool [B|1, 1, T, past+T], True = may attend: causal AND the key is a real token of the query's sequence.

    attention_mask [B, past+T]: 0 = pad, 1 = real (HF convention); a packed row numbers its sequences 1, 2, ...
    (pack_rows), and a token then sees only the earlier tokens of its own sequence.
    A left-pad query would see no key at all (NaN softmax), so every query may always see itself.
    Returns None for the no-padding, no-cache case, so SDPA can take its fused `is_causal` path.
    """
    if past == 0 and (attention_mask is None or bool((attention_mask == 1).all())):
        return None
    q_pos = torch.arange(past, past + T, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(past + T, device=device)[None, :]        # [1, S]
    causal = k_pos <= q_pos                                       # [T, S]
    if attention_mask is None:
        return causal[None, None]                                 # [1, 1, T, S]
    keys = attention_mask[:, None, None, :]                       # [B, 1, 1, S]
    queries = attention_mask[:, None, past:, None]                # [B, 1, T, 1]
    return causal & (((keys == queries) & (keys > 0)) | (k_pos == q_pos))  # [B, 1, T, S]


def sequence_positions(attention_mask):
    """[B, S] -> [B, S] RoPE positions: each token's distance from the start of its run of equal mask values, so a
    left-padded prompt starts at 0 at its first real token and each sequence of a packed row starts at 0 again."""
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    starts = torch.ones_like(attention_mask, dtype=torch.bool)
    starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(-1).values


class KVCache:
    """Keys/values of every layer seen so far, so each new token attends to the past without recomputing it."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []    # per layer [B, n_kv, S, hd]
        self.values: list[torch.Tensor] = []

    @property
    def seq_len(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer_idx: int, k, v):  # k, v [B, n_kv, T, hd] -> full [B, n_kv, S, hd]
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]


class Attention(nn.Module):
    """GQA self-attention; Qwen3 RMS-normalises every q/k head (before RoPE) to keep logits bounded."""

    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project(self, x, cos, sin):  # x [B, T, H] -> q [B, nh, T, hd], k, v [B, nkv, T, hd]
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask, cache=None, watch=False):  # x [B, T, H] -> [B, T, H]
        """watch=True (training, no cache) also returns the attention weights [B, nh, T, T], for losses that steer
        where a head looks. SDPA's fused kernel never forms them, so the layer then attends with explicit weights:
        once, with the very weights the loss sees (the text warm-up runs 8-12% faster than computing them twice)."""
        B, T, _ = x.shape
        if watch and cache is not None:
            raise ValueError("watched attention weights are for training passes, without a KV cache")
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                    # [B, nkv, S, hd], S = past + T
        if not watch:                                                    # query head h uses kv head h // (nh / nkv)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=True)       # [B, nh, T, hd]
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))   # [B, T, H]
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, nh, T, hd]
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5      # [B, nh, T, T]
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(B, T, -1)), weights


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # [B, T, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, watch=False):  # x [B, T, H]; watch: see Attention
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, watch)
        if watch:
            attended, weights = attended                                # [B, T, H], [B, nh, T, T]
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, weights) if watch else x


class Qwen3Model(nn.Module):
    """Embeddings + decoder stack + final norm; a submodule only so weights are named `model.*` like HF."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class LLMOutput:
    logits: torch.Tensor | None         # [B, T, V], [B, 1, V] ("last"), [N, V] (bool logits_at) or None
    hidden_states: torch.Tensor         # [B, T, H] after the final norm
    cache: KVCache | None
    attentions: torch.Tensor | None = None  # [B, nh, T, T] of the layer named by watch_layer, else None


class Qwen3ForCausalLM(nn.Module):
    """Set `gradient_checkpointing = True` to recompute layer activations in backward (training, no cache)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def tie_weights(self):
        """Small Qwen3 models share one matrix between the input embedding and the output projection."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache: KVCache | None = None, logits_at=None, watch_layer: int | None = None) -> LLMOutput:
        """attention_mask [B, past+T] (1 = real, HF convention) covers the cached and the new tokens.
        watch_layer: also return that layer's attention weights (training losses that steer a head; no cache).

        logits_at: None -> [B, T, V]; "last" -> [B, 1, V]; "none" -> no logits; Bool [B, T] -> [N, V] rows
        at the True positions (training never materialises [B, T, V] for a 151k vocabulary).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids / inputs_embeds")
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, H]
        B, T, _ = h.shape
        past = cache.seq_len if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, expected past+T = {past + T}")
        if position_ids is None:
            if attention_mask is not None:  # left padding / packing: each sequence's first token gets 0
                position_ids = sequence_positions(attention_mask)[:, past:]                    # [B, T]
            else:
                position_ids = torch.arange(past, past + T, device=h.device).expand(B, T)      # [B, T]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)  # [B, T, hd]
        mask = build_attention_mask(attention_mask, T, past, h.device)  # [B|1, 1, T, S] or None (plain causal)

        use_checkpoint = self.gradient_checkpointing and self.training and cache is None
        attentions = None
        for i, layer in enumerate(self.model.layers):
            args = (h, cos, sin, mask, cache, i == watch_layer)
            h = checkpoint(layer, *args, use_reentrant=False) if use_checkpoint else layer(*args)
            if i == watch_layer:
                h, attentions = h                               # [B, T, H], [B, nh, T, T]
        h = self.model.norm(h)                                  # [B, T, H]

        if logits_at is None:
            logits = self.lm_head(h)                            # [B, T, V]
        elif isinstance(logits_at, str):
            if logits_at not in ("last", "none"):
                raise ValueError(f"logits_at must be None, 'last', 'none' or a Bool [B, T] tensor, got {logits_at!r}")
            logits = self.lm_head(h[:, -1:]) if logits_at == "last" else None  # [B, 1, V] or None
        else:
            logits = self.lm_head(h[logits_at])                 # [N, V]
        return LLMOutput(logits=logits, hidden_states=h, cache=cache, attentions=attentions)

    @classmethod
    def from_pretrained_hf(cls, folder: str, dtype=torch.float32) -> "Qwen3ForCausalLM":
        """Build from a LOCAL HF Qwen3 folder (config.json + safetensors); nothing is downloaded."""
        cfg = LLMConfig.from_hf_config(read_hf_config(folder))
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        model.to_empty(device="cpu")  # allocate without a random init: the checkpoint overwrites every tensor
        model.tie_weights()           # to_empty made new tensors, which unties lm_head
        tied = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
        load_state_dict_checked(model, read_safetensors(folder), f"Qwen3 LLM from {folder}", ignore_missing=tied)
        return model
