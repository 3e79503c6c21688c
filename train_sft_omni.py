"""Supervised fine-tuning on instruction data of every task family (images, multi-image, video, audio, thinking).

    python train_sft_omni.py --init out/joint --out out/sft                      # tiny demo: everything trains
    python train_sft_omni.py --init out/align --train projectors,llm --lora_rank 64 --out out/sft_lora
    torchrun --nproc_per_node 8 train_sft_omni.py --init out/align --data a.jsonl b.jsonl ...
    python train_sft_omni.py --init out/sft --train talker --speech_weight 1 --out out/talker   # speech, LLM frozen

--train picks the components that learn (vision,audio,llm,resampler,audio_projector; projectors = both).
--lora_rank r trains the LLM through LoRA on q/k/v/o instead of fully (the original's fine-tune recipe,
r = alpha = 64); the update is merged into the weights when the stage output is saved, so the output is a plain
checkpoint. Frozen towers that came from pretrained folders are not copied into the output.
--speech_weight W > 0 adds W * the talker's loss on samples with a speech target (`build_toyworld.py --speak`):
a model without a talker gets one sized for the codec saved next to the data (--codec), and the talker trains
along with --train (`--train talker` alone: the LLM stays frozen and only the talker learns to speak).
"""
import argparse
import os

from dataset.phonemes import token_sounds
from model.codec import MelCodec
from model.talker import TalkerConfig
from stage_utils import (add_model_args, build_model, component_lrs, finish_stage, finished_before, omni_data,
                         set_trainable)
from trainer import Trainer, add_common_args

DATA = "data/toyworld"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, data=[f"{DATA}/sft.jsonl"])
    g = parser.add_argument_group("lora")
    g.add_argument("--lora_rank", type=int, default=0, help="train the LLM through LoRA of this rank (0 = off)")
    g.add_argument("--lora_alpha", type=float, default=0.0, help="LoRA scale alpha / rank (default alpha = rank)")
    g = parser.add_argument_group("speech output")
    g.add_argument("--speech_weight", type=float, default=0.0, help="weight of the talker loss (0 = off)")
    g.add_argument("--codec", default="", help="speech codec folder (default: codec/ next to the first --data)")
    g.add_argument("--talker_config", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="TalkerConfig fields of a NEW talker, e.g. num_hidden_layers=4 guided_attention=0")
    add_common_args(parser)
    parser.set_defaults(out="out/sft", train="vision,audio,llm,projectors", epochs=2, batch_size=16, lr=3e-4,
                        warmup_ratio=0.05)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if finished_before(args):
        return
    model, tokenizer = build_model(args)
    codec = attach_talker(model, args, tokenizer) if args.speech_weight else None
    set_trainable(model, args.train.split(",") + (["talker"] if codec else []), args.lora_rank, args.lora_alpha)
    data = omni_data(args, model.config, tokenizer, codec)
    lora = f" (LLM through LoRA r={args.lora_rank})" if args.lora_rank else ""
    print(f"sft: training {model.trainable_components()}{lora}, {len(data[0])} samples")
    Trainer(args, model, *data, lr_for=component_lrs(args, {})).fit()
    finish_stage(model, tokenizer, args)


# the longest ToyWorld word has 9; held-out CER 17.2% (5 seeds, picked codes) vs 19.6-21.1% without (README)
SOUND_PHONEMES = 12


def attach_talker(model, args, tokenizer) -> MelCodec:
    """Load the data's codec; give the model a talker sized for it unless it already has one; let it spell and,
    on a phonetic codec, know how each token sounds (espeak-ng's phonemes, saved with the talker)."""
    codec = MelCodec.load(args.codec or os.path.join(os.path.dirname(args.data[0]), "codec"))
    if model.talker is None:
        model.add_talker(new_talker_config(codec, args.talker_config))
    elif args.talker_config:
        raise SystemExit("--talker_config shapes a NEW talker, but the --init checkpoint already has one")
    model.talker.set_spelling(tokenizer)
    if model.talker.config.sound_phonemes and not model.talker.sounds.any():  # filled once (Qwen3's vocab: minutes)
        if codec.phonemes is None:
            raise SystemExit("a talker that reads phonemes (sound_phonemes) needs a phonetic codec (--speech_codec)")
        model.talker.set_sounds(token_sounds(tokenizer, codec.phonemes))
    model.codec, model.speech_weight = codec, args.speech_weight
    return codec


def new_talker_config(codec: MelCodec, overrides: list[str]) -> TalkerConfig:
    """TalkerConfig sized for the codec, with FIELD=VALUE overrides of its number fields (typed like the default).
    On a phonetic codec it also reads SOUND_PHONEMES phonemes of each token (TalkerConfig's own default, 0, is what
    talkers saved before the sound term load with)."""
    defaults = TalkerConfig()
    fields = {"sound_phonemes": SOUND_PHONEMES} if codec.phonemes else {}
    for item in overrides:
        name, _, value = item.partition("=")
        kind = type(getattr(defaults, name, None))
        if kind not in (int, float):
            raise SystemExit(f"--talker_config {item!r}: not a number field of TalkerConfig")
        try:
            fields[name] = kind(value)
        except ValueError:
            raise SystemExit(f"--talker_config {item!r}: {value!r} is not a valid {kind.__name__}")
    return TalkerConfig(**{"n_codebooks": codec.n_codebooks, "vocab_size": codec.vocab_size, **fields})


if __name__ == "__main__":
    main()
