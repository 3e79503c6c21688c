"""ToyWorld's words: scene vocabulary, OCR/ASR word lists, every question/answer template in English and Chinese.

Kept apart from the renderer so the wording can be read (and tuned) in one place. Answers are short and canonical
("Red.", "3.", "Top left.", "红色。") so that exact match is a fair score. Chinese speech goes through
`espeak-ng -v cmn-latn-pinyin`, which reads pinyin, not characters: `to_pinyin` converts every Chinese string we speak
with the small hand-written table `PINYIN` (a word missing from it is a KeyError, never a silent mispronunciation).
"""
import hashlib

from dataset.media import uniform_indices

# ---------------------------------------------------------------------------------------------------------------------
# Scene vocabulary
# ---------------------------------------------------------------------------------------------------------------------
COLORS = {  # name -> (RGB, Chinese); hues far apart so they survive 112 px and a 14x14-patch ViT
    "red": ((220, 40, 40), "红色"),
    "green": ((40, 170, 60), "绿色"),
    "blue": ((40, 80, 220), "蓝色"),
    "yellow": ((235, 195, 20), "黄色"),
    "purple": ((140, 60, 180), "紫色"),
    "orange": ((245, 130, 20), "橙色"),
}
SHAPES = {"circle": ("circles", "圆形"), "square": ("squares", "正方形"), "triangle": ("triangles", "三角形"),
          "star": ("stars", "星形")}  # name -> (plural, Chinese)
SIZES = {"small": "小", "large": "大"}
# 3x3 grid cells, row-major: (canonical answer, phrase used in captions, Chinese)
POSITIONS = [
    ("top left", "at the top left", "左上"), ("top", "at the top", "上方"), ("top right", "at the top right", "右上"),
    ("left", "on the left", "左边"), ("center", "in the center", "中间"), ("right", "on the right", "右边"),
    ("bottom left", "at the bottom left", "左下"), ("bottom", "at the bottom", "下方"),
    ("bottom right", "at the bottom right", "右下"),
]
DIRECTIONS = {"left": "左", "right": "右", "up": "上", "down": "下"}  # video motion -> Chinese answer
NEIGHBORS = {  # think family: grid step -> (English, Chinese)
    (0, 1): ("to the right of", "右边"), (0, -1): ("to the left of", "左边"),
    (-1, 0): ("above", "上面"), (1, 0): ("below", "下面"),
}

# ---------------------------------------------------------------------------------------------------------------------
# OCR / ASR vocabulary. The test split uses the same words, rendered with new fonts sizes/angles/noise and spoken with
# new speed/pitch settings; some two-word combinations are held out of training entirely (see `held_out`).
# ---------------------------------------------------------------------------------------------------------------------
NOUNS = ("cat dog bird fish horse cow pig duck frog lion tiger bear rabbit monkey snake whale "
         "apple banana bread cheese milk water coffee tea rice egg cake pizza soup lemon grape cookie "
         "book pen cup chair table door window house car bus train boat plane phone clock lamp key bag hat shoe ball "
         "box bed bottle sun moon tree flower river mountain rain snow cloud sky sea fire stone leaf grass wind "
         "mother father sister brother friend teacher doctor baby king queen "
         "school city park garden market kitchen office home road bridge").split()
UNCOUNTABLE = {"bread", "cheese", "milk", "water", "coffee", "tea", "rice", "soup", "grass", "rain", "snow", "wind",
               "fire", "home", "sky", "sun", "moon", "sea"}
COUNTABLE = [n for n in NOUNS if n not in UNCOUNTABLE]  # the nouns that go after a number ("three cats")
PLURALS = {"fish": "fish", "box": "boxes", "bus": "buses", "baby": "babies", "city": "cities", "leaf": "leaves"}
ADJECTIVES = ("big small hot cold happy sad fast slow new old good bad long short tall soft loud quiet bright "
              "dark").split()
COLOR_WORDS = "red green blue yellow purple orange black white pink brown".split()
VERBS = "run walk jump swim read write sing dance eat drink sleep play open close look listen".split()
MISC = "today tomorrow morning night yes no hello thanks please sorry".split()
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()
SHAPE_WORDS = list(SHAPES) + ["hexagon"]
WORDS = NOUNS + ADJECTIVES + COLOR_WORDS + VERBS + MISC + NUMBER_WORDS + SHAPE_WORDS  # ~190 distinct words
PHRASES = ["good morning", "good night", "thank you", "how are you", "see you later", "open the door",
           "close the window", "read a book", "drink some water", "let us play", "time to sleep", "i like cake"]

