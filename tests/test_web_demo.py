"""The browser demo on a tiny random checkpoint: gradio_client drives the running app, headless Chromium opens it.

Answers are gibberish (random weights); these tests check the plumbing: uploads reach the model, answers stream
back (spoken too: the checkpoint has a random talker and a codec fitted on a tone), bad input becomes a message in
the chat and the app keeps serving.
"""
import json
import os
import socket

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageDraw

from dataset.tokenizer import train_tokenizer
from model.codec import MelCodec
from model.model_omni import OmniConfig, OmniModel
from model.talker import TalkerConfig

gradio_client = pytest.importorskip("gradio_client")
import web_demo  # noqa: E402  (imports gradio, so only once gradio_client is known to be installed)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")
SETTINGS = (False, 0.0, 1.0, 8, False, "ava")  # thinking, temperature, top_p, max_new_tokens, speak, voice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(root) -> str:
    """A ToyWorld-like test.jsonl: an image question, a spoken question, a clip; media under root/data."""
    data = root / "data"
    data.mkdir()
    img = Image.new("RGB", (112, 112), (240, 240, 240))
    ImageDraw.Draw(img).ellipse((30, 30, 80, 80), fill=(220, 30, 30))
    img.save(data / "circle.png")
    t = np.arange(16000) / 16000
    soundfile.write(data / "question.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    frames = [Image.new("RGB", (112, 112), (240, 240, 240)) for _ in range(4)]
    for i, frame in enumerate(frames):
        ImageDraw.Draw(frame).rectangle((10 + 20 * i, 40, 40 + 20 * i, 70), fill=(30, 160, 30))
    frames[0].save(data / "clip.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    samples = [("color", "<image>\nWhat color is the circle?", "Red.", {"images": ["circle.png"]}),
               ("audio_qa", "<audio>", "Green.", {"audios": ["question.wav"]}),
               ("video", "<video>\nWhich way is the square moving?", "Right.", {"videos": ["clip.gif"]})]
    with open(data / "test.jsonl", "w") as f:
        for task, question, answer, media in samples:
            f.write(json.dumps({"task": task, "conversations": [{"role": "user", "content": question},
                                                                {"role": "assistant", "content": answer}],
                                **media}) + "\n")
    return str(data / "test.jsonl")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, data folder) of the demo serving a random tiny checkpoint."""
    root = tmp_path_factory.mktemp("web_demo")
    jsonl = write_data(root)
    tok = train_tokenizer([jsonl], str(root / "tok"), vocab_size=300)
    tone = torch.from_numpy(soundfile.read(root / "data" / "question.wav", dtype="float32")[0])
    codec = MelCodec(n_codebooks=2, vocab_size=8).fit([tone])
    cfg = OmniConfig.preset("tiny")
    cfg.llm.vocab_size = len(tok)
    cfg.talker = TalkerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32, n_codebooks=2, vocab_size=8, max_frames=12)
    cfg.set_token_ids(tok)
    torch.manual_seed(0)
    model = OmniModel(cfg)
    model.codec = codec
    with torch.no_grad():  # zero stop-token rows of the tied head: random weights must not end an answer at once
        for token in ("<|im_end|>", "<|endoftext|>"):
            model.llm.get_input_embeddings().weight[tok.convert_tokens_to_ids(token)] = 0
    model.save_pretrained(str(root / "sft"))
    tok.save_pretrained(str(root / "sft"))
    with open(root / "sft" / "stage_args.json", "w") as f:  # as the stage scripts write it: examples are found
        json.dump({"data": [str(root / "data" / "sft.jsonl")]}, f)  # beside the training data
    port = free_port()
    demo = web_demo.main(["--ckpt", str(root / "sft"), "--port", str(port), "--max_upload_mb", "1"], block=False)
    yield f"http://127.0.0.1:{port}/", root / "data"
    demo.close()


@pytest.fixture
def prompts(monkeypatch):
    """Records what each turn hands the model: (messages, images, audios, videos)."""
    seen, chat = [], OmniModel.chat

    def spy(self, processor, messages, images=(), audios=(), videos=(), **kwargs):
        seen.append((messages, [os.path.basename(p) for p in images], [os.path.basename(p) for p in audios],
                     [os.path.basename(p) for p in videos]))
        return chat(self, processor, messages, images, audios, videos, **kwargs)

    monkeypatch.setattr(OmniModel, "chat", spy)
    return seen


def ask(client, text, *files):
    """One turn through the /chat endpoint -> the chat's last message."""
    box = {"text": text, "files": [gradio_client.handle_file(str(f)) for f in files]}
    chat, _, _ = client.predict(box, *SETTINGS, api_name="/chat")
    return chat[-1]


def assert_answer(message):
    assert message["role"] == "assistant" and not message["metadata"], message
    text = message["content"][0]["text"]
    assert text.strip() and not text.startswith("*(empty answer"), message


def assert_notice(message, *words):
    assert message["role"] == "assistant" and message["metadata"]["title"] == "Notice", message
    assert all(w in message["content"][0]["text"] for w in words), message


