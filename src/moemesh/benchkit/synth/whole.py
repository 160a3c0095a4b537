"""Whole synthetic models at their real shapes and in their real formats, as GGUFs that both llama.cpp
and moemesh read: gpt-oss-120b (36 layers x 128 MXFP4 experts with fp32 biases, ~61 GB) and
Qwen3-30B-A3B (48 layers x 128 Q4_K experts, ~17 GB). The weights are random but valid blocks
(benchkit/synth/whole_fill.py: scales in a range that keeps 36-48 layers' activations finite), written
by benchkit/synth/whole_write.py (resumable, with a progress bar and a disk check).

``tiny_spec`` gives the same code path at a few MB (tests/test_whole_synth.py)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class WholeSpec:
    """One whole model: its published shapes and the GGUF types the benchmark writes it in."""

    name: str
    arch: str  # llama.cpp architecture: gpt-oss | qwen3moe
    layers: int
    experts: int
    top_k: int
    hidden: int
    inter: int  # expert width
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    expert_type: str  # MXFP4 | Q4_K
    table_type: str  # token table and head
    attn_type: str
    seed: int = 0

    @property
    def gpt_oss(self) -> bool:
        return self.arch == "gpt-oss"

    def key(self) -> str:
        """The file's identity: every field (a changed shape or seed is another file)."""
        return (f"{self.name}-L{self.layers}-E{self.experts}-H{self.hidden}-I{self.inter}-V{self.vocab}"
                f"-{self.expert_type}-s{self.seed}")

    def as_dict(self) -> dict:
        return asdict(self)


GPT_OSS_WINDOW = 128  # gpt-oss's sliding window (every other layer), as its GGUF metadata says

SPECS = {
    # config.json of openai/gpt-oss-120b; llama.cpp's MXFP4 GGUF layout (expert biases fp32)
    "gpt-oss-120b": WholeSpec("gpt-oss-120b", "gpt-oss", 36, 128, 4, 2880, 2880, 64, 8, 64, 201088,
                              "MXFP4", "MXFP4", "Q8_0"),
    # config.json of Qwen/Qwen3-30B-A3B; Q4_K experts, attention and tables (a Q4_K_M-like file)
    "qwen3-30b-a3b": WholeSpec("qwen3-30b-a3b", "qwen3moe", 48, 128, 8, 2048, 768, 32, 4, 128, 151936,
                               "Q4_K", "Q4_K", "Q4_K"),
}


def tiny_spec(name: str, layers: int = 4, seed: int = 0) -> WholeSpec:
    """The same model family at a few MB: widths the block formats allow (MXFP4 32, Q4_K 256)."""
    s = SPECS[name]
    if s.gpt_oss:
        return replace(s, name=f"{name}-tiny", layers=layers, experts=8, top_k=2, hidden=64, inter=64, heads=4,
                       kv_heads=2, head_dim=16, vocab=256, seed=seed)
    return replace(s, name=f"{name}-tiny", layers=layers, experts=8, top_k=2, hidden=256, inter=256, heads=4,
                   kv_heads=2, head_dim=64, vocab=256, seed=seed)


def data_dir() -> Path:
    """Where whole models live: $MOEMESH_BENCH_DATA or ~/.cache/moemesh/bench-data (never the repo)."""
    env = os.environ.get("MOEMESH_BENCH_DATA")
    return Path(env) if env else Path.home() / ".cache" / "moemesh" / "bench-data"


def tensors(s: WholeSpec) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(name, element shape, ggml type, role) in file order; role: blocks | expert | expert_bias | norm | router | bias | sinks.
    Shapes are ggml's reversed order of numpy's: the last entry is the row length."""
    d, inter, e, hd = s.hidden, s.inter, s.experts, s.head_dim
    out = [("token_embd.weight", (s.vocab, d), s.table_type, "blocks"),
           ("output_norm.weight", (d,), "F32", "norm"),
           ("output.weight", (s.vocab, d), s.table_type, "blocks")]
    for i in range(s.layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (d,), "F32", "norm"),
                (p + ("post_attention_norm.weight" if s.gpt_oss else "ffn_norm.weight"), (d,), "F32", "norm")]
        for name, rows, cols in (("attn_q", s.heads * hd, d), ("attn_k", s.kv_heads * hd, d),
                                 ("attn_v", s.kv_heads * hd, d), ("attn_output", d, s.heads * hd)):
            out.append((p + name + ".weight", (rows, cols), s.attn_type, "blocks"))
            if s.gpt_oss:
                out.append((p + name + ".bias", (rows,), "F32", "bias"))
        if s.gpt_oss:
            out += [(p + "attn_sinks.weight", (s.heads,), "F32", "sinks"),
                    (p + "ffn_gate_inp.bias", (e,), "F32", "bias")]
        else:
            out += [(p + "attn_q_norm.weight", (hd,), "F32", "norm"), (p + "attn_k_norm.weight", (hd,), "F32", "norm")]
        out.append((p + "ffn_gate_inp.weight", (e, d), "F32", "router"))
        for part, rows, cols in (("gate", inter, d), ("up", inter, d), ("down", d, inter)):
            out.append((p + f"ffn_{part}_exps.weight", (e, rows, cols), s.expert_type, "expert"))
            if s.gpt_oss:
                out.append((p + f"ffn_{part}_exps.bias", (e, rows), "F32", "expert_bias"))
    return out


def nbytes(shape: tuple[int, ...], qtype: str) -> int:
    import gguf

    if qtype == "F32":
        return int(np.prod(shape)) * 4
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return int(np.prod(shape[:-1])) * shape[-1] // block * size


def expert_bytes(s: WholeSpec) -> int:
    """Bytes of every expert (the stacked expert tensors, biases included)."""
    return sum(nbytes(shape, q) for _, shape, q, role in tensors(s) if role in ("expert", "expert_bias"))


def file_bytes(s: WholeSpec) -> int:
    """The tensor data's bytes (the header adds a few MB of vocabulary)."""
    return sum(nbytes(shape, q) for _, shape, q, _ in tensors(s))


def metadata(w, s: WholeSpec) -> None:
    """The GGUF keys llama.cpp's loader needs for the architecture (as its converters write them) and a
    minimal vocabulary (benchmarks feed token ids; nothing is tokenized)."""
    import gguf

    w.add_name(s.name + "-synthetic")
    w.add_block_count(s.layers)
    w.add_context_length(131072 if s.gpt_oss else 40960)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.inter)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_layer_norm_rms_eps(1e-5 if s.gpt_oss else 1e-6)
    w.add_rope_freq_base(150000.0 if s.gpt_oss else 1e6)
    w.add_expert_count(s.experts)
    w.add_expert_used_count(s.top_k)
    w.add_expert_feed_forward_length(s.inter)
    if s.gpt_oss:
        w.add_sliding_window(GPT_OSS_WINDOW)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(32.0)
        w.add_rope_scaling_orig_ctx_len(4096)
    w.add_vocab_size(s.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<unk>", "<|bos|>", "<|eos|>", "t", "1", "t1"] + [f"x{i}" for i in range(6, s.vocab)])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (s.vocab - 3))
    w.add_token_merges(["t 1"])
    w.add_eos_token_id(2)