# Chinese: every word we write or speak, with its pinyin (tone numbers, 5 = neutral tone)
PINYIN = {
    # scene words
    "红色": "hong2 se4", "绿色": "lv4 se4", "蓝色": "lan2 se4", "黄色": "huang2 se4", "紫色": "zi3 se4",
    "橙色": "cheng2 se4", "圆形": "yuan2 xing2", "正方形": "zheng4 fang1 xing2", "三角形": "san1 jiao3 xing2",
    "星形": "xing1 xing2", "大": "da4", "小": "xiao3", "左上": "zuo3 shang4", "上方": "shang4 fang1",
    "右上": "you4 shang4", "左边": "zuo3 bian1", "中间": "zhong1 jian1", "右边": "you4 bian1", "左下": "zuo3 xia4",
    "下方": "xia4 fang1", "右下": "you4 xia4",
    # question words
    "是": "shi4", "什么": "shen2 me5", "颜色": "yan2 se4", "的": "de5", "物体": "wu4 ti3", "形状": "xing2 zhuang4",
    "图中": "tu2 zhong1", "有": "you3", "几个": "ji3 ge4", "在": "zai4", "哪里": "na3 li3",
    # vocabulary for OCR and ASR
    "猫": "mao1", "狗": "gou3", "鸟": "niao3", "鱼": "yu2", "马": "ma3", "牛": "niu2", "兔子": "tu4 zi5",
    "老虎": "lao3 hu3", "熊猫": "xiong2 mao1", "苹果": "ping2 guo3", "香蕉": "xiang1 jiao1", "米饭": "mi3 fan4",
    "面条": "mian4 tiao2", "茶": "cha2", "水": "shui3", "牛奶": "niu2 nai3", "鸡蛋": "ji1 dan4", "面包": "mian4 bao1",
    "书": "shu1", "笔": "bi3", "杯子": "bei1 zi5", "桌子": "zhuo1 zi5", "椅子": "yi3 zi5", "电脑": "dian4 nao3",
    "手机": "shou3 ji1", "汽车": "qi4 che1", "火车": "huo3 che1", "飞机": "fei1 ji1", "太阳": "tai4 yang2",
    "月亮": "yue4 liang4", "星星": "xing1 xing1", "山": "shan1", "花": "hua1", "树": "shu4", "雨": "yu3",
    "雪": "xue3", "妈妈": "ma1 ma5", "爸爸": "ba4 ba5", "朋友": "peng2 you3", "老师": "lao3 shi1",
    "学生": "xue2 sheng1", "医生": "yi1 sheng1", "学校": "xue2 xiao4", "公园": "gong1 yuan2", "北京": "bei3 jing1",
    "上海": "shang4 hai3", "中国": "zhong1 guo2", "你好": "ni3 hao3", "谢谢": "xie4 xie4", "再见": "zai4 jian4",
    "早上好": "zao3 shang4 hao3", "晚安": "wan3 an1", "对不起": "dui4 bu5 qi3", "没关系": "mei2 guan1 xi5",
    "快乐": "kuai4 le4", "漂亮": "piao4 liang5", "今天": "jin1 tian1", "明天": "ming2 tian1", "音乐": "yin1 yue4",
    "一": "yi1", "两": "liang3", "三": "san1", "四": "si4", "五": "wu3", "六": "liu4", "七": "qi1", "八": "ba1",
    "九": "jiu3", "十": "shi2",
    # measure words (Chinese counts things as number + measure word + noun: 三只猫, 两本书)
    "只": "zhi1", "个": "ge4", "条": "tiao2", "匹": "pi3", "头": "tou2", "本": "ben3", "支": "zhi1", "张": "zhang1",
    "把": "ba3", "台": "tai2", "辆": "liang4", "列": "lie4", "架": "jia4", "朵": "duo3", "棵": "ke1", "根": "gen1",
}
ZH_MEASURE = {  # countable nouns -> their measure word
    "猫": "只", "狗": "只", "鸟": "只", "鱼": "条", "马": "匹", "牛": "头", "兔子": "只", "老虎": "只", "熊猫": "只",
    "苹果": "个", "香蕉": "根", "书": "本", "笔": "支", "杯子": "个", "桌子": "张", "椅子": "把", "电脑": "台",
    "手机": "个", "汽车": "辆", "火车": "列", "飞机": "架", "花": "朵", "树": "棵", "面包": "个", "鸡蛋": "个",
}
ZH_ANIMALS = ["猫", "狗", "鸟", "鱼", "马", "牛", "兔子", "老虎", "熊猫"]
ZH_THINGS = [w for w in ZH_MEASURE if w not in ZH_ANIMALS]
ZH_OTHER = ["米饭", "面条", "茶", "水", "牛奶", "太阳", "月亮", "星星", "山", "雨", "雪", "妈妈", "爸爸", "朋友",
            "老师", "学生", "医生", "学校", "公园", "北京", "上海", "中国", "你好", "谢谢", "再见", "早上好", "晚安",
            "对不起", "没关系", "快乐", "漂亮", "今天", "明天", "音乐"]
