"""MoE GGUF files (qwen3moe; Mixtral written as a llama with experts): loading, and `convert` from
a GGUF into an expert store, lazy == resident. The GGUFs are written here from tiny HF checkpoints
the way llama.cpp's converter lays them out (3-D expert tensors, permuted llama q/k rows)."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from moemesh.loading.source import open_source

PROMPT = list(range(3, 40))


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permute (HF -> GGUF order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, path: Path, q4_experts: bool = False, expert_type=None) -> None:
    """An HF qwen3_moe or mixtral checkpoint -> GGUF (F32 trunk; experts F32, Q4_0, or ``expert_type``:
    tests/gguf_write.encode, random valid blocks for the K-quants)."""
    config, source, _ = open_source(hf_dir)
    mixtral = config["model_type"] == "mixtral"
    arch = "llama" if mixtral else "qwen3moe"
    w = gguf.GGUFWriter(str(path), arch)
    n_exp = config.get("num_local_experts") or config["num_experts"]
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    w.add_expert_count(n_exp)
    w.add_expert_used_count(config["num_experts_per_tok"])
    if not mixtral:
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    v = config["vocab_size"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<unk>", "<s>", "</s>", "t", "1", "t1"] + [f"x{i}" for i in range(6, v)])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (v - 3))
    w.add_token_merges(["t 1"])
    w.add_eos_token_id(2)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name in source.ckpt.names():
        if ".experts." in name:
            continue
        t = source.get(name).float().numpy()
        if name in top:
            w.add_tensor(top[name], t)
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        part = rest.removesuffix(".weight")
        if mixtral and part == "self_attn.q_proj":
            t = _llama_permute(t, heads)
        if mixtral and part == "self_attn.k_proj":
            t = _llama_permute(t, kv_heads)
        w.add_tensor(f"blk.{layer}.{names[part]}.weight", t)
    for layer in range(config["num_hidden_layers"]):
        prefix = "block_sparse_moe" if mixtral else "mlp"
        hf_parts = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for part, hf in zip(("gate", "up", "down"), hf_parts):
            arr = np.stack([source.get(f"model.layers.{layer}.{prefix}.experts.{e}.{hf}.weight").float().numpy()
                            for e in range(n_exp)])  # [E, out, in]
            if expert_type is not None:
                from gguf_write import encode

                raw, _ = encode(arr, expert_type, np.random.default_rng(layer))
                w.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", raw, raw_dtype=expert_type)
            elif q4_experts:
                w.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q4_0)
            else:
                w.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory):
    """A qwen3_moe whose widths are multiples of 32, so every expert tensor can be Q4_0."""
    from transformers import Qwen3MoeConfig

    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("gguf_moe")
    cfg = Qwen3MoeConfig(vocab_size=160, num_hidden_layers=2, max_position_embeddings=256, hidden_size=64,
                         intermediate_size=64, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    make_checkpoint(cfg, root / "hf")
    write_gguf(root / "hf", root / "q4.gguf", q4_experts=True)
    return root


def logits(model) -> torch.Tensor:
    ids = torch.tensor(PROMPT)
    cache = model.new_cache()
    cache.add_sequence(0)
    return model(ids, torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)  # [T, V]


@pytest.mark.parametrize("name", ["qwen3_moe-norm", "mixtral"])
def test_f32_gguf_matches_hf_checkpoint(tiny_checkpoints, tmp_path, name):
    hf_model, d = tiny_checkpoints[name]
    write_gguf(d, tmp_path / "m.gguf")
    ours = load_model(str(tmp_path / "m.gguf"), "fp32")
    cfg = hf_model.config
    n_exp = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    assert (ours.args.model_type, ours.args.num_experts, ours.args.top_k) == (name.split("-")[0], n_exp, cfg.num_experts_per_tok)
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert (logits(ours.model) - ref).abs().max().item() < 1e-4


def test_q4_gguf_converts_to_store_lazy_equals_resident(q4_model):
    from moemesh.quant.qlinear_state import export_state

    gguf_path = q4_model / "q4.gguf"
    direct = load_model(str(gguf_path), "int4")  # Q4_0 experts straight into the int4 kernel (auto: BlockLinear)
    store = convert(gguf_path, q4_model / "store", "int4", progress=False)
    assert (store / "tokenizer.json").is_file()  # the GGUF's tokenizer survives conversion
    resident = load_model(str(store))
    assert resident.tokenizer is not None and resident.tokenizer.eos_token_ids == {2}
    for layer in (0, 1):  # experts stored as read (same kernel buffers), never requantized
        for e in range(8):
            a, b = (m.model.layers[layer].ffn.provider.experts[layer][e] for m in (direct, resident))
            for lin in ("gate_up", "down"):
                sa, sb = export_state(getattr(a, lin))[1], export_state(getattr(b, lin))[1]
                assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ref = logits(resident.model)
    for slots in (2, 5):
        lazy = load_model(str(store), experts=ExpertOptions(slots=slots))
        assert torch.equal(logits(lazy.model), ref)
        assert lazy.provider.stats()["misses"] > 0


def test_q4_gguf_store_is_symmetric_and_planned_at_its_size(q4_model, tmp_path):
    """Q4_0 experts (zero 0) are stored symmetric: scales only, 18 bytes per 32 weights like the
    GGUF (asymmetric: 20); plan's int4 row for the store uses the store's real blob size."""
    from moemesh.benchkit.shapes import blob_bytes, shape_from_config
    from moemesh.commands.plan import plan
    from moemesh.store.expert_store import ExpertStore

    store = ExpertStore(convert(q4_model / "q4.gguf", tmp_path / "store", "int4", progress=False))
    assert all(store.linear_meta[lin].get("symmetric") for lin in ("gate_up", "down"))
    assert {p.buffer for p in store.parts} == {"qweight", "scales"}
    asym = blob_bytes(shape_from_config(store.config), "int4")  # what an HF -> int4 convert writes
    assert store.blob_size <= asym
    r = plan(str(store.root), 2**30, 1, None)
    assert r["formats"]["int4"]["expert_bytes"] == store.blob_size
    assert r["formats"]["int8"]["expert_bytes"] == blob_bytes(shape_from_config(store.config), "int8")


def test_q4_gguf_experts_dequantize_exactly(q4_model):
    """Each expert slice of a 3-D Q4_0 tensor equals gguf-py's dequantization of that expert."""
    from moemesh.loading.gguf_checkpoint import open_gguf

    ckpt = open_gguf(q4_model / "q4.gguf")
    raw = next(t for t in ckpt.reader.tensors if t.name == "blk.1.ffn_down_exps.weight")
    ref = gguf.quants.dequantize(raw.data, raw.tensor_type)  # [E, out, in]
    for e in (0, 5, 7):
        ours = ckpt.tensor(f"model.layers.1.mlp.experts.{e}.down_proj.weight").dequantize()
        assert torch.equal(ours, torch.from_numpy(ref[e]))
