"""RLAIF-V DPO: the claim judge on hand-written answers, the pair builder (stubbed sampler), the DPO loss against a
hand computation, the frozen reference (no gradient, not saved) and exact resume, on a micro random checkpoint."""
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_dpo_omni
from dataset.build_preferences import ModelSampler, load_prompts, make_pairs, select_pairs, write_pairs
from dataset.build_toyworld import build
from dataset.judge import caption_claims, count_claims, hallucination_metrics, judge, position_claims, score
from dataset.processor import OmniProcessor
from dataset.tokenizer import load_tokenizer
from model.model_omni import OmniConfig, OmniModel
from train_dpo_omni import DPOModel, PairDataset, collate_pairs, dpo_loss
from trainer import Trainer

FAST = ["--swanlab_mode", "disabled", "--num_workers", "0", "--batch_size", "2", "--log_every", "1"]

# ----------------------------------------------------------------------------- the judge
OBJECTS = [{"color": "red", "shape": "circle", "size": "large", "cell": [0, 0]},
           {"color": "blue", "shape": "square", "size": "small", "cell": [1, 1]},
           {"color": "blue", "shape": "star", "size": "small", "cell": [2, 2]}]
TRUE = "A large red circle at the top left, a small blue square in the center, a small blue star at the bottom right."


def false_kinds(claims) -> list[str]:
    return [c.kind for c in claims if not c.true]


def test_true_caption_has_only_true_claims():
    claims = caption_claims(TRUE, OBJECTS)
    assert len(claims) == 13 and not false_kinds(claims)  # 3 x (object, color, position, size) + the total count
    assert not false_kinds(caption_claims("左上有一个大的红色圆形，中间有一个小的蓝色正方形，右下有一个小的蓝色星形。",
                                          OBJECTS, "zh"))


@pytest.mark.parametrize("caption, expected", [
    ("A large green circle at the top left, a small blue square in the center, a small blue star at the bottom right.",
     ["color"]),                                                     # wrong colour
    ("A large red circle at the top right, a small blue square in the center, a small blue star at the bottom right.",
     ["position"]),                                                  # wrong position
    (TRUE[:-1] + ", a small green triangle on the left.", ["object", "count"]),  # non-existent object, one too many
    ("A large red circle at the top left, a small blue hexagon in the center, a small blue star at the bottom right.",
     ["object"]),                                                    # a shape ToyWorld never draws
    ("A small red circle at the top left, a small blue square in the center, a small blue star at the bottom right.",
     ["size"]),
    ("Two red circles, a small blue square in the center and a small blue star at the bottom right.",
     ["count", "count"]),                                            # wrong count phrasing: 2 circles, 4 listed
    ("There are 3 shapes: a red circle, a blue square and a blue star.", []),
    ("There are 4 blue shapes: a red circle, a blue square and a blue star.", ["count"]),
    ("A large red circle at the top left, a small blue square in the center.", ["count"]),  # one object dropped
    ("A small red circle at the center, a large black square at the center, a small blue star at the bottom right.",
     ["position", "size", "color"]),                                  # partially false: several errors
    ("", ["count"]),
    ("左上有一个大的绿色圆形，中间有两个小的蓝色正方形。", ["color", "count"]),  # 1 + 2 listed: the total holds
])
def test_false_caption_claims(caption, expected):
    assert sorted(false_kinds(caption_claims(caption, OBJECTS, "zh" if "有" in caption else "en"))) == sorted(expected)


def test_short_answers_are_judged_against_their_question():
    assert false_kinds(count_claims("3.", OBJECTS, {})) == []
    assert false_kinds(count_claims("Two.", OBJECTS, {"color": "blue"})) == []
    assert false_kinds(count_claims("There are 2 blue shapes.", OBJECTS, {"color": "blue"})) == []
    assert false_kinds(count_claims("1.", OBJECTS, {"color": "blue"})) == ["count"]
    assert false_kinds(count_claims("0.", OBJECTS, {"shape": "triangle"})) == []
    assert false_kinds(count_claims("Blue.", OBJECTS, {})) == ["count"]         # no number: no answer
    q = {"color": "red", "shape": "circle"}
    assert false_kinds(position_claims("Top left.", OBJECTS, q)) == []
    assert false_kinds(position_claims("Top.", OBJECTS, q)) == ["position"]     # not read as a part of 'top left'
    assert false_kinds(position_claims("Circle.", OBJECTS, q)) == ["position"]
    assert false_kinds(position_claims("左上。", OBJECTS, q, "zh")) == []
    sample = {"task": "count", "meta": {"scene": {"objects": OBJECTS}, "query": {}}}
    assert score(sample, "5.") == -1 and score(sample, "3.") == 0
    assert judge({"task": "ocr", "meta": {}}, "cat") == []