ZH_WORDS = ZH_ANIMALS + ZH_THINGS + ZH_OTHER
ZH_NUMBERS = ["一", "两", "三", "四", "五", "六", "七", "八", "九", "十"]
ZH_COLORS = [zh for _, zh in COLORS.values()]


def to_pinyin(text: str) -> str:
    """Chinese text -> space-separated pinyin by greedy longest match over `PINYIN` (punctuation is dropped)."""
    text = "".join(ch for ch in text if ch not in "，。？！、：；　 ")
    longest = max(len(w) for w in PINYIN)
    out, i = [], 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            if text[i:i + n] in PINYIN:
                out.append(PINYIN[text[i:i + n]])
                i += n
                break
        else:
            raise KeyError(f"no pinyin for {text[i]!r} in {text!r}: add it to toyworld_text.PINYIN")
    return " ".join(out)


def held_out(phrase: str) -> bool:
    """About 1 in 8 two-word combinations never appear in training: the test's 'unseen combination' probes."""
    return hashlib.sha1(phrase.encode("utf-8")).digest()[0] % 8 == 0


# ---------------------------------------------------------------------------------------------------------------------
# Object phrases
# ---------------------------------------------------------------------------------------------------------------------
def obj_name(lang: str, color: str, shape: str) -> str:
    """'red circle' / '红色圆形'."""
    return f"{color} {shape}" if lang == "en" else COLORS[color][1] + SHAPES[shape][1]


def a_obj(lang: str, color: str, shape: str) -> str:
    """The canonical 'what appeared' answer: 'A red star.' / 'An orange circle.' / '一个红色星形。'."""
    if lang == "en":
        return f"{article(color).capitalize()} {color} {shape}."
    return f"一个{obj_name(lang, color, shape)}。"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def answer(lang: str, word: str) -> str:
    """Canonical one-word answer: 'Red.' / '红色。' (numbers stay digits: '3.' / '3。')."""
    return word[:1].upper() + word[1:] + "." if lang == "en" else word + "。"


def caption(lang: str, objects: list[dict]) -> str:
    """Every object in row-major cell order: 'A large red circle at the top left, a small blue square in the center.'"""
    objs = sorted(objects, key=lambda o: o["cell"][0] * 3 + o["cell"][1])
    if lang == "en":
        parts = [f"a {o['size']} {o['color']} {o['shape']} {POSITIONS[o['cell'][0] * 3 + o['cell'][1]][1]}"
                 for o in objs]
        text = ", ".join(parts) + "."
        return text[0].upper() + text[1:]
    parts = [f"{POSITIONS[o['cell'][0] * 3 + o['cell'][1]][2]}有一个{SIZES[o['size']]}的"
             f"{obj_name('zh', o['color'], o['shape'])}" for o in objs]
    return "，".join(parts) + "。"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def plural_noun(noun: str) -> str:
    return PLURALS.get(noun, noun + "s")


# ---------------------------------------------------------------------------------------------------------------------
# Prompts: a few phrasings per task so the model learns the task, not one string
# ---------------------------------------------------------------------------------------------------------------------
PROMPTS = {
    "en": {
        "caption": ["Describe the image.", "What is in the picture?", "List the shapes in the image.",
                    "Describe every shape you see."],
        "ocr": ["What does the text say?", "Read the text in the image.", "What is written in the image?"],
        "asr": ["Transcribe the audio.", "What did the speaker say?", "Write down what you hear."],
        "multi_image": ["What is different between the two images?",
                        "What changed from the first image to the second?"],
        "appear": ["What appeared in the video?", "What shape appears in the video?"],
        "read_aloud": ["Say: {}", "Repeat after me: {}", "Read this aloud: {}"],
    },
    "zh": {
        "caption": ["描述这张图片。", "图片里有什么？", "列出图中的所有形状。"],
        "ocr": ["图片中的文字是什么？", "读出图片中的文字。"],
        "asr": ["请转写这段音频。", "说话的人说了什么？"],
        "multi_image": ["这两张图片有什么不同？", "第二张图片和第一张相比有什么变化？"],
        "appear": ["视频中出现了什么？", "视频里出现了什么形状？"],
    },
}


