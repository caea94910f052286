"""The vision-language model (llmstack/vision): shapes, the placeholder splice, a tiny VLM that learns a
colour task through the shared loop above its no-image baselines, image decoding, serving (the official
``openai`` client, data: URLs, refusals) and the web UI's image attachment."""

from __future__ import annotations

import base64
import io
import random

import pytest
import torch
from conftest import running, tiny_model_config
from PIL import Image

from llmstack.chat.conversation import Conversation
from llmstack.model.llama import GPT
from llmstack.training.config import TrainConfig
from llmstack.training.distributed import init_distributed
from llmstack.training.loop import train
from llmstack.vision.data import Example, make_examples
from llmstack.vision.encoder import ImageEncoder, Projector, VisionConfig
from llmstack.vision.images import ImageError, decode_data_url, decode_image, to_data_url, to_tensor
from llmstack.vision.measure import image_is_used, measure
from llmstack.vision.train import VisionTask, image_rows
from llmstack.vision.vlm import IMAGE_TOKEN, VisionChat, VisionLanguageModel, from_lm, load_vlm

TINY_VISION = VisionConfig(image_size=16, patch=8, dim=32, n_layer=1, n_head=4)  # 4 soft tokens
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220)}
QUESTION = "what colour is the shape?"


def filled(colour: str, rng: random.Random) -> Image.Image:
    """A plain image of ``colour`` with some per-pixel noise (no two alike)."""
    base = COLOURS[colour]
    img = Image.new("RGB", (16, 16))
    img.putdata([tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in base) for _ in range(256)])
    return img


def colour_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour = rng.choice(list(COLOURS))
        out.append(Example(to_tensor(filled(colour, rng), 16), QUESTION, colour, "colour"))
    return out


def png_url(img: Image.Image) -> str:
    return to_data_url(img)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, tok):
    """A tiny VLM (random LM + encoder) trained through the shared loop to name a filled image's colour."""
    out = tmp_path_factory.mktemp("vlm")
    tok.save(out / "tokenizer")
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_model_config(tok.vocab_size), TINY_VISION, tok.special_id(IMAGE_TOKEN))
    chat = VisionChat(tok, TINY_VISION.n_tokens)
    cfg = TrainConfig(
        max_steps=120, batch_size=16, seq_len=64, lr=1e-2, warmup_steps=5, weight_decay=0.0, eval_every=0,
        eval_batches=1, ckpt_every=0, keep_checkpoints=1, log_every=10, dtype="float32",
    )  # fmt: skip
    dist = init_distributed("cpu")
    val = {"val_loss": image_rows(chat, colour_examples(16, 2))}
    task = VisionTask("instruct", image_rows(chat, colour_examples(300, 1)), val, chat.fmt.pad_id, cfg, dist)
    meta = {"tokenizer_fingerprint": tok.fingerprint, "vision_config": TINY_VISION.to_dict(), "stage": "vlm-test"}
    result = train(model, task, cfg, out / "instruct", dist, meta=meta, progress=False)
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"] / 10
    return out


# ----------------------------------------------------------------------------- shapes and the splice
def test_encoder_and_projector_shapes():
    cfg = VisionConfig(image_size=32, patch=8, dim=48, n_layer=2, n_head=4)
    feats = ImageEncoder(cfg)(torch.randn(3, 3, 32, 32))
    assert feats.shape == (3, 16, 48) and cfg.n_tokens == 16
    assert Projector(48, 80)(feats).shape == (3, 16, 80)
    with pytest.raises(ValueError, match="multiple of patch"):
        VisionConfig(image_size=30, patch=8)


def test_placeholders_take_the_image_tokens_exactly(tok):
    """With soft tokens equal to some tokens' embeddings, the VLM's logits equal a plain forward over those tokens
    at the placeholders' positions: the features land where the placeholders are, in order, and nowhere else."""
    torch.manual_seed(0)
    lm = GPT(tiny_model_config(tok.vocab_size))
    vlm = from_lm(lm, TINY_VISION, tok.special_id(IMAGE_TOKEN)).eval()
    chat = VisionChat(tok, TINY_VISION.n_tokens)
    ids = torch.tensor([chat.question(QUESTION)] * 2)
    stand_in = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # row b's image "is" these tokens
    vlm.image_tokens = lambda images: lm.model.embed_tokens(stand_in)  # type: ignore[method-assign]
    plain = ids.clone()
    plain[ids == chat.image_id] = stand_in.flatten()
    with torch.no_grad():
        got = vlm(ids, images_BCHW=torch.zeros(2, 3, 16, 16))
        want = lm.eval()(plain)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[0], got[1])  # the two rows saw different "images"


