"""The talker: delay pattern, chunk interleaving, training, stop token, streaming == whole-answer generation, and
its place in OmniModel (loss, gradient paths, save/load, old configs, chat with speech)."""
import json
import math

import pytest
import torch

from model.model_omni import OmniConfig, OmniModel
from model.model_llm import Attention, LLMConfig, rope_cos_sin
from model.talker import (SpokenFrames, Talker, TalkerConfig, answer_words, delay_grid, diagonal_penalty,
                          interleave_order)
from tests.test_omni import tiny_config


def tiny_talker_config(**overrides) -> TalkerConfig:
    return TalkerConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=32, n_codebooks=3, vocab_size=16, text_chunk=2,
                                  speech_chunk=3, max_frames=40), **overrides})


def test_delay_grid_and_interleave_order():
    codes = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    grid = delay_grid(codes, fill=16, stop=17)
    assert grid.tolist() == [[1, 2, 3, 17, 16], [16, 4, 5, 6, 16], [16, 16, 7, 8, 9]]
    assert delay_grid(codes[:1], 16, 17).tolist() == [[1, 2, 3, 17]]                # one codebook: just STOP
    order = interleave_order(n_text=5, n_steps=4, text_chunk=2, speech_chunk=3)
    # items: 0 voice, 1-5 text, 6-9 steps -> voice, t0 t1, s0 s1 s2, t2 t3, s3, t4
    assert order.tolist() == [0, 1, 2, 6, 7, 8, 3, 4, 9, 5]


VOCAB = 50


class LetterTokenizer:
    """Token t is spelled as the letters of t in base 26 ('a', 'b', ..., 'bx'): distinct spellings, shared letters."""

    def __len__(self):
        return VOCAB

    def decode(self, ids):
        t, text = ids[0], ""
        while True:
            text, t = chr(97 + t % 26) + text, t // 26
            if not t:
                return text


def overfit_set(llm_width=32):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 5)]
    texts = [torch.randn(n, llm_width, generator=g) for n in (3, 5)]
    hidden = [torch.randn(n, llm_width, generator=g) for n in (3, 5)]
    codes = [torch.randint(0, 16, (3, f), generator=g) for f in (4, 7)]
    return ids, texts, hidden, codes, torch.tensor([0, 1])


def test_loss_decreases_and_greedy_generation_stops_at_the_learned_length():
    torch.manual_seed(0)
    talker = Talker(tiny_talker_config(), llm_width=32, llm_vocab=VOCAB)
    talker.set_spelling(LetterTokenizer())
    ids, texts, hidden, codes, voices = overfit_set()
    opt = torch.optim.AdamW(talker.parameters(), lr=5e-3)
    first = talker(ids, texts, hidden, codes, voices).item()
    for _ in range(80):
        loss = talker(ids, texts, hidden, codes, voices)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    talker.eval()
    for t, e, h, c, v in zip(ids, texts, hidden, codes, voices):
        assert torch.equal(talker.generate(t, e, h, int(v)).codes, c)   # the right codes, ended by STOP in time


def test_watched_attention_is_the_fused_attention():
    """A watched layer (the talker's guided layer) attends with explicit weights: the same output as SDPA's fused
    causal kernel, and weights that are causal rows summing to 1 (their values: tests/test_llm.py, against
    transformers)."""
    torch.manual_seed(0)
    cfg = LLMConfig(vocab_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8)
    attn, x = Attention(cfg, 0), torch.randn(2, 6, 32)
    cos, sin = rope_cos_sin(torch.arange(6).expand(2, 6), 8, cfg.rope_theta, x.dtype)
    out, weights = attn(x, cos, sin, None, watch=True)                          # [2, 6, 32], [2, 4, 6, 6]
    assert torch.allclose(out, attn(x, cos, sin, None), atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 6)) and weights.triu(1).abs().max() == 0   # causal