def test_hallucination_metrics():
    samples = [{"id": str(i), "task": t, "meta": {"scene": {"objects": OBJECTS}, "query": {}}}
               for i, t in enumerate(["caption", "caption", "count", "caption"])]
    predictions = [TRUE, TRUE.replace("green", "x").replace("red", "green"), "7.", "A red circle."]
    records = [{"id": s["id"], "task": s["task"], "prediction": p} for s, p in zip(samples, predictions)]
    h = hallucination_metrics(records, samples)
    assert h["n"] == 3 and h["rate"] == pytest.approx(2 / 3) and h["per_caption"] == pytest.approx(2 / 3)
    assert h["per_caption_by_kind"] == {"color": pytest.approx(1 / 3), "count": pytest.approx(1 / 3)}
    assert h["shapes_per_caption"] == pytest.approx(7 / 3)
    assert records[1]["false_claims"] == ["there is a green circle"] and "false_claims" not in records[2]
    with pytest.raises(ValueError, match="in order"):
        hallucination_metrics(records[::-1], samples)


# ----------------------------------------------------------------------------- preference pairs
def test_select_pairs_needs_a_gap_keeps_at_most_max_and_pairs_equal_size_captions():
    assert select_pairs(["a", "b", "c"], [0, 0, 0]) == []
    assert select_pairs(["a", "b"], [-1, 0]) == [("b", "a", 0, -1)]
    answers, scores = ["w", "x", "y", "z", "v", "u"], [-3, 0, -1, 0, -2, -3]
    assert select_pairs(answers, scores) == [("x", "u", 0, -3), ("z", "w", 0, -3)]
    assert select_pairs(answers, scores, max_pairs=3) == [("x", "u", 0, -3), ("z", "w", 0, -3), ("y", "v", -1, -2)]
    assert select_pairs(answers, scores, min_gap=3) == [("x", "u", 0, -3), ("z", "w", 0, -3)]
    assert select_pairs(["a", "a", "b"], [0, 0, -1]) == [("a", "b", 0, -1)]  # duplicates count once
    # captions pair only with captions describing as many shapes ("a" is best only because it says little)
    assert select_pairs(["a", "b", "c", "d"], [0, -3, -1, -2], sizes=[1, 3, 3, 1]) == [("a", "d", 0, -2),
                                                                                    ("c", "b", -1, -3)]
    assert select_pairs(["a", "b", "c"], [0, -3, -1], sizes=[1, 4, 3]) == []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = tmp_path_factory.mktemp("toyworld")
    build(str(data), size="small", workers=1)
    return data


def stub_answers(samples, k):
    """Fixed answers: the reference, a wrong one (a caption of as many hexagons), the reference again (k = 3)."""
    def wrong(s):
        ref = s["conversations"][-1]["content"]
        return {"caption": re.sub("circle|square|triangle|star", "hexagon", ref), "count": "9.", "position": "?"}
    return [[s["conversations"][-1]["content"], wrong(s)[s["task"]], s["conversations"][-1]["content"]][:k]
            for s in samples]


def test_make_pairs_with_a_stubbed_sampler(world, tmp_path):
    samples = load_prompts([str(world / "sft.jsonl")], {"caption", "count", "position"})
    records, stats = make_pairs(samples, stub_answers, k=3, prompts_per_call=4)
    assert stats["prompts"] == len(samples) == 6 and stats["pairs"] == 6  # one pair per prompt: 2 distinct answers
    for r, s in zip(records, samples):
        assert r["chosen"]["content"] == s["conversations"][-1]["content"] and r["dpo"]["scores"][0] == 0
        assert r["dpo"]["scores"][1] <= -1 and r["dpo"]["rejected_false_claims"]
        assert r["conversations"] == s["conversations"] and r["meta"] == s["meta"]
    constant, stats = make_pairs(samples, lambda ss, k: [["3."] * k for _ in ss], k=4)
    assert constant == [] and stats["pairs"] == 0
    write_pairs(records, str(tmp_path / "sub" / "pairs.jsonl"))
    first = json.loads((tmp_path / "sub" / "pairs.jsonl").read_text().splitlines()[0])
    assert (tmp_path / "sub" / first["images"][0]).resolve() == Path(records[0]["images"][0]).resolve()


