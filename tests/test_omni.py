"""Resampler rules (REFERENCE.md), placeholder splicing, loss masking, save/load and generation of OmniModel."""
import math

import pytest
import torch

from model.model_llm import rope_cos_sin
from model.model_omni import (AudioProjector, MediaInputs, OmniConfig, OmniModel, Resampler, audio_token_count,
                              sincos_2d, spelling_loss)


def tiny_config() -> OmniConfig:
    cfg = OmniConfig.preset("tiny")
    cfg.llm.vocab_size, cfg.llm.num_hidden_layers = 64, 2
    cfg.vision.num_hidden_layers, cfg.audio.encoder_layers = 1, 1
    cfg.query_num, cfg.audio_pool_step = 4, 5  # the prompts below are counted at the original's 10 audio tokens/s
    cfg.image_pad_id, cfg.video_pad_id, cfg.audio_pad_id = 61, 62, 63
    return cfg


def test_sincos_2d_known_table():
    # dim 8: columns use dims 0-3, rows dims 4-7; each half is [sin(p*w0), sin(p*w1), cos(p*w0), cos(p*w1)]
    # with w_i = 1 / 10000^(i / (8/4)) = [1, 0.01].
    table = sincos_2d(2, 3, 8)
    assert table.shape == (2, 3, 8)
    r, c = 1, 2
    expected = [math.sin(c), math.sin(0.01 * c), math.cos(c), math.cos(0.01 * c),
                math.sin(r), math.sin(0.01 * r), math.cos(r), math.cos(0.01 * r)]
    assert torch.allclose(table[r, c], torch.tensor(expected), atol=1e-6)
    assert torch.equal(table[0, 0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.float32))


def test_resampler_padded_batch_equals_each_alone():
    torch.manual_seed(0)
    res = Resampler(query_num=8, embed_dim=256, kv_dim=48).eval()
    grids = torch.tensor([[2, 3], [4, 4], [1, 5]])
    lengths = grids.prod(1)
    L = int(lengths.max())
    x = torch.randn(3, L, 48)
    mask = torch.arange(L)[None] < lengths[:, None]
    batched = res(x, mask, grids)
    assert batched.shape == (3, 8, 256)
    for i in range(3):
        n = int(lengths[i])
        alone = res(x[i:i + 1, :n], mask[i:i + 1, :n], grids[i:i + 1])
        assert (batched[i] - alone[0]).abs().max() < 1e-5
    # the keys carry positions: transposing a slice's grid changes the output
    assert (res(x[:1, :6], mask[:1, :6], torch.tensor([[3, 2]])) - batched[:1]).abs().max() > 1e-3


def test_resampler_param_names_follow_original():
    names = set(dict(Resampler(64, 256, kv_dim=128).named_parameters()))
    assert names == {"query", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                     "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias",
                     "ln_post.weight", "ln_post.bias", "proj"}
    assert Resampler(64, 1024, kv_dim=1152).attn.num_heads == 8  # D // 128 heads


def test_video_groups_give_query_num_tokens_each():
    torch.manual_seed(0)
    res = Resampler(query_num=64, embed_dim=128, kv_dim=32).eval()
    frames, L = 8, 6
    x = torch.randn(frames, L, 32)
    mask = torch.ones(frames, L, dtype=torch.bool)
    grids = torch.tensor([[2, 3]] * frames)
    times = torch.arange(frames) * 5                      # 0.5 s apart, in 0.1 s units
    sizes = torch.tensor([6, 2])
    out = res.forward_video(x, mask, grids, times, sizes)
    assert out.shape == (2, 64, 128)                      # 6 frames -> 64 tokens, 2 frames -> 64 tokens
    second = res.forward_video(x[6:], mask[6:], grids[6:], times[6:], torch.tensor([2]))
    assert (out[1] - second[0]).abs().max() < 1e-5        # groups are independent
    shifted = res.forward_video(x[6:], mask[6:], grids[6:], times[6:] + 7, torch.tensor([2]))
    assert (shifted - second).abs().max() > 1e-4          # timestamps enter the keys