def color_question(lang: str, rng, shape: str | None = None, cell: int | None = None) -> str:
    """Ask for a colour by a unique shape or by a grid position."""
    if lang == "en":
        if shape:
            return rng.choice([f"What color is the {shape}?", f"What is the color of the {shape}?"])
        return f"What color is the shape {POSITIONS[cell][1]}?"
    if shape:
        return f"{SHAPES[shape][1]}是什么颜色？"
    return f"{POSITIONS[cell][2]}的形状是什么颜色？"


def shape_question(lang: str, rng, color: str | None = None, cell: int | None = None) -> str:
    """Ask for a shape by a unique colour or by a grid position."""
    if lang == "en":
        if color:
            return rng.choice([f"What shape is the {color} object?", f"Which shape is {color}?"])
        return f"What shape is {POSITIONS[cell][1]}?"
    if color:
        return f"{COLORS[color][1]}的物体是什么形状？"
    return f"{POSITIONS[cell][2]}的物体是什么形状？"


def count_question(lang: str, rng, color: str | None = None, shape: str | None = None) -> str:
    """Count everything, one colour, or one shape."""
    if lang == "en":
        if color:
            return f"How many {color} shapes are there?"
        if shape:
            return f"How many {SHAPES[shape][0]} are there?"
        return rng.choice(["How many shapes are there?", "How many objects are in the image?"])
    if color:
        return f"图中有几个{COLORS[color][1]}的形状？"
    if shape:
        return f"图中有几个{SHAPES[shape][1]}？"
    return "图中有几个形状？"


def position_question(lang: str, rng, color: str, shape: str) -> str:
    if lang == "en":
        return rng.choice([f"Where is the {color} {shape}?", f"In which part of the image is the {color} {shape}?"])
    return f"{obj_name(lang, color, shape)}在哪里？"


def move_question(lang: str, rng, color: str, shape: str) -> str:
    if lang == "en":
        return rng.choice([f"Which way is the {color} {shape} moving?",
                           f"In which direction does the {color} {shape} move?"])
    return f"{obj_name(lang, color, shape)}往哪个方向移动？"


def difference_answer(lang: str, change: str, color: str, shape: str, new_color: str | None = None) -> str:
    """'The red circle turned blue.' / 'A green star was added.' / 'The blue square was removed.'"""
    if lang == "en":
        if change == "color":
            return f"The {color} {shape} turned {new_color}."
        if change == "added":
            return f"{article(color).capitalize()} {color} {shape} was added."
        return f"The {color} {shape} was removed."
    name = obj_name(lang, color, shape)
    if change == "color":
        return f"{name}变成了{COLORS[new_color][1]}。"
    return f"多了一个{name}。" if change == "added" else f"{name}不见了。"


def think_more(lang: str, c1: str, n1: int, c2: str, n2: int) -> tuple[str, str, str]:
    """(question, reasoning, answer): 'How many more red shapes than blue shapes are there?'"""
    d = n1 - n2
    if lang == "en":
        q = f"How many more {c1} shapes than {c2} shapes are there?"
        verb = "is" if n1 == 1 else "are"
        chain = (f"There {verb} {plural(n1, c1 + ' shape')} and {plural(n2, c2 + ' shape')}.\n"
                 f"{n1} - {n2} = {d}.")
        return q, chain, f"{d}."
    zc1, zc2 = COLORS[c1][1], COLORS[c2][1]
    return (f"{zc1}的形状比{zc2}的形状多几个？", f"有{n1}个{zc1}的形状和{n2}个{zc2}的形状。\n{n1} - {n2} = {d}。",
            f"{d}。")


def think_not(lang: str, c: str, total: int, k: int) -> tuple[str, str, str]:
    """'How many shapes are not red?'"""
    d = total - k
    if lang == "en":
        verb = "is" if k == 1 else "are"
        chain = f"There are {total} shapes in total.\n{k} of them {verb} {c}.\n{total} - {k} = {d}."
        return f"How many shapes are not {c}?", chain, f"{d}."
    zc = COLORS[c][1]
    return (f"有几个形状不是{zc}的？", f"一共有{total}个形状。\n其中{k}个是{zc}的。\n{total} - {k} = {d}。", f"{d}。")


