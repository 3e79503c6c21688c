"""DPO against hallucination (RLAIF-V): prefer the model's own answers with fewer false claims.

    python dataset/build_preferences.py --ckpt out/sft --out data/toyworld/dpo.jsonl      # the pairs (judge-ranked)
    python train_dpo_omni.py --init out/sft --data data/toyworld/dpo.jsonl --out out/dpo
    torchrun --nproc_per_node 8 train_dpo_omni.py --init out/sft --data dpo.jsonl --lora_rank 64 ...

Loss per pair: -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with pi / ref the log-probability of the
chosen (c) or rejected (r) answer under the policy / the frozen reference, summed over the answer's tokens (the
labelled assistant tokens, <|im_end|> included). The reference is the starting checkpoint (--init): it never
trains, is never saved (a resumed run rebuilds it from --init) and computes its log-probs on the fly under no_grad.
--sft_weight adds the usual next-token loss on the chosen answers. The default lr (5e-5) is for the tiny preset;
RLAIF-V trains 7B+ models at 5e-7. The tiny demo (`DPO=1 bash scripts/demo.sh`) trains the vision side too, since
most of its false claims are misreadings, with a weak preference term: --train vision,resampler,llm --beta 0.01
--sft_weight 1 (the README's "DPO against hallucination" has the measured sweep).

A pair's chosen and rejected answers share the prompt, so they go through the model as rows b and B + b of one
batch of 2B rows, and the prompt's media (images, audio, video) is encoded once for both. The reference shares
every component the policy does not train (no second copy of a frozen vision tower in memory) and, when no media
component trains, reuses the policy's media embeddings outright.
"""
import argparse
import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Subset

from dataset.chat import tokenize_conversation
from dataset.omni_dataset import OmniDataset, SampleError, collate, length_grouped_batches
from model.model_omni import MediaInputs, OmniModel
from stage_utils import add_model_args, build_model, finish_stage, finished_before, set_trainable
from trainer import Trainer, add_common_args

MEDIA_COMPONENTS = ("vision", "audio", "resampler", "audio_projector")


# ----------------------------------------------------------------------------- data
class PairDataset(OmniDataset):
    """Lines of build_preferences.py: a sample whose final assistant turn is replaced by "chosen" / "rejected".
    Each item loads the media once and tokenises both conversations."""

    @staticmethod
    def _parse(line: str) -> dict:
        sample = OmniDataset._parse(line)  # JSON, turns, media markers
        for key in ("chosen", "rejected"):
            turn = sample.get(key)
            if not (isinstance(turn, dict) and turn.get("role") == "assistant" and isinstance(turn.get("content"), str)
                    and turn["content"].strip()):
                raise SampleError("bad_structure", f"'{key}' must be a non-empty assistant turn")
        if sample["conversations"][-1]["role"] != "assistant":
            raise SampleError("bad_structure", "the conversation must end with the assistant turn to replace")
        return sample

    def _load(self, sample: dict) -> dict:
        out, expansions = self._load_media(sample)
        for key in ("chosen", "rejected"):
            turns = sample["conversations"][:-1] + [sample[key]]
            ids, labels = tokenize_conversation(dict(sample, conversations=turns), self.tokenizer, expansions)
            if len(ids) > self.max_length:
                raise SampleError("too_long", f"{len(ids)} tokens > max_length {self.max_length}")
            out[key] = {"input_ids": ids, "labels": labels}
        return out


def collate_pairs(items: list[dict | None], pad_id: int) -> dict | None:
    """B pairs -> 2B rows: the chosen answers, then the rejected ones; the media of the B prompts, once."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    chosen = [dict({k: v for k, v in it.items() if k not in ("chosen", "rejected")}, **it["chosen"]) for it in items]
    return collate(chosen + [it["rejected"] for it in items], pad_id)


def pair_data(args, config, tokenizer):
    tasks = set(filter(None, args.tasks.split(",")))
    parts, lengths = [], []
    for path in args.data:
        full = PairDataset(path, tokenizer, config, args.max_length)
        keep = [i for i, (_, s) in enumerate(full.records) if not tasks or s.get("task") in tasks]
        parts.append(Subset(full, keep))
        lengths += [full.lengths[i] for i in keep]
    return (ConcatDataset(parts), partial(collate_pairs, pad_id=tokenizer.pad_token_id),
            partial(length_grouped_batches, lengths, args.batch_size, args.seed))


# ----------------------------------------------------------------------------- the loss
def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float):
    """Sequence log-probs [B] -> (mean loss, margins [B]); the margin is beta * (implicit reward gap)."""
    margin = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    return -F.logsigmoid(margin).mean(), margin


def embed_pairs(model: OmniModel, input_ids, media: MediaInputs, media_embeds=None):
    """[2B, T] ids -> ([2B, T, D] embeddings, [n, D] media embeddings of the B prompts). Rows b and B + b hold
    the same prompt, so the media is encoded once (with the chosen rows) and copied into the rejected rows."""
    cfg, B = model.config, input_ids.shape[0] // 2
    pads = torch.tensor([cfg.image_pad_id, cfg.video_pad_id, cfg.audio_pad_id], device=input_ids.device)
    is_media = torch.isin(input_ids, pads)                                          # [2B, T]
    if media_embeds is None:
        media_embeds = model.embed_inputs(input_ids[:B], media)[is_media[:B]]       # [n, D]
    embeds = model.llm.get_input_embeddings()(input_ids)                            # [2B, T, D]
    return embeds.masked_scatter(is_media.unsqueeze(-1), media_embeds.repeat(2, 1).to(embeds.dtype)), media_embeds


def sequence_logps(model: OmniModel, embeds, attention_mask, labels):
    """-> (log p of each row's labelled tokens summed [R], per-token log-probs [N], row of each token [N])."""
    targets = labels[:, 1:]                                                         # position t predicts t + 1
    keep = targets != -100                                                          # [R, T-1]
    logits = model.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                       logits_at=F.pad(keep, (0, 1))).logits                        # [N, V] labelled rows only
    token_logps = -F.cross_entropy(logits.float(), targets[keep], reduction="none")  # [N]
    rows = keep.nonzero()[:, 0]                                                     # [N]
    return torch.zeros(len(labels), device=embeds.device).index_add(0, rows, token_logps), token_logps, rows