def test_image_audio_and_video_questions_get_answers(app, prompts):
    url, data = app
    client = gradio_client.Client(url, verbose=False)
    assert_answer(ask(client, "What color is the <audio>circle?", data / "circle.png"))  # typed marker dropped
    assert_answer(ask(client, "", data / "question.wav"))  # a spoken question: no text at all
    assert_answer(ask(client, "Which way is it moving?", data / "clip.gif"))
    assert_answer(ask(client, "And the first picture?"))
    messages, images, audios, videos = prompts[-1]  # multi-turn: earlier media stay in the prompt
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "<image>\nWhat color is the circle?", "<audio>", "<video>\nWhich way is it moving?", "And the first picture?"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert (images, audios, videos) == (["circle.png"], ["question.wav"], ["clip.gif"])
    chat, _, _ = client.predict(api_name="/clear")
    assert chat == []
    assert_answer(ask(client, "Hello?"))
    assert prompts[-1] == ([{"role": "user", "content": "Hello?"}], [], [], [])


def test_spoken_answer_comes_with_the_text(app, prompts):
    url, data = app
    client = gradio_client.Client(url, verbose=False)
    box = {"text": "What color is the circle?", "files": [gradio_client.handle_file(str(data / "circle.png"))]}
    chat, _, speech = client.predict(box, *SETTINGS[:4], True, "max", api_name="/chat")
    assert_answer(chat[-1])
    wav, rate = soundfile.read(speech)
    assert rate == 16000 and len(wav) > 0 and np.abs(wav).max() > 0
    chat, _, speech = client.predict(box, *SETTINGS, api_name="/chat")  # speak off: text only
    assert_answer(chat[-1])
    assert speech is None
    chat, _, speech = client.predict(box, *SETTINGS[:4], True, "nobody", api_name="/chat")
    assert_notice(chat[-1], "Unknown voice", "ava, max")
    assert speech is None


def test_bad_input_is_a_message_and_the_app_keeps_serving(app, prompts, tmp_path):
    url, data = app
    client = gradio_client.Client(url, verbose=False)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "tiny.wav").write_bytes(open(data / "question.wav", "rb").read()[:100])  # truncated header
    assert_notice(ask(client, "What is this?", tmp_path / "broken.png"), "could not read", "broken.png")
    assert_notice(ask(client, "Read this", tmp_path / "notes.txt"), "unsupported file type", ".txt")
    assert_notice(ask(client, "Hear this", tmp_path / "tiny.wav"), "could not read", "tiny.wav")
    assert_notice(ask(client, "   "), "Type a question")
    assert prompts == []  # nothing reached the model
    assert_answer(ask(client, "What color is the circle?", data / "circle.png"))
    assert prompts[-1][0] == [{"role": "user", "content": "<image>\nWhat color is the circle?"}]  # no bad leftovers


def test_oversize_upload_is_refused(app, tmp_path):
    """--max_upload_mb 1: the server itself refuses the upload (the page shows gradio's size message)."""
    import httpx
    url, _ = app
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (2 << 20))
    with open(big, "rb") as f:
        reply = httpx.post(url + "gradio_api/upload", files={"files": ("big.wav", f)})
    assert reply.status_code >= 400 and "maximum" in reply.text, reply.text


def test_no_checkpoint_explains_how_to_get_one(tmp_path):
    demo = web_demo.main(["--ckpt", str(tmp_path / "missing"), "--port", str(free_port())], block=False)
    try:
        client = gradio_client.Client(demo.local_url, verbose=False)
        assert_notice(ask(client, "hello"), "No checkpoint", "bash scripts/demo.sh", "out/demo/sft")
    finally:
        demo.close()


def test_examples_pick_one_per_task(app):
    _, data = app
    rows, labels = web_demo.load_examples(str(data / "test.jsonl"))
    assert [label.split(":")[0] for label in labels] == ["color", "audio_qa", "video"]
    assert rows[0] == [{"text": "What color is the circle?", "files": [str(data / "circle.png")]}, False]
    assert labels[1] == "audio_qa: (spoken question) → Green."


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="needs Debian's chromium + chromium-driver (apt-get install chromium chromium-driver)")
def test_browser_finds_controls_and_answers_an_example(app, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = app
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        for css in ("#chat", "#input textarea", "#input input[type=file]", "#send", "#clear", "#thinking",
                    "#speak input", "#voice"):
            wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))
        example = wait.until(EC.element_to_be_clickable((By.XPATH, "//button[contains(., 'color: What color')]")))
        example.click()  # fills the input and asks: the answer streams into the chat, then it is spoken
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat .bot.message")
                   and d.find_elements(By.CSS_SELECTOR, "#chat .bot.message")[-1].text.strip())
        # the spoken answer arrives last; waiting for it also keeps the app from closing mid-generation
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#speech [data-testid=download-link]")))
        os.makedirs(ARTIFACTS, exist_ok=True)
        shot = os.path.join(ARTIFACTS, "web_demo.png")
        driver.save_screenshot(shot)
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