def think_or(lang: str, c1: str, n1: int, c2: str, n2: int) -> tuple[str, str, str]:
    """'How many shapes are red or blue?'"""
    s = n1 + n2
    if lang == "en":
        verb = "is" if n1 == 1 else "are"
        chain = (f"There {verb} {plural(n1, c1 + ' shape')} and {plural(n2, c2 + ' shape')}.\n"
                 f"{n1} + {n2} = {s}.")
        return f"How many shapes are {c1} or {c2}?", chain, f"{s}."
    zc1, zc2 = COLORS[c1][1], COLORS[c2][1]
    return (f"{zc1}或{zc2}的形状一共有几个？", f"有{n1}个{zc1}的形状和{n2}个{zc2}的形状。\n{n1} + {n2} = {s}。",
            f"{s}。")


def think_neighbor(lang: str, step: tuple[int, int], anchor: dict, other: dict) -> tuple[str, str, str]:
    """'What color is the shape to the right of the star?' answered by locating the star, then its neighbour."""
    rel_en, rel_zh = NEIGHBORS[step]
    pa, po = (POSITIONS[o["cell"][0] * 3 + o["cell"][1]] for o in (anchor, other))
    if lang == "en":
        q = f"What color is the shape {rel_en} the {anchor['shape']}?"
        chain = (f"The {anchor['shape']} is {pa[1]}.\nThe shape {rel_en} it is a {other['color']} {other['shape']} "
                 f"{po[1]}.\nIts color is {other['color']}.")
        return q, chain, answer(lang, other["color"])
    zs = SHAPES[anchor["shape"]][1]
    zo = obj_name(lang, other["color"], other["shape"])
    return (f"{zs}{rel_zh}的形状是什么颜色？",
            f"{zs}在{pa[2]}。\n它{rel_zh}的形状在{po[2]}，是一个{zo}。\n所以颜色是{COLORS[other['color']][1]}。",
            answer(lang, COLORS[other["color"]][1]))


# ---------------------------------------------------------------------------------------------------------------------
# Media as text: what each image / clip / audio of a sample shows, for the LLM's text-only warm-up
# ---------------------------------------------------------------------------------------------------------------------
def cell_texts(lang: str, objects: list[dict]) -> list[str]:
    """The 9 grid cells of a scene, row-major, each as its words: its position, then its object's colour, shape
    and size ('top left red circle large'; an empty cell is just 'center'). One cell = one image slot of the
    text warm-up and the target of `align`'s stand-in loss (see OmniModel.embed_standins)."""
    cells = [[p[0] if lang == "en" else p[2]] for p in POSITIONS]
    for o in objects:
        cells[o["cell"][0] * 3 + o["cell"][1]] += ([o["color"], o["shape"], o["size"]] if lang == "en" else
                                                   [COLORS[o["color"]][1], SHAPES[o["shape"]][1], SIZES[o["size"]]])
    return [" ".join(words) for words in cells]


def scene_slots(sample: dict) -> list[list[str]] | None:
    """Per image of a ToyWorld sample, cell_texts of its scene; None unless every image is a scene."""
    meta, lang = sample.get("meta") or {}, sample.get("lang", "en")
    scenes = meta.get("scenes") or ([meta["scene"]] if "scene" in meta else [])
    if not scenes or len(scenes) != len(sample.get("images") or []):
        return None
    return [cell_texts(lang, sc["objects"]) for sc in scenes]


