r"""Probe (not a test): can the tiny LLM learn ToyWorld's scene questions when the image is PERFECTLY perceived?

Each of the 9 grid cells becomes one input position whose embedding is the sum of the LLM's own embeddings of the
cell's words (its position, and the colour, shape and size of its object if it has one), placed where the image
pad tokens go. No vision tower, no resampler: the best case any media path could hand the LLM. The LLM (random
init, the tiny preset's shape unless told otherwise) trains on fresh colour / shape / count / position questions
(ToyWorld's own generators, new scenes every step) and is scored on 200 fixed fresh scenes per task: exact match
of the whole answer under teacher forcing, which equals greedy decoding's exact match. Colour and shape scores
also come split by how the question names its object (by another attribute or by grid cell), and the run first
prints what naming the attribute of a RANDOM object of the scene would score: a model that knows which words a
scene offers but not which object a question means gets that much (about 0.57 for colour and shape), so only scores
above it show the lookup.

    python benchmarks/probe_scene_reading.py --tokenizer data/toyworld/tokenizer --steps 1000
    python benchmarks/probe_scene_reading.py --tokenizer data/toyworld/tokenizer --hidden 128 --layers 2 --lr 3e-3
    python benchmarks/probe_scene_reading.py --tokenizer data/toyworld/tokenizer --hidden 128 --layers 2 --lr 3e-3 \
        --restate color,shape        # 'The star is red.' instead of 'Red.'
    python benchmarks/probe_scene_reading.py --tokenizer data/toyworld/tokenizer --as_caption   # the caption as text
    python benchmarks/probe_scene_reading.py --tasks color --steps 600      # one question type alone
    python benchmarks/probe_scene_reading.py --steps 8000 --eval_every 250  # the long curve (78 min on one thread)
    python benchmarks/probe_scene_reading.py --first color,shape --first_steps 1500 --steps 3000 --eval_every 250
    python benchmarks/probe_scene_reading.py --lr 6e-4 --steps 1500 --eval_every 250   # the text warm-up's lr now

The default --lr is the text warm-up's old 2e-3, kept so that earlier runs (README, docs/experiments.md) re-run as
they were; at 2e-3 the lookups are learned late and by chance, at 6e-4 sooner and in every run tried.

--restate TASKS: the answers of those tasks first name what was asked about ("The star is red.", "The green object
is a star.", "The blue triangle is at the top left."), so the object is looked up right after the answer has named
it instead of from the question several tokens back. Only questions that name an object change (colour by shape,
shape by colour, position); by-cell questions and counts keep their one-word answers.

--as_caption: the image is not 9 cell vectors but the scene's caption as TEXT ("A large red circle at the top left,
..."), the text warm-up's stand-in: how fast the same LLM learns to answer from a description it reads word by word.

--questions K: every training scene comes with K question/answer turns (one conversation, every answer trained), so
a step carries K lookups per scene instead of one; the held-out score stays one question per scene.
--mimetic: key projections start equal to query projections, so attention first prefers tokens of the same content.
--fixed_codes: a cell is the sum of a FROZEN copy of the initial word embeddings, not of the embeddings as they train
(the demo's text warm-up pulls colour words together, mean cosine 0.77, so a sum of them tells colours apart less;
the text warm-up's stand-ins are such fixed codes now, OmniModel.word_codes).
--tasks: train on some of the four only (all four are scored); --curriculum N: N steps of each task alone, in the
order of --tasks, then all of them mixed; --grow N: N steps of the first task, N of the first two mixed, ... (the
mixture grows one task at a time), then all of them; --first TASKS --first_steps N: the first N steps train on
TASKS only, then on --tasks. --question_first: the image comes after the question ("What color is the star?\n<image>"),
so the cells can see what is asked. --few K --few_steps N: the first N steps draw scenes of at most K objects.
"""
import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

from dataset import build_toyworld as B
from dataset import toyworld_text as T
from dataset.chat import tokenize_conversation
from dataset.omni_dataset import collate
from dataset.tokenizer import load_tokenizer
from model.model_llm import LLMConfig, Qwen3ForCausalLM
from model.model_omni import IMAGE_END, IMAGE_PAD, IMAGE_START

TASKS = ["color", "shape", "count", "position"]
CELLS = 9
HELD_OUT = 200  # fresh scenes per task


