"""Images in chat requests: OpenAI ``image_url`` parts and Anthropic ``image`` blocks -> image bytes.

Each image part of a message becomes ``{"type": "image", "source": ImageSource}`` in the internal
message shape (the chat template sees only ``{"type": "image"}``); the bytes are read and decoded
on the prompt threads (prompting.py), in prompt order. Where bytes may come from:

- data URIs (``data:image/png;base64,...``) and Anthropic base64 blocks: always;
- local files (``file:///...`` or a plain path): only under the directory given to
  ``serve --allow-image-dir DIR`` (resolved, so ``..`` and symlinks cannot leave it);
- http(s) URLs: refused with a 400 unless ``serve --allow-remote-images`` (then fetched with a
  timeout and a size cap).

Anything else (a bad data URI, base64 that does not decode, a media type that is not an image, a
file outside the allowed directory) is a 400 naming the request field.
"""
from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import APIError

MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
MAX_IMAGE_BYTES = 32 << 20  # one encoded image, whatever its source
FETCH_TIMEOUT = 10.0


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from (``moemesh serve --allow-image-dir``, ``--allow-remote-images``)."""

    local_dir: str | None = None
    remote: bool = False


@dataclass(frozen=True)
class ImageSource:
    """One image of a request: where its bytes are, and the request field it came from."""

    kind: str  # bytes | file | url
    value: bytes | str
    where: str

    def read(self) -> bytes:
        """The encoded image (blocking: runs on the prompt threads)."""
        if self.kind == "bytes":
            assert isinstance(self.value, bytes)
            return self.value
        if self.kind == "file":
            try:
                with open(self.value, "rb") as f:
                    data = f.read(MAX_IMAGE_BYTES + 1)
            except OSError as exc:
                raise APIError(400, f"{self.where}: cannot read the image file ({exc.strerror or exc})",
                               param=self.where) from None
        else:
            try:
                with urllib.request.urlopen(str(self.value), timeout=FETCH_TIMEOUT) as resp:  # noqa: S310 (opt-in)
                    data = resp.read(MAX_IMAGE_BYTES + 1)
            except (OSError, ValueError) as exc:
                raise APIError(400, f"{self.where}: cannot fetch the image ({exc})", param=self.where) from None
        if len(data) > MAX_IMAGE_BYTES:
            raise APIError(400, f"{self.where}: the image is over {MAX_IMAGE_BYTES} bytes", param=self.where)
        return data


def _b64(data: Any, where: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise APIError(400, f"{where}: base64 image data must be a non-empty string", param=where)
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise APIError(400, f"{where}: the image is over {MAX_IMAGE_BYTES} bytes", param=where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the image data is not valid base64", param=where) from None


def _media_type(kind: str, where: str) -> None:
    if kind.lower() not in MEDIA_TYPES:
        raise APIError(400, f"{where}: unsupported image media type {kind!r} (supported: {', '.join(MEDIA_TYPES)})",
                       param=where)


def _local(path: str, policy: ImagePolicy, where: str) -> ImageSource:
    if policy.local_dir is None:
        raise APIError(400, f"{where}: local image files are not allowed (start the server with "
                       "--allow-image-dir DIR to allow files under DIR)", param=where)
    root = Path(policy.local_dir).resolve()
    target = Path(path).expanduser().resolve()
    if not target.is_relative_to(root):
        raise APIError(400, f"{where}: {path} is outside the allowed image directory", param=where)
    return ImageSource("file", str(target), where)


def url_source(url: Any, policy: ImagePolicy, where: str) -> ImageSource:
    """An OpenAI image URL (data URI, file, http) -> its ImageSource, or a 400."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: the image url must be a non-empty string", param=where)
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        if not sep or not head.endswith(";base64"):
            raise APIError(400, f"{where}: a data URI image must be data:image/...;base64,<data>", param=where)
        _media_type(head[: -len(";base64")], where)
        return ImageSource("bytes", _b64(data, where), where)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.remote:
            raise APIError(400, f"{where}: remote image URLs are not fetched (send the image as a data URI, or "
                           "start the server with --allow-remote-images)", param=where)
        return ImageSource("url", url, where)
    if scheme == "file":
        return _local(urllib.parse.unquote(urllib.parse.urlsplit(url).path), policy, where)
    if scheme == "" or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        return _local(url, policy, where)
    raise APIError(400, f"{where}: unsupported image URL scheme {scheme!r}", param=where)


def openai_part(part: dict[str, Any], policy: ImagePolicy, where: str) -> dict[str, Any]:
    """``{"type": "image_url", "image_url": {"url": ...}}`` -> the internal image part."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec  # some clients send the url bare
    return {"type": "image", "source": url_source(url, policy, f"{where}.image_url.url")}


def anthropic_block(block: dict[str, Any], policy: ImagePolicy, where: str) -> dict[str, Any]:
    """``{"type": "image", "source": {"type": "base64" | "url", ...}}`` -> the internal image part."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise APIError(400, f"{where}.source: an image block needs a source object", param=f"{where}.source")
    kind = source.get("type")
    if kind == "base64":
        _media_type(str(source.get("media_type", "")), f"{where}.source.media_type")
        return {"type": "image", "source": ImageSource("bytes", _b64(source.get("data"), f"{where}.source.data"),
                                                       f"{where}.source")}
    if kind == "url":
        return {"type": "image", "source": url_source(source.get("url"), policy, f"{where}.source.url")}
    raise APIError(400, f"{where}.source.type: unsupported image source type {kind!r} (base64 or url)",
                   param=f"{where}.source.type")


def openai_images(messages: list[dict[str, Any]], policy: ImagePolicy) -> list[dict[str, Any]]:
    """OpenAI messages with their ``image_url`` parts turned into internal image parts."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            where = f"messages[{i}].content"
            content = [openai_part(p, policy, f"{where}[{j}]") if isinstance(p, dict) and p.get("type") == "image_url"
                       else p for j, p in enumerate(content)]
            msg = {**msg, "content": content}
        out.append(msg)
    return out


def image_sources(messages: list[dict[str, Any]]) -> list[ImageSource]:
    """The request's images in prompt order (the order a template renders them)."""
    return [p["source"] for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]
