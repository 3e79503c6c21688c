"""The Qwen3 chat template, media-marker expansion and tokenisation with label masks.

A conversation is rendered as a list of (text, trained) pieces; the joined text is tokenised ONCE (so ids are
exactly what the whole string tokenises to, as with Qwen3's own apply_chat_template) and each token is labelled
when its first character lies in a trained piece. Qwen3's template, reproduced here (tools aside):

    <|im_start|>system\\n{system}<|im_end|>\\n                  (only with a system prompt)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{answer}<|im_end|>\\n   (assistant turns after
                                                        the last user turn; earlier ones keep only {answer})
"""
import functools
import random
import re
import zlib

import torch

from model.model_omni import AUDIO_PAD, IMAGE_PAD, IMAGE_START, TEXT_SLOTS_FROM, VIDEO_PAD, VIDEO_START

IGNORE_INDEX = -100
MARKERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
PADS = {"image": IMAGE_PAD, "audio": AUDIO_PAD, "video": VIDEO_PAD}
EMPTY_THINK = "<think>\n\n</think>\n\n"
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS.values()))


class SampleError(ValueError):
    """A sample that cannot be trained on; `reason` is a short key the dataset counts skips by."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def conversation_messages(sample: dict) -> list[dict]:
    """The sample's turns as [{"role", "content"}], with a top-level "system" prompt turned into the first turn."""
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleError("bad_structure", "'conversations' must be a non-empty list")
    if not isinstance(sample.get("system") or "", str):
        raise SampleError("bad_structure", "'system' must be a string")
    messages = [{"role": "system", "content": sample["system"]}] if sample.get("system") else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant") \
                or not isinstance(turn.get("content"), str):
            raise SampleError("bad_structure", f"turn {i} is not {{'role': system|user|assistant, 'content': str}}")
        if not turn["content"].strip():
            raise SampleError("empty_turn", f"turn {i} ({turn['role']}) is empty")
        if turn["role"] == "assistant" and _MARKER_RE.search(turn["content"]):
            raise SampleError("marker_mismatch", f"turn {i}: media marker inside an assistant turn")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no_assistant", "no assistant turn to learn from")
    return messages


def count_markers(messages: list[dict]) -> dict[str, int]:
    text = "\n".join(m["content"] for m in messages)
    return {kind: text.count(marker) for kind, marker in MARKERS.items()}


def _split_think(content: str) -> tuple[str | None, str]:
    """(reasoning or None when there is no think block, answer), parsed exactly as Qwen3's template does."""
    if "</think>" not in content:
        return None, content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def render_pieces(messages: list[dict], thinking: bool = False) -> list[tuple[str, bool]]:
    """Conversation -> [(text, trained)] pieces. Only assistant answers and their <|im_end|> are trained.

    As in Qwen3, the final assistant turn always has a think block; when the data has none, the empty block
    "<think>\n\n</think>\n\n" is inserted. Whether an empty block (inserted or from the data) is TRAINED
    depends on the sample's mode:
    - thinking=False (default): not trained. At inference `build_prompt(enable_thinking=False)` puts it in the
      prompt, so the model never produces it; training it would teach the model to close its thinking at once
      whenever the prompt stops at "assistant\n", i.e. to ignore enable_thinking=True.
    - thinking=True: trained. The prompt stops at "assistant\n" and the model itself chose not to think.
    A think block with reasoning in it is always trained.
    """
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    pieces = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
            continue
        reasoning, answer = _split_think(m["content"])
        pieces.append(("<|im_start|>assistant\n", False))
        if i > last_user and (i == len(messages) - 1 or reasoning):
            block = f"<think>\n{(reasoning or '').strip(chr(10))}\n</think>\n\n"  # == EMPTY_THINK without reasoning
            pieces.append((block, bool(reasoning) or thinking))
            answer = answer.lstrip("\n")
        pieces += [(answer + "<|im_end|>", True), ("\n", False)]
    return pieces


def render_prompt(messages: list[dict], enable_thinking: bool = False) -> str:
    """Inference prompt: the history, then the assistant header (+ the empty think block when thinking is off)."""
    history = "".join(t for t, _ in render_pieces(messages))
    return history + "<|im_start|>assistant\n" + ("" if enable_thinking else EMPTY_THINK)


