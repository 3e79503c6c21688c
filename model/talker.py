"""The talker: a small causal transformer that speaks the LLM's answer as codec codes (MiniCPM-o's speech decoder).

What it reads. One item per answer token, the answer's text tokenised as the tokenizer writes it (answer_words: an
answer the LLM spelled a character per token is read as its words): that token's text embedding (the LLM's input
embedding, projected to the talker's width) + L2-normalised MLP(the LLM's last hidden state of that token, of its last
letter when spelled) + its L2-normalised SPELLING (the sum of an embedding per UTF-8 byte of the token's text at its
place in the token) + (with `sound_phonemes`, on a phonetic codec) its L2-normalised SOUND (the same over the token's
phonemes, as ids of the codec's first codebook).
The text embedding says WHAT to say; spelling and sound say how it is written and said, which carries over between
words (a whole-word token is only ever heard in the few clips that say it, its letters and phonemes in thousands;
with phonetic codes, codebook 0 becomes copying the sound at the right pace); the hidden state carries the context
the LLM had when it wrote it. The L2 norms keep those terms on a fixed scale whatever the LLM's width or stage.

What it writes. Codec frames of `n_codebooks` codes each (with the distribution each code was picked from:
SpokenFrames; the codec decodes the finer codebooks as their expected codeword), with a DELAY pattern: codebook k
is shifted k steps later, so one step predicts codebook 0 of frame f together with codebook 1 of frame f-1, ...,
and the finer codebooks of a frame are always predicted after the coarser ones of that frame were fed back. One
head per codebook. Each codebook's vocabulary has two extra ids: FILL (the empty slots the delay leaves at the start
and end) and STOP (codebook 0 only: the speech is over).

    delayed grid, 3 codebooks, F = 3 frames (c = code, S = STOP, . = FILL)
        step       0    1    2    3    4
        book 0    c00  c01  c02   S    .
        book 1     .   c10  c11  c12   .      L = F + max(K - 1, 1) steps
        book 2     .    .   c20  c21  c22

Streaming order. Text and speech are interleaved in fixed chunks, in training exactly as in generation:

    [voice] [text 0..n) [steps 0..m) [text n..2n) [steps m..2m) ... (then whatever is left of either)

so the talker can start speaking after the first n answer tokens and never waits for the whole answer. The
item before step s (a text item at a chunk boundary, else step s-1) predicts step s. m is chosen so the text
stays ahead of the speech: m steps (0.48 s by default) are shorter than n tokens (4) take to say, so the
talker always has the words it is saying (and a few after them) in view.

Where it looks. Training adds a guided-attention loss (diagonal_penalty) on one layer: a step that is x% through
the speech is steered to attend to the text x% through the answer (by letters). Big TTS models learn that
alignment from data; a small talker on a few thousand clips tends to say the first word from the text and the
next from memory (README, "Speech output", for what the loss changes and what it does not).
"""
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from model.model_llm import DecoderLayer, KVCache, LLMConfig, RMSNorm, build_attention_mask, rope_cos_sin

IGNORE = -100


class SpokenFrames(NamedTuple):
    """Code frames as the talker says them, with the distribution over each codebook's codes that every code was
    picked from: codec.decode(*frames) decodes the finer codebooks as the codeword expected under it."""
    codes: torch.Tensor   # Long[K, f]
    probs: torch.Tensor   # [K, f, V]

    @staticmethod
    def empty(n_codebooks: int, vocab_size: int, device: torch.device | str = "cpu") -> "SpokenFrames":
        return SpokenFrames(torch.zeros(n_codebooks, 0, dtype=torch.long, device=device),
                            torch.zeros(n_codebooks, 0, vocab_size, device=device))

    @staticmethod
    def cat(parts: list["SpokenFrames"]) -> "SpokenFrames":
        return SpokenFrames(torch.cat([p.codes for p in parts], 1), torch.cat([p.probs for p in parts], 1))