def test_text_rows_beside_image_rows_read_as_plain_text(tok):
    """A batch mixing a chat without image (stage 2 mixes text chats in) and one with: the text row's logits
    are the LM's own, whatever the images hold."""
    torch.manual_seed(0)
    lm = GPT(tiny_model_config(tok.vocab_size)).eval()
    vlm = from_lm(lm, TINY_VISION, tok.special_id(IMAGE_TOKEN)).eval()
    chat = VisionChat(tok, TINY_VISION.n_tokens)
    with_image, text = chat.question(QUESTION), chat.question(QUESTION, with_image=False)
    text = text + [chat.fmt.pad_id] * (len(with_image) - len(text))
    ids = torch.tensor([with_image, text])
    with torch.no_grad():
        got = vlm(ids, images_BCHW=torch.randn(2, 3, 16, 16))
        torch.testing.assert_close(got[1], lm(ids[1:])[0])
        torch.testing.assert_close(vlm(ids[1:], images_BCHW=torch.randn(1, 3, 16, 16)), lm(ids[1:]))


def test_a_row_with_the_wrong_number_of_placeholders_is_refused(tok):
    vlm = VisionLanguageModel(tiny_model_config(tok.vocab_size), TINY_VISION, tok.special_id(IMAGE_TOKEN))
    ids = torch.tensor([[1, tok.special_id(IMAGE_TOKEN), 2, 3]])
    with pytest.raises(ValueError, match="image placeholders"):
        vlm(ids, images_BCHW=torch.zeros(1, 3, 16, 16))


def test_rendering_puts_the_image_in_the_user_turn_and_trains_the_answer_only(tok):
    chat = VisionChat(tok, 4)
    ids, mask = chat.example(QUESTION, "red")
    at = ids.index(chat.user_start) + 1
    assert ids[at : at + 4] == [chat.image_id] * 4 and ids.count(chat.image_id) == 4
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(trained[:-1]) == "red" and trained[-1] == chat.fmt.end["assistant"]
    # a later user turn holds the image: the placeholders follow the second <|user_start|>
    conv = Conversation.of(("user", "hi"), ("assistant", "hello"), ("user", QUESTION))
    prompt = chat.prompt(conv, 1)
    starts = [i for i, t in enumerate(prompt) if t == chat.user_start]
    assert prompt[starts[1] + 1 : starts[1] + 5] == [chat.image_id] * 4 and chat.image_id not in prompt[: starts[1]]


def test_held_out_data_are_new_images_and_unseen_combinations():
    train_set = make_examples("train", 30, 0, 32)
    test_set = make_examples("test", 30, 0, 32)
    seen = {e.answer for e in train_set if e.kind == "caption" and e.answer.startswith("a ")}
    held = {e.answer for e in test_set if e.kind == "caption" and e.answer.startswith("a ")}
    assert held and not seen & held  # "a red triangle" is never a training caption
    assert all(e.image.shape == (3, 32, 32) and e.image.min() >= -1 and e.image.max() <= 1 for e in test_set)
    assert {e.kind for e in test_set} == {"colour", "shape", "count", "chart", "digit", "caption"}


# ----------------------------------------------------------------------------- learning, measured
def test_a_tiny_vlm_uses_the_image(vlm_dir):
    vlm = load_vlm(vlm_dir)
    held_out = colour_examples(60, 99)
    results = measure(vlm, held_out, ("image", "blank", "none"))
    assert results["image"]["colour"].accuracy >= 0.9
    assert image_is_used(results, "colour"), results


# ----------------------------------------------------------------------------- images in
def test_image_decoding_names_the_problem():
    red = filled("red", random.Random(0))
    assert decode_data_url(png_url(red)).getpixel((0, 0)) == red.getpixel((0, 0))
    buf = io.BytesIO()
    red.save(buf, format="GIF")
    gif = base64.b64encode(buf.getvalue()).decode()
    cases = {
        "https://example.com/cat.png": "not fetched",
        "data:image/gif;base64," + gif: "image/gif is not supported",
        "data:image/png;base64," + gif: "not a PNG or JPEG",
        "data:image/png;base64,%%%": "not valid base64",
        "data:image/png," + "abc": "base64",
        "cat.png": "expected a data: URL",
    }
    for url, problem in cases.items():
        with pytest.raises(ImageError, match=problem):
            decode_data_url(url)
    with pytest.raises(ImageError, match="limited to"):
        decode_image(b"\x89PNG" + b"0" * (5 << 20))
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")


def test_cli_answers_about_an_image_file(vlm_dir, tmp_path, capsys):
    from llmstack.cli.main import main

    filled("blue", random.Random(5)).save(tmp_path / "blue.png")
    assert main(["vlm", "ask", "--vlm", str(vlm_dir), "--image", str(tmp_path / "blue.png"), QUESTION]) == 0
    assert capsys.readouterr().out.strip() == "blue"
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["vlm", "ask", "--vlm", str(vlm_dir), "--image", str(tmp_path / "notes.png"), QUESTION]) == 2
    assert "not a PNG or JPEG image" in capsys.readouterr().err