def test_diagonal_penalty_is_small_on_the_diagonal_and_large_off_it():
    # positions: 0 voice, 1-2 the two text items, 3-6 four steps; centers: token 0 at 0.25, token 1 at 0.75
    text_at, steps_at, centers = torch.tensor([1, 2]), torch.tensor([3, 4, 5, 6]), torch.tensor([0.25, 0.75])
    progress = torch.tensor([0.125, 0.375, 0.625, 0.875])

    def looking_at(items):  # every head of every step attends to text item items[step] only
        w = torch.zeros(2, 7, 7)
        for s, n in enumerate(items):
            w[:, 3 + s, 1 + n] = 1
        return w

    def by_hand(items):
        far = [1 - torch.exp(-(centers[n] - progress[s]) ** 2 / (2 * 0.2 ** 2)) for s, n in enumerate(items)]
        return torch.stack(far).mean()

    for items in ([0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]):
        assert torch.allclose(diagonal_penalty(looking_at(items), text_at, steps_at, centers, 0.2), by_hand(items))
    assert by_hand([0, 0, 1, 1]) < 0.2 < 0.7 < by_hand([1, 1, 0, 0])
    half = looking_at([0, 0, 1, 1]) * 0.5                       # half the attention on earlier speech: not penalised
    assert torch.allclose(diagonal_penalty(half, text_at, steps_at, centers, 0.2), by_hand([0, 0, 1, 1]))


def test_token_centers_follow_the_letters_and_the_talker_loss_steers_its_watched_layer():
    talker = Talker(tiny_talker_config(), llm_width=32, llm_vocab=VOCAB)
    talker.set_spelling(LetterTokenizer())
    assert torch.allclose(talker.token_centers(torch.tensor([1, 28, 1])), torch.tensor([0.125, 0.5, 0.875]))  # b bc b
    ids, texts, hidden, codes, voices = overfit_set()
    talker(ids, texts, hidden, codes, voices).backward()
    watched = talker.layers[talker.config.guided_layer].self_attn.q_proj.weight.grad
    off = Talker(tiny_talker_config(guided_attention=0.0), llm_width=32, llm_vocab=VOCAB)
    off.load_state_dict(talker.state_dict())
    off(ids, texts, hidden, codes, voices).backward()
    assert not torch.allclose(watched, off.layers[off.config.guided_layer].self_attn.q_proj.weight.grad)


def test_first_codebook_weight_weights_codebook_zero_in_the_mean():
    ids, texts, hidden, codes, voices = overfit_set()
    torch.manual_seed(1)
    weights = Talker(tiny_talker_config(), 32, VOCAB).state_dict()
    for k in (1, 2):                                          # codebooks 1, 2 predict uniformly: CE = ln(16 + 2)
        weights[f"heads.{k}.weight"].zero_()
    uniform = math.log(18)
    loss = {}
    for w in (1.0, 4.0):
        talker = Talker(tiny_talker_config(guided_attention=0.0, first_codebook_weight=w), 32, VOCAB)
        talker.load_state_dict(weights)
        loss[w] = talker(ids, texts, hidden, codes, voices).item()
    first = 3 * loss[1.0] - 2 * uniform                       # plain mean of 3 -> codebook 0's own CE
    assert abs(first - uniform) > 0.1
    assert abs(loss[4.0] - (4 * first + 2 * uniform) / 6) < 1e-5


class NeverStop(torch.nn.Module):
    """A codebook-0 head that never predicts STOP: only max_frames can end the speech."""

    def __init__(self, head, stop: int):
        super().__init__()
        self.head, self.stop = head, stop

    def forward(self, x):
        return self.head(x).index_fill(-1, torch.tensor([self.stop]), float("-inf"))


