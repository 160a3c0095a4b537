"""Fuzzing the GGUF reader (weights/gguf_reader.py) and its family translation (models/gguf.py).

A small valid Mixtral-style GGUF (llama architecture with experts: metadata scalars, strings, a
string array, tensors in F32/F16/Q8_0/Q4_0 and stacked experts) is mutated: cut short, bytes
flipped, every count/length/type/dimension/offset/value field of its header overwritten with
edge values (0, huge, the file size, NaN for floats). Every mutant either opens, and then every
tensor dequantizes, or ends in CheckpointError / UnsupportedArchitecture naming the file; never
another exception, a hang or a big allocation (tests/fuzz_support.py).
"""
from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import Tally, fuzz_settings, guarded
from moemesh.loading.gguf_checkpoint import open_gguf

V, D, F, E, HEADS, KV = 32, 64, 64, 4, 2, 1


def write_valid(path: Path, heads: int = HEADS, kv: int = KV) -> None:
    """The seed (``heads``/``kv``: the metadata head counts, for the regression tests)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(E)
    w.add_expert_used_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_bos_token_id(1)

    def add(name: str, shape: tuple[int, ...], qtype: Q = Q.F32) -> None:
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", (V, D))
    add("blk.0.attn_norm.weight", (D,))
    add("blk.0.attn_q.weight", (HEADS * 32, D), Q.Q8_0)
    add("blk.0.attn_k.weight", (KV * 32, D), Q.F16)
    add("blk.0.attn_v.weight", (KV * 32, D))
    add("blk.0.attn_output.weight", (D, HEADS * 32), Q.Q4_0)
    add("blk.0.ffn_norm.weight", (D,))
    add("blk.0.ffn_gate_inp.weight", (E, D))
    add("blk.0.ffn_gate_exps.weight", (E, F, D), Q.Q8_0)
    add("blk.0.ffn_up_exps.weight", (E, F, D), Q.Q8_0)
    add("blk.0.ffn_down_exps.weight", (E, D, F), Q.Q4_0)
    add("output_norm.weight", (D,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def header_slots(path: Path) -> list[tuple[int, str]]:
    """(byte offset, numpy dtype char) of every number in the header: counts, string lengths, value
    types, array lengths, scalar values, tensor dims, ggml types and data offsets."""
    r = gguf.GGUFReader(path)
    base = r.data.__array_interface__["data"][0]
    slots = []
    for f in list(r.fields.values()) + [t.field for t in r.tensors]:
        for part in f.parts:
            if part.dtype == np.uint8 or part.size == 0:
                continue  # string bytes: mutated by the byte flips
            start = part.__array_interface__["data"][0] - base
            slots += [(start + i * part.itemsize, part.dtype.str) for i in range(min(part.size, 4))]
    return slots


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[bytes, list[tuple[int, str]]]:
    path = tmp_path_factory.mktemp("fuzz-gguf") / "valid.gguf"
    write_valid(path)
    ckpt = open_gguf(path)  # the seed itself must read cleanly
    assert ckpt.config["num_local_experts"] == E
    return path.read_bytes(), header_slots(path)


def edge_values(size: int) -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 2, 3, 7, 31, 32, 255, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62,
                            2**63 - 1, 2**63, 2**64 - 1, size - 1, size, size + 1, size * 2]) | st.integers(0, 2**64 - 1)


def set_number(data: bytearray, offset: int, dtype: str, value: int) -> None:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        fval = float(np.frombuffer(struct.pack("<Q", value), np.float64)[0]) if value > 2**40 else float(value)
        raw = np.array([[float("nan"), float("inf"), -float("inf"), fval][value % 4]], dt).tobytes()
    else:
        raw = (value % 2 ** (8 * dt.itemsize)).to_bytes(dt.itemsize, "little")
    data[offset : offset + len(raw)] = raw


Op = tuple  # ("number", slot index, value) | ("flip", at, xor) | ("truncate", at) | ("extend", bytes)


def ops(size: int, n_slots: int) -> st.SearchStrategy[list[Op]]:
    """1-3 mutations, kept as small descriptions (a failing case prints as its ops, not 200 kB)."""
    op = st.one_of(
        st.tuples(st.just("number"), st.integers(0, n_slots - 1), edge_values(size)),
        st.tuples(st.just("number"), st.integers(0, n_slots - 1), edge_values(size)),
        st.tuples(st.just("flip"), st.integers(0, size - 1), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    )
    return st.lists(op, min_size=1, max_size=3)


def apply(seed: bytes, slots: list[tuple[int, str]], mutations: list[Op]) -> bytes:
    data = bytearray(seed)
    for m in mutations:
        if m[0] == "number":
            offset, dtype = slots[m[1]]
            set_number(data, offset, dtype, m[2])
        elif m[0] == "flip" and m[1] < len(data):
            data[m[1]] ^= m[2]
        elif m[0] == "truncate":
            del data[m[1]:]
        elif m[0] == "extend":
            data += m[1]
    return bytes(data)


def open_and_read(path: Path) -> None:
    ckpt = open_gguf(path)
    for name in ckpt.names():
        t = ckpt.tensor(name).dequantize()
        assert list(t.shape) == list(ckpt.tensor(name).shape)


def fuzz(valid, examples: int | None = None) -> Tally:
    seed, slots = valid
    tally = Tally("gguf")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mutant.gguf"

        @fuzz_settings(examples)
        @given(mutations=ops(len(seed), len(slots)))
        def case(mutations: list[Op]) -> None:
            path.write_bytes(apply(seed, slots, mutations))
            guarded(tally, str(path), lambda: open_and_read(path))

        case()
    tally.report()
    return tally


def test_gguf_reader_fuzz(valid):
    tally = fuzz(valid)
    assert sum(tally.outcomes.values()) >= 30
    assert tally.outcomes["CheckpointError"] > 0  # the mutations do reach the checks


@pytest.mark.slow
def test_gguf_reader_fuzz_long(valid):
    fuzz(valid, 3000)