def restated(task: str, answer: str, query: dict) -> str:
    """'Red.' -> 'The star is red.' for a question that named its object (see --restate)."""
    word = answer.rstrip(".").lower()
    if task == "color" and "shape" in query:
        return f"The {query['shape']} is {word}."
    if task == "shape" and "color" in query:
        return f"The {query['color']} object is a {word}."
    if task == "position":
        return f"The {query['color']} {query['shape']} is at the {word}."
    return answer


GUESSED = ("color", "shape", "position")


def scene_guess(task: str, scene: dict, answer: str) -> float:
    """How often naming the colour / shape / place (GUESSED tasks) of a RANDOM object of the scene gives `answer`:
    what a model scores that has learned which words a scene offers but not which object a question asks about."""
    objs, word = scene["objects"], answer.rstrip(".").lower()
    if task == "position":
        return sum(T.POSITIONS[B.cell_index(o)][0].lower() == word for o in objs) / len(objs)
    return sum(o[task] == word for o in objs) / len(objs) if task in GUESSED else 0.0


def make_batch(rng: random.Random, n: int, tasks: list[str], tokenizer, restate=(),
               as_caption=False, questions=1, question_first=False, max_objects=CELLS) -> tuple[dict, list, dict]:
    """-> (collated batch: input_ids / attention_mask / labels [n, T], cell word ids: n x 9 lists, per-question
    facts: "by_cell" whether it names its object by grid cell ("what colour is the shape at the top left?"),
    "guess" its scene_guess). as_caption: the image is its caption as TEXT instead (the text warm-up's stand-in), so
    there are no cell vectors. questions > 1: that many question/answer turns about each scene (the first from
    ToyWorld's generator, the rest random). question_first: the image follows the first question instead of
    preceding it. max_objects: scenes with more objects are drawn again."""
    rows, cells, facts = [], [], {"by_cell": [], "guess": []}
    for i in range(n):
        task = tasks[i % len(tasks)]
        scene, question, answer, extra = B.ASK[task](rng, "en")
        while len(scene["objects"]) > max_objects:
            scene, question, answer, extra = B.ASK[task](rng, "en")
        facts["by_cell"].append("position" in extra["query"])
        facts["guess"].append(scene_guess(task, scene, answer))
        if task in restate:
            answer = restated(task, answer, extra["query"])
        opening = question + "\n<image>" if question_first else "<image>\n" + question
        turns = [(opening, answer)] + [(q, a) for q, a, _ in B.follow_up_questions(rng, "en", scene, questions - 1,
                                                                                    tasks)]
        sample = {"conversations": [{"role": role, "content": text} for q, a in turns
                                    for role, text in (("user", q), ("assistant", a))]}
        image = T.caption("en", scene["objects"]) if as_caption else IMAGE_PAD * CELLS
        input_ids, labels = tokenize_conversation(sample, tokenizer, {"image": [IMAGE_START + image + IMAGE_END]})
        rows.append({"input_ids": input_ids, "labels": labels})
        if not as_caption:
            cells.append([tokenizer(" " + text, add_special_tokens=False)["input_ids"]
                          for text in T.cell_texts("en", scene["objects"])])
    return collate(rows, tokenizer.pad_token_id), cells, facts