def test_spelling_table_holds_each_tokens_bytes_and_tells_same_embeddings_apart():
    talker = Talker(tiny_talker_config(spelling_bytes=2), llm_width=32, llm_vocab=VOCAB)
    same = torch.randn(1, 32).expand(3, 32)                      # three tokens the LLM embeds (and states) alike
    before = talker.text_items(torch.tensor([1, 2, 28]), same, same)
    assert torch.equal(before[0], before[1])                     # empty table: the spelling term is 0
    talker.set_spelling(LetterTokenizer())
    assert talker.spelling[[1, 28, 49]].tolist() == [[99, 0], [99, 100], [99, 121]]  # 'b' 'bc' 'bx', +1
    after = talker.text_items(torch.tensor([1, 2, 28]), same, same)
    assert not torch.allclose(after[0], after[1]) and not torch.allclose(after[0], after[2])
    assert torch.allclose(after.norm(dim=-1), after[:1].norm(dim=-1).expand(3), atol=1.5)  # one scale: unit terms


def test_sound_table_holds_each_tokens_phonemes_and_adds_a_unit_term():
    """sound_phonemes: token t's phonemes (ids of a phonetic codec's first codebook) in a saved table, read as one
    more L2-normalised term; tokens with the same embeddings, states and spelling but other sounds come apart."""
    talker = Talker(tiny_talker_config(sound_phonemes=3), llm_width=32, llm_vocab=VOCAB)
    talker.set_spelling(LetterTokenizer())
    same = torch.randn(1, 32).expand(2, 32)
    ids = torch.tensor([1, 1])                                    # the same token twice
    talker.set_sounds([[], [4, 0, 7, 9]])                         # token 1 sounds 4 0 7 (cut to 3 phonemes)
    assert talker.sounds[1].tolist() == [5, 1, 8] and talker.sounds[0].tolist() == [0, 0, 0]
    items = talker.text_items(ids, same, same)
    plain = Talker(tiny_talker_config(), llm_width=32, llm_vocab=VOCAB)
    plain.load_state_dict(talker.state_dict(), strict=False)
    plain.set_spelling(LetterTokenizer())
    difference = items[0] - plain.text_items(ids, same, same)[0]  # exactly the sound term
    assert torch.allclose(difference.norm(), torch.tensor(1.0), atol=1e-5)
    talker.set_sounds([[], [5]])
    assert not torch.allclose(talker.text_items(ids, same, same)[0], items[0])


def test_token_sounds_are_espeak_ng_phonemes_in_the_codecs_inventory():
    from dataset.phonemes import token_sounds

    class Words:
        words = ["<|im_end|>", " mountains", "3", "三", ".", "ten"]

        def __len__(self):
            return len(self.words)

        def decode(self, ids):
            return self.words[ids[0]]
    inventory = ["_", "m", "aU", "n", "t", "I", "z", "T", "r", "i:", "E"]
    table = token_sounds(Words(), inventory)
    named = [[inventory[i] for i in row] for row in table]
    assert named == [[], ["m", "aU", "n", "t", "I", "n", "z"], ["T", "r", "i:"], [], [], ["t", "E", "n"]]


def test_max_frames_cuts_an_untrained_talker():
    torch.manual_seed(0)
    talker = Talker(tiny_talker_config(max_frames=5), llm_width=32, llm_vocab=VOCAB).eval()
    talker.heads[0] = NeverStop(talker.heads[0], talker.stop)
    out = talker.generate(torch.arange(3), torch.randn(3, 32), torch.randn(3, 32))
    assert out.codes.shape == (3, 5) and int(out.codes.max()) < 16 and out.probs.shape == (3, 5, 16)


