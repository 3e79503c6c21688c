"""The claim judge: split an answer about a ToyWorld scene into atomic claims and check each one against the
scene's ground truth (`sample["meta"]["scene"]`).

This is the "AI feedback" of RLAIF-V. There a judge model answers one yes/no question per claim; ToyWorld knows
its scenes exactly, so here the check is a lookup and the judge is never wrong about a claim it can parse.
The same judge scores sampled answers for the DPO preference pairs (dataset/build_preferences.py) and the
hallucination metrics of the benchmark (eval_omni.py --bench), so training and evaluation agree on what a false
claim is.

Claims, per object mention ("a large red circle at the top left" / "左上有一个大的红色圆形"):
- object:   "there is a circle"                     (a shape the scene does not hold is a non-existent object)
- color:    "there is a red circle"
- position: "the red circle is at the top left"
- size:     "the red circle at the top left is large"
Each claim is made only when the previous ones hold, so one mistake costs one false claim (a non-existent star
is not also counted as a wrong-coloured and misplaced star). A mention with an explicit number
("two red circles", "3 shapes") makes one count claim instead. A caption also makes one count claim for the
whole scene: captions list every object, so listing N objects claims the scene holds N (this is what catches
dropped and duplicated objects), and a caption phrase that names no shape at all ("a small bluebook", the
garble of a sampled answer) counts as one false claim of its own (garble is no way to make fewer claims).
Short answers are judged against their question: a counting answer claims the count of what was asked
(meta["query"]), a position answer claims where the asked object is; an answer that gives no number / no
position counts as one false claim.
"""
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from dataset import toyworld_text as T

JUDGED_TASKS = ("caption", "count", "position")


@dataclass
class Claim:
    kind: str   # object | color | position | size | count | unreadable
    text: str   # the claim as a sentence, for inspection
    true: bool


# ----------------------------------------------------------------------------- vocabulary
@lru_cache
def _lexicon(lang: str) -> dict[str, dict[str, object]]:
    """Surface form -> canonical value, per word class. Colours and shapes ToyWorld never draws (black, hexagon)
    are known words, so a claim about them is parsed and judged false rather than ignored."""
    if lang == "zh":
        return {"color": {zh: c for c, (_, zh) in T.COLORS.items()},
                "shape": {zh: s for s, (_, zh) in T.SHAPES.items()},
                "size": {zh: s for s, zh in T.SIZES.items()},
                "position": {zh: i for i, (_, _, zh) in enumerate(T.POSITIONS)},
                "number": {**{zh: i + 1 for i, zh in enumerate(T.ZH_NUMBERS)}, "二": 2},
                "generic": {"形状": "shape", "物体": "shape"}}
    shapes = {s: s for s in T.SHAPE_WORDS} | {s + "s": s for s in T.SHAPE_WORDS}
    return {"color": {c: c for c in list(T.COLORS) + T.COLOR_WORDS},
            "shape": shapes,
            "size": {s: s for s in T.SIZES},
            "position": {name: i for i, (name, _, _) in enumerate(T.POSITIONS)} | {"centre": 4, "middle": 4},
            "number": {w: i for i, w in enumerate(T.NUMBER_WORDS)},
            "generic": {w: "shape" for w in ("shape", "shapes", "object", "objects", "thing", "things")}}


@lru_cache
def _pattern(lang: str, word_class: str) -> re.Pattern:
    forms = sorted(_lexicon(lang)[word_class], key=len, reverse=True)  # longest first: 'top left' before 'top'
    alternation = "|".join(map(re.escape, forms)) + (r"|\d+" if word_class == "number" else "")
    return re.compile(rf"\b(?:{alternation})\b" if lang == "en" else f"(?:{alternation})")


def _find(text: str, lang: str, word_class: str):
    """The canonical value of the first word of `word_class` in `text` (digits included for numbers), or None."""
    m = _pattern(lang, word_class).search(text)
    if not m:
        return None
    word = m.group()
    return int(word) if word.isdigit() else _lexicon(lang)[word_class][word]


