"""Supervised fine-tuning on instruction data of every task family (images, multi-image, video, audio, thinking).

    python train_sft_omni.py --init out/joint --out out/sft                      # tiny demo: everything trains
    python train_sft_omni.py --init out/align --train projectors,llm --lora_rank 64 --out out/sft_lora
    torchrun --nproc_per_node 8 train_sft_omni.py --init out/align --data a.jsonl b.jsonl ...

--train picks the components that learn (vision,audio,llm,resampler,audio_projector; projectors = both).
--lora_rank r trains the LLM through LoRA on q/k/v/o instead of fully (the original's fine-tune recipe,
r = alpha = 64); the update is merged into the weights when the stage output is saved, so the output is a plain
checkpoint. Frozen towers that came from pretrained folders are not copied into the output.
"""
import argparse

from stage_utils import add_model_args, build_model, component_lrs, finish_stage, omni_data, set_trainable
from trainer import Trainer, add_common_args

DATA = "data/toyworld"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, data=[f"{DATA}/sft.jsonl"])
    g = parser.add_argument_group("lora")
    g.add_argument("--lora_rank", type=int, default=0, help="train the LLM through LoRA of this rank (0 = off)")
    g.add_argument("--lora_alpha", type=float, default=0.0, help="LoRA scale alpha / rank (default alpha = rank)")
    add_common_args(parser)
    parser.set_defaults(out="out/sft", train="vision,audio,llm,projectors", epochs=3, batch_size=16, lr=1e-3,
                        warmup_ratio=0.05)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = build_model(args)
    set_trainable(model, args.train.split(","), args.lora_rank, args.lora_alpha)
    data = omni_data(args, model.config, tokenizer)
    lora = f" (LLM through LoRA r={args.lora_rank})" if args.lora_rank else ""
    print(f"sft: training {model.trainable_components()}{lora}, {len(data[0])} samples")
    Trainer(args, model, *data, lr_for=component_lrs(args, {})).fit()
    finish_stage(model, tokenizer, args)


if __name__ == "__main__":
    main()