@dataclass
class TalkerConfig:
    hidden_size: int = 384           # 384 wide: lower held-out CER than 256, one seed (README, "Speech output")
    intermediate_size: int = 1024
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 96
    rope_theta: float = 10000.0
    n_codebooks: int = 4             # from the codec
    vocab_size: int = 256            # codec entries per codebook; + FILL + STOP
    voices: list[str] = field(default_factory=lambda: ["ava", "max"])
    text_chunk: int = 4              # answer tokens per interleaved text chunk
    speech_chunk: int = 12           # delayed-grid steps per interleaved speech chunk (0.48 s at 25 frames/s)
    max_frames: int = 500            # 20 s at 25 frames/s: generation is cut (STOP forced) here
    spelling_bytes: int = 16         # bytes of each token's text the talker reads (longer tokens are cut)
    sound_phonemes: int = 0          # phonemes of each token's pronunciation it reads (phonetic codec; 0 = off;
                                     # train_sft_omni gives a new talker on a phonetic codec 12)
    guided_attention: float = 1.0    # weight of the diagonal-attention loss (0 = off); see diagonal_penalty
    guided_layer: int = 1            # the layer whose heads it steers (the last one if the talker has fewer)
    guided_width: float = 0.2        # how far (in fractions of the answer) a head may look off the diagonal
    first_codebook_weight: float = 4.0   # codebook 0's cross-entropy counts this much more than each finer one's

    def decoder_config(self) -> LLMConfig:
        """The Qwen3 block shapes the talker reuses."""
        return LLMConfig(vocab_size=1, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                         num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                         num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                         rope_theta=self.rope_theta)


# ----------------------------------------------------------------------------- delay pattern and chunk order
def delay_grid(codes: torch.Tensor, fill: int, stop: int) -> torch.Tensor:
    """Long[K, F] frames -> Long[K, L] delayed grid, L = F + max(K - 1, 1): codebook k shifted right by k,
    STOP in codebook 0 right after the last frame, FILL everywhere else."""
    K, frames = codes.shape
    grid = codes.new_full((K, frames + max(K - 1, 1)), fill)
    for k in range(K):
        grid[k, k:k + frames] = codes[k]
    grid[0, frames] = stop
    return grid


def interleave_order(n_text: int, n_steps: int, text_chunk: int, speech_chunk: int) -> torch.Tensor:
    """Long[1 + n_text + n_steps]: the order in which the items [voice, text 0.., step 0..] are fed."""
    order, j = [0], 0
    while j * text_chunk < n_text or j * speech_chunk < n_steps:
        order += range(1 + j * text_chunk, 1 + min((j + 1) * text_chunk, n_text))
        order += range(1 + n_text + j * speech_chunk, 1 + n_text + min((j + 1) * speech_chunk, n_steps))
        j += 1
    return torch.tensor(order)


def diagonal_penalty(weights: torch.Tensor, text_at: torch.Tensor, steps_at: torch.Tensor, centers: torch.Tensor,
                     width: float) -> torch.Tensor:
    """Guided attention (Tachibana et al., 2017, DC-TTS): speech that is 40% through should be reading the text that
    is 40% through. A small talker trained on a few thousand clips learns to say the FIRST word from the text and
    the next from memory ("ten cars" -> "ten bears"), since the frames before already predict the next ones well;
    the penalty pushes it to look where it is in the text (it helps on unseen texts, not enough: README).

    weights [nh, P, P] one answer's attention weights; text_at Long[N] / steps_at Long[F] the positions of its text
    items / of the step items that predict its frames; centers [N] where each token sits in the answer (0..1).
    -> the mean over heads and steps of sum_n w[n] * (1 - exp(-(center_n - progress)^2 / (2 width^2))), w = the
    step's attention over the text items, renormalised to sum to 1 (attending to earlier speech is not penalised)."""
    on_text = weights[:, steps_at][:, :, text_at]                                 # [nh, F, N]
    on_text = on_text / on_text.sum(-1, keepdim=True).clamp_min(1e-6)
    progress = (torch.arange(len(steps_at), device=weights.device) + 0.5) / len(steps_at)   # [F]
    off_diagonal = 1 - torch.exp(-(centers[None] - progress[:, None]) ** 2 / (2 * width ** 2))  # [F, N]
    return (on_text * off_diagonal).sum(-1).mean()


def fill_table(table: torch.Tensor, rows: list[list[int]]) -> None:
    """A per-token lookup (spelling, sound): row t = rows[t] + 1, cut to the table's width, 0-padded."""
    filled = torch.zeros_like(table)
    for token, row in enumerate(rows[:len(table)]):
        row = row[:table.shape[1]]
        filled[token, :len(row)] = torch.tensor(row, dtype=table.dtype) + 1
    table.copy_(filled)