# ----------------------------------------------------------------------------- parsing
@dataclass
class Mention:
    shape: str | None          # None: a generic "shape(s)" / "object(s)"
    color: str | None = None
    size: str | None = None
    cell: int | None = None    # 0..8, row-major
    count: int | None = None   # an explicit number ("two", "3"); None for "a" / "一个"


def split_phrases(text: str, lang: str) -> list[str]:
    """A caption -> one phrase per object mention (split at punctuation and 'and')."""
    if lang == "zh":
        return [p for p in re.split(r"[，。、；：！？,.;:!?\n]", text) if p.strip()]
    return [p for p in re.split(r"[,.;:!?\n]|\band\b", text.lower()) if p.strip()]


def parse_mention(phrase: str, lang: str) -> Mention | None:
    """One phrase -> what it says about one object (or a counted group); None if it names no shape."""
    if lang == "en":
        phrase = phrase.lower()
    shape = _find(phrase, lang, "shape")
    if shape is None and _find(phrase, lang, "generic") is None:
        return None
    count = _find(phrase, lang, "number")
    if lang == "zh" and count == 1:  # 一个 is the article "a"
        count = None
    return Mention(shape, _find(phrase, lang, "color"), _find(phrase, lang, "size"),
                   _find(phrase, lang, "position"), count)


# ----------------------------------------------------------------------------- checking
def _cell(obj: dict) -> int:
    return obj["cell"][0] * 3 + obj["cell"][1]


def _where(cell: int) -> str:
    return T.POSITIONS[cell][1]


def _there_are(n: int, name: str) -> str:
    return f"there is 1 {name}" if n == 1 else f"there are {n} {name}s"


def _matches(obj: dict, shape=None, color=None, size=None) -> bool:
    return all(want is None or obj[key] == want for key, want in (("shape", shape), ("color", color), ("size", size)))


def mention_claims(m: Mention, objects: list[dict]) -> list[Claim]:
    """The claims one mention makes, each checked against the scene's objects (see the module docstring)."""
    name = " ".join(w for w in (m.size, m.color, m.shape or "shape") if w)
    if m.count is None and m.shape is None:  # "a shape in the center": all it says is where something is
        if m.cell is None:
            return []
        here = [o for o in objects if _matches(o, None, m.color, m.size) and _cell(o) == m.cell]
        return [Claim("position", f"there is a {name} {_where(m.cell)}", bool(here))]
    if m.count is not None:
        n = sum(_matches(o, m.shape, m.color, m.size) for o in objects)
        return [Claim("count", _there_are(m.count, name), n == m.count)]
    claims = [Claim("object", f"there is a {m.shape}", any(_matches(o, m.shape) for o in objects))]
    pool = [o for o in objects if _matches(o, m.shape, m.color)]
    what = f"{m.color} {m.shape}" if m.color else m.shape
    if claims[-1].true and m.color:
        claims.append(Claim("color", f"there is a {what}", bool(pool)))
    if not claims[-1].true:
        return claims
    if m.cell is not None:
        here = [o for o in pool if _cell(o) == m.cell]
        claims.append(Claim("position", f"the {what} is {_where(m.cell)}", bool(here)))
        pool = here or pool
    if m.size:
        where = f" {_where(m.cell)}" if m.cell is not None else ""
        claims.append(Claim("size", f"the {what}{where} is {m.size}", any(o["size"] == m.size for o in pool)))
    return claims


def listed_shapes(mentions: list[Mention]) -> int:
    """How many shapes a caption describes ("3 shapes" sums up the others, it adds none)."""
    return sum(1 if m.count is None else m.count for m in mentions if m.shape)


def caption_size(text: str, lang: str = "en") -> int:
    return listed_shapes([m for m in (parse_mention(p, lang) for p in split_phrases(text, lang)) if m])