def test_audio_projector_pools_and_counts():
    cfg = tiny_config()
    proj = AudioProjector(16, 32, pool_step=5)
    states = torch.randn(2, 50, 16)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[0, :50], mask[1, :23] = True, True
    out = proj(states, mask)
    assert out.shape == (10 + 4, 32)                      # (50-5)//5+1 = 10, (23-5)//5+1 = 4
    # mel frames -> tokens: 1 s = 100 frames -> 50 after conv2 -> 10 after pooling by 5 (the original's rule),
    # 25 by 2 (the tiny preset: a row per spoken character); 45 s = 30 s + 15 s chunks
    assert audio_token_count(100, cfg) == 10
    assert audio_token_count(4500, cfg) == 300 + 150
    assert audio_token_count(100, OmniConfig.preset("tiny")) == 25


def make_batch(cfg, with_audio=True):
    """Prompt: 2 image slices (4 tokens each) + one 1 s audio (10 tokens), text around them."""
    q = cfg.query_num
    ids = [1, 2] + [cfg.image_pad_id] * (2 * q) + [3] + ([cfg.audio_pad_id] * 10 if with_audio else []) + [4, 5, 6, 7]
    input_ids = torch.tensor([ids])
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 pixel_values=torch.randn(2, 3, 28, 42), image_grid_hw=torch.tensor([[2, 3], [2, 2]]))
    batch["pixel_values"][1, :, :, 28:] = 0
    if with_audio:
        batch.update(audio_features=torch.randn(1, 80, 100), audio_feature_lens=torch.tensor([100]))
    return batch


