"""A synthetic Qwen3-30B-A3B-shaped MoE model, written twice from the same weights: as a moemesh
expert store and as a Q4_0 GGUF that llama.cpp loads (architecture ``qwen3moe``).

Per layer the shapes are Qwen3-30B-A3B's (hidden 2048, 128 experts, top-8, expert width 768,
32 query / 4 KV heads of dim 128, per-head q/k norms, norm_topk_prob); the depth and the vocabulary
are parameters (the real model has 48 layers and a 151936-token vocabulary; see ``--vocab`` in
bench/lazy.py for why the default is smaller).

Experts are bit-identical in both files: every weight is ``(q - 8) * d`` with a random nibble q and
one bf16-exact (hence fp16-exact) scale d per 32 inputs, which is a Q4_0 block exactly and, with a
zero offset, exactly the int4 group-32 kernel format (``QuantLinear.from_int4_groups``, which stores
it symmetric: scales only, the same 18 bytes per 32 weights as Q4_0). The trunk
(attention, embedding, head) is random bf16 in the store, quantized at load time by moemesh (int4,
asymmetric min/max) and to Q4_0 by gguf.quants from the same bf16 values for llama.cpp.

Nothing here goes through an HF checkpoint: the store is written directly (trunk.safetensors,
experts.bin, manifest.json, in convert._write_store's format, with convert.blob_layout/pack_blob),
and the GGUF is streamed tensor by tensor with GGUFWriter.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SYNTH_VERSION = 2  # bump when the generated weights or layout change (invalidates cached data)
# v2: expert blobs hold symmetric int4 (scales only, 18 bytes per 32 weights like Q4_0; v1 also
# stored the all-zero zeros: 20 bytes). Same weights; the GGUF is unchanged.
SHAPES = dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
              num_attention_heads=32, num_key_value_heads=4, head_dim=128)
GROUP = 32  # Q4_0 block = int4 kernel group


def hf_config(layers: int, vocab: int) -> dict:
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], **SHAPES,
        "vocab_size": vocab, "num_hidden_layers": layers, "intermediate_size": 6144,
        "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
        "attention_bias": False, "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


@contextlib.contextmanager
def atomic_dir(out: Path, done: dict) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into. When the block finishes, DONE (``done``, read
    then, plus the seconds taken) is written last and the directory renamed into place, replacing a
    stale ``out``; on any error the temporary directory is removed: ``out`` never looks finished
    when it is not. Shared by the synthetic stores, GGUFs and HF checkpoints."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    try:
        yield tmp
        (tmp / "DONE").write_text(json.dumps({"seconds": time.time() - t0, **done}))
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_dir(work_dir: Path, layers: int, vocab: int, seed: int) -> Path:
    return Path(work_dir) / f"qwen3moe-synth-v{SYNTH_VERSION}-L{layers}-V{vocab}-s{seed}"


def _gen(seed: int, *key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr((seed, *key)).encode()))
    return g


def random_int4(n: int, k: int, fan_in: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """q uint8 [n, k] in 0..15 and bf16-exact fp32 scales [n, k/32]; weight std ~ 1/sqrt(fan_in)."""
    b = np.frombuffer(rng.bytes(n * k // 2), dtype=np.uint8).reshape(n, k // 2)
    q = np.empty((n, k), np.uint8)
    q[:, 0::2], q[:, 1::2] = b & 15, b >> 4
    base = 1.0 / (21.5 * fan_in) ** 0.5  # E[(q-8)^2] = 21.5 for uniform q; scales vary +-25% per block
    d = (base * (0.75 + 0.5 * rng.random((n, k // GROUP), dtype=np.float32))).astype(np.float32)
    d = torch.from_numpy(d).to(torch.bfloat16).float().numpy()  # bf16-exact, hence fp16-exact
    return q, d


def q4_0_bytes(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q uint8 [..., n, k], d [..., n, k/32] -> GGUF Q4_0 bytes [..., n, k/32*18] (the same weights)."""
    *lead, n, k = q.shape
    qb = q.reshape(*lead, n, k // GROUP, GROUP)
    qs = qb[..., :16] | (qb[..., 16:] << 4)  # byte j: element j (low nibble), j + 16 (high)
    dh = d.astype(np.float16).reshape(*lead, n, k // GROUP, 1).view(np.uint8)  # [.., 2]
    return np.concatenate([dh, qs], axis=-1).reshape(*lead, n, k // GROUP * 18)


def expert_weights(seed: int, layer: int, expert: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.Generator(np.random.PCG64([seed, 1, layer, expert]))
    d_model, inter = SHAPES["hidden_size"], SHAPES["moe_intermediate_size"]
    return {"gate": random_int4(inter, d_model, d_model, rng), "up": random_int4(inter, d_model, d_model, rng),
            "down": random_int4(d_model, inter, inter, rng)}


def _gate_up(w: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([w["gate"][0], w["up"][0]]), np.concatenate([w["gate"][1], w["up"][1]])


def expert_linears_reference(w: dict) -> dict:
    """The two QuantLinears of one expert through the public constructor (slow: packs and verifies)."""
    from moemesh.quant.qlinear import QuantLinear

    out = {}
    for name, (q, d) in (("gate_up", _gate_up(w)), ("down", w["down"])):
        qt, dt = torch.from_numpy(q), torch.from_numpy(d)
        bias = w.get(name + "_bias")  # fp32 [N] (gpt-oss experts have biases), else None
        out[name] = QuantLinear.from_int4_groups(qt, dt, -8 * dt, None if bias is None else torch.from_numpy(bias), GROUP)
    return out


def pack_int4(q: np.ndarray, block_n: int, halves: bool) -> np.ndarray:
    """q uint8 [n, k] -> the CPU int4 kernel's packed [n, k/2] (inverse of qlinear._unpack_int4 for
    n % block_n == 0): blocks of block_n rows stored [k, block_n/2], byte j = rows j | j+half << 4
    (halves) or rows 2j | 2j+1 << 4."""
    n, k = q.shape
    nb, half = n // block_n, block_n // 2
    qb = q.reshape(nb, 2, half, k) if halves else q.reshape(nb, half, 2, k).transpose(0, 2, 1, 3)
    return np.ascontiguousarray((qb[:, 0] | (qb[:, 1] << 4)).transpose(0, 2, 1)).reshape(n, k // 2)


class FastExperts:
    """Valid int4 QuantLinear states without the constructor's repacking/verification: packs with
    numpy in the layout the reference constructor detected, checked against it once per layer."""

    def __init__(self, reference: dict) -> None:
        from moemesh.quant.qlinear_state import export_state

        self.meta = {name: export_state(layer)[0] for name, layer in reference.items()}
        self.layout = {name: m["int4_layout"] for name, m in self.meta.items()}

    def linears(self, w: dict) -> dict:
        from moemesh.quant.qlinear_state import from_state

        out = {}
        for name, (q, d) in (("gate_up", _gate_up(w)), ("down", w["down"])):
            layout = self.layout[name]
            if layout is None or q.shape[0] % layout[0]:
                return expert_linears_reference(w)
            packed = torch.from_numpy(pack_int4(q, layout[0], layout[1]))
            dt = torch.from_numpy(d)  # [n, k/g]
            if self.meta[name].get("symmetric"):
                state = {"qweight": packed, "scales": dt.t().to(torch.bfloat16).contiguous()}  # [k/g, n]
            else:
                sz = torch.stack([dt.t(), torch.zeros_like(dt).t()], -1).to(torch.bfloat16).contiguous()  # [k/g, n, 2]
                state = {"qweight": packed, "scales_and_zeros": sz}
            if self.meta[name].get("bias"):
                state["bias"] = torch.from_numpy(w[name + "_bias"]).float()
            out[name] = from_state(self.meta[name], state)
        return out

    def check(self, w: dict) -> None:
        from moemesh.quant.qlinear_state import export_state

        ref, fast = expert_linears_reference(w), self.linears(w)
        for name in ref:
            (rm, rt), (fm, ft) = export_state(ref[name]), export_state(fast[name])
            for buf in rt:
                if rm != fm or buf not in ft or not torch.equal(rt[buf], ft[buf]):
                    raise RuntimeError(f"fast int4 packing differs from QuantLinear.from_int4_groups ({name}.{buf})")


class BlobAppender:
    """Expert blobs appended to an open experts.bin: each packed (FastExperts, convert.pack_blob),
    checksummed and given its offset; ``entry`` -> the manifest row."""

    def __init__(self, f, fast: FastExperts, parts, blob_size: int, blob_sum) -> None:
        self.f, self.fast, self.parts, self.blob_size, self.blob_sum = f, fast, parts, blob_size, blob_sum
        self.offset = 0

    def entry(self, w: dict, check: bool = False) -> dict[str, int]:
        from moemesh.loading.convert import pack_blob

        if check:  # the fast path builds exactly what the constructor builds
            self.fast.check(w)
        blob = pack_blob(self.fast.linears(w), self.parts, self.blob_size)
        self.f.write(blob)
        row = {"offset": self.offset, "sum": self.blob_sum(blob)}
        self.offset += self.blob_size
        return row


def trunk_tensors(cfg: dict, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Every non-expert tensor under its HF name, bf16 (as an HF Qwen3-MoE checkpoint stores them)."""
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    h, hkv, dh, e = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_experts"]
    g = _gen(seed, 0)

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def norm_w(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g)).abs().to(torch.bfloat16)

    out = [("model.embed_tokens.weight", normal(v, d, std=1.0)), ("model.norm.weight", norm_w(d)),
           ("lm_head.weight", normal(v, d, std=d ** -0.5))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", norm_w(d)),
            (p + "self_attn.q_proj.weight", normal(h * dh, d, std=d ** -0.5)),
            (p + "self_attn.k_proj.weight", normal(hkv * dh, d, std=d ** -0.5)),
            (p + "self_attn.v_proj.weight", normal(hkv * dh, d, std=d ** -0.5)),
            (p + "self_attn.o_proj.weight", normal(d, h * dh, std=(h * dh) ** -0.5)),
            (p + "self_attn.q_norm.weight", norm_w(dh)),
            (p + "self_attn.k_norm.weight", norm_w(dh)),
            (p + "post_attention_layernorm.weight", norm_w(d)),
            (p + "mlp.gate.weight", normal(e, d, std=d ** -0.5)),
        ]
    return out


# HF name (per layer, without "model.layers.{i}.") -> GGUF name; None = model-level
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
}
Q4_TRUNK = {"token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output"}  # the rest stays F32


def is_q4(gguf_tensor: str) -> bool:
    return gguf_tensor.split(".")[-2] in Q4_TRUNK


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}"


def gguf_trunk_array(name: str, t: torch.Tensor) -> tuple[np.ndarray, object]:
    import gguf

    arr = t.float().numpy()
    if is_q4(name):
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0
    return arr.astype(np.float32), None


def _gguf_metadata(w, cfg: dict) -> None:
    import gguf

    w.add_name("qwen3moe-synthetic")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_expert_count(cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # a minimal gpt2-style vocabulary: benchmarks feed token ids, nothing is ever tokenized
    v = cfg["vocab_size"]
    tokens = ["<unk>", "<|bos|>", "<|eos|>"] + [f"t{i}" for i in range(3, v)]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (v - 3)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["t 1"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)


def build(work_dir: Path, layers: int, vocab: int, seed: int = 0, log=print) -> Path:
    """Write (or reuse) DIR/store (moemesh expert store) and DIR/model.gguf; returns DIR."""
    out = model_dir(work_dir, layers, vocab, seed)
    if (out / "DONE").is_file():
        return out
    import gguf

    from moemesh.loading.convert import blob_layout
    from moemesh.models import get_arch
    from moemesh.store.checksum import DEFAULT as CHECKSUM
    from moemesh.store.checksum import checksum_fn
    from moemesh.store.expert_source import ALIGN
    from moemesh.store.expert_store import FORMAT, VERSION
    from moemesh.weights.safetensors_io import write_safetensors

    cfg = hf_config(layers, vocab)
    args = get_arch("qwen3_moe").args_from_config(cfg)
    t0 = time.time()
    with atomic_dir(out, {"synth_version": SYNTH_VERSION}) as tmp:
        (tmp / "store").mkdir()
        trunk = trunk_tensors(cfg, seed)
        write_safetensors(tmp / "store" / "trunk.safetensors", trunk)
        trunk_by_name = dict(trunk)

        # GGUF: declare every tensor first (the header lists them), then stream the data in order
        e, inter, d = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
        gw = gguf.GGUFWriter(tmp / "model.gguf", "qwen3moe")
        _gguf_metadata(gw, cfg)
        order: list[tuple[str, object]] = []  # (gguf name, HF trunk name | ("exps", layer, part))
        q4 = gguf.GGMLQuantizationType.Q4_0

        def declare_trunk(hf: str) -> None:
            name = gguf_name(hf)
            t = trunk_by_name[hf]
            shape = list(t.shape)
            if is_q4(name):
                gw.add_tensor_info(name, shape[:-1] + [shape[-1] // GROUP * 18], np.dtype(np.uint8),
                                   int(np.prod(shape[:-1])) * shape[-1] // GROUP * 18, raw_dtype=q4)
            else:
                gw.add_tensor_info(name, shape, np.dtype(np.float32), t.numel() * 4)
            order.append((name, hf))

        for hf in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            declare_trunk(hf)
        for i in range(layers):
            for hf in [n for n, _ in trunk if n.startswith(f"model.layers.{i}.")]:
                declare_trunk(hf)
            for part, (n, k) in (("gate", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
                shape = [e, n, k // GROUP * 18]
                gw.add_tensor_info(f"blk.{i}.ffn_{part}_exps.weight", shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=q4)
                order.append((f"blk.{i}.ffn_{part}_exps.weight", ("exps", i, part)))
        gw.write_header_to_file()
        gw.write_kv_data_to_file()
        gw.write_ti_data_to_file()

        first = expert_linears_reference(expert_weights(seed, 0, 0))
        metas, parts, blob_size = blob_layout(first)
        fast = FastExperts(first)
        manifest_layers: dict[str, list[dict[str, int]]] = {}
        exps: dict[str, np.ndarray] = {}
        with open(tmp / "store" / "experts.bin", "wb") as f:
            blobs = BlobAppender(f, fast, parts, blob_size, checksum_fn(CHECKSUM))
            for name, src in order:
                if not isinstance(src, tuple):
                    arr, _ = gguf_trunk_array(name, trunk_by_name[src])
                    gw.write_tensor_data(arr)
                    continue
                _, i, part = src
                if part == "gate":  # generate the whole layer's experts once, write blobs + GGUF stacks
                    stacks = {p: [] for p in ("gate", "up", "down")}
                    entries = []
                    for x in range(e):
                        w = expert_weights(seed, i, x)
                        entries.append(blobs.entry(w, check=x == 0))
                        for p in stacks:
                            stacks[p].append(q4_0_bytes(*w[p]))
                    manifest_layers[str(i)] = entries
                    exps = {p: np.stack(v) for p, v in stacks.items()}
                    log(f"  layer {i + 1}/{layers} generated ({time.time() - t0:.0f} s)")
                gw.write_tensor_data(exps.pop(part))
            f.flush()
            os.fsync(f.fileno())
        gw.close()
        manifest = {
            "format": FORMAT, "version": VERSION, "model_type": args.model_type, "config": cfg, "quant": "int4",
            "checksum": CHECKSUM, "hidden_act": args.hidden_act, "alignment": ALIGN, "blob_size": blob_size, "linears": metas, "parts": parts,
            "trunk_file": "trunk.safetensors", "experts_file": "experts.bin", "layers": manifest_layers,
        }
        with open(tmp / "store" / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="/work/bench-data")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(Path(a.work_dir), a.layers, a.vocab, a.seed))
