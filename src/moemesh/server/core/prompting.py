"""Request -> prompt token ids, off the event loop and behind a cheap length check.

Rendering a chat template and tokenizing cost time and memory in proportion to the prompt, so a
huge prompt once froze the whole server (and grew its memory) before the context check could say
no. Now: a prompt whose text is longer than the context window could hold even if every token
were the vocabulary's longest is refused before any work (``context_length_exceeded``); the rest
is rendered and tokenized on the server's prompt threads while the event loop keeps serving.
"""
from __future__ import annotations

from typing import Any

from ...models.media import Media
from ...models.qwen3_5_vision import ImageInput
from ...tokenizer.formats.chat_prompt import PromptPlan, build_chat_prompt
from ...tokenizer.images import ImageError, open_image
from ...tokenizer.tokenizer import Tokenizer
from ..common.errors import APIError
from .images import ImageSource, image_sources
from .sampling import check_prompt_fits
from .state import ServerState


def encode_off_gil(tokenizer: Tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """``tokenizer.encode``, the same ids, but through the batch call, which lets go of the GIL while
    it works (the single call holds it: seconds for a long prompt, with the event loop frozen)."""
    return tokenizer.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def message_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of the messages' text (content strings and text parts): a lower bound on what
    the template renders, since templates add to the text (reasoning may be dropped: not counted)."""
    total = 0
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def check_text_fits(chars: int, state: ServerState, param: str) -> None:
    """400 when ``chars`` characters cannot fit the context window: every token is at most
    ``max_token_chars`` characters long, so the text has at least chars / max_token_chars tokens."""
    room = state.context_length * max(state.max_token_chars, 1)
    if chars > room:
        raise APIError(
            400, f"the prompt has {chars} characters, more than a context window of {state.context_length} tokens "
            f"can hold ({room} characters at most, {state.max_token_chars} per token; prompts are never truncated)",
            param=param, code="context_length_exceeded")


async def chat_prompt_ids(state: ServerState, tokenizer: Tokenizer, messages: list[dict[str, Any]],
                          tools: list[dict[str, Any]] | None, tool_choice: str | dict | None,
                          template_kwargs: dict[str, Any] | None = None, *, param: str = "messages",
                          check_fits: bool = True, encode_images: bool = True, structured: bool = False,
                          ) -> tuple[PromptPlan, list[int], Media | None]:
    """The rendered prompt, its token ids (each image's placeholder repeated once per image token)
    and the images' Media (None without images, or when ``encode_images`` is off: a token count);
    with ``check_fits``, a 400 unless it fits the context, images included."""
    check_text_fits(message_chars(messages), state, param)
    sources = image_sources(messages)
    vision = state.image_input(sources[0].where) if sources else None

    def render() -> tuple[PromptPlan, list[int], Media | None]:
        plan = build_chat_prompt(tokenizer, messages, tools, tool_choice, template_kwargs, structured)
        ids = encode_off_gil(tokenizer, plan.text)
        if vision is None:
            if check_fits:
                check_prompt_fits(len(ids), state.context_length, param)
            return plan, ids, None
        pads = ids.count(vision.tokens.image)
        if pads != len(sources):
            raise APIError(400, f"the chat template wrote {pads} image placeholders for {len(sources)} images",
                           param=param)
        images, grids, n = [], [], len(ids) - len(sources)
        for src in sources:  # one at a time, each kept only at the size the model reads
            image, grid = decode(src, vision)
            images.append(image)
            grids.append(grid)
            n += vision.tokens_per_image(grid)
            if check_fits:  # before the next image and the vision tower: images count against the context
                check_prompt_fits(n, state.context_length, param)
        if not encode_images:
            return plan, vision.expand(ids, grids), None
        ids, media = vision.prepare(ids, images)
        return plan, ids, media

    return await state.off_loop(render)


def decode(source: ImageSource, vision: ImageInput):
    """An image source -> (the RGB image resized to what the model reads, its patch grid), or a 400
    naming the request field and the problem."""
    data = source.read()
    try:
        return vision.fit(open_image(data))
    except ImageError as exc:
        raise APIError(400, f"{source.where}: {exc}", param=source.where) from None


async def text_prompt_ids(state: ServerState, tokenizer: Tokenizer, text: str, *, add_special_tokens: bool = True,
                          param: str = "prompt") -> list[int]:
    """Token ids of a plain-text prompt (the completions API, /tokenize), after the cheap check."""
    check_text_fits(len(text), state, param)
    return await state.off_loop(lambda: encode_off_gil(tokenizer, text, add_special_tokens))