def test_stream_pulls_text_lazily_and_concatenates_to_generate():
    torch.manual_seed(0)
    talker = Talker(tiny_talker_config(max_frames=12), llm_width=32, llm_vocab=VOCAB).eval()
    talker.set_spelling(LetterTokenizer())
    talker.heads[0] = NeverStop(talker.heads[0], talker.stop)     # speaks all 12 frames: every text chunk is needed
    ids, text, hidden = torch.arange(7), torch.randn(7, 32), torch.randn(7, 32)
    pulled = []

    def chunks():
        for i in range(0, 7, 2):
            pulled.append(i)
            yield ids[i:i + 2], text[i:i + 2], hidden[i:i + 2]

    pieces, pulled_at_yield = [], []
    for frames in talker.stream(chunks(), voice=1):
        pieces.append(frames)
        pulled_at_yield.append(len(pulled))
    assert pulled_at_yield[0] == 1 and pulled_at_yield[-1] == 4     # speech starts after the first text chunk
    streamed, whole = SpokenFrames.cat(pieces), talker.generate(ids, text, hidden, voice=1)
    assert torch.equal(streamed.codes, whole.codes) and torch.allclose(streamed.probs, whole.probs)
    # each code's distribution is the one it was picked from (greedy: its argmax), re-aligned like the codes
    assert torch.equal(whole.probs.argmax(-1), whole.codes)
    assert torch.allclose(whole.probs.sum(-1), torch.ones(whole.codes.shape))


# ----------------------------------------------------------------------------- inside OmniModel
def omni_with_talker() -> OmniModel:
    cfg = tiny_config()
    cfg.talker = tiny_talker_config()
    return OmniModel(cfg)


def speech_batch():
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 8, 9, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6, -100], [-100, -100, -100, 8, 9, -100, -100]])
    return dict(input_ids=input_ids, attention_mask=(input_ids > 0).long(), labels=labels,
                speech_codes=torch.tensor([[[1, 2, 3, 4]] * 3, [[0] * 4] * 3]),              # row 1: no speech
                speech_lens=torch.tensor([4, 0]), speech_voices=torch.tensor([1, 0]),
                speech_text_ids=torch.tensor([[4, 5], [0, 0]]), speech_text_at=torch.tensor([[3, 4], [-1, -1]]))


def test_speech_loss_adds_to_the_text_loss_and_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model = omni_with_talker().train()
    batch = speech_batch()
    text_only = {k: v for k, v in batch.items() if not k.startswith("speech_")}
    with torch.no_grad():
        assert model(**batch)["loss"] > model(**text_only)["loss"]
    model.llm.requires_grad_(False)                                 # talker-only training: gradients stop at it
    model(**text_only)["loss"].backward()                           # no speech in the batch: anchored, not absent
    assert all(p.grad is not None for p in model.talker.parameters())
    model.zero_grad()
    model(**batch)["loss"].backward()
    assert all(p.grad is None for p in model.llm.parameters())


def test_old_configs_without_a_talker_load_and_talkers_round_trip(tmp_path):
    model = omni_with_talker().eval()
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = OmniModel.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config.talker == model.config.talker
    assert all(torch.equal(a, b) for a, b in zip(model.talker.state_dict().values(),
                                                   loaded.talker.state_dict().values()))
    raw = json.loads((tmp_path / "ckpt/config.json").read_text())
    raw.pop("talker"), raw.pop("excluded")
    assert OmniConfig.from_dict(raw).talker is None
    with pytest.raises(ValueError, match="talker only when config.talker is set"):
        OmniModel(OmniConfig.from_dict(raw)).unfreeze("talker")


# ----------------------------------------------------------------------------- ToyWorld speech targets end to end
@pytest.fixture(scope="module")
def spoken_world(tmp_path_factory):
    from dataset.build_toyworld import build
    out = tmp_path_factory.mktemp("spoken_world")
    build(str(out), size="small", workers=1, speak=True, read_aloud=5)
    return out


