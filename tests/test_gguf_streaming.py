"""Lazy experts straight from a GGUF (no expert store): lazy-from-GGUF == lazy-from-store == resident,
bit for bit, for every MoE family with a GGUF path, at cache sizes from one layer's active experts
up; split GGUFs; the CLI honours --ram on a GGUF (it used to run every expert resident, silently)
and stays within it; bad files fail before any compute with the file and tensor named."""
from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_write import write_deepseek, write_gpt_oss
from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import CheckpointError
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from moemesh.store.file_experts import FileExpertSource
from test_gguf_families import fresh, prompt
from test_gguf_moe import write_gguf


def forward_all(model, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache()
    cache.add_sequence(0)
    return model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)


def decode(model, ids: list[int], n: int = 12) -> list[int]:
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=n)  # sampled: routing does not settle into a loop
    return Engine(model).generate([ids], params)[0].output_ids


def hf_moe(kind: str, tmp_path):
    """A tiny qwen3_moe or mixtral HF checkpoint dir whose widths suit 32-element blocks."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    from tiny import make_checkpoint

    common = dict(vocab_size=160, num_hidden_layers=2, max_position_embeddings=256, hidden_size=64,
                  num_attention_heads=4, num_key_value_heads=2)
    cfg = (Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32, head_dim=16, num_experts=8,
                          num_experts_per_tok=2, norm_topk_prob=True) if kind == "qwen3_moe" else
           MixtralConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2))
    make_checkpoint(cfg, tmp_path / kind)
    return tmp_path / kind


CASES = {  # name -> (writer, expert type)
    "qwen3_moe-Q8_0": ("qwen3_moe", Q.Q8_0),
    "mixtral-Q4_0": ("mixtral", Q.Q4_0),
    "gpt_oss-MXFP4": ("gpt_oss", Q.MXFP4),
    "deepseek_v2-Q8_0": ("deepseek_v2", Q.Q8_0),
    "deepseek_v3-Q4_K": ("deepseek_v3", Q.Q4_K),  # its trunk's matrices Q4_K too where rows are 256-blocks
}


def write_case(name: str, path, tmp_path, split: int = 0) -> None:
    kind, fmt = CASES[name]
    if kind in ("qwen3_moe", "mixtral"):
        write_gguf(hf_moe(kind, tmp_path), path, expert_type=fmt)
    elif kind == "gpt_oss":
        write_gpt_oss(fresh("gpt_oss", 64, 64), path, fmt, split_max_tensors=split)
    else:
        wide = fmt.name.endswith("_K")
        write_deepseek(fresh("deepseek", kind == "deepseek_v3", 256 if wide else 64, 256 if wide else 32), path, fmt,
                       split_max_tensors=split, trunk_type=fmt if wide else Q.F32)


@pytest.mark.parametrize("name", list(CASES))
def test_lazy_from_gguf_equals_resident_and_store(tmp_path, name):
    path = tmp_path / "m.gguf"
    write_case(name, path, tmp_path)
    resident = load_model(str(path))
    args = resident.args
    first = resident.model.layers[args.moe_layers[0]].ffn.provider.experts[args.moe_layers[0]][0]
    assert type(first.down).__name__ == "BlockLinear" and first.down.qtype == CASES[name][1].name
    if name == "deepseek_v3-Q4_K":  # a block-format trunk, table and head: kept as blocks on every path
        assert type(resident.model.embed).__name__ == "BlockTable" and resident.model.lm_head.rescore == 0
        assert type(resident.model.layers[0].attn.q_in).__name__ == "BlockLinear"
    ids, start = prompt(1, 20), prompt(2, 6)
    ref, ref_tokens = forward_all(resident.model, ids), decode(resident.model, start)
    store = convert(path, tmp_path / "store", "auto", progress=False)  # the same block rows, one blob per expert
    for slots in (args.top_k, args.top_k + 1, 2 * args.top_k + 1, args.num_experts * len(args.moe_layers)):
        for src in (path, store):
            lazy = load_model(str(src), experts=ExpertOptions(slots=slots))
            assert isinstance(lazy.provider.cache.source, FileExpertSource) == (src == path)
            assert torch.equal(forward_all(lazy.model, ids), ref), (slots, src)
            assert decode(lazy.model, start) == ref_tokens, (slots, src)
            stats = lazy.provider.stats()
            assert stats["misses"] > 0 and stats["cache_slots"] == slots


def test_split_gguf_streams_like_one_file(tmp_path):
    write_case("deepseek_v2-Q8_0", tmp_path / "one.gguf", tmp_path)
    write_case("deepseek_v2-Q8_0", tmp_path / "m.gguf", tmp_path, split=12)
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) > 2
    ids = prompt(1, 20)
    ref = forward_all(load_model(str(tmp_path / "one.gguf")).model, ids)
    lazy = load_model(str(shards[0]), experts=ExpertOptions(slots=3))
    assert len(lazy.provider.cache.source.files) == len(shards)
    assert torch.equal(forward_all(lazy.model, ids), ref)
    assert torch.equal(forward_all(load_model(str(shards[0])).model, ids), ref)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        load_model(str(shards[0]))


def test_generate_gguf_honours_ram_and_reports_experts(tmp_path):
    """The silent-resident defect: --ram on a GGUF runs lazy experts (stats in --json) within the budget."""
    from transformers import Qwen3MoeConfig

    from moemesh.experts.budget import RUNTIME_OVERHEAD
    from tiny import make_checkpoint

    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_experts=32, num_experts_per_tok=4, max_position_embeddings=512)
    make_checkpoint(cfg, tmp_path / "hf")
    path = tmp_path / "big.gguf"
    write_gguf(tmp_path / "hf", path, expert_type=Q.Q8_0)  # 4 layers x 32 experts x 408 KiB of Q8_0
    base = [sys.executable, "-m", "moemesh.cli", "generate", str(path), "--prompt-ids",
            ",".join(str(i) for i in range(10, 42)), "-n", "16", "--temperature", "1", "--seed", "1", "--json"]

    def run(*extra: str) -> dict:
        r = subprocess.run(base + list(extra), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    from moemesh.loading.experts import model_bytes

    probe = load_model(str(path), experts=ExpertOptions(slots=1))
    slot, trunk = probe.provider.cache.blob_size, model_bytes(probe.model, embed_resident=True)
    expert_bytes = probe.provider.cache.source.expert_bytes()  # 4 x 32 x 408 KiB = 51 MiB
    slots = 24  # the experts are ~5x the cache
    ram = trunk + 64 * 2**20 + RUNTIME_OVERHEAD + slots * slot + 2**20
    resident = run()
    lazy = run("--ram", str(ram))
    stats = lazy.get("experts")
    assert stats, "--ram on a GGUF must run lazy experts"
    assert stats["cache_slots"] >= slots and expert_bytes >= 4 * stats["cache_bytes"] and stats["misses"] > slots
    assert lazy["token_ids"] == resident["token_ids"]  # same stored weights, same seed
    assert lazy["peak_rss_bytes"] <= ram, (lazy["peak_rss_bytes"], ram, resident["peak_rss_bytes"], stats)
    assert resident["peak_rss_bytes"] - lazy["peak_rss_bytes"] > 0.5 * (expert_bytes - stats["cache_bytes"])


# -- bad files: a clear CheckpointError naming the file and the tensor, before any compute ------------


def small_gguf(path, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(4)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_gguf_names_file_and_tensor(tmp_path):
    write_case("gpt_oss-MXFP4", tmp_path / "m.gguf", tmp_path)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*tensor '.*'.*truncated"):
        load_model(str(tmp_path / "cut.gguf"), experts=ExpertOptions(slots=2))


def test_tensor_size_disagreeing_with_type_and_shape(tmp_path):
    """A header whose type claims more bytes than the file gives the tensor before the next one."""
    rng = np.random.default_rng(0)
    a = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0)
    b = gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32), Q.Q8_0)  # the file goes on after a
    small_gguf(tmp_path / "m.gguf", {"blk.0.ffn_gate_exps.weight": (a, Q.Q8_0),
                                      "blk.0.ffn_up_exps.weight": (b, Q.Q8_0)})
    raw = bytearray((tmp_path / "m.gguf").read_bytes())
    name = b"blk.0.ffn_gate_exps.weight"
    at = raw.index(name) + len(name) + 4 + 2 * 8  # n_dims (u32), dims (u64 x 2), then the type (u32)
    assert int.from_bytes(raw[at:at + 4], "little") == Q.Q8_0
    raw[at:at + 4] = int(Q.F32).to_bytes(4, "little")  # F32 needs 4 bytes a weight, Q8_0 gave 34 per 32
    (tmp_path / "bad.gguf").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"bad\.gguf.*blk\.0\.ffn_gate_exps\.weight.*disagrees"):
        load_model(str(tmp_path / "bad.gguf"))


def test_unknown_quant_type(tmp_path):
    rng = np.random.default_rng(0)
    a = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0)
    small_gguf(tmp_path / "m.gguf", {"blk.0.ffn_down_exps.weight": (a, Q.Q8_0)})
    raw = bytearray((tmp_path / "m.gguf").read_bytes())
    name = b"blk.0.ffn_down_exps.weight"
    at = raw.index(name) + len(name) + 4 + 2 * 8
    raw[at:at + 4] = (97).to_bytes(4, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"bad\.gguf.*blk\.0\.ffn_down_exps\.weight.*unknown ggml type 97"):
        load_model(str(tmp_path / "bad.gguf"))


# -- an HF directory's own safetensors --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lazy_from_hf_dir_equals_resident_and_store(tmp_path, dtype):
    """Per-expert safetensors tensors read in place: fp32 as fp32, bf16 as bf16 (--quant auto keeps the
    file's precision: a bf16 store of the same checkpoint holds the same bits)."""
    d = hf_moe("qwen3_moe", tmp_path)
    if dtype == "bfloat16":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
        d = tmp_path / "bf16"
    resident = load_model(str(d))
    first = resident.model.layers[0].ffn.provider.experts[0][0]
    assert first.down.mode == ("fp32" if dtype == "float32" else "bf16")
    ids, start = prompt(1, 20), prompt(2, 6)
    ref, ref_tokens = forward_all(resident.model, ids), decode(resident.model, start)
    store = convert(d, tmp_path / "store", "fp32" if dtype == "float32" else "bf16", progress=False)
    for slots in (2, 5):
        for src in (d, store):
            lazy = load_model(str(src), experts=ExpertOptions(slots=slots))
            assert isinstance(lazy.provider.cache.source, FileExpertSource) == (src == d)
            assert torch.equal(forward_all(lazy.model, ids), ref), (slots, src)
            assert decode(lazy.model, start) == ref_tokens


def test_gpt_oss_mxfp4_safetensors_lazy_through_a_store(tmp_path, monkeypatch):
    """Fused MXFP4 gate_up (interleaved rows, blocks and scales apart) is not usable in place: --ram
    converts once into an expert store that keeps the MXFP4 bytes (BlockLinear blobs), lazy == resident."""
    from transformers import GptOssConfig

    from test_gpt_oss import make_checkpoint, write_mxfp4_checkpoint

    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    cfg = GptOssConfig(vocab_size=160, max_position_embeddings=131072, num_hidden_layers=2, hidden_size=64,
                       intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       sliding_window=4, num_local_experts=4, num_experts_per_tok=2)
    hf = make_checkpoint(cfg, tmp_path / "fp32")
    write_mxfp4_checkpoint(hf, tmp_path / "fp32", tmp_path / "mxfp4")
    ids = prompt(1, 20)
    ref = forward_all(load_model(str(tmp_path / "mxfp4")).model, ids)
    lazy = load_model(str(tmp_path / "mxfp4"), experts=ExpertOptions(slots=3))
    expert = lazy.provider.cache.source.read_expert(0, 1)
    assert expert.gate_up.qtype == "MXFP4" and expert.gate_up.bias is not None
    assert torch.equal(forward_all(lazy.model, ids), ref)