def media_of(batch) -> MediaInputs:
    return MediaInputs(**{k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")})


def test_placeholder_count_mismatch_raises():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = OmniModel(cfg).eval()
    batch = make_batch(cfg)
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:]
    model(**batch)
    bad = make_batch(cfg)
    bad["input_ids"][0, 2] = 9                         # one image placeholder fewer than the slices produce
    bad["attention_mask"] = torch.ones_like(bad["input_ids"])
    with pytest.raises(ValueError, match="image placeholder/embedding count mismatch.*7 image pad tokens.*8 embeddings"):
        model(**bad)
    no_audio = make_batch(cfg)
    del no_audio["audio_features"], no_audio["audio_feature_lens"]
    with pytest.raises(ValueError, match="10 audio placeholder tokens but no audio inputs"):
        model(**no_audio)


def test_media_rows_are_spliced_at_placeholders():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = OmniModel(cfg).eval()
    batch = make_batch(cfg)
    embeds = model.embed_inputs(batch["input_ids"], media_of(batch))
    images = model.embed_images(batch["pixel_values"], batch["image_grid_hw"]).reshape(-1, 256)
    audio = model.embed_audio(batch["audio_features"], batch["audio_feature_lens"])
    ids = batch["input_ids"][0]
    assert torch.equal(embeds[0, ids == cfg.image_pad_id], images)
    assert torch.equal(embeds[0, ids == cfg.audio_pad_id], audio)
    text = model.llm.get_input_embeddings()(ids)
    is_text = (ids != cfg.image_pad_id) & (ids != cfg.audio_pad_id)
    assert torch.equal(embeds[0, is_text], text[is_text])


def standin_batch(cfg):
    """make_batch without audio, the first image slice's rows standing for words: row k -> ids [k+1, k+2] for
    k < 3, the last row -> [9]; the second slice has no stand-in."""
    batch = make_batch(cfg, with_audio=False)
    standin = torch.full((*batch["input_ids"].shape, 2), -1)
    rows = torch.nonzero(batch["input_ids"][0] == cfg.image_pad_id).flatten()[:cfg.query_num]
    for k, row in enumerate(rows[:3]):
        standin[0, row] = torch.tensor([k + 1, k + 2])
    standin[0, rows[3], 0] = 9
    return dict(batch, standin_ids=standin), rows


def test_standins_fill_image_rows_with_the_sum_of_their_word_codes():
    """Without images (the text warm-up), a stand-in row is the sum of its words' fixed codes; other rows keep
    their own token's embedding. The codes are seeded (the same in every model), not the LLM's trainable table.
    Pads without images and without stand-ins still raise."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = OmniModel(cfg).eval()
    batch, rows = standin_batch(cfg)
    del batch["pixel_values"], batch["image_grid_hw"]
    with pytest.raises(ValueError, match="image placeholder tokens but no image inputs"):
        model(**batch)                                  # the second slice's pads stand for nothing
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][0, rows[-1] + 1:rows[-1] + 1 + cfg.query_num] = 5
    embeds = model.embed_inputs(batch["input_ids"], media_of(batch))
    codes = model.word_codes()
    expected = torch.stack([codes[1] + codes[2], codes[2] + codes[3], codes[3] + codes[4], codes[9]])
    assert torch.allclose(embeds[0, rows], expected)
    assert torch.equal(OmniModel(cfg).word_codes(), codes) and not any(p is codes for p in model.parameters())
    assert codes.std().item() == pytest.approx(0.5, rel=0.05)
    table = model.llm.get_input_embeddings().weight
    others = torch.ones_like(batch["input_ids"][0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(embeds[0, others], table[batch["input_ids"][0, others]])


def test_standin_loss_pulls_the_resampler_not_the_words():
    """With images, the image rows are the resampler's; standin_loss = |image - words|^2 / |words|^2 over the rows
    with stand-ins (hand-computed), its gradient reaches the resampler but not the word embeddings. Only an LLM
    that learned the stand-ins (config.reads_standins, set by the text warm-up) gets the loss."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = OmniModel(cfg).train()
    batch, rows = standin_batch(cfg)
    labels = batch["input_ids"].clone()
    model.standin_weight = 0.5
    assert "standin_loss" not in model(**batch, labels=labels)  # e.g. a real Qwen3 never read these codes
    model.config.reads_standins = True
    media = media_of(batch)
    images = model.embed_images(batch["pixel_values"], batch["image_grid_hw"])[0]   # [Q, D] first slice
    table = model.llm.get_input_embeddings().weight
    codes = model.word_codes()
    words = torch.stack([codes[1] + codes[2], codes[2] + codes[3], codes[3] + codes[4], codes[9]])
    expected = ((images - words) ** 2).sum(-1).mean() / (words ** 2).sum(-1).mean()
    embeds = model.embed_inputs(batch["input_ids"], media)
    loss = model.standin_loss(batch["input_ids"], embeds, media)
    assert torch.allclose(loss, expected, atol=1e-6)
    model.zero_grad()
    loss.backward()
    assert model.resampler.query.grad.abs().sum() > 0 and (table.grad is None or not table.grad.any())
    out = model(**batch, labels=labels)
    assert torch.allclose(out["standin_loss"], expected, atol=1e-6)
    model.standin_weight = 0.0
    plain = model(**batch, labels=labels)
    assert "standin_loss" not in plain and torch.allclose(out["loss"], plain["loss"] + 0.5 * expected, atol=1e-5)
    model.standin_weight = 0.5
    model.resampler.requires_grad_(False)  # e.g. a talker-only run: nothing the stand-in loss could move
    assert "standin_loss" not in model(**batch, labels=labels)


def test_spelling_loss_is_near_zero_on_a_spelled_path_and_large_off_it():
    """Tokens that ARE the codes of a CTC path spelling the target (blank c1 blank c2 c2 blank) cost ~0; the same
    tokens against the reversed target cost a lot; tokens twice their codes' size (CTC alone would like them even
    better) pay the pull onto the nearest code: relative error (2c - c)^2 / c^2 = 1."""
    torch.manual_seed(0)
    codes = torch.randn(4, 32)                                       # std 1: squared distances ~64 apart
    tokens = codes[[0, 1, 0, 2, 2, 0]].unsqueeze(0)                  # [1, 6, D]
    n = torch.tensor([6])
    right, wrong = torch.tensor([[1, 2]]), torch.tensor([[2, 1]])
    assert spelling_loss(tokens, n, codes, right, torch.tensor([2])) < 0.05
    assert spelling_loss(tokens, n, codes, wrong, torch.tensor([2])) > 3
    ctc_only = spelling_loss(tokens * 2, n, codes, right, torch.tensor([2])) - 1.0
    assert 0 <= ctc_only < 0.05


def test_listen_loss_spells_each_chunks_audio_rows():
    """With config.spelling_ids and a trainable audio projector, forward adds standin_weight x listen_loss: the
    spelling_loss of each chunk's audio rows (embed_audio, in order) against its transcript's characters; chunks
    without one (length 0) are left out; the gradient reaches the projector, not the LLM's embeddings."""
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.spelling_ids = [[5], [6], [7, 8]]
    model = OmniModel(cfg).train()
    batch = make_batch(cfg)
    batch["audio_features"] = torch.randn(2, 80, 100)
    batch["audio_feature_lens"] = torch.tensor([100, 60])
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, 6), cfg.audio_pad_id)], 1)  # 60 frames: 6
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch.update(audio_spelling=torch.tensor([[3, 1, 2], [0, 0, 0]]), audio_spelling_lens=torch.tensor([3, 0]))
    labels = batch["input_ids"].clone()
    codes = model.word_codes()
    table = torch.stack([codes[cfg.audio_pad_id], codes[5], codes[6], codes[7] + codes[8]])
    assert torch.equal(model.spelling_codes(), table)
    first = model.embed_audio(batch["audio_features"][:1], batch["audio_feature_lens"][:1])   # [10, D]
    expected = spelling_loss(first[None], torch.tensor([10]), table, torch.tensor([[3, 1, 2]]), torch.tensor([3]))
    model.standin_weight = 0.5
    out = model(**batch, labels=labels)
    assert torch.allclose(out["listen_loss"], expected, atol=1e-5)
    model.zero_grad()
    out["listen_loss"].backward()
    table_grad = model.llm.get_input_embeddings().weight.grad
    assert model.audio_projector.linear1.weight.grad.abs().sum() > 0 and (table_grad is None or not table_grad.any())
    model.standin_weight = 0.0
    plain = model(**batch, labels=labels)
    assert "listen_loss" not in plain and torch.allclose(out["loss"], plain["loss"] + 0.5 * expected, atol=1e-5)
    model.standin_weight = 0.5
    model.audio_projector.requires_grad_(False)
    assert "listen_loss" not in model(**batch, labels=labels)


