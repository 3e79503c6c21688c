"""Tokenizers: train a tiny byte-level BPE for the demo, or load a real Qwen3 one; both get our special tokens.

The tiny tokenizer copies Qwen2/3's design (byte-level BPE behind the same regex pre-split), so any text,
Chinese included, is encodable and the chat template tokenises the same way at both scales.
"""
import json
import os
import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model.model_omni import MEDIA_TOKENS

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SPECIAL_TOKENS = CHAT_TOKENS + MEDIA_TOKENS
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"

# Qwen2/Qwen3's pre-tokeniser split: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _conversation_texts(jsonl_paths: list[str]):
    """Every text field of every sample (special tokens removed: they are added whole, not learned)."""
    yield "system\nuser\nassistant\n"  # the template's role names
    for path in jsonl_paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    sample = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the dataset reports bad lines; the tokenizer just learns from the good ones
                if not isinstance(sample, dict):
                    continue
                turns = list(sample.get("conversations") or []) + [sample.get("chosen"), sample.get("rejected")]
                texts = [sample.get("system")] + [t.get("content") if isinstance(t, dict) else t for t in turns]
                for text in texts:
                    if isinstance(text, str) and text:
                        yield _SPECIAL_RE.sub(" ", text)


def train_tokenizer(jsonl_paths: list[str], out_dir: str, vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the conversation text of `jsonl_paths`, saved as a transformers tokenizer folder.

    Deterministic: the same files give the same tokenizer.json. Special tokens take ids 0..len(SPECIAL_TOKENS)-1.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_conversation_texts(jsonl_paths), trainer=trainer)
    others = [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 additional_special_tokens=others, clean_up_tokenization_spaces=False)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the generic class name every transformers version knows
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str):
    """Load a tokenizer folder (ours or a Qwen3 checkpoint) and add whichever of our special tokens it lacks.

    Tokens the folder already has keep their ids (Qwen3 has <|im_start|>, <think>, <|image_pad|>, ...);
    the rest are appended after the vocabulary (Qwen3-0.6B's embedding has 267 spare rows for them).
    """
    tok = AutoTokenizer.from_pretrained(path)
    vocab = tok.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = PAD_TOKEN
    return tok