def model_for(world) -> tuple[OmniModel, object]:
    from dataset.processor import OmniProcessor
    from dataset.tokenizer import load_tokenizer
    from model.codec import MelCodec
    torch.manual_seed(0)
    tokenizer, codec = load_tokenizer(str(world / "tokenizer")), MelCodec.load(str(world / "codec"))
    cfg = OmniConfig.preset("tiny")
    cfg.llm.vocab_size, cfg.llm.num_hidden_layers = -(-len(tokenizer) // 64) * 64, 1
    cfg.vision.num_hidden_layers, cfg.audio.encoder_layers = 1, 1
    cfg.talker = tiny_talker_config(n_codebooks=codec.n_codebooks, vocab_size=codec.vocab_size, max_frames=10)
    model = OmniModel(cfg.set_token_ids(tokenizer)).eval()
    model.codec = codec
    return model, OmniProcessor(tokenizer, cfg)


def test_speak_flag_adds_speech_targets_that_become_talker_batches(spoken_world):
    from dataset.omni_dataset import OmniDataset, collate
    model, processor = model_for(spoken_world)
    dataset = OmniDataset(str(spoken_world / "sft.jsonl"), processor.tokenizer, model.config, codec=model.codec)
    spoken = [i for i, (_, s) in enumerate(dataset.records) if "speech" in s["conversations"][-1]]
    assert spoken and all(dataset.records[i][1]["task"] in {"color", "shape", "count", "position", "audio_qa", "asr",
                                                            "read_aloud"} for i in spoken)
    item = dataset[spoken[0]]
    answer = dataset.records[spoken[0]][1]["conversations"][-1]["content"]
    assert processor.tokenizer.decode(item["speech_text_ids"]) == answer
    assert torch.equal(item["input_ids"][item["speech_text_at"]], item["speech_text_ids"])  # written as the words
    assert item["speech_codes"].shape[0] == model.codec.n_codebooks
    assert model.codec.phonemes and int(item["speech_codes"][0].max()) < len(model.codec.phonemes)  # phonetic code 0
    batch = collate([item, dataset[next(i for i in range(len(dataset)) if i not in spoken)]],
                    processor.tokenizer.pad_token_id)
    assert batch["speech_lens"].tolist() == [item["speech_codes"].shape[1], 0]
    assert model(**batch)["speech_loss"] > 0


def test_read_aloud_phrases_are_spoken_training_data_without_held_out_combinations(spoken_world):
    from dataset import toyworld_text as T
    splits = {split: [json.loads(line) for line in open(spoken_world / f"{split}.jsonl")]
              for split in ("pretrain", "sft", "test")}
    phrases = [s for s in splits["sft"] if s["task"] == "read_aloud"]
    assert len(phrases) == 5  # the fixture's read_aloud=5
    assert not any(s["task"] == "read_aloud" for split in ("pretrain", "test") for s in splits[split])
    for s in phrases:
        question, reply = s["conversations"]
        words = s["meta"]["text"].split()
        assert question["content"].endswith(s["meta"]["text"]) and reply["content"] == T.answer("en", s["meta"]["text"])
        assert reply["speech"] and (spoken_world / reply["speech"]).exists()
        assert not any(T.held_out(" ".join(pair)) for pair in zip(words, words[1:]))


def test_talker_stage_on_a_phonetic_codec_reads_each_tokens_phonemes(spoken_world, tmp_path):
    """train_sft_omni --speech_weight on a --speak build (phonetic codec by default): the new talker reads
    SOUND_PHONEMES phonemes per token, its table holds espeak-ng's phonemes of the answer words, and the checkpoint
    carries both the table and the phonetic codec."""
    import train_sft_omni
    from dataset.tokenizer import load_tokenizer
    out = tmp_path / "talker"
    train_sft_omni.main(["--out", str(out), "--max_steps", "2", "--data", str(spoken_world / "sft.jsonl"),
                         "--train", "talker", "--speech_weight", "1", "--tasks", "color,read_aloud",
                         "--swanlab_mode", "disabled", "--num_workers", "0", "--batch_size", "4"])
    model = OmniModel.from_pretrained(str(out))
    assert model.talker.config.sound_phonemes == train_sft_omni.SOUND_PHONEMES
    assert model.codec.phonemes is not None and model.codec.classifier is not None
    red = load_tokenizer(str(out)).encode(" red")
    assert len(red) == 1                                           # a ToyWorld word is one token of the tiny BPE
    sound = [model.codec.phonemes[p - 1] for p in model.talker.sounds[red[0]].tolist() if p]
    assert sound == ["r", "E", "d"]


@torch.no_grad()
def test_streamed_speech_equals_the_talker_on_the_whole_answer(spoken_world):
    model, processor = model_for(spoken_world)
    question = [{"role": "user", "content": "What color is the star?"}]
    streamed = list(model.chat(processor, question, speak=True, stream=True, max_new_tokens=6, voice="max"))
    text, wav = model.chat(processor, question, speak=True, max_new_tokens=6, voice="max")
    assert "".join(t for t, _ in streamed) == text == model.chat(processor, question, max_new_tokens=6)
    assert len(streamed) > 2 and sum(len(a) for _, a in streamed) > 0 and len(wav) > 0

    batch = processor(question)                                    # the whole answer, read in one forward pass
    steps = list(model.stream_generate(**batch, max_new_tokens=7, stop_ids=processor.stop_ids, with_hidden=True))
    frames = SpokenFrames.cat([f for _, f in model.speak_stream(iter(steps), processor.tokenizer,
                                                                set(processor.stop_ids), "max", max_tokens=6)])
    answer = torch.tensor([int(ids[0]) for ids, _ in steps if int(ids[0]) not in processor.stop_ids][:6])  # written
    ids = torch.cat([batch["input_ids"][0], answer])
    hidden = model.llm(input_ids=ids[None], logits_at="none").hidden_states[0, -len(answer):]
    words, at = answer_words(processor.tokenizer, answer.tolist())
    words = torch.tensor(words)
    whole = model.talker.generate(words, model.llm.get_input_embeddings()(words), hidden[at], voice=1)
    assert torch.equal(frames.codes, whole.codes) and torch.allclose(frames.probs, whole.probs, atol=1e-6)
    assert torch.equal(wav, model.codec.decode(*frames))           # chat decodes the finer books as expected codewords,
    assert not torch.allclose(wav, model.codec.decode(frames.codes))  # not as the picked ones


def spelled(tokenizer, text: str) -> list[int]:
    """text written a character per token, as the tiny LLM writes what it reads off a text image or hears."""
    return [i for c in text for i in tokenizer(c, add_special_tokens=False)["input_ids"]]


def test_answer_words_reads_a_spelled_answer_as_its_words(spoken_world):
    from dataset.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(str(spoken_world / "tokenizer"))
    for text in ["three red cats", "The boat is red.", "a  b   c"]:
        letters, words = spelled(tokenizer, text), tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(letters) > len(words)
        ids, at = answer_words(tokenizer, letters)
        assert ids == words
        # each word's state is the one after its last letter
        assert [tokenizer.decode(letters[:k + 1]) for k in at] == [tokenizer.decode(words[:j + 1])
                                                                   for j in range(len(words))]
        assert answer_words(tokenizer, words) == (words, list(range(len(words))))  # words stay as they are
        for n in range(len(letters) + 1):                          # while it is written: a prefix, never a guess
            partial, partial_at = answer_words(tokenizer, letters[:n], complete=False)
            assert partial == ids[:len(partial)] and partial_at == at[:len(partial)]
            assert len(partial) < len(ids)                         # the last word waits for the answer's end


def test_a_spelled_asr_answer_gives_the_talker_its_words(spoken_world):
    """An ASR answer the LLM learns to write a character per token (the model spells speech): the talker trains on
    the transcript's words, each with the LLM state at its last letter."""
    from dataset.chat import char_token_ids
    from dataset.omni_dataset import OmniDataset
    from stage_utils import charset
    model, processor = model_for(spoken_world)
    tokenizer = processor.tokenizer
    model.config.spelling_ids = [char_token_ids(tokenizer, c)[0] for c in charset([str(spoken_world / "sft.jsonl")])]
    dataset = OmniDataset(str(spoken_world / "sft.jsonl"), tokenizer, model.config, codec=model.codec, standins=True)
    index = next(i for i, (_, s) in enumerate(dataset.records)
                 if s["task"] == "asr" and "speech" in s["conversations"][-1])
    item, answer = dataset[index], dataset.records[index][1]["conversations"][-1]["content"]
    words = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert item["speech_text_ids"].tolist() == words and len(words) < len(spelled(tokenizer, answer))
    written = item["input_ids"][:int(item["speech_text_at"][-1]) + 1]
    assert written[-len(spelled(tokenizer, answer)):].tolist() == spelled(tokenizer, answer)  # the LLM spells it
    last_letters = [tokenizer.decode([int(item["input_ids"][k])]) for k in item["speech_text_at"]]
    assert last_letters == [tokenizer.decode([w])[-1] for w in words]


@torch.no_grad()
def test_streamed_speech_of_a_spelled_answer_equals_the_talker_on_its_words(spoken_world):
    model, processor = model_for(spoken_world)
    tokenizer, text = processor.tokenizer, "three red cats"
    letters = spelled(tokenizer, text)
    torch.manual_seed(1)
    states = torch.randn(len(letters) + 1, model.config.llm.hidden_size)  # [n + 1, D]: the prompt's last, each letter's
    stop = processor.stop_ids[0]
    steps = [(torch.tensor([t]), states[k:k + 1]) for k, t in enumerate(letters + [stop])]
    pieces = list(model.speak_stream(iter(steps), tokenizer, {stop}, "ava"))
    assert "".join(t for t, _ in pieces) == text
    words, at = answer_words(tokenizer, letters)
    words = torch.tensor(words)
    whole = model.talker.generate(words, model.llm.get_input_embeddings()(words), states[1:][at], voice=0)
    streamed = SpokenFrames.cat([f for _, f in pieces])
    assert torch.equal(streamed.codes, whole.codes) and torch.allclose(streamed.probs, whole.probs, atol=1e-6)


def test_new_talker_config_takes_typed_overrides_of_number_fields():
    from types import SimpleNamespace
    from train_sft_omni import new_talker_config
    from train_sft_omni import SOUND_PHONEMES
    codec = SimpleNamespace(n_codebooks=2, vocab_size=8, phonemes=None)
    cfg = new_talker_config(codec, ["num_hidden_layers=4", "guided_width=0.3", "first_codebook_weight=1"])
    assert (cfg.n_codebooks, cfg.vocab_size, cfg.num_hidden_layers, cfg.guided_width) == (2, 8, 4, 0.3)
    assert isinstance(cfg.first_codebook_weight, float)
    assert new_talker_config(codec, []) == TalkerConfig(n_codebooks=2, vocab_size=8)
    phonetic = SimpleNamespace(n_codebooks=2, vocab_size=8, phonemes=["_", "a"])  # reads phonemes unless told not to
    assert new_talker_config(phonetic, []).sound_phonemes == SOUND_PHONEMES
    assert new_talker_config(phonetic, ["sound_phonemes=0"]).sound_phonemes == 0
    for bad in (["voices=ava"], ["no_such_field=1"]):
        with pytest.raises(SystemExit, match="not a number field"):
            new_talker_config(codec, bad)
    with pytest.raises(SystemExit, match="'four' is not a valid int"):
        new_talker_config(codec, ["num_hidden_layers=four"])


def test_speech_scoring_hears_numbers_as_words():
    from benchmarks.bench_speech import clean
    assert clean("3.") == clean("Three.") == "three"
    assert clean("  Twelve  cats! ") == clean("12 cats") == "twelve cats"
    assert clean("Top left.") == "top left" and clean("3.5") == "3.5" and clean("25") == "25"
