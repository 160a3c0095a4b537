"""Every crasher the reader fuzzers (tests/test_fuzz_*.py) found, kept as a plain regression test:
each input used to end in another exception (or an endless loop) and must now be the reader's own
error naming the file or field."""
from __future__ import annotations

import base64
import json
import struct

import gguf
import msgpack
import numpy as np
import pytest
import torch
from hivemind.proto import runtime_pb2

from moemesh.errors import CheckpointError
from moemesh.loading.gguf_checkpoint import open_gguf
from moemesh.mesh.discovery.invite import Invite, InviteError, _checksum
from moemesh.mesh.discovery.nostr_listing import ListingError, parse_content
from moemesh.mesh.transport.wire import WireError, unpack
from moemesh.weights.safetensors_io import SafetensorsCheckpoint, SafetensorsFile, write_safetensors
from test_fuzz_gguf import write_valid


def part_offset(path, field_name: str, part: int) -> int:
    r = gguf.GGUFReader(path)
    f = r.fields.get(field_name) or next(t.field for t in r.tensors if t.name == field_name)
    return f.parts[part].__array_interface__["data"][0] - r.data.__array_interface__["data"][0]


@pytest.mark.parametrize("heads,kv", [(0, 1), (2, 0), (3, 1)])
def test_gguf_head_counts_that_do_not_divide(tmp_path, heads, kv):
    path = tmp_path / "m.gguf"
    write_valid(path, heads=heads, kv=kv)  # was ZeroDivisionError (config, q/k unpermute) / numpy reshape ValueError
    with pytest.raises(CheckpointError, match=str(path)):
        open_gguf(path)


def test_gguf_undecodable_metadata_string(tmp_path):
    path = tmp_path / "m.gguf"
    write_valid(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"\x05\x00\x00\x00\x00\x00\x00\x00llama") + 8  # general.architecture's value
    data[at] = 0xEC  # was UnicodeDecodeError
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unreadable metadata value 'general.architecture'"):
        open_gguf(path)


def test_gguf_endless_array_count(tmp_path):
    path = tmp_path / "m.gguf"
    write_valid(path)
    at = part_offset(path, "tokenizer.ggml.tokens", 4)  # the array length
    data = bytearray(path.read_bytes())
    data[at:at + 8] = struct.pack("<Q", 2**62)  # was: gguf-py looping over empty reads past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="past the end of the file"):
        open_gguf(path)


def test_gguf_dims_whose_product_wraps(tmp_path):
    path = tmp_path / "m.gguf"
    write_valid(path)
    at = part_offset(path, "blk.0.attn_norm.weight", 3)  # n_dims = 1: make its one dim 2**64 / 2**32 ...
    data = bytearray(path.read_bytes())
    data[at - 4:at] = struct.pack("<I", 2)  # ... two dims of 2**32: the int64 product used to wrap to 0
    data[at:at + 8] = struct.pack("<Q", 2**32)
    data[at + 8:at + 8] = struct.pack("<Q", 2**32)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        open_gguf(path)


@pytest.mark.parametrize("header", [
    [1, 2], None, {"a": None}, {"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "data_offsets": [0, 4]}}, {"a": {"dtype": "F32", "shape": [1]}},
    {"a": {"dtype": "F32", "shape": None, "data_offsets": [0, 4]}}, {"a": {"dtype": "F32", "shape": [":"], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [1], "data_offsets": []}}, {"a": {"dtype": "F32", "shape": [1], "data_offsets": None}},
    {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}}, {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}},
])
def test_safetensors_malformed_headers(tmp_path, header):
    path = tmp_path / "m.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match=str(path)):
        SafetensorsFile(path)


def test_safetensors_deep_header(tmp_path):
    path = tmp_path / "m.safetensors"
    raw = b"[" * 100000 + b"]" * 100000  # was RecursionError
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match=str(path)):
        SafetensorsFile(path)


@pytest.mark.parametrize("doc", [[], {}, {"weight_map": None}, {"weight_map": {"a": 3}}, {"weight_map": {"a": "../x"}}])
def test_safetensors_index_malformed(tmp_path, doc):
    write_safetensors(tmp_path / "model-1.safetensors", [("a", torch.ones(2))])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        SafetensorsCheckpoint(tmp_path)


def signed(payload: bytes) -> str:
    text = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"moemesh1:{text}.{_checksum(text)}"


@pytest.mark.parametrize("text", [signed(b"[" * 50000 + b"]" * 50000), "moemesh1:\x80.abc", "moemesh1:" + "A" * 100000])
def test_invite_crashers(text):  # were RecursionError, UnicodeEncodeError; a huge text is refused before decoding
    with pytest.raises(InviteError, match="invite"):
        Invite.decode(text)


def test_listing_deep_json():
    with pytest.raises(ListingError, match="nested"):
        parse_content("[" * 8000 + "]" * 8000, "id")  # was RecursionError


def test_wire_errors_are_moemesh_errors():
    msg = runtime_pb2.ExpertRequest(metadata=msgpack.packb({}), tensors=[runtime_pb2.Tensor(dtype="fp32", size=[3], buffer=b"")])
    with pytest.raises(WireError, match="tensor 0"):
        unpack(msg)
    with pytest.raises(WireError, match="header"):
        unpack(runtime_pb2.ExpertRequest(metadata=b"\xc1"))
    assert np.issubdtype(type(len(msg.tensors)), np.integer)


def test_store_manifest_unhashable_dtype(tmp_path):
    """Found by the 1000-case run of tests/test_fuzz_store.py: a list as a part's dtype was a TypeError."""
    from moemesh.store.manifest import check_manifest

    m = {"config": {}, "quant": "int4", "hidden_act": "silu", "experts_file": "experts.bin", "trunk_file": "t",
         "blob_size": 4096, "parts": [{"linear": "down", "buffer": "qweight", "dtype": ["uint8"], "shape": [1],
                                       "offset": 0, "nbytes": 1}], "layers": {"0": [{"offset": 0, "crc32": 1}]},
         "linears": {n: {"mode": "int8", "in_features": 2, "out_features": 2} for n in ("gate_up", "down")}}
    with pytest.raises(CheckpointError, match=r"manifest.json: bad manifest field parts\[0\].dtype"):
        check_manifest(tmp_path / "manifest.json", m, 4096)


def test_gguf_tensor_offset_that_wraps(tmp_path):
    """A data offset of 2**64 - 1: numpy's uint64 sum with the data start wrapped to a small offset inside
    the header (its bytes read as the tensor); now past the end of the file."""
    path = tmp_path / "m.gguf"
    write_valid(path)
    at = part_offset(path, "output_norm.weight", 5)
    data = bytearray(path.read_bytes())
    data[at:at + 8] = struct.pack("<Q", 2**64 - 1)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="output_norm.weight"):
        open_gguf(path)
