"""Training speed of the tiny preset and the peak memory of one qwen3_0_6b SFT step (random weights, no download).

    python benchmarks/bench_train.py [--data data/toyworld] [--steps 20] [--tokens 2048]
    python benchmarks/bench_train.py --text_packing [--data data/toyworld] [--steps 40]
    python benchmarks/bench_train.py --frozen_towers [--data data/toyworld] [--steps 20]

1. tiny: full SFT steps (every component trains, AdamW) on pre-collated ToyWorld SFT batches, so the number is
   the model's speed, not the data loader's: samples/s and tokens/s (prompt + answer + media tokens).
2. qwen3_0_6b: one SFT step as the 24 GB recipe runs it: LLM + resampler + audio projector train, SigLIP2 and
   Whisper frozen, bf16 autocast over fp32 weights, gradient checkpointing, one 2k-token sample (an image, 10 s of
   audio, text, the answer labelled). On a GPU: torch.cuda.max_memory_allocated after a real step. On CPU (a 0.6B
   step takes minutes there) the peak is accounted instead:
     weights (all, fp32) + gradients (trainable, fp32) + AdamW moments (2 x trainable, fp32)
     + activations autograd saves for backward, measured with saved_tensors_hooks (unique storages, bytes) on the
       same step with 1 and 2 decoder layers and extrapolated linearly to all layers (each layer adds the same)
     + the largest transient of backward: one layer's activations recomputed without checkpointing.
   The frozen towers run without any tensor requiring grad, so autograd saves nothing for them.
3. --text_packing: the text warm-up's batches padded vs packed (pack_rows), same batches, same LLM, ratio.
4. --frozen_towers: the slots and listen warm-ups, whose datasets run the frozen tower once per item up front: a
   step on the served tower output against the same step with the tower run on the decoded media first (as
   every epoch did before), same batches, same model, ratio; plus the one-off encoding time.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

from dataset.chat import char_token_ids
from dataset.omni_dataset import OmniDataset, collate, length_grouped_batches, pack_rows
from dataset.tokenizer import load_tokenizer
from model.model_omni import OmniConfig, OmniModel, audio_token_count
from model.warmup_heads import ListenWarmup, SlotWarmup
from stage_utils import AudioWarmupData, TextDataset, collate_audio, set_trainable, warmup_data

GB = 1024 ** 3


def timed_steps(model, batches: list[dict], samples: list[int], params) -> tuple[float, float]:
    """-> (samples/s, real tokens/s) of AdamW steps on pre-collated batches (samples[k]: how many batch k holds);
    the first 3 steps warm up the allocator and kernels and are not timed."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_samples = n_tokens = 0
    for k, (batch, n) in enumerate(zip(batches, samples)):
        if k == 3:
            t0 = time.perf_counter()
        model(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= 3:
            n_samples, n_tokens = n_samples + n, n_tokens + int((batch["attention_mask"] > 0).sum())
    seconds = time.perf_counter() - t0
    return n_samples / seconds, n_tokens / seconds


def tiny_throughput(data: str, steps: int, batch_size: int = 16):
    if not os.path.exists(os.path.join(data, "sft.jsonl")):
        from dataset.build_toyworld import build
        data = tempfile.mkdtemp()
        build(data, size="small", workers=2)
    tokenizer = load_tokenizer(os.path.join(data, "tokenizer"))
    config = OmniConfig.preset("tiny")
    config.llm.vocab_size = -(-len(tokenizer) // 64) * 64
    torch.manual_seed(0)
    model = OmniModel(config.set_token_ids(tokenizer)).train()
    dataset = OmniDataset(os.path.join(data, "sft.jsonl"), tokenizer, config)
    order = length_grouped_batches(dataset.lengths, batch_size, seed=0, epoch=0)
    batches = [collate([dataset[i] for i in idx], tokenizer.pad_token_id) for idx in order[:steps + 3]]
    samples_per_s, tokens_per_s = timed_steps(model, batches, [b["input_ids"].shape[0] for b in batches],
                                              model.parameters())
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny preset ({n / 1e6:.1f}M params, {torch.get_num_threads()} threads, batch {batch_size}): "
          f"{samples_per_s:.1f} samples/s, {tokens_per_s:.0f} tokens/s over {steps} SFT steps")


def text_packing(data: str, steps: int, scene_questions: int, questions_per_scene: int, transcriptions: int,
                 clips: int, batch_size: int = 16):
    """The text warm-up's batches (the dataset's conversations with stand-ins + generated scenes, transcriptions and
    clips, plainly shuffled) collated padded (collate) and packed (pack_rows), the same batches on the same LLM: the
    share of computed tokens that are real, and the speed of each."""
    tokenizer = load_tokenizer(os.path.join(data, "tokenizer"))
    config = OmniConfig.preset("tiny")
    config.llm.vocab_size = -(-len(tokenizer) // 64) * 64
    torch.manual_seed(0)
    model = OmniModel(config.set_token_ids(tokenizer)).train()
    model.lookup_weight = 1.0
    set_trainable(model, ["llm"])
    dataset = TextDataset([os.path.join(data, f) for f in ("pretrain.jsonl", "sft.jsonl")], tokenizer,
                          config, scene_questions, 0, questions_per_scene, transcriptions, clips)
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    order = length_grouped_batches(lengths, batch_size, seed=0, epoch=0, mega_batches=1)[:steps + 3]
    speeds = {}
    for name, collate_fn in (("padded", collate), ("packed", pack_rows)):
        batches = [collate_fn([dataset[i] for i in idx], tokenizer.pad_token_id) for idx in order]
        real = sum(int((b["attention_mask"] > 0).sum()) for b in batches) / sum(b["input_ids"].numel() for b in batches)
        speeds[name], _ = timed_steps(model, batches, [len(idx) for idx in order],
                                      [p for p in model.parameters() if p.requires_grad])
        print(f"text warm-up, {name}: {real:.0%} of the computed tokens real, {speeds[name]:.1f} samples/s")
    print(f"packed / padded: {speeds['packed'] / speeds['padded']:.2f}x over {steps} steps "
          f"({len(dataset)} samples, {torch.get_num_threads()} threads)")


def frozen_towers(data: str, steps: int, batch_size: int = 16):
    """ms per step of the slots and listen warm-ups on the served tower output vs with the frozen tower in the step
    (media decoded beforehand, not timed), and the time their datasets take to encode every item once."""
    tokenizer = load_tokenizer(os.path.join(data, "tokenizer"))
    config = OmniConfig.preset("tiny")
    config.llm.vocab_size = -(-len(tokenizer) // 64) * 64
    torch.manual_seed(0)
    model = OmniModel(config.set_token_ids(tokenizer)).train()
    set_trainable(model, ["resampler", "audio_projector"])
    args = argparse.Namespace(data=[os.path.join(data, f) for f in ("pretrain.jsonl", "sft.jsonl")],
                              batch_size=batch_size, seed=0)
    for stage in ("slots", "listen"):
        t0 = time.perf_counter()
        dataset, collate_fn, batches_fn = warmup_data(args, stage, model, tokenizer)
        encode_s = time.perf_counter() - t0
        order = batches_fn(0)[:steps + 3]
        served = [collate_fn([dataset[i] for i in idx]) for idx in order]
        if stage == "slots":
            net = SlotWarmup(model)
            media = [torch.cat([dataset._pixels(i) for i in idx]) for idx in order]   # [N, 3, S, S]

            def tower(pixels, batch):
                grid_hw = torch.tensor([[pixels.shape[-1] // config.vision.patch_size] * 2] * len(pixels))
                return {**batch, "patch_features": model.vision_tower(pixels, grid_hw)[0]}
        else:
            config.spelling_ids = [char_token_ids(tokenizer, c)[0] for c in dataset.chars]
            net = ListenWarmup(model)
            media = [collate_audio([AudioWarmupData.__getitem__(dataset, i) for i in idx]) for idx in order]

            def tower(mels, batch):
                states, mask = model.audio_tower(mels["audio_features"], mels["audio_feature_lens"])
                return {**batch, "audio_states": states, "audio_state_lens": mask.sum(1)}
        ms = {}
        for name, step in (("served", lambda k: served[k]), ("tower", lambda k: tower(media[k], served[k]))):
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
            for k in range(len(order)):
                if k == 3:
                    t0 = time.perf_counter()
                net(**step(k))["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            ms[name] = (time.perf_counter() - t0) / steps * 1000
        print(f"{stage} warm-up ({len(dataset)} items, batch {batch_size}): {ms['served']:.1f} ms/step served, "
              f"{ms['tower']:.1f} ms/step with the tower in the step ({ms['tower'] / ms['served']:.2f}x); "
              f"encoding every item once: {encode_s:.1f} s")


def big_sample(config: OmniConfig, tokens: int, device) -> dict:
    """One sample of `tokens` tokens: a 448x448 image (query_num tokens), 10 s of audio, text; last 25% labelled."""
    image_tokens, mel_len = config.query_num, 1000
    audio_tokens = audio_token_count(mel_len, config)
    ids = torch.randint(0, 150000, (1, tokens))
    ids[0, 10:10 + image_tokens] = config.image_pad_id
    ids[0, 100 + image_tokens:100 + image_tokens + audio_tokens] = config.audio_pad_id
    labels = torch.full_like(ids, -100)
    labels[0, -tokens // 4:] = ids[0, -tokens // 4:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(1, 3, 448, 448), "image_grid_hw": torch.tensor([[32, 32]]),
             "audio_features": torch.randn(1, 80, mel_len), "audio_feature_lens": torch.tensor([mel_len])}
    return {k: v.to(device) for k, v in batch.items()}


def qwen_config(layers: int | None = None) -> OmniConfig:
    """layers: decoder layers for the CPU accounting, which also shrinks the frozen towers to one layer each
    (same output shapes; frozen, they add nothing to what autograd saves, and 27 SigLIP layers take minutes on CPU)."""
    config = OmniConfig.preset("qwen3_0_6b")
    config.image_pad_id, config.video_pad_id, config.audio_pad_id = 151655, 151656, 151669
    if layers:
        config.llm.num_hidden_layers = layers
        config.vision.num_hidden_layers = config.audio.encoder_layers = 1
    return config


def sft_model(config: OmniConfig, device) -> OmniModel:
    model = set_trainable(OmniModel(config), ["llm", "projectors"]).to(device)
    model.llm.gradient_checkpointing = True
    for tower in (model.vision_tower, model.audio_tower):
        tower.eval()
    return model


def gpu_peak(tokens: int):
    torch.manual_seed(0)
    model = sft_model(qwen_config(), "cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = big_sample(model.config, tokens, "cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step has the AdamW moments allocated
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"qwen3_0_6b SFT step, {tokens} tokens, bf16 autocast + grad checkpointing, LLM + projectors trainable: "
          f"peak {torch.cuda.max_memory_allocated() / GB:.2f} GiB on {torch.cuda.get_device_name()}")


def saved_bytes(model: OmniModel, batch: dict) -> int:
    """Bytes autograd keeps for backward during one forward (unique storages), under bf16 autocast."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)["loss"]
    return sum(seen.values())


def cpu_accounting(tokens: int):
    with torch.device("meta"):
        full = set_trainable(OmniModel(qwen_config()), ["llm", "projectors"])
    n_all = sum(p.numel() for p in full.parameters())
    n_train = sum(p.numel() for p in full.parameters() if p.requires_grad)
    static = 4 * n_all + 4 * n_train + 8 * n_train
    acts = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = sft_model(qwen_config(layers), "cpu")
        acts.append(saved_bytes(model, big_sample(model.config, tokens, "cpu")))
    per_layer, base = acts[1] - acts[0], 2 * acts[0] - acts[1]
    activations = base + per_layer * full.config.llm.num_hidden_layers
    model.llm.gradient_checkpointing = False  # one layer's activations, as backward recomputes it
    layer = (saved_bytes(model, big_sample(model.config, tokens, "cpu")) - acts[1]) // 2 + per_layer
    total = static + activations + layer
    print(f"qwen3_0_6b SFT step, {tokens} tokens, bf16 autocast + grad checkpointing, LLM + projectors trainable "
          f"(CPU accounting, see the docstring):\n"
          f"  params {n_all / 1e6:.0f}M ({n_train / 1e6:.0f}M trainable): weights {4 * n_all / GB:.2f} GiB + grads "
          f"{4 * n_train / GB:.2f} GiB + AdamW {8 * n_train / GB:.2f} GiB\n"
          f"  activations saved for backward {activations / GB:.2f} GiB ({per_layer / 2**20:.1f} MiB per layer) + "
          f"one recomputed layer {layer / GB:.2f} GiB\n"
          f"  estimated peak {total / GB:.2f} GiB (+ CUDA context and allocator slack on a GPU)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/toyworld")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--skip_tiny", action="store_true")
    p.add_argument("--text_packing", action="store_true",
                   help="only compare the text warm-up's padded and packed batches (needs the full ToyWorld in --data)")
    p.add_argument("--scene_questions", type=int, default=3000, help="--text_packing: the text stage's default")
    p.add_argument("--questions_per_scene", type=int, default=6, help="--text_packing: the text stage's default")
    p.add_argument("--transcriptions", type=int, default=2000, help="--text_packing: the text stage's default")
    p.add_argument("--clips", type=int, default=1200, help="--text_packing: the text stage's default")
    p.add_argument("--frozen_towers", action="store_true",
                   help="only time the slots / listen warm-ups' steps on served vs recomputed tower output")
    args = p.parse_args()
    if args.frozen_towers:
        return frozen_towers(args.data, args.steps)
    if args.text_packing:
        return text_packing(args.data, args.steps, args.scene_questions, args.questions_per_scene, args.transcriptions,
                            args.clips)
    if not args.skip_tiny:
        tiny_throughput(args.data, args.steps)
    (gpu_peak if torch.cuda.is_available() else cpu_accounting)(args.tokens)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