def expand_markers(messages: list[dict], media_expansions: dict[str, list[str]]) -> list[dict]:
    """Replace the k-th <image>/<audio>/<video> marker by the k-th expansion string of that kind."""
    found = count_markers(messages)
    for kind in MARKERS:
        given = len(media_expansions.get(kind, []))
        if found[kind] != given:
            raise SampleError("marker_mismatch", f"{found[kind]} {MARKERS[kind]} markers but {given} {kind}s")
    queues = {kind: iter(media_expansions.get(kind, [])) for kind in MARKERS}
    kind_of = {marker: kind for kind, marker in MARKERS.items()}
    return [dict(m, content=_MARKER_RE.sub(lambda x: next(queues[kind_of[x.group()]]), m["content"]))
            for m in messages]


def _check_pad_counts(ids: torch.Tensor, tokenizer, media_expansions: dict[str, list[str]]):
    """The number of pad ids must equal what the expansions asked for: a mismatch would silently shift media."""
    for kind, pad in PADS.items():
        expected = sum(e.count(pad) for e in media_expansions.get(kind, []))
        got = int((ids == tokenizer.convert_tokens_to_ids(pad)).sum())
        if got != expected:
            raise SampleError("placeholder_mismatch", f"{got} {pad} tokens after tokenising, expected {expected}")


def tokenize_conversation(sample: dict, tokenizer, media_expansions: dict[str, list[str]] | None = None,
                          spell: str | None = None):
    """Sample -> (input_ids Long[T], labels Long[T]); labels are -100 except assistant answers + <|im_end|>.
    An answer that is exactly `spell` (spelled_answer: what a square text image's slots or a clip's audio pads
    spell) is written a character per token: reading it is then copying characters off the spelled rows, not
    picking the one word token the tokenizer has for each word, which one misread character defeats
    (docs/experiments.md, stop 34)."""
    media_expansions = media_expansions or {}
    messages = expand_markers(conversation_messages(sample), media_expansions)
    pieces = render_pieces(messages, thinking=bool(sample.get("thinking", False)))
    text = "".join(t for t, _ in pieces)
    trained = torch.zeros(len(text) + 1, dtype=torch.bool)  # per character
    spelled = torch.zeros(len(text) + 1, dtype=torch.bool)
    spelled_piece = spell and spell + "<|im_end|>"  # the trained piece of that answer (render_pieces)
    start = 0
    for piece, is_trained in pieces:
        trained[start:start + len(piece)] = is_trained
        spelled[start:start + len(piece) - len("<|im_end|>")] = is_trained and piece == spelled_piece
        start += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, first_chars = enc["input_ids"], [s for s, _ in enc["offset_mapping"]]
    if spell:
        ids, first_chars = _spell_tokens(tokenizer, text, ids, enc["offset_mapping"], spelled)
    input_ids = torch.tensor(ids, dtype=torch.long)                               # [T]
    first_char = torch.tensor(first_chars, dtype=torch.long)                      # [T]
    labels = torch.where(trained[first_char], input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    _check_pad_counts(input_ids, tokenizer, media_expansions)
    return input_ids, labels


def _spell_tokens(tokenizer, text: str, ids: list[int], offsets: list[tuple[int, int]], spelled: torch.Tensor
                  ) -> tuple[list[int], list[int]]:
    """(ids, first characters) with every token that lies inside a spelled span (spelled: Bool[len(text) + 1])
    replaced by one token per character (a character the vocabulary lacks: its byte tokens)."""
    out_ids, out_first = [], []
    for token, (s, e) in zip(ids, offsets):
        if e > s and spelled[s:e].all():
            for k in range(s, e):
                chars = _piece_ids(tokenizer, text[k])
                out_ids += chars
                out_first += [k] * len(chars)
        else:
            out_ids.append(token)
            out_first.append(s)
    return out_ids, out_first


@functools.lru_cache(maxsize=None)
def _piece_ids(tokenizer, text: str) -> tuple[int, ...]:
    """Token ids of a short piece of text on its own (a character, a cell's words), tokenised once per tokenizer:
    stand-ins are rebuilt for every sample of every epoch from a few hundred distinct pieces."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def slot_standin_ids(input_ids: torch.Tensor, tokenizer, slots: list[list[str]], pad_token: str = IMAGE_PAD
                     ) -> torch.Tensor | None:
    """[T] ids + per image (or per video frame, pad_token VIDEO_PAD) its slot texts (toyworld_text.scene_slots,
    frame_slots) -> Long[T, W]: the word ids each pad row stands for, -1 elsewhere and as padding. Each block of pad
    rows takes its slot texts in order; rows beyond them stand for the image pad token (a spare slot of the
    resampler, which cannot tell a frame from a scene: both write the same spare slots). None when the pads do not
    split evenly into one block per image with room for every slot (e.g. an image that was sliced): such a sample
    simply has no stand-in."""
    rows = torch.nonzero(input_ids == tokenizer.convert_tokens_to_ids(pad_token)).flatten()  # [n_pads]
    per_image = len(rows) // max(len(slots), 1)
    if not slots or per_image * len(slots) != len(rows) or any(len(s) > per_image for s in slots):
        return None
    words = {int(rows[k * per_image + j]): _piece_ids(tokenizer, " " + text)
             for k, texts in enumerate(slots) for j, text in enumerate(texts)}     # pad row -> its word ids
    out = torch.full((len(input_ids), max(map(len, words.values()))), -1, dtype=torch.long)  # [T, W]
    out[rows, 0] = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for row, ids in words.items():
        out[row, :len(ids)] = torch.tensor(ids)
    return out


def spelled_length(text: str) -> int:
    """Audio pad rows a transcript's spelled stand-in gets in the text warm-up: about what a ToyWorld clip of it
    gives at the tiny preset's 25 tokens/s (the sft split's 600 clips: 1.1 rows per character + 8, correlation
    0.97; never fewer rows than characters)."""
    return round(1.1 * len(text)) + 8


def char_token_ids(tokenizer, text: str) -> list[list[int]]:
    """The token ids of each lower-cased character of text on its own (' ' -> the space token, a CJK character ->
    its UTF-8 byte tokens): a spelled stand-in row is the sum of their word codes."""
    return [list(_piece_ids(tokenizer, c)) for c in text.lower()]


def spelling_targets(tokenizer, text: str, spelling_ids: list[list[int]]) -> torch.Tensor:
    """Long[L]: text's characters as 1-based classes of spelling_ids (OmniConfig.spelling_ids; 0 is the CTC
    blank), characters outside it dropped: the listen loss's target for a clip saying text."""
    index = {tuple(ids): k + 1 for k, ids in enumerate(spelling_ids)}
    return torch.tensor([index[tuple(ids)] for ids in char_token_ids(tokenizer, text) if tuple(ids) in index],
                        dtype=torch.long)


