"""Images through ``moemesh serve``: the real openai and anthropic SDKs send images to a tiny random
Qwen3.5-MoE (vision tower, chat template that writes image parts) and get the answer the engine
gives for the same prompt and images in one process; images count against the context; bad
images, remote URLs, files outside the allowed directory and images for a text-only model get a
400 naming the problem."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import anthropic
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.server.launcher import ServerProcess
from moemesh.tokenizer.detok import IncrementalDetokenizer
from moemesh.tokenizer.images import open_image
from tiny_families import make_qwen3_5_chat

N = 12  # tokens per answer
QUESTION = "What is in this image?"


def png(h: int, w: int, seed: int) -> bytes:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def huge_png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels (header only): refused before anything is decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


PICS = [png(40, 56, 0), png(24, 72, 1)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_5_chat")
    make_qwen3_5_chat(d)
    return d


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    (d / "a.png").write_bytes(PICS[0])
    return d


@pytest.fixture(scope="module")
def server(ckpt, image_dir):
    with ServerProcess(str(ckpt), "--threads", "1", "--quant", "none", "--served-model-name", "vl",
                       "--allow-image-dir", str(image_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(ckpt):
    """content parts ([("image", bytes) | ("text", str)]) -> (answer text, prompt tokens): the
    engine in this process, greedy, on the template's prompt with the images prepared here."""
    loaded = load_model(str(ckpt), "fp32")
    tok = loaded.tokenizer

    def answer(parts: list[tuple[str, object]]) -> tuple[str, int]:
        content = [{"type": "image"} if k == "image" else {"type": "text", "text": v} for k, v in parts]
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": content}]), add_special_tokens=False)
        ids, media = loaded.images.prepare(ids, [open_image(v) for k, v in parts if k == "image"])
        engine = Engine(loaded.model, stop_token_ids=tok.eos_token_ids, cache=loaded.model.new_cache("dense"))
        (seq,) = engine.generate([ids], SamplingParams(temperature=0, max_tokens=N), media=[media])
        detok = IncrementalDetokenizer(tok, ids)
        text = "".join(detok.add(t) for t in seq.output_ids if t not in tok.eos_token_ids) + detok.flush()
        return text, len(ids)

    return answer


def openai_image(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


def chat(oai, content, **kw):
    return oai.chat.completions.create(model="vl", messages=[{"role": "user", "content": content}],
                                       max_tokens=N, temperature=0, **kw)


def test_openai_sdk_one_image_equals_the_engine(oai, reference):
    want, n_prompt = reference([("image", PICS[0]), ("text", QUESTION)])
    r = chat(oai, [openai_image(PICS[0]), {"type": "text", "text": QUESTION}])
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == n_prompt  # the image's tokens count: 35 here, not one placeholder
    assert r.usage.completion_tokens == N


def test_openai_sdk_two_images_streamed(oai, reference):
    parts = [("text", "Compare"), ("image", PICS[0]), ("text", "and"), ("image", PICS[1]), ("text", "now.")]
    want, _ = reference(parts)
    content = [openai_image(v) if k == "image" else {"type": "text", "text": v} for k, v in parts]
    stream = chat(oai, content, stream=True)
    got = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert got == want


def test_local_file_under_the_allowed_dir(oai, reference, image_dir):
    want, _ = reference([("image", PICS[0]), ("text", QUESTION)])
    r = chat(oai, [{"type": "image_url", "image_url": {"url": f"file://{image_dir / 'a.png'}"}},
                   {"type": "text", "text": QUESTION}])
    assert r.choices[0].message.content == want


def test_anthropic_sdk_image_block_equals_the_engine(server, reference):
    want, n_prompt = reference([("image", PICS[1]), ("text", QUESTION)])
    client = anthropic.Anthropic(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                          "data": base64.b64encode(PICS[1]).decode()}}
    r = client.messages.create(model="vl", max_tokens=N, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": [block, {"type": "text", "text": QUESTION}]}])
    assert r.content[0].text == want
    assert r.usage.input_tokens == n_prompt
    count = client.messages.count_tokens(model="vl", messages=[
        {"role": "user", "content": [block, {"type": "text", "text": QUESTION}]}])
    assert count.input_tokens == n_prompt


def bad_request(oai, content) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as exc:
        chat(oai, content)
    return exc.value


@pytest.mark.parametrize("url, words", [
    (data_uri(b"not an image at all"), "not a readable image"),
    (data_uri(huge_png_header(10_000, 10_000)), "10000x10000 is over"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/tiff;base64,AAAA", "unsupported image media type"),
    (data_uri(b"GIF89a" + b"\0" * 4), "not a readable image"),
    ("https://example.com/cat.png", "--allow-remote-images"),
    ("file:///etc/passwd", "outside the allowed image directory"),
    ("ftp://example.com/cat.png", "unsupported image URL scheme"),
])
def test_bad_images_are_a_400_naming_the_problem(oai, url, words):
    err = bad_request(oai, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}])
    assert words in err.body["message"]
    assert err.body["param"].startswith("messages[0].content[0]")


def test_unsupported_format_is_named(oai):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "TIFF")
    err = bad_request(oai, [{"type": "image_url", "image_url": {"url": data_uri(buf.getvalue())}}])
    assert "unsupported image format TIFF" in err.body["message"]


def test_images_count_against_the_context(oai):
    big = png(200, 150, 3)  # 54 image tokens each at this checkpoint's max_pixels: 10 do not fit 512
    err = bad_request(oai, [openai_image(big)] * 10 + [{"type": "text", "text": "hi"}])
    assert err.code == "context_length_exceeded"


def test_images_only_in_user_messages(oai):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(model="vl", max_tokens=2, messages=[
            {"role": "system", "content": [openai_image(PICS[0])]}, {"role": "user", "content": "hi"}])
    assert "only taken in user messages" in exc.value.body["message"]


def test_anthropic_bad_media_type(server):
    client = anthropic.Anthropic(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model="vl", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "application/pdf", "data": "AAAA"}}]}])
    assert "unsupported image media type" in str(exc.value)


def test_text_only_model_refuses_images(tmp_path):
    """The server's own check (no process needed): a model without a vision tower names the image."""
    from moemesh.server.common.errors import APIError
    from moemesh.server.core.state import ServerConfig, ServerState

    state = ServerState(ServerConfig(model="smollm2"))
    with pytest.raises(APIError) as exc:
        state.image_input("messages[0].content[1].image_url.url")
    assert exc.value.status == 400 and "does not take images" in exc.value.message
    assert exc.value.param == "messages[0].content[1].image_url.url"


def test_fit_keeps_preprocessing_exact(ckpt):
    """The server keeps each image only at the size the model reads (ImageInput.fit): preprocessing
    the fitted image gives the same patches as preprocessing the original, large or small."""
    from moemesh.tokenizer.images import preprocess

    vision = load_model(str(ckpt), "fp32").images
    for h, w, seed in [(40, 56, 0), (300, 200, 1), (9, 13, 2), (64, 64, 3)]:
        img = open_image(png(h, w, seed))
        fitted, grid = vision.fit(img)
        want, want_grid = preprocess(img, vision.spec)
        got, got_grid = preprocess(fitted, vision.spec)
        assert grid == want_grid == got_grid and torch.equal(got, want)