def mimetic_init(llm: Qwen3ForCausalLM):
    """Each key head starts as a copy of its group's first query head (Trockman & Kolter's mimetic init: q.k then
    favours tokens with the same content, the first step of a lookup by content; see --mimetic)."""
    with torch.no_grad():
        for layer in llm.model.layers:
            attn = layer.self_attn
            q = attn.q_proj.weight.view(attn.n_kv, attn.n_heads // attn.n_kv, attn.head_dim, -1)
            attn.k_proj.weight.copy_(q[:, 0].reshape(attn.n_kv * attn.head_dim, -1))


def loss_and_exact(llm, pad_id: int, batch: dict, cells, codes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss, Bool[B]: whole answer right under teacher forcing). A cell is the sum of its words' vectors: the
    LLM's own embeddings, or with `codes` (an nn.Embedding) fixed vectors that the LLM's training does not move."""
    embed = llm.get_input_embeddings()
    codes = embed if codes is None else codes
    device = embed.weight.device
    input_ids = batch["input_ids"].to(device)
    x = embed(input_ids)                                                       # [B, T, D]
    for b, words in enumerate(cells):                                          # one fused vector per cell
        x[b, input_ids[b] == pad_id] = torch.stack([codes(torch.tensor(w, device=device)).sum(0) for w in words])
    logits = llm(inputs_embeds=x, attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]  # [B, T-1, V]
    target = batch["labels"][:, 1:].to(device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    return loss, ((logits.argmax(-1) == target) | (target == -100)).all(1).cpu()


def score(exact: torch.Tensor, facts: dict) -> str:
    """'0.60' or, where the questions name objects both ways, '0.60 (by name 0.45, by cell 0.95)'."""
    cell = torch.tensor(facts["by_cell"])
    text = f"{exact.float().mean():.2f}"
    if cell.any() and not cell.all():
        text += f" (by name {exact[~cell].float().mean():.2f}, by cell {exact[cell].float().mean():.2f})"
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="data/toyworld/tokenizer")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restate", default="", help="comma-separated tasks whose answers name the object first")
    p.add_argument("--as_caption", action="store_true", help="the scene as its caption text, not 9 cell vectors")
    p.add_argument("--questions", type=int, default=1, help="training question/answer turns per scene")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks to train on (all four are scored)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--mimetic", action="store_true", help="key heads start as copies of query heads")
    p.add_argument("--question_first", action="store_true", help="the image after the question, not before it")
    p.add_argument("--curriculum", type=int, default=0, help="first this many steps per task, one task at a time")
    p.add_argument("--grow", type=int, default=0, help="first this many steps per task, adding one task at a time")
    p.add_argument("--first", default="", help="comma-separated tasks that the first --first_steps steps train on")
    p.add_argument("--first_steps", type=int, default=0)
    p.add_argument("--few", type=int, default=CELLS, help="most objects per scene in the first --few_steps")
    p.add_argument("--few_steps", type=int, default=0)
    p.add_argument("--fixed_codes", action="store_true", help="cells from a frozen copy of the initial embeddings")
    args = p.parse_args()
    restate = [t for t in args.restate.split(",") if t]
    if not set(restate) <= {"color", "shape", "position"}:
        p.error(f"--restate takes color, shape, position; got {args.restate!r}")
    if args.curriculum and args.grow:
        p.error("--curriculum and --grow are two different schedules: give one")
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or not set(tasks) <= set(TASKS):
        p.error(f"--tasks takes some of {','.join(TASKS)}; got {args.tasks!r}")
    first = [t for t in args.first.split(",") if t]
    if bool(first) != bool(args.first_steps) or not set(first) <= set(TASKS):
        p.error(f"--first takes some of {','.join(TASKS)} and goes with --first_steps")
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    llm = Qwen3ForCausalLM(LLMConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True)).to(args.device)
    if args.mimetic:
        mimetic_init(llm)
    codes = None
    if args.fixed_codes:  # a frozen copy of the initial embeddings: colour words stay as distinct as at init
        codes = torch.nn.Embedding.from_pretrained(llm.get_input_embeddings().weight.detach().clone(), freeze=True)
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    opt = torch.optim.AdamW(llm.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    train_rng, eval_rng = random.Random(args.seed), random.Random(args.seed + 123)
    held_out = {task: make_batch(eval_rng, HELD_OUT, [task], tokenizer, restate, args.as_caption,
                                 question_first=args.question_first) for task in TASKS}
    print("a random object of the scene: " + " ".join(f"{task} {sum(held_out[task][2]['guess']) / HELD_OUT:.2f}"
                                                      for task in GUESSED))
    t0 = time.time()
    for step in range(1, args.steps + 1):
        warm, cosine = min(1.0, step / 50), 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * (0.1 + 0.9 * cosine)
        period = args.curriculum or args.grow
        phase = (step - 1) // period if period else len(tasks)  # phase k: task k alone (curriculum) / tasks 0..k
        now = tasks if phase >= len(tasks) else [tasks[phase]] if args.curriculum else tasks[:phase + 1]
        if step <= args.first_steps:
            now = first
        batch = make_batch(train_rng, args.batch_size, now, tokenizer, restate, args.as_caption, args.questions,
                           args.question_first, args.few if step <= args.few_steps else CELLS)
        loss, _ = loss_and_exact(llm, pad_id, *batch[:2], codes)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                scores = {task: score(loss_and_exact(llm, pad_id, *held_out[task][:2], codes)[1], held_out[task][2])
                          for task in TASKS}
            print(f"step {step} ({step * args.batch_size} samples, {time.time() - t0:.0f} s) loss {loss.item():.3f} "
                  + " ".join(f"{task} {value}" for task, value in scores.items()), flush=True)


if __name__ == "__main__":
    main()
