"""Pretraining: tower warm-ups, modality alignment, joint pretraining. One stage per run; each stage's --out is
the next one's --init (and a checkpoint eval_omni.py can chat with). The warm-ups of the image side and of the sound +
language side train different parts, so they can run side by side (scripts/demo.sh does) and meet at align, which
takes the image side's parts with --graft; one after the other (--init the previous stage) gives the same model.

    python train_pretrain_omni.py --stage vision --out out/vision                    # tiny towers only: warm-ups
    python train_pretrain_omni.py --stage slots  --out out/slots  --init out/vision  # resampler alone
    python train_pretrain_omni.py --stage audio  --out out/audio                     # beside the two above:
    python train_pretrain_omni.py --stage listen --out out/listen --init out/audio   # audio projector alone
    python train_pretrain_omni.py --stage text   --out out/text   --init out/listen  # the LLM
    python train_pretrain_omni.py --stage align  --out out/align  --init out/text --graft vision,resampler=out/slots
    python train_pretrain_omni.py --stage joint  --out out/joint  --init out/align   # everything trains
    torchrun --nproc_per_node 2 train_pretrain_omni.py --stage align ...          # DDP: NCCL on GPU, gloo on CPU

Stages (see the README for the why):
- vision / audio / text: the tiny recipe's stand-in for towers that arrive pretrained. The vision tower learns
  per-cell colour/shape/size from ToyWorld ground truth and to read generated square text images (the character
  under each column), the audio tower transcribes (CTC), the LLM learns ToyWorld's language with each medium
  replaced by its stand-in (a scene as one vector per cell in its image slots, a clip frame by frame the same way,
  speech as its transcript spelled one character per audio row, a square text image as its text spelled over the
  image slots a scene leaves spare, ...), plus 3,000 generated scenes of 6 questions each, where the lookup loss
  (--lookup_weight) points middle-layer heads at the slot a question asks about, 2,000 generated transcriptions
  (spelling practice over the whole ASR lexicon) and 1,200 generated clips: what a pretrained LLM arrives able to
  do. Answers that read a spelled medium back (OCR of a square text image, ASR) are written a character per
  token. With real Qwen3 / SigLIP2 / Whisper folders these are skipped.
- slots (tiny recipe too): the resampler alone learns to write each scene cell's stand-in into that cell's slot
  (each frame of a clip too), and each square text image's text spelled into the spare slots (--reading_weight),
  from the frozen tower (run once per image) and without the LLM. The stand-ins are fixed word codes, so the text
  side (text stage) and the image side (this stage) each learn to meet at them, and `align` starts from slots the
  LLM can read.
- listen (tiny recipe too): the same for speech: the audio projector alone learns, by CTC on the frozen tower, to
  write each clip's transcript spelled, one character's word code per audio token where it is heard.
- align: the original's first stage: encoders and LLM frozen, only the resampler and audio projector learn to
  map media into the LLM's embedding space (caption, OCR, ASR data); on ToyWorld scenes the stand-in loss
  (--standin_weight) also pulls each resampler slot onto its cell's vector from the text warm-up.
- joint: the same data with more parts unfrozen (--train, per-component learning rates with --lr_for).
"""
import argparse

from dataset.chat import char_token_ids
from model.warmup_heads import AudioWarmup, ListenWarmup, SlotWarmup, VisionWarmup
from stage_utils import (add_model_args, build_model, charset, component_lrs, finish_stage, finished_before,
                         omni_data, set_trainable, text_data, warmup_data)
from trainer import Trainer, add_common_args