def frozen_reference(policy: OmniModel, training: list[str]) -> OmniModel:
    """The starting model, frozen: the components that will train are copied, the others shared with the policy."""
    reference = copy.copy(policy)
    reference._modules = dict(policy._modules)
    for name in training:
        attr = OmniModel.COMPONENTS[name]
        reference._modules[attr] = copy.deepcopy(getattr(policy, attr)).requires_grad_(False)
    return reference


class DPOModel(nn.Module):
    """policy + frozen reference; forward(**batch of collate_pairs) -> {"loss", ...} as trainer.py expects."""

    def __init__(self, policy: OmniModel, components: list[str], beta: float = 0.1, sft_weight: float = 0.0):
        super().__init__()
        self.beta, self.sft_weight = beta, sft_weight
        wanted = {"resampler", "audio_projector"} if "projectors" in components else set()
        training = [c for c in OmniModel.COMPONENTS if c in wanted | set(components)]
        self.policy = policy  # registered first: parameters shared with the reference keep their policy. names
        self.reference = frozen_reference(policy, training)
        self.media_trains = any(c in MEDIA_COMPONENTS for c in training)

    def forward(self, input_ids, attention_mask, labels, **media) -> dict:
        media, B = MediaInputs(**media), input_ids.shape[0] // 2
        embeds, media_embeds = embed_pairs(self.policy, input_ids, media)
        pi, token_logps, rows = sequence_logps(self.policy, embeds, attention_mask, labels)   # [2B]
        with torch.no_grad():
            ref_embeds, _ = embed_pairs(self.reference, input_ids, media,
                                        None if self.media_trains else media_embeds.detach())
            ref = sequence_logps(self.reference, ref_embeds, attention_mask, labels)[0]        # [2B]
        loss, margin = dpo_loss(pi[:B], pi[B:], ref[:B], ref[B:], self.beta)
        out = {"dpo_loss": loss.detach(), "reward_acc": (margin > 0).float().mean(), "margin": margin.mean().detach(),
               "chosen_reward": self.beta * (pi[:B] - ref[:B]).mean().detach(),
               "rejected_reward": self.beta * (pi[B:] - ref[B:]).mean().detach(),
               "num_tokens": attention_mask.sum()}
        if self.sft_weight:
            sft = -token_logps[rows < B].mean()                                                # chosen tokens
            loss, out["sft_loss"] = loss + self.sft_weight * sft, sft.detach()
        if self.training:  # keeps the unused modality branches in the graph (DDP)
            loss = loss + self.policy.unused_branch_anchor(media).to(loss.device)
        return dict(out, loss=loss)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, data=["data/toyworld/dpo.jsonl"])
    g = parser.add_argument_group("dpo")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    g.add_argument("--sft_weight", type=float, default=0.0, help="weight of a next-token loss on the chosen answers")
    g.add_argument("--lora_rank", type=int, default=0, help="train the LLM through LoRA of this rank (0 = off)")
    g.add_argument("--lora_alpha", type=float, default=0.0, help="LoRA scale alpha / rank (default alpha = rank)")
    add_common_args(parser)
    parser.set_defaults(out="out/dpo", train="llm", epochs=2, batch_size=8, lr=5e-5, warmup_ratio=0.1,
                        min_lr_ratio=0.0, weight_decay=0.0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.init:
        raise SystemExit("DPO starts from a trained checkpoint (the reference): pass --init out/sft")
    if finished_before(args):
        return
    policy, tokenizer = build_model(args)
    components = args.train.split(",")
    model = DPOModel(policy, components, args.beta, args.sft_weight)  # the reference: copied before LoRA / training
    set_trainable(policy, components, args.lora_rank, args.lora_alpha)
    data = pair_data(args, policy.config, tokenizer)
    print(f"dpo: training {policy.trainable_components()}, {len(data[0])} pairs, beta {args.beta}")
    # --lr_for prefixes name the model's parameters (llm.=...), which live under policy. in the DPO wrapper
    trainer_args = argparse.Namespace(**{**vars(args), "lr_for": [("policy." + k, v) for k, v in args.lr_for]})
    Trainer(trainer_args, model, *data).fit()
    finish_stage(policy, tokenizer, args)


if __name__ == "__main__":
    main()