def test_loss_ignores_minus_100_labels():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = OmniModel(cfg).eval()
    batch = make_batch(cfg)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -3:] = batch["input_ids"][0, -3:]        # only the last 3 tokens are "assistant" tokens
    out = model(**batch, labels=labels)
    full = model.llm(inputs_embeds=model.embed_inputs(batch["input_ids"], media_of(batch)), logits_at=None).logits
    expected = torch.nn.functional.cross_entropy(full[0, -4:-1], batch["input_ids"][0, -3:])
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert int(out["num_label_tokens"]) == 3


def test_lookup_loss_is_the_cross_entropy_of_the_watched_heads():
    """watch_layer returns the weights its layer attends with (softmax of its queries and keys by hand, from the
    layer's input captured by a hook); lookup_loss = mean over the targeted positions and over the heads sharing
    the first key/value head of -log weight on the target slot of its half (hand-computed), added times
    lookup_weight."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = OmniModel(cfg).eval()
    batch = make_batch(cfg, with_audio=False)
    labels = batch["input_ids"].clone()
    T = labels.shape[1]
    lookups = torch.full((1, T, 2), -1)
    lookups[0, T - 2], lookups[0, T - 1] = torch.tensor([3, 3]), torch.tensor([5, 6])  # a scene's, a clip's
    seen = {}
    layer = model.llm.model.layers[model.lookup_layer]
    layer.input_layernorm.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    embeds = model.embed_inputs(batch["input_ids"], media_of(batch))
    out = model.llm(inputs_embeds=embeds, logits_at="none", watch_layer=model.lookup_layer)
    cos, sin = rope_cos_sin(torch.arange(T)[None], cfg.llm.head_dim, cfg.llm.rope_theta, embeds.dtype)
    q, k, _ = layer.self_attn.project(seen["x"], cos, sin)                       # [1, nh, T, hd], [1, nkv, T, hd]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(future, float("-inf")).softmax(-1)  # [1, nh, T, T]
    assert torch.allclose(out.attentions, w, atol=1e-6)
    heads = cfg.llm.num_attention_heads // cfg.llm.num_key_value_heads
    assert heads == 2                                    # one head per half: the first reads 5, the second 6
    by_hand = -torch.stack([w[0, 0, T - 2, 3], w[0, 1, T - 2, 3], w[0, 0, T - 1, 5], w[0, 1, T - 1, 6]]).log().mean()
    assert torch.allclose(model.lookup_loss(w, lookups), by_hand, atol=1e-5)
    model.lookup_weight = 0.5
    both = model(**batch, labels=labels, lookup_slots=lookups)
    model.lookup_weight = 0.0
    plain = model(**batch, labels=labels, lookup_slots=lookups)
    assert "lookup_loss" not in plain and torch.allclose(both["lookup_loss"], by_hand, atol=1e-5)
    assert torch.allclose(both["loss"], plain["loss"] + 0.5 * by_hand, atol=1e-5)


def test_unused_modality_still_gets_gradient_path():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = OmniModel(cfg).train()
    batch = make_batch(cfg, with_audio=False)
    labels = batch["input_ids"].clone()
    model(**batch, labels=labels)["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_freeze_by_component():
    model = OmniModel(tiny_config())
    model.freeze("vision", "audio", "llm")
    assert model.trainable_components() == ["resampler", "audio_projector"]
    model.unfreeze("llm").freeze("projectors")
    assert model.trainable_components() == ["llm"]
    with pytest.raises(ValueError, match="unknown components"):
        model.freeze("talker")


def test_graft_takes_the_named_parts_and_what_the_config_says_about_them():
    torch.manual_seed(0)
    base = OmniModel(tiny_config())
    torch.manual_seed(1)
    donor = OmniModel(tiny_config())
    donor.config.reads_standins, donor.config.spelling_ids = True, [[5], [6]]
    donor.config.external_weights["vision"] = "/models/siglip"
    before = {k: v.clone() for k, v in base.state_dict().items()}
    base.graft(donor, ["vision", "resampler"])
    theirs = donor.state_dict()
    for key, value in base.state_dict().items():
        taken = key.startswith(("vision_tower.", "resampler."))
        assert torch.equal(value, theirs[key] if taken else before[key]), key
    assert not torch.equal(before["resampler.query"], theirs["resampler.query"])  # the two inits differ
    assert base.config.spelling_ids == [[5], [6]]          # the resampler spells with the donor's characters
    assert base.config.external_weights == {"vision": "/models/siglip"}
    assert not base.config.reads_standins                  # an LLM property: only grafting the LLM brings it
    base.graft(donor, ["llm"])
    assert base.config.reads_standins and torch.equal(base.llm.lm_head.weight, donor.llm.lm_head.weight)

    other = OmniModel(tiny_config())
    other.config.spelling_ids = [[7], [6]]
    with pytest.raises(ValueError, match="other characters"):
        base.graft(other, ["audio_projector"])
    with pytest.raises(ValueError, match="choose from"):
        base.graft(donor, ["talker"])
    wider = tiny_config()
    wider.query_num = 8
    with pytest.raises(ValueError, match="query_num"):
        base.graft(OmniModel(wider), ["resampler"])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = OmniModel(cfg).eval()
    batch = make_batch(cfg)
    labels = batch["input_ids"].clone()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = OmniModel.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert loaded.config == model.config
    assert torch.equal(model(**batch, labels=labels)["loss"], loaded(**batch, labels=labels)["loss"])
    with pytest.raises(ValueError, match="external_weights"):
        model.save_pretrained(tmp_path / "x", exclude=("vision",))


def test_generate_with_and_without_cache_match():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = OmniModel(cfg).eval()
    batch = make_batch(cfg)
    with_cache = model.generate(**batch, max_new_tokens=8, use_cache=True)
    no_cache = model.generate(**batch, max_new_tokens=8, use_cache=False)
    assert with_cache.shape == (1, 8) and torch.equal(with_cache, no_cache)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(**batch, max_new_tokens=8, temperature=1.0, top_k=10, top_p=0.9, generator=g1)
    s2 = model.generate(**batch, max_new_tokens=8, temperature=1.0, top_k=10, top_p=0.9, generator=g2, use_cache=False)
    assert torch.equal(s1, s2)
    stop = int(with_cache[0, 2])
    stopped = model.generate(**batch, max_new_tokens=8, stop_ids=(stop,))
    assert stopped.shape[1] <= 3 and int(stopped[0, -1]) == stop


def test_top_k_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(OmniModel.sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(OmniModel.sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(200)}
    assert draws == {0}                                     # p(token 0) = 0.66 > 0.5 alone


def test_config_json_round_trip(tmp_path):
    for name in ("tiny", "qwen3_0_6b"):
        cfg = OmniConfig.preset(name)
        cfg.save(tmp_path / "c.json")
        assert OmniConfig.load(tmp_path / "c.json") == cfg


def test_resampler_heads_follow_the_original_rule_unless_set():
    """width // 128 heads (MiniCPM-o: 8 at Qwen3-0.6B's 1024); the tiny preset sets 8 (its rule would give 2), and a
    config saved before the field existed keeps the rule."""
    with torch.device("meta"):
        assert OmniModel(OmniConfig.preset("qwen3_0_6b")).resampler.attn.num_heads == 8
        tiny = OmniConfig.preset("tiny")
        assert OmniModel(tiny).resampler.attn.num_heads == 8
        old = {k: v for k, v in tiny.to_dict().items() if k != "resampler_heads"}
        assert OmniModel(OmniConfig.from_dict(old)).resampler.attn.num_heads == 256 // 128


def test_qwen3_0_6b_preset_matches_real_model_sizes():
    # published sizes: Qwen3-0.6B 596,049,920 (tied embeddings); Whisper-medium encoder 307,216,384 (incl. the
    # 1500x1024 position table); SigLIP2-so400m-patch14-384 vision tower 412,987,248 without its pooling head.
    with torch.device("meta"):
        model = OmniModel(OmniConfig.preset("qwen3_0_6b"))
    n = {name: sum(p.numel() for p in getattr(model, attr).parameters()) for name, attr in model.COMPONENTS.items()}
    assert n["llm"] == 596_049_920
    assert n["audio"] == 307_216_384
    assert n["vision"] == 412_987_248


def test_omni_from_local_hf_folders_and_save_without_frozen_towers(tmp_path):
    """Real-checkpoint path: three local HF folders -> OmniModel; saving can leave the frozen towers out."""
    from transformers import (Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel, WhisperConfig,
                              WhisperModel)
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "llm")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=56, patch_size=14)
                      ).save_pretrained(tmp_path / "vision")
    WhisperModel(WhisperConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=64,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
                 ).save_pretrained(tmp_path / "audio")
    model = OmniModel.from_hf_folders(str(tmp_path / "llm"), str(tmp_path / "vision"), str(tmp_path / "audio"),
                                      query_num=4, image_pad_id=61, video_pad_id=62, audio_pad_id=63).eval()
    assert model.config.llm.hidden_size == 128 and model.config.vision.hidden_size == 64
    assert model.resampler.kv_proj.weight.shape == (128, 64)
    batch = make_batch(model.config)
    model.freeze("vision", "audio")
    model.save_pretrained(tmp_path / "omni", exclude=("vision", "audio"))
    from safetensors import safe_open
    with safe_open(tmp_path / "omni" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith(("vision_tower.", "audio_tower.")) for k in keys)
    loaded = OmniModel.from_pretrained(str(tmp_path / "omni")).eval()
    labels = batch["input_ids"].clone()
    assert torch.equal(model(**batch, labels=labels)["loss"], loaded(**batch, labels=labels)["loss"])