def spelled_path(n_chars: int, n_rows: int, doubled: list[bool], seed: int) -> list[int] | None:
    """A CTC path over n_rows rows that spells n_chars characters: row -> character index, -1 = blank. The shortest
    path (a blank between two equal neighbours, doubled[i]: character i equals i - 1), grown to n_rows by inserting
    blanks and repeating rows at seeded random places, as a recogniser's frames hold a character over a few rows
    and pause between some. None when n_rows is too short."""
    path = [k for i in range(n_chars) for k in ([-1, i] if doubled[i] else [i])]
    if len(path) > n_rows:
        return None
    rng = random.Random(seed)
    while len(path) < n_rows:
        at = rng.randrange(len(path) + 1)
        inside_a_run = 0 < at < len(path) and path[at - 1] == path[at] >= 0  # a blank there would spell it twice
        path.insert(at, -1 if at == 0 or (rng.random() < 0.5 and not inside_a_run) else path[at - 1])
    return path


def spelled_rows(text: str) -> int:
    """The fewest pad rows that spell text (a blank between two equal neighbours)."""
    chars = text.lower()
    return len(chars) + sum(a == b for a, b in zip(chars, chars[1:]))


def fits_text_slots(text: str, query_num: int) -> bool:
    """A square text image's text can be spelled over the slots from TEXT_SLOTS_FROM on: the one rule the text
    warm-up's stand-in, the slots warm-up's and align's reading targets share (a longer text stays text)."""
    return spelled_rows(text) <= query_num - TEXT_SLOTS_FROM


def spelled_answer(read: list[str] | None, heard: list[str]) -> str | None:
    """The text an answer is written a character per token for (tokenize_conversation's spell): what the sample's
    one spelled medium spells, a square text image's text (read) or else a single clip's transcript (heard)."""
    return read[0] if read else (heard[0] if len(heard) == 1 else None)