DATA = "data/toyworld"
WARMUP_DATA = [f"{DATA}/pretrain.jsonl", f"{DATA}/sft.jsonl"]  # every image, OCR text and transcript of the train split
# Per-stage defaults (all overridable on the command line); lrs maps components to their learning rate.
STAGES = {
    "vision": dict(train="vision", data=WARMUP_DATA, tasks="", epochs=8, batch_size=32, lr=2e-3, lrs={},
                   text_images=6000),
    "audio": dict(train="audio", data=WARMUP_DATA, tasks="", epochs=3, batch_size=16, lr=2e-3, lrs={}),
    "text": dict(train="llm", data=WARMUP_DATA, tasks="", epochs=2, batch_size=16, lr=6e-4, lrs={},  # not 2e-3: README
                 scene_questions=3000, questions_per_scene=6, transcriptions=2000, clips=1200),  # 1,200: README
    "slots": dict(train="resampler", data=WARMUP_DATA, tasks="", epochs=6, batch_size=16, lr=2e-3, lrs={},
                  text_images=12000),
    "listen": dict(train="audio_projector", data=WARMUP_DATA, tasks="", epochs=4, batch_size=16, lr=2e-3, lrs={}),
    "align": dict(train="projectors", data=[f"{DATA}/pretrain.jsonl"], tasks="caption,ocr,asr",
                  epochs=2, batch_size=16, lr=2e-3, lrs={}),  # 2 epochs, not 3: README (stop 32)
    "joint": dict(train="vision,audio,llm,projectors", data=[f"{DATA}/pretrain.jsonl"], tasks="caption,ocr,asr",
                  epochs=1, batch_size=16, lr=1e-3, lrs={"vision": 5e-4, "audio": 5e-4}),
}


def parse_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage", choices=list(STAGES), default="align")
    stage = pre.parse_known_args(argv)[0].stage
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=list(STAGES), default="align")
    defaults = dict(STAGES[stage])
    add_model_args(parser, data=defaults.pop("data"), tasks=defaults.pop("tasks"))
    parser.add_argument("--scene_questions", type=int, default=0,
                        help="text stage: this many generated scene questions on top of --data (see README)")
    parser.add_argument("--questions_per_scene", type=int, default=1,
                        help="text stage: question/answer turns per generated scene (one conversation)")
    parser.add_argument("--transcriptions", type=int, default=0,
                        help="text stage: this many generated ASR samples (spelling practice) on top of --data")
    parser.add_argument("--clips", type=int, default=0,
                        help="text stage: this many generated video questions (clips read frame by frame) on top")
    parser.add_argument("--text_images", type=int, default=0,
                        help="vision / slots stages: this many generated square text images (reading practice)")
    add_common_args(parser)
    lrs = defaults.pop("lrs")
    parser.set_defaults(out=f"out/{stage}", warmup_ratio=0.05, **defaults)
    args = parser.parse_args(argv)
    args.component_lrs = lrs
    return args


def main(argv=None):
    args = parse_args(argv)
    if finished_before(args):
        return
    model, tokenizer = build_model(args)
    if args.stage in ("vision", "audio", "text", "slots", "listen") and model.config.external_weights:
        raise SystemExit(f"--stage {args.stage} warms up a randomly initialised tower; pretrained towers "
                         f"({', '.join(model.config.external_weights)}) start at --stage align")
    set_trainable(model, args.train.split(","))
    if args.stage in ("slots", "listen"):  # text images and speech are spelled with the data's characters
        model.config.spelling_ids = [char_token_ids(tokenizer, c)[0] for c in charset(args.data)]
    if args.stage in ("vision", "audio"):  # a throw-away head on the tower; only the tower moves on
        data = warmup_data(args, args.stage, model)
        net = (VisionWarmup(model.vision_tower, model.config.scale_resolution, len(data[0].chars))
               if args.stage == "vision" else AudioWarmup(model.audio_tower, len(data[0].chars)))
    elif args.stage == "slots":
        net, data = SlotWarmup(model), warmup_data(args, args.stage, model, tokenizer)
    elif args.stage == "listen":  # the audio warm-up's clips and characters, now written by the projector
        net, data = ListenWarmup(model), warmup_data(args, args.stage, model)
    elif args.stage == "text":
        net, data = model, text_data(args, tokenizer, model.config)
    else:
        net, data = model, omni_data(args, model.config, tokenizer)
    print(f"stage {args.stage}: training {model.trainable_components()}, {len(data[0])} samples")
    Trainer(args, net, *data, lr_for=component_lrs(args, args.component_lrs)).fit()
    if args.stage == "text":
        model.config.reads_standins = True  # from now on align / SFT may pull image slots onto the stand-ins
    finish_stage(model, tokenizer, args)


if __name__ == "__main__":
    main()
