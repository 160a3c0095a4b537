"""Wire format of mesh messages: a msgpack header plus tensors as raw bytes (never pickle).

Every message is a hivemind ``runtime_pb2.ExpertRequest``/``ExpertResponse``: ``metadata`` holds
the msgpack header, ``tensors`` hold raw little-endian buffers with their dtype and shape.
Unary messages are capped at 4 MiB by the P2P daemon (an oversize call can hang), so senders
split big batches below ``MAX_MESSAGE_BYTES`` and every decoder checks sizes against the header.
"""
from __future__ import annotations

import msgpack
import torch
from hivemind.proto import runtime_pb2

from ...errors import MoemeshError

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SAFE_PAYLOAD_BYTES = 3 * 1024 * 1024  # tensor bytes per message, leaving room for the header

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "i64": torch.int64,
          "i32": torch.int32}
NAMES = {v: k for k, v in DTYPES.items()}


class WireError(MoemeshError, ValueError):
    """A malformed message: wrong dtype, shape or byte count; the message names the part."""


def encode_tensor(t: torch.Tensor) -> runtime_pb2.Tensor:
    if t.dtype not in NAMES:
        raise WireError(f"cannot send dtype {t.dtype}")
    t = t.detach().contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return runtime_pb2.Tensor(buffer=raw, size=list(t.shape), dtype=NAMES[t.dtype])


def decode_tensor(msg: runtime_pb2.Tensor) -> torch.Tensor:
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"unknown dtype {msg.dtype!r}")
    shape = list(msg.size)
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.buffer) != numel * itemsize:
        raise WireError(f"tensor of shape {shape} {msg.dtype} needs {numel * itemsize} bytes, got {len(msg.buffer)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(msg.buffer), dtype=torch.uint8)  # bytearray: writable, owned
    return flat.view(dtype).reshape(shape)


def pack_request(header: dict, tensors: list[torch.Tensor] = ()) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=msgpack.packb(header), tensors=[encode_tensor(t) for t in tensors])


def pack_response(header: dict, tensors: list[torch.Tensor] = ()) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=msgpack.packb(header), tensors=[encode_tensor(t) for t in tensors])


def unpack(msg: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse) -> tuple[dict, list[torch.Tensor]]:
    """(header, tensors); raises WireError on anything malformed (an empty reply included)."""
    if not msg.metadata:
        raise WireError("empty message (the peer may have died mid-call)")
    try:
        header = msgpack.unpackb(msg.metadata, raw=False)
    except Exception as exc:
        raise WireError(f"header: not msgpack ({exc})") from None
    if not isinstance(header, dict):
        raise WireError("header: not a map")
    tensors = []
    for i, t in enumerate(msg.tensors):
        try:
            tensors.append(decode_tensor(t))
        except WireError as exc:
            raise WireError(f"tensor {i}: {exc}") from None
    return header, tensors