def spelled_standin_ids(input_ids: torch.Tensor, tokenizer, transcripts: list[str], pad_token: str = AUDIO_PAD,
                        skip: int = 0) -> torch.Tensor | None:
    """[T] ids + per audio its transcript -> Long[T, W]: each audio's block of pad rows SPELLS its transcript as a CTC
    path (spelled_path: one character per row, held over some rows, with the pad token itself as the blank on the
    others); -1 elsewhere. What the text warm-up reads in place of speech, and the form the listen warm-up
    (model/warmup_heads.ListenWarmup) teaches the audio projector to write; with pad_token IMAGE_PAD and skip
    TEXT_SLOTS_FROM, the same for square text images over the slots after the first `skip` of each block (those
    stand for the pad). None when the pads do not form one block per transcript with room for its path.
    Deterministic: the path is seeded by the transcript."""
    pad = tokenizer.convert_tokens_to_ids(pad_token)
    rows = torch.nonzero(input_ids == pad).flatten()                              # [n_pads]
    blocks = torch.tensor_split(rows, (torch.nonzero(rows[1:] != rows[:-1] + 1).flatten() + 1).tolist())
    if not len(rows) or len(blocks) != len(transcripts):
        return None
    words = {}                                                                    # pad row -> its character's ids
    for block, text in zip(blocks, transcripts):
        chars = char_token_ids(tokenizer, text)
        doubled = [i > 0 and chars[i] == chars[i - 1] for i in range(len(chars))]
        path = spelled_path(len(chars), len(block) - skip, doubled, zlib.crc32(text.encode()))
        if path is None:
            return None
        words |= {row: chars[k] for row, k in zip(block[skip:].tolist(), path) if k >= 0}
    out = torch.full((len(input_ids), max(map(len, words.values()), default=1)), -1, dtype=torch.long)  # [T, W]
    out[rows, 0] = pad
    for row, ids in words.items():
        out[row, 0] = -1
        out[row, :len(ids)] = torch.tensor(ids)
    return out


def standin_ids(input_ids: torch.Tensor, tokenizer, slots: list[list[str]] | None, spelled: list[str] | None,
                frames: list[list[str]] | None = None, read: list[str] | None = None) -> torch.Tensor | None:
    """Long[T, W]: the word ids behind a sample's image slots and video frame slots (slot_standin_ids), its
    spelled audio and its spelled text images (spelled_standin_ids), -1 elsewhere; None if it has none of them."""
    parts = [slot_standin_ids(input_ids, tokenizer, slots) if slots else None,
             slot_standin_ids(input_ids, tokenizer, frames, VIDEO_PAD) if frames else None,
             spelled_standin_ids(input_ids, tokenizer, spelled) if spelled else None,
             spelled_standin_ids(input_ids, tokenizer, read, IMAGE_PAD, TEXT_SLOTS_FROM) if read else None]
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    out = torch.full((len(input_ids), max(p.shape[1] for p in parts)), -1, dtype=torch.long)
    for p in parts:
        rows = (p >= 0).any(-1)
        out[rows, :p.shape[1]] = p[rows]
    return out


def lookup_targets(input_ids: torch.Tensor, labels: torch.Tensor, tokenizer, lookups: list) -> torch.Tensor:
    """Long[T, 2]: at the position that predicts the first token of the k-th answer, the rows of the slots that
    lookups[k] names ((image or frame, cell) for each half of the steered heads, frame -1 = the last:
    toyworld_text.queried_slots); -1 elsewhere, and everywhere unless the sample's pads are one image's or one
    clip's frames, a block of >= 9 slots each, all before its first answer. What OmniModel.lookup_loss asks the
    heads to look at."""
    out = torch.full((len(input_ids), 2), -1, dtype=torch.long)
    trained = labels != IGNORE_INDEX
    starts = torch.nonzero(trained & ~torch.cat([trained.new_zeros(1), trained[:-1]])).flatten()  # each answer
    kinds = [(pad, start) for pad, start in ((IMAGE_PAD, IMAGE_START), (VIDEO_PAD, VIDEO_START))
             if (input_ids == tokenizer.convert_tokens_to_ids(pad)).any()]
    if len(kinds) != 1 or not len(starts):
        return out
    pad, start = (tokenizer.convert_tokens_to_ids(t) for t in kinds[0])
    rows = torch.nonzero(input_ids == pad).flatten()                                          # [n_pads]
    blocks = int((input_ids == start).sum())
    per_block = len(rows) // blocks
    one_medium = blocks == 1 or kinds[0][0] == VIDEO_PAD               # one image, or a clip's frames, one block each
    if not one_medium or rows[-1] > starts[0] or per_block * blocks != len(rows) or per_block < 9:
        return out
    for start, lookup in zip(starts.tolist(), lookups):
        if lookup is not None and all(-blocks <= block < blocks for block, _ in lookup):
            out[start - 1] = torch.stack([rows[block % blocks * per_block + cell] for block, cell in lookup])
    return out


def build_prompt(messages: list[dict], tokenizer, enable_thinking: bool = False,
                 media_expansions: dict[str, list[str]] | None = None) -> list[int]:
    """Token ids of the inference prompt (markers expanded like in training) that ends in the assistant header."""
    media_expansions = media_expansions or {}
    messages = expand_markers(messages, media_expansions)
    ids = tokenizer(render_prompt(messages, enable_thinking), add_special_tokens=False)["input_ids"]
    _check_pad_counts(torch.tensor(ids, dtype=torch.long), tokenizer, media_expansions)
    return ids
