"""Decode speed and KV memory: dense fp32 cache vs TurboQuant, SmolLM2 at several context lengths.

For every context length each cache is filled directly with random keys/values (prefilling 8K
tokens through the model would dominate the run; decode cost does not depend on the values), then
single-token decode steps of the whole model are timed round-robin across the caches, so a burst
of load from other processes hits all of them. Also timed: attention alone (``cache.attend`` of
every layer for one token, outside the model).
KV bytes per token per layer come from ``cache.nbytes()`` (the actual buffers, capacity included).
Writes bench/results/kv.{json,md} (``--out NAME`` for another name). ``--random-weights`` builds
a SmolLM2-135M-shaped model with random fp32 weights instead of loading the checkpoint (same
shapes, hence the same decode cost), for machines without the model package.

    .venv/bin/python bench/kv.py [--contexts 1024,4096,8192] [--kv dense,turboquant:3.5,...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import MappingProxyType

import torch

from moemesh.batch import BatchLayout
from moemesh.benchkit.results import cpu_model, write_results
from moemesh.kvcache.base import KVCache
from moemesh.kvcache.dense import DenseKVCache
from moemesh.kvcache.turboquant import TurboQuantKVCache
from moemesh.models import get_arch
from moemesh.models.build import Builder

RESULTS = Path(__file__).parent / "results"
KINDS = "dense,turboquant:2.5,turboquant:3.5,turboquant:4"
SMOLLM2 = MappingProxyType(dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
               tie_word_embeddings=True))  # SmolLM2-135M's config


class RandomSource:
    """A WeightSource that makes each requested tensor up, with the shape SmolLM2 stores it in."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.gen = torch.Generator().manual_seed(0)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def get(self, name: str) -> torch.Tensor:
        return torch.randn(self.shapes[name], generator=self.gen) * 0.05

    def int4_groups(self, name: str):
        return None