def answer_words(tokenizer, ids: list[int], complete: bool = True) -> tuple[list[int], list[int]]:
    """What the talker reads of an answer the LLM wrote (ids): (the tokenizer's own ids for its text, and for each the
    index in ids of the token that completes it, whose last hidden state the talker reads with it).

    The tiny LLM writes what it reads off a text image or hears a character per token (dataset/chat.py,
    tokenize_conversation); a letter token's sound is the letter's name, so the talker reads the words those letters
    make. An answer already in the tokenizer's own tokens comes back unchanged. complete=False (the LLM is still
    writing): the last word is left out, it may still grow."""
    enc = tokenizer(tokenizer.decode(ids), add_special_tokens=False, return_offsets_mapping=True)
    words, n = enc.word_ids(), len(enc["input_ids"])
    if not complete and n:
        n = words.index(words[-1])
    if enc["input_ids"][:n] == ids[:n]:                     # written in the tokenizer's own tokens
        return ids[:n], list(range(n))
    ends = [len(tokenizer.decode(ids[:k + 1]).rstrip("\ufffd")) for k in range(len(ids))]  # text written by token k
    return enc["input_ids"][:n], [min(bisect_left(ends, e), len(ids) - 1) for _, e in enc["offset_mapping"][:n]]


# ----------------------------------------------------------------------------- the talker
class Talker(nn.Module):
    def __init__(self, config: TalkerConfig, llm_width: int, llm_vocab: int):
        super().__init__()
        self.config = config
        H, K = config.hidden_size, config.n_codebooks
        self.fill, self.stop = config.vocab_size, config.vocab_size + 1   # the two extra ids of every codebook
        self.text_proj = nn.Linear(llm_width, H) if llm_width != H else nn.Identity()
        self.hidden_mlp = nn.Sequential(nn.Linear(llm_width, H), nn.SiLU(), nn.Linear(H, H))
        self.byte_embed = nn.Embedding(257, H, padding_idx=0)              # byte b -> row b + 1; 0 = no byte
        self.byte_pos = nn.Embedding(config.spelling_bytes, H)
        # Long-lived lookup, saved with the talker: row t = the bytes of token t's text (+1), 0-padded. set_spelling
        # fills it from the tokenizer; all zeros = the spelling term is 0.
        self.register_buffer("spelling", torch.zeros(llm_vocab, config.spelling_bytes, dtype=torch.uint8))
        if config.sound_phonemes:  # the same for how each token SOUNDS: its phonemes as the codec's code-0 ids + 1
            self.sound_embed = nn.Embedding(config.vocab_size + 1, H, padding_idx=0)
            self.sound_pos = nn.Embedding(config.sound_phonemes, H)
            self.register_buffer("sounds", torch.zeros(llm_vocab, config.sound_phonemes, dtype=torch.int16))
        self.voice_embed = nn.Embedding(len(config.voices), H)
        self.code_embeds = nn.ModuleList(nn.Embedding(config.vocab_size + 2, H) for _ in range(K))
        decoder = config.decoder_config()
        self.layers = nn.ModuleList(DecoderLayer(decoder, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(H, decoder.rms_norm_eps)
        self.heads = nn.ModuleList(nn.Linear(H, config.vocab_size + 2, bias=False) for _ in range(K))

    def set_spelling(self, tokenizer) -> None:
        """Fill the spelling table: every token's decoded text as UTF-8 bytes, cut to spelling_bytes."""
        fill_table(self.spelling, [list(tokenizer.decode([t]).encode("utf-8")) for t in range(len(tokenizer))])

    def set_sounds(self, sounds: list[list[int]]) -> None:
        """Fill the sound table: sounds[t] = token t's phonemes as ids of a phonetic codec's first codebook
        (dataset/phonemes.token_sounds), cut to sound_phonemes."""
        fill_table(self.sounds, sounds)

    # ---- items
    def text_items(self, ids: torch.Tensor, text_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Long[N] answer tokens, [N, D_llm] their input embeddings, [N, D_llm] last hidden states -> [N, H]."""
        spelled = self.spelling[ids].long()                                        # [N, S] byte + 1, 0 = none
        letters = (self.byte_embed(spelled) + self.byte_pos.weight) * (spelled > 0).unsqueeze(-1)  # [N, S, H]
        items = (self.text_proj(text_embeds) + F.normalize(self.hidden_mlp(hidden), dim=-1)
                 + F.normalize(letters.sum(1), dim=-1))
        if self.config.sound_phonemes:
            phones = self.sounds[ids].long()                                        # [N, P] phoneme + 1, 0 = none
            sounds = (self.sound_embed(phones) + self.sound_pos.weight) * (phones > 0).unsqueeze(-1)  # [N, P, H]
            items = items + F.normalize(sounds.sum(1), dim=-1)
        return items

    def step_items(self, columns: torch.Tensor) -> torch.Tensor:
        """Long[L, K] grid columns -> [L, H]: the sum of each codebook's embedding."""
        return sum(embed(columns[:, k]) for k, embed in enumerate(self.code_embeds))

    def decode(self, x: torch.Tensor, cache: KVCache | None = None, watch: int | None = None):
        """[B, T, H] items -> [B, T, H] states; causal over the cache and the new items. With `watch` = a layer
        index (training, no cache): -> (states, that layer's attention weights [B, nh, T, T])."""
        B, T, _ = x.shape
        past = cache.seq_len if cache is not None else 0
        positions = torch.arange(past, past + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = build_attention_mask(None, T, past, x.device)
        weights = None
        for i, layer in enumerate(self.layers):
            if i == watch:
                x, weights = layer(x, cos, sin, mask, cache, watch=True)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x) if watch is None else (self.norm(x), weights)

    def token_centers(self, ids: torch.Tensor) -> torch.Tensor:
        """Long[N] answer tokens -> [N] where each sits in the answer (0..1), by its number of letters (a token
        of 8 letters takes about twice as long to say as one of 4)."""
        letters = (self.spelling[ids] > 0).sum(-1).clamp_min(1).float()         # [N]
        ends = letters.cumsum(0)
        return (ends - letters / 2) / ends[-1]

    # ---- training
    def forward(self, ids: list[torch.Tensor], text_embeds: list[torch.Tensor], hidden: list[torch.Tensor],
                codes: list[torch.Tensor], voices: torch.Tensor) -> torch.Tensor:
        """Per answer: ids Long[N_i], text_embeds/hidden [N_i, D_llm], codes Long[K, F_i]; voices Long[B].
        -> the cross-entropy at every step that holds a code (or STOP), averaged over codebooks with codebook 0
        weighted first_codebook_weight (its coarse codes decide what is said and when a word starts; Moshi weights
        its semantic codebook up the same way) + guided_attention x the watched layer's diagonal_penalty."""
        cfg = self.config
        sequences, targets, places = [], [], []
        for t, e, h, c, v in zip(ids, text_embeds, hidden, codes, voices):
            grid = delay_grid(c, self.fill, self.stop).T                           # [L, K]
            items = torch.cat([self.voice_embed(v)[None], self.text_items(t, e, h), self.step_items(grid)])
            target = torch.cat([grid.new_full((1 + len(e), grid.shape[1]), IGNORE),
                                grid.masked_fill(grid == self.fill, IGNORE)])      # [1 + N + L, K]
            order = interleave_order(len(e), len(grid), cfg.text_chunk, cfg.speech_chunk)
            sequences.append(items[order])                                        # [P, H]
            targets.append(target[order[1:]])                                     # [P - 1, K]: item p predicts p + 1
            at = torch.empty_like(order)
            at[order] = torch.arange(len(order))                                  # item i sits at position at[i]
            places.append((at[1:1 + len(e)], at[1 + len(e):1 + len(e) + c.shape[1]], self.token_centers(t)))
        watch = min(cfg.guided_layer, cfg.num_hidden_layers - 1) if cfg.guided_attention > 0 else None
        decoded = self.decode(pad_sequence(sequences, batch_first=True), watch=watch)
        states = (decoded if watch is None else decoded[0])[:, :-1]             # [B, P-1, H] (right-padded)
        targets = pad_sequence(targets, batch_first=True, padding_value=IGNORE)   # [B, P-1, K]
        losses = []
        for k, head in enumerate(self.heads):
            keep = targets[..., k] != IGNORE                                      # [B, P-1]
            losses.append(F.cross_entropy(head(states[keep]).float(), targets[..., k][keep]))
        per_book = torch.tensor([cfg.first_codebook_weight] + [1.0] * (len(losses) - 1), device=states.device)
        loss = (torch.stack(losses) * per_book).sum() / per_book.sum()
        if watch is None:
            return loss
        guided = torch.stack([diagonal_penalty(w, *place, cfg.guided_width) for w, place in zip(decoded[1], places)])
        return loss + cfg.guided_attention * guided.mean()

    # ---- generation
    def pick(self, logits: torch.Tensor, step: int, stop_step: int | None, temperature: float,
             generator: torch.Generator | None) -> torch.Tensor:
        """[K, V + 2] logits of one step -> Long[K] grid column. Slots the delay pattern fixes are forced to FILL;
        only codebook 0 may say STOP, and only once."""
        column = []
        for k in range(len(logits)):
            if step < k or (stop_step is not None and step - k >= stop_step):
                column.append(self.fill)
                continue
            if k == 0 and step >= self.config.max_frames:
                column.append(self.stop)
                continue
            allowed = logits[k].float().clone()
            allowed[self.fill] = float("-inf")
            if k > 0:
                allowed[self.stop] = float("-inf")
            if temperature <= 0:
                column.append(int(allowed.argmax()))
            else:
                column.append(int(torch.multinomial((allowed / temperature).softmax(-1), 1, generator=generator)))
        return torch.tensor(column, device=logits.device)

    @torch.no_grad()
    def stream(self, text_chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], voice: int = 0,
               temperature: float = 0.0, generator: torch.Generator | None = None) -> Iterator[SpokenFrames]:
        """Pulls (ids Long[n], text_embeds [n, D_llm], hidden [n, D_llm]) chunks of <= text_chunk answer tokens lazily, and
        yields the code frames [K, f] as they complete (f may be 0), one yield per speech chunk, each code with the
        distribution over its codebook's V codes it was picked from (the model's own, whatever the temperature).
        Pulling lazily is what interleaves it with the LLM: the next text chunk is only asked for when the talker
        needs it."""
        K, m, V = self.config.n_codebooks, self.config.speech_chunk, self.config.vocab_size
        device = self.norm.weight.device
        cache, chunks = KVCache(), iter(text_chunks)
        state = self.decode(self.voice_embed(torch.tensor([[voice]], device=device)), cache)[:, -1]  # [1, H]
        columns, dists, stop_step, emitted, text_left = [], [], None, 0, True
        while stop_step is None or len(columns) < stop_step + max(K - 1, 1):
            if text_left and len(columns) % m == 0:
                chunk = next(chunks, None)
                text_left = chunk is not None and len(chunk[0]) == self.config.text_chunk
                if chunk is not None and len(chunk[0]):
                    state = self.decode(self.text_items(*chunk)[None], cache)[:, -1]
            logits = torch.stack([head(state[0]) for head in self.heads])        # [K, V + 2]
            column = self.pick(logits, len(columns), stop_step, temperature, generator)
            if column[0] == self.stop:
                stop_step = len(columns)
            columns.append(column)
            dists.append(logits[:, :V].float().softmax(-1))                     # [K, V]
            state = self.decode(self.step_items(column[None])[None], cache)[:, -1]
            if len(columns) % m == 0:
                emitted = yield from self._emit(columns, dists, emitted, stop_step)
        yield from self._emit(columns, dists, emitted, stop_step)

    def _emit(self, columns: list[torch.Tensor], dists: list[torch.Tensor], emitted: int, stop_step: int | None):
        """Yield the frames whose every codebook has been generated since the last yield; -> frames emitted."""
        K = self.config.n_codebooks
        done = min(len(columns) - (K - 1), len(columns) if stop_step is None else stop_step)
        if done <= emitted:
            yield SpokenFrames.empty(K, self.config.vocab_size, self.norm.weight.device)
            return emitted
        steps = slice(emitted, done + K - 1)          # frame f's codebook k was picked at step f + k
        grid, probs = torch.stack(columns[steps], 1), torch.stack(dists[steps], 1)   # [K, n], [K, n, V]
        n = done - emitted
        yield SpokenFrames(torch.stack([grid[k, k:k + n] for k in range(K)]),     # undo the delay
                           torch.stack([probs[k, k:k + n] for k in range(K)]))
        return done

    def generate(self, ids: torch.Tensor, text_embeds: torch.Tensor, hidden: torch.Tensor, voice: int = 0,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> SpokenFrames:
        """A whole answer at once: Long[N], [N, D_llm], [N, D_llm] -> frames [K, F] (streaming's chunk order)."""
        n = self.config.text_chunk
        chunks = [(ids[i:i + n], text_embeds[i:i + n], hidden[i:i + n]) for i in range(0, len(ids), n)]
        return SpokenFrames.cat(list(self.stream(chunks, voice, temperature, generator)))