# ----------------------------------------------------------------------------- the DPO stage
def micro_config(vocab: int) -> OmniConfig:
    cfg = OmniConfig.preset("tiny")
    return replace(cfg, llm=replace(cfg.llm, vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32),
                   vision=replace(cfg.vision, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2),
                   audio=replace(cfg.audio, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                 encoder_ffn_dim=64), query_num=4)


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):
    """A micro random checkpoint (config + weights + tokenizer) and a pairs file built with the stub sampler."""
    root = tmp_path_factory.mktemp("dpo")
    tokenizer = load_tokenizer(str(world / "tokenizer"))
    torch.manual_seed(0)
    model = OmniModel(micro_config(-(-len(tokenizer) // 64) * 64))
    model.config.set_token_ids(tokenizer)
    model.save_pretrained(str(root / "init"))
    tokenizer.save_pretrained(str(root / "init"))
    records, _ = make_pairs(load_prompts([str(world / "sft.jsonl")], {"caption", "count", "position"}), stub_answers, 3)
    write_pairs(records, str(world / "pairs.jsonl"))
    return root, world / "pairs.jsonl", tokenizer


def test_model_sampler_gives_k_answers_per_prompt(setup, world):
    root, _, _ = setup
    model = OmniModel.from_pretrained(str(root / "init")).eval()
    sampler = ModelSampler(model, OmniProcessor.from_pretrained(str(root / "init"), model.config), max_new_tokens=4)
    samples = load_prompts([str(world / "sft.jsonl")], {"caption", "count"}, limit=1)
    answers = sampler(samples, 3)
    assert [len(a) for a in answers] == [3, 3] and all(isinstance(a, str) for row in answers for a in row)
    again = ModelSampler(model, sampler.processor, max_new_tokens=4)(samples, 3)
    assert again == answers  # seeded


def pair_batch(root, pairs, tokenizer, n=2):
    policy = OmniModel.from_pretrained(str(root / "init"))
    dataset = PairDataset(str(pairs), tokenizer, policy.config)
    return policy, dataset, collate_pairs([dataset[i] for i in range(n)], tokenizer.pad_token_id)


@torch.no_grad()
def row_logp(model, batch, row_of_pair: str, b: int) -> float:
    """Hand computation for one answer: its own forward pass over full logits, log-softmax, sum over the labels."""
    B = batch["input_ids"].shape[0] // 2
    assert len(batch["pixel_values"]) == B  # one 112 px scene per prompt: one slice each
    i = b if row_of_pair == "chosen" else B + b
    media = {"pixel_values": batch["pixel_values"][b:b + 1], "image_grid_hw": batch["image_grid_hw"][b:b + 1]}
    ids, labels = batch["input_ids"][i:i + 1], batch["labels"][i:i + 1]
    embeds = model.embed_inputs(ids, train_dpo_omni.MediaInputs(**media))
    logits = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"][i:i + 1]).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), -1)
    keep = labels[0, 1:] != -100
    return float(logp[keep].gather(1, labels[0, 1:][keep][:, None]).sum())


def test_dpo_loss_equals_hand_computed_value(setup):
    loss, margin = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5]), torch.tensor([-1.5, -2.5]),
                            torch.tensor([-2.0, -1.0]), beta=0.1)
    m = [0.1 * ((-1.0 + 1.5) - (-3.0 + 2.0)), 0.1 * ((-2.0 + 2.5) - (-1.5 + 1.0))]
    assert margin.tolist() == pytest.approx(m)
    assert float(loss) == pytest.approx(sum(math.log(1 + math.exp(-x)) for x in m) / 2)

    root, pairs, tokenizer = setup
    policy, _, batch = pair_batch(root, pairs, tokenizer)
    model = DPOModel(policy, ["llm"], beta=0.5).eval().requires_grad_(False)
    assert float(model(**batch)["loss"]) == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    torch.manual_seed(1)
    for p in policy.llm.parameters():
        p.add_(0.05 * torch.randn_like(p))
    pi = {(r, b): row_logp(policy, batch, r, b) for r in ("chosen", "rejected") for b in range(2)}
    ref = {(r, b): row_logp(model.reference, batch, r, b) for r in ("chosen", "rejected") for b in range(2)}
    margins = [0.5 * ((pi["chosen", b] - ref["chosen", b]) - (pi["rejected", b] - ref["rejected", b]))
               for b in range(2)]
    expected = sum(math.log(1 + math.exp(-x)) for x in margins) / 2
    out = model(**batch)
    # rel 1e-4: row-by-row forwards and the batched one differ in float rounding (~3e-5 relative);
    # a wrong formula differs by far more
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-4) and abs(margins[0]) > 1e-3
    model.sft_weight = 0.3
    chosen_tokens = int((batch["labels"][:2, 1:] != -100).sum())
    sft = -(pi["chosen", 0] + pi["chosen", 1]) / chosen_tokens
    assert float(model(**batch)["loss"]) == pytest.approx(expected + 0.3 * sft, rel=1e-4)