def random_smollm2():
    spec = get_arch("llama")
    args = spec.args_from_config(dict(SMOLLM2))
    d, f, dh = args.hidden_size, args.intermediate_size, args.head_dim
    shapes = {"model.embed_tokens.weight": (args.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (args.num_heads * dh, d), p + "self_attn.k_proj.weight": (args.num_kv_heads * dh, d),
            p + "self_attn.v_proj.weight": (args.num_kv_heads * dh, d), p + "self_attn.o_proj.weight": (d, args.num_heads * dh),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    return Builder(spec, args, RandomSource(shapes), "fp32").build()


def fill(cache: KVCache, n: int, hkv: int, dh: int, layers: int, gen: torch.Generator) -> None:
    """Give sequence 0 a history of n random tokens, as if it had been prefilled."""
    cache.add_sequence(0)
    cache.begin(BatchLayout([0], [n]))
    seq = cache.seqs[0]
    for layer in range(layers):
        k, v = torch.randn(hkv, n, dh, generator=gen) * 4, torch.randn(hkv, n, dh, generator=gen)  # [Hkv, n, Dh]
        if isinstance(cache, DenseKVCache):
            seq.keys[layer][:, :n], seq.values[layer][:, :n] = k, v
            continue
        assert isinstance(cache, TurboQuantKVCache)
        nc = max(0, n - cache.window)
        st, tq = seq.layers[layer], cache.quantizers[layer]
        words, norms = tq.encode(torch.stack([k[:, :nc], v[:, :nc]]))  # [2, Hkv, nc, W], [2, Hkv, nc]
        st.hist.k_codes[:, :, :nc], st.hist.v_codes[:, :, :nc] = words[0].transpose(1, 2), words[1].transpose(1, 2)
        st.hist.k_norms[:, :nc], st.hist.v_norms[:, :nc] = norms[0], norms[1]
        st.win_k, st.win_v = k[:, nc:].clone(), v[:, nc:].clone()
    if isinstance(cache, TurboQuantKVCache):
        seq.coded = max(0, n - cache.window)
    seq.length = n


@torch.inference_mode()
def measure(model, kinds: list[str], ctx: int, steps: int) -> list[dict]:
    a = model.args
    gen = torch.Generator().manual_seed(ctx)
    caches = {}
    for kind in kinds:
        caches[kind] = model.new_cache(kind)
        fill(caches[kind], ctx, a.num_kv_heads, a.head_dim, a.num_layers, gen)
    bytes_tok = {k: c.nbytes() / (ctx * a.num_layers) for k, c in caches.items()}
    tok = torch.tensor([42])
    one = BatchLayout([0], [1])
    q = torch.randn(1, a.num_heads, a.head_dim, generator=gen)
    kv1 = torch.randn(1, a.num_kv_heads, a.head_dim, generator=gen)
    step_s: dict[str, list[float]] = {k: [] for k in kinds}
    attend_s: dict[str, list[float]] = {k: [] for k in kinds}
    for kind, c in caches.items():  # warm-up (allocator, native library load)
        model(tok, torch.tensor([c.length(0)]), c, one)
    for _ in range(steps):
        for kind, c in caches.items():
            t0 = time.perf_counter()
            model(tok, torch.tensor([c.length(0)]), c, one)
            step_s[kind].append(time.perf_counter() - t0)
            c.begin(one)  # attention alone: every layer's cache.attend for one more token
            t0 = time.perf_counter()
            for layer in range(a.num_layers):
                c.attend(layer, q, kv1, kv1, one, a.head_dim**-0.5)
            attend_s[kind].append(time.perf_counter() - t0)
            c.end(one)
    bf16 = 2 * 2 * a.num_kv_heads * a.head_dim  # bytes/token/layer of a bf16 K+V cache
    base = statistics.median(step_s[kinds[0]])
    rows = []
    for kind in kinds:
        med = statistics.median(step_s[kind])
        rows.append(dict(
            context=ctx, kv=kind, decode_ms=round(med * 1e3, 2), decode_tok_s=round(1 / med, 2),
            vs_first=round(med / base, 3), attention_ms=round(statistics.median(attend_s[kind]) * 1e3, 2),
            kv_bytes_per_token_layer=round(bytes_tok[kind], 1), x_smaller_than_bf16=round(bf16 / bytes_tok[kind], 2),
            native=getattr(caches[kind], "lib", None) is not None, samples=steps,
        ))
        print(f"  ctx {ctx:5d} {kind:16s} {med * 1e3:7.2f} ms/token  attention {rows[-1]['attention_ms']:.2f} ms"
              f"  {bytes_tok[kind]:7.1f} B/token/layer", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["# KV cache: decode speed and memory (SmolLM2-135M shapes: 30 layers, 3 KV heads, Dh 64)\n",
           "; ".join(f"{k}: {v}" for k, v in meta.items()) + "\n",
           "decode = one whole-model single-token step (median of interleaved steps); vs dense = that time / "
           "dense's at the same context; attention = cache.attend of all layers for one token, alone; bytes = cache.nbytes() / "
           "(tokens * layers), K and V, norms and the exact window included; x bf16 = a bf16 cache's 768 B "
           "/ that.\n",
           "| context | kv | decode ms | tok/s | vs dense | attention ms | bytes/token/layer | x smaller than bf16 |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['context']} | {r['kv']} | {r['decode_ms']:.2f} | {r['decode_tok_s']:.1f} | {r['vs_first']:.3f} "
                   f"| {r['attention_ms']:.2f} | {r['kv_bytes_per_token_layer']:.1f} | {r['x_smaller_than_bf16']:.2f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--kv", default=KINDS, help="comma-separated cache specs; the first is the baseline")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps per cache and context")
    ap.add_argument("--quant", default="fp32", help="model weights (fp32, bf16, int8, int4, auto)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2 shapes, random fp32 weights")
    ap.add_argument("--out", default="kv", help="results file name (without extension)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.random_weights:
        model, a.quant = random_smollm2(), "random fp32"
    else:
        from moemesh.loading.loader import load_model

        model = load_model("smollm2", a.quant).model
    kinds = a.kv.split(",")
    meta = dict(torch=torch.__version__, cpu=cpu_model(), threads=a.threads, weights=a.quant, cores=os.cpu_count(),
                loadavg_before=" ".join(f"{v:.1f}" for v in os.getloadavg()))
    t0 = time.perf_counter()
    rows = [r for ctx in (int(c) for c in a.contexts.split(",")) for r in measure(model, kinds, ctx, a.steps)]
    meta.update(wall_s=round(time.perf_counter() - t0, 1), loadavg_after=" ".join(f"{v:.1f}" for v in os.getloadavg()))
    md = markdown(rows, meta)
    print(md)
    if not a.no_write:
        write_results(RESULTS, a.out, dict(meta=meta, rows=rows), md, sys.argv)


if __name__ == "__main__":
    main()