def frame_objects(meta: dict, max_frames: int | None = None) -> list[list[dict]]:
    """The objects each frame of a ToyWorld clip shows (of the max_frames a reader samples: media.read_video); the
    moving one sits in the cell its centre is in."""
    if meta["kind"] == "move":
        size, o = meta["width"], meta["object"]
        frames = [meta["objects"] + [dict(o, cell=[min(2, int((box[1] + box[3]) / 2 * 3 // size)),
                                                   min(2, int((box[0] + box[2]) / 2 * 3 // size))])]
                  for box in meta["track"]]
    else:
        frames = [meta["objects"] + ([meta["object"]] if t >= meta["appear_frame"] else [])
                  for t in range(meta["num_frames"])]
    return [frames[t] for t in uniform_indices(len(frames), max_frames or len(frames))]


def _is_clip(sample: dict) -> bool:
    """A ToyWorld video question: one clip whose meta records what each frame shows."""
    return (sample.get("meta") or {}).get("kind") in ("move", "appear") and len(sample.get("videos") or []) == 1


def frame_slots(sample: dict, max_frames: int) -> list[list[str]] | None:
    """Per frame a reader samples from a ToyWorld clip (at most max_frames), cell_texts of what it shows (a frame
    reads like a scene); None for other samples."""
    if not _is_clip(sample):
        return None
    return [cell_texts(sample.get("lang", "en"), objs) for objs in frame_objects(sample["meta"], max_frames)]


def _cell(o: dict) -> int:
    return o["cell"][0] * 3 + o["cell"][1]


def queried_cell(sample: dict) -> int | None:
    """The grid cell (row-major 0-8) of the one object a colour / shape / position question (also spoken, audio_qa)
    asks about, from its meta.query; None for other questions."""
    meta = sample.get("meta") or {}
    kind = meta.get("question_type") if sample.get("task") == "audio_qa" else sample.get("task")
    if kind not in ("color", "shape", "position") or "scene" not in meta or not meta.get("query"):
        return None
    hits = [o for o in meta["scene"]["objects"] if all(o.get(k) == v for k, v in meta["query"].items())]
    return _cell(hits[0]) if len(hits) == 1 else None


Lookup = tuple[tuple[int, int], tuple[int, int]]  # (image or frame, cell) for the first and second half of the heads


def queried_slots(sample: dict, max_frames: int) -> list[Lookup | None]:
    """Per assistant turn, the slots its answer must be read from, as (image or frame, cell; frame -1 = the last)
    for each half of the heads the lookup loss steers (OmniModel.lookup_loss), None where there is none. A scene
    question: the cell of the object asked about, for both (also the generated follow-ups, meta.follow_up_cells).
    A clip (at most max_frames sampled): where the mover is in the first frame and in the last (its direction is the
    step between them); what appeared, in the last."""
    meta = sample.get("meta") or {}
    if _is_clip(sample):
        if meta["kind"] == "move":
            moving = [objs[-1] for objs in frame_objects(meta, max_frames)]
            return [((0, _cell(moving[0])), (-1, _cell(moving[-1])))]
        return [((-1, _cell(meta["object"])),) * 2]
    cells = [queried_cell(sample)] + list(meta.get("follow_up_cells", []))
    return [None if c is None else ((0, c), (0, c)) for c in cells]


def text_image_reading(sample: dict) -> list[str] | None:
    """[the text] of a sample whose one image is square rendered text (ToyWorld's OCR square layout: one word or
    number), the text its slots spell; None for anything else (wide and tall text images are sliced)."""
    meta = sample.get("meta") or {}
    if meta.get("layout") == "square" and "text" in meta and len(sample.get("images") or []) == 1:
        return [meta["text"]]
    return None


def describe_media(sample: dict) -> dict[str, list[str]] | None:
    """{"image": [...], "audio": [...], "video": [...]} text stand-ins for a ToyWorld sample's media, in order
    (None when the sample carries no ToyWorld ground truth). A scene reads as its caption, rendered text as itself,
    speech as its transcript, a clip as its first frame plus what happens."""
    meta, lang = sample.get("meta") or {}, sample.get("lang", "en")
    out = {"image": [], "audio": [], "video": []}
    if "scenes" in meta:
        out["image"] = [caption(lang, sc["objects"]) for sc in meta["scenes"]]
    elif "scene" in meta:
        out["image"] = [caption(lang, meta["scene"]["objects"])]
    elif "text" in meta:
        out["image"] = [meta["text"]]
    if "transcript" in meta:
        out["audio"] = [meta["transcript"]]
    if meta.get("kind") in ("move", "appear"):
        o = meta["object"]
        if meta["kind"] == "move":
            first = caption(lang, meta["objects"] + [o])
            event = (f"The {obj_name(lang, o['color'], o['shape'])} moves {meta['direction']}." if lang == "en" else
                     f"{obj_name(lang, o['color'], o['shape'])}向{DIRECTIONS[meta['direction']]}移动。")
        else:
            first = caption(lang, meta["objects"])
            where = POSITIONS[o["cell"][0] * 3 + o["cell"][1]]
            event = (f"Then {a_obj(lang, o['color'], o['shape'])[:-1].lower()} appears {where[1]}." if lang == "en"
                     else f"然后{where[2]}出现了{a_obj(lang, o['color'], o['shape'])}")
        out["video"] = [f"{first} {event}"]
    counts = {kind: len(sample.get(kind + "s") or []) for kind in out}
    return out if any(counts.values()) and all(len(out[k]) == counts[k] for k in out) else None