def test_reference_gets_no_gradient(setup):
    root, pairs, tokenizer = setup
    policy, _, batch = pair_batch(root, pairs, tokenizer)
    model = DPOModel(policy, ["llm", "projectors"])
    train_dpo_omni.set_trainable(policy, ["llm", "projectors"])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.llm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()(**batch)["loss"].backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(not p.requires_grad and p.grad is None for p in model.reference.parameters())
    assert model.reference.llm is not policy.llm and model.reference.resampler is not policy.resampler
    assert model.reference.vision_tower is policy.vision_tower  # frozen in both: shared, not copied


def test_training_saves_only_the_policy_and_resume_is_exact(setup, tmp_path, monkeypatch):
    root, pairs, _ = setup
    args = ["--init", str(root / "init"), "--data", str(pairs), "--lr", "1e-3", "--max_steps", "4",
            "--save_every", "1", "--resume", "auto", "--train", "llm,resampler", *FAST]
    train_dpo_omni.main(["--out", str(tmp_path / "straight"), *args])
    step = load_file(str(tmp_path / "straight" / "step_4" / "model.safetensors"))
    assert step and all(k.startswith(("policy.llm.", "policy.resampler.")) for k in step)
    init, final = (load_file(str(p / "model.safetensors")) for p in (root / "init", tmp_path / "straight"))
    assert final.keys() == init.keys()  # the stage output is a plain OmniModel checkpoint
    assert any(not torch.equal(init[k], final[k]) for k in init if k.startswith("llm."))
    OmniModel.from_pretrained(str(tmp_path / "straight"))

    class Crash(Exception):
        pass

    def crash_after_step_2(trainer):
        if trainer.step == 2:
            raise Crash

    monkeypatch.setattr(Trainer, "on_step_end", crash_after_step_2)
    with pytest.raises(Crash):
        train_dpo_omni.main(["--out", str(tmp_path / "resumed"), *args])
    monkeypatch.undo()
    train_dpo_omni.main(["--out", str(tmp_path / "resumed"), *args])
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for k in final:
        assert torch.equal(final[k], resumed[k]), k


def test_compare_results_pairs_samples_and_gives_the_paired_standard_error(tmp_path):
    from benchmarks.compare_results import compare, load
    before, after = [], []
    for i, (b, a) in enumerate([(1, 1), (0, 1), (1, 0), (0, 1), (1, 1)]):  # 2 gained, 1 lost of 5
        before.append({"id": f"s{i}", "task": "color", "score": b})
        after.append({"id": f"s{i}", "task": "color", "score": a})
    before.append({"id": "c", "task": "caption", "score": 0.0, "false_claims": ["x", "y"]})
    after.append({"id": "c", "task": "caption", "score": 1.0, "false_claims": []})
    for name, rows in (("b", before), ("a", after)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = {r["task"]: r for r in compare(load([str(tmp_path / "b.jsonl")]), load([str(tmp_path / "a.jsonl")]))}
    diffs = [0, 1, -1, 1, 0]
    mean = sum(diffs) / 5
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4 / 5)
    assert (rows["color"]["before"], rows["color"]["after"]) == (0.6, 0.8)
    assert rows["color"]["delta"] == pytest.approx(0.2) and rows["color"]["se"] == pytest.approx(se)
    assert rows["false claims / caption"]["delta"] == -2 and rows["caption"]["delta"] == 1
    after[0]["id"] = "other"  # the two sides must score the same samples
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after))
    with pytest.raises(SystemExit, match="different samples"):
        compare(load([str(tmp_path / "b.jsonl")]), load([str(tmp_path / "a.jsonl")]))