# ----------------------------------------------------------------------------- serving
@pytest.fixture(scope="module")
def vlm_server(vlm_dir, scripted_run):
    from llmstack.serve.app import create_app
    from llmstack.serve.config import ServeConfig
    from llmstack.serve.models import ModelRegistry

    registry = ModelRegistry()
    registry.add("tiny", scripted_run)
    registry.add_vlm("tiny-vlm", vlm_dir)
    with running(create_app(registry, ServeConfig(max_tokens_cap=64))) as url:
        yield url


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def test_server_answers_an_image_url_part(vlm_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=vlm_server + "/v1", api_key="unused", max_retries=0, timeout=60)
    rng = random.Random(7)
    for colour in COLOURS:
        msgs = image_message(png_url(filled(colour, rng)))
        r = client.chat.completions.create(model="tiny-vlm", messages=msgs, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        assert r.choices[0].message.content == colour and r.choices[0].finish_reason == "stop"
        assert r.usage is not None and r.usage.prompt_tokens > TINY_VISION.n_tokens
    stream = client.chat.completions.create(
        model="tiny-vlm",
        messages=image_message(png_url(filled("green", rng))),
        max_tokens=8,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "green"
    # without an image the VLM's LM answers through the engine as any served model
    r = client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].message.content is not None


def test_server_refuses_remote_urls_bad_images_and_text_only_models(vlm_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=vlm_server + "/v1", api_key="unused", max_retries=0, timeout=60)
    good = png_url(filled("red", random.Random(1)))
    cases = [
        ("tiny-vlm", image_message("https://example.com/cat.png"), "not fetched"),
        ("tiny-vlm", image_message("data:image/png;base64,aGVsbG8="), "not a PNG or JPEG"),
        ("tiny-vlm", image_message(good) * 2, "one per chat"),
        ("tiny", image_message(good), "does not read images"),
    ]
    for model, messages, problem in cases:
        with pytest.raises(openai.BadRequestError, match=problem) as e:
            client.chat.completions.create(model=model, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        assert e.value.status_code == 400
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="tools: not supported in a chat with an image"):
        client.chat.completions.create(model="tiny-vlm", messages=image_message(good), tools=[tool])  # type: ignore[arg-type,list-item]


def test_image_chats_take_the_engines_sampling_settings(vlm_server):
    """An image chat is an engine row like any other: n, logprobs, top_p and a seed all apply."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=vlm_server + "/v1", api_key="unused", max_retries=0, timeout=60)
    msgs = image_message(png_url(filled("red", random.Random(5))))
    kw = dict(model="tiny-vlm", messages=msgs, max_tokens=6, n=3, top_p=0.9, temperature=1.0, seed=4, logprobs=True)
    r = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    assert len(r.choices) == 3 and all(c.logprobs is not None and c.logprobs.content for c in r.choices)
    assert [c.message.content for c in client.chat.completions.create(**kw).choices] == [  # type: ignore[call-overload]
        c.message.content for c in r.choices
    ]
    greedy = client.chat.completions.create(model="tiny-vlm", messages=msgs, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert greedy.choices[0].message.content == "red"


# ----------------------------------------------------------------------------- the web UI
from test_webui import browser  # noqa: E402,F401  (the module's Chromium fixture)


def test_web_ui_attaches_an_image(browser, vlm_server, tmp_path):  # noqa: F811
    filled("blue", random.Random(3)).resize((120, 90)).save(tmp_path / "blue.png")
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    page = context.new_page()
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(vlm_server + "/")
    page.wait_for_function("[...document.querySelectorAll('#model option')].some(o => o.value === 'tiny-vlm')")
    page.select_option("#model", "tiny-vlm")
    page.evaluate("document.querySelector('#temperature').value = '0'")  # greedy: the answer is checked
    page.set_input_files("[data-testid=image-input]", str(tmp_path / "blue.png"))
    page.wait_for_selector("[data-testid=attachment]:not([hidden])")
    page.fill("[data-testid=input]", QUESTION)
    page.click("[data-testid=send]")
    page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming)').length === 1")
    assert page.locator(".msg.user [data-testid=msg-image]").count() == 1
    assert page.locator("[data-testid=attachment]").is_hidden()  # sent with this message, not the next
    assert page.locator(".msg.assistant .body").inner_text().strip() == "blue"
    page.set_input_files("[data-testid=image-input]", {"name": "x.gif", "mimeType": "image/gif", "buffer": b"GIF89a"})
    page.wait_for_selector("#error:not([hidden])")
    assert "not a PNG or JPEG" in page.locator("#error").inner_text()
    context.close()
    assert not problems, problems
