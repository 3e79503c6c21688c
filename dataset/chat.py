"""The Qwen3 chat template, media-marker expansion and tokenisation with label masks.

A conversation is rendered as a list of (text, trained) pieces; the joined text is tokenised ONCE (so ids are
exactly what the whole string tokenises to, as with Qwen3's own apply_chat_template) and each token is labelled
when its first character lies in a trained piece. Qwen3's template, reproduced here (tools aside):

    <|im_start|>system\\n{system}<|im_end|>\\n                  (only with a system prompt)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{answer}<|im_end|>\\n   (assistant turns after
                                                        the last user turn; earlier ones keep only {answer})
"""
import re

import torch

from model.model_omni import AUDIO_PAD, IMAGE_PAD, IMAGE_START, VIDEO_PAD

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


def tokenize_conversation(sample: dict, tokenizer, media_expansions: dict[str, list[str]] | None = None):
    """Sample -> (input_ids Long[T], labels Long[T]); labels are -100 except assistant answers + <|im_end|>."""
    media_expansions = media_expansions or {}
    messages = expand_markers(conversation_messages(sample), media_expansions)
    pieces = render_pieces(messages, thinking=bool(sample.get("thinking", False)))
    text = "".join(t for t, _ in pieces)
    trained = torch.zeros(len(text) + 1, dtype=torch.bool)  # per character
    start = 0
    for piece, is_trained in pieces:
        trained[start:start + len(piece)] = is_trained
        start += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = torch.tensor(enc["input_ids"], dtype=torch.long)                  # [T]
    first_char = torch.tensor([s for s, _ in enc["offset_mapping"]], dtype=torch.long)  # [T]
    labels = torch.where(trained[first_char], input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    _check_pad_counts(input_ids, tokenizer, media_expansions)
    return input_ids, labels


def slot_standin_ids(input_ids: torch.Tensor, tokenizer, slots: list[list[str]]) -> torch.Tensor | None:
    """[T] ids + per image its slot texts (toyworld_text.scene_slots) -> Long[T, W]: the word ids each image pad
    row stands for, -1 elsewhere and as padding. Each image's pad rows take its slot texts in order; rows beyond
    them stand for the pad token itself. None when the pads do not split evenly into one block per image with
    room for every slot (e.g. an image that was sliced): such a sample simply has no stand-in."""
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    rows = torch.nonzero(input_ids == pad).flatten()                              # [n_pads]
    per_image = len(rows) // max(len(slots), 1)
    if not slots or per_image * len(slots) != len(rows) or any(len(s) > per_image for s in slots):
        return None
    words = {int(rows[k * per_image + j]): tokenizer(" " + text, add_special_tokens=False)["input_ids"]
             for k, texts in enumerate(slots) for j, text in enumerate(texts)}     # pad row -> its word ids
    out = torch.full((len(input_ids), max(map(len, words.values()))), -1, dtype=torch.long)  # [T, W]
    out[rows, 0] = pad
    for row, ids in words.items():
        out[row, :len(ids)] = torch.tensor(ids)
    return out


def lookup_targets(input_ids: torch.Tensor, labels: torch.Tensor, tokenizer, cells: list[int | None]) -> torch.Tensor:
    """Long[T]: at the position that predicts the first token of the k-th answer, the row of the image slot that
    holds cells[k] (toyworld_text.queried_cells); -1 elsewhere, and everywhere unless the sample has exactly one
    image, with a slot per cell, before its first answer. What OmniModel.lookup_loss asks a head to look at."""
    out = torch.full_like(input_ids, -1)
    rows = torch.nonzero(input_ids == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).flatten()  # [n_pads]
    trained = labels != IGNORE_INDEX
    starts = torch.nonzero(trained & ~torch.cat([trained.new_zeros(1), trained[:-1]])).flatten()  # each answer
    if len(rows) < 9 or not len(starts) or rows[-1] > starts[0]:
        return out
    if tokenizer.convert_tokens_to_ids(IMAGE_START) in input_ids[rows[0] + 1:rows[-1]].tolist():
        return out                                                                 # more than one image
    for start, cell in zip(starts.tolist(), cells):
        if cell is not None:
            out[start - 1] = rows[cell]
    return out


def build_prompt(messages: list[dict], tokenizer, enable_thinking: bool = False,
                 media_expansions: dict[str, list[str]] | None = None) -> list[int]:
    """Token ids of the inference prompt (markers expanded like in training) that ends in the assistant header."""
    media_expansions = media_expansions or {}
    messages = expand_markers(messages, media_expansions)
    ids = tokenizer(render_prompt(messages, enable_thinking), add_special_tokens=False)["input_ids"]
    _check_pad_counts(torch.tensor(ids, dtype=torch.long), tokenizer, media_expansions)
    return ids