def caption_claims(text: str, objects: list[dict], lang: str = "en") -> list[Claim]:
    phrases = split_phrases(text, lang)
    parsed = [parse_mention(p, lang) for p in phrases]
    claims = [Claim("unreadable", f"(describes no shape: {p.strip()!r})", False)
              for p, m in zip(phrases, parsed) if not m]
    mentions = [m for m in parsed if m]
    claims += [c for m in mentions for c in mention_claims(m, objects)]
    listed = listed_shapes(mentions)
    claims.append(Claim("count", f"the caption lists every shape: {_there_are(listed, 'shape')} in total",
                        listed == len(objects)))
    return claims


def count_claims(text: str, objects: list[dict], query: dict, lang: str = "en") -> list[Claim]:
    """'3.' to 'How many red shapes are there?' claims 'there are 3 red shapes'."""
    n = _find(text.lower(), lang, "number")
    truth = sum(_matches(o, query.get("shape"), query.get("color")) for o in objects)
    name = " ".join(w for w in (query.get("color"), query.get("shape") or "shape") if w)
    if n is None:
        return [Claim("count", f"(no count given for the {name}s)", False)]
    return [Claim("count", _there_are(n, name), n == truth)]


def position_claims(text: str, objects: list[dict], query: dict, lang: str = "en") -> list[Claim]:
    """'Top left.' to 'Where is the red circle?' claims 'the red circle is at the top left'."""
    cell = _find(text.lower(), lang, "position")
    what = f"{query['color']} {query['shape']}"
    if cell is None:
        return [Claim("position", f"(no position given for the {what})", False)]
    here = [o for o in objects if _matches(o, query["shape"], query["color"]) and _cell(o) == cell]
    return [Claim("position", f"the {what} is {_where(cell)}", bool(here))]


def judge(sample: dict, answer: str) -> list[Claim]:
    """Every claim `answer` makes as the reply to `sample`'s question ([] for tasks the judge does not cover)."""
    task, lang, meta = sample.get("task"), sample.get("lang", "en"), sample.get("meta") or {}
    if task not in JUDGED_TASKS or "scene" not in meta:
        return []
    objects, answer = meta["scene"]["objects"], re.sub(r"<think>.*?</think>", "", answer, flags=re.DOTALL)
    if task == "caption":
        return caption_claims(answer, objects, lang)
    if task == "count":
        return count_claims(answer, objects, meta.get("query", {}), lang)
    return position_claims(answer, objects, meta["query"], lang)


def false_claims(sample: dict, answer: str) -> list[Claim]:
    return [c for c in judge(sample, answer) if not c.true]


def score(sample: dict, answer: str) -> int:
    """RLAIF-V's score: minus the number of false claims."""
    return -len(false_claims(sample, answer))


# ----------------------------------------------------------------------------- benchmark metrics
def hallucination_metrics(records: list[dict], samples: list[dict]) -> dict:
    """Hallucination of the benchmark's captions: the share with >= 1 false claim (`rate`), false claims per
    caption (`per_caption`) and per kind, and the shapes a caption describes (`shapes_per_caption`: a model
    that says more can claim more, so read the two together). `records` are run_bench's, in the order of
    `samples`; each caption record gets its false claims added as record["false_claims"]."""
    if len(records) != len(samples):
        raise ValueError(f"{len(records)} records for {len(samples)} samples")
    n = with_false = shapes = 0
    kinds = Counter()
    for record, sample in zip(records, samples):
        if record.get("id") != sample.get("id"):
            raise ValueError(f"record {record.get('id')} is not sample {sample.get('id')}: pass them in order")
        if record["task"] != "caption":
            continue
        wrong = false_claims(sample, record["prediction"])
        record["false_claims"] = [c.text for c in wrong]
        n, with_false = n + 1, with_false + bool(wrong)
        shapes += caption_size(record["prediction"], sample.get("lang", "en"))
        kinds.update(c.kind for c in wrong)
    return {"n": n, "rate": with_false / max(n, 1), "per_caption": sum(kinds.values()) / max(n, 1),
            "per_caption_by_kind": {k: v / max(n, 1) for k, v in sorted(kinds.items())},
            "shapes_per_caption": shapes / max(n, 1)}
