"""Exactness at scale: on the first layers of a whole synthetic GGUF, lazy experts == resident experts
bit for bit, and layer-major ("expert-major") prefill == chunked prefill bit for bit.

The first layers are either copied byte for byte into a GGUF of their own (``write_prefix``; the tests)
or read in place from the whole file with its block count lowered at load (``first_layers``; the
benchmark: a 61 GB file leaves no disk for a 4 GB copy). The tests check both give the same logits."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import whole, whole_write


def prefix_spec(spec: whole.WholeSpec, layers: int) -> whole.WholeSpec:
    return replace(spec, name=f"{spec.name}-first{layers}", layers=layers)


def write_prefix(path: Path, spec: whole.WholeSpec, layers: int = 2, directory: Path | None = None,
                 progress: bool = False) -> Path:
    """A GGUF of the whole file's trunk and its first ``layers`` layers, tensors copied from ``path``."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}

    def chunks(_i, name, _shape, _q, _role, nbytes):
        flat = np.asarray(by_name[name].data).reshape(-1).view(np.uint8)  # [nbytes] (memory-mapped)
        if flat.nbytes != nbytes:
            raise ValueError(f"{path}: tensor {name}: {flat.nbytes} bytes, expected {nbytes}")
        step = 64 << 20
        for o in range(0, nbytes, step):
            yield np.array(flat[o:o + step])

    return whole_write.write(prefix_spec(spec, layers), directory, progress=progress, chunks=chunks)


@contextlib.contextmanager
def first_layers(n: int | None) -> Iterator[None]:
    """Within: a GGUF opens as its first ``n`` layers (the config's layer count; the rest of the file is
    never read). None: unchanged."""
    from ...loading import gguf_checkpoint

    if n is None:
        yield
        return
    orig = gguf_checkpoint.open_gguf

    def opened(path):
        ckpt = orig(path)
        cfg, total = ckpt.config, ckpt.config["num_hidden_layers"]
        for k, v in list(cfg.items()):
            if isinstance(v, list) and len(v) == total:  # per-layer lists (gpt-oss's layer_types)
                cfg[k] = v[:n]
        cfg["num_hidden_layers"] = min(n, total)
        return ckpt

    gguf_checkpoint.open_gguf = opened
    try:
        yield
    finally:
        gguf_checkpoint.open_gguf = orig


def _first_logits(model, ids: list[int], prefill: str, chunk: int) -> tuple[torch.Tensor, bool]:
    from ...engine.engine import Engine
    from ...engine.sampling_params import SamplingParams

    eng = Engine(model, max_prefill_tokens=chunk, prefill=prefill)
    seen: list[torch.Tensor] = []
    sample = eng.sampler.sample

    def spy(logits, *a, **k):
        seen.append(logits.clone())
        return sample(logits, *a, **k)

    eng.sampler.sample = spy  # type: ignore[method-assign]
    eng.generate([ids], SamplingParams(temperature=0.0, max_tokens=1))
    return seen[0], eng.layer_major  # [1, V], whether the engine really ran layer-major


def _forward(model, ids: list[int]) -> torch.Tensor:
    from ...batch import BatchLayout

    cache = model.new_cache()
    cache.add_sequence(0)
    return model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)  # [T, V]


def check(path: Path, tokens: int = 48, chunk: int = 16, seed: int = 0, layers: int | None = None) -> dict:
    """On a GGUF (its first ``layers`` layers, None: all): resident vs lazy logits over a ``tokens``-token
    prompt, and layer-major vs chunked prefill (chunks of ``chunk``) on the lazy model; bit-for-bit
    flags and max differences."""
    with first_layers(layers):
        out = _check(path, tokens, chunk, seed)
    return {**out, "layers": layers}


def _check(path: Path, tokens: int, chunk: int, seed: int) -> dict:
    from ...loading.experts import ExpertOptions
    from ...loading.loader import load_model

    resident = load_model(str(path))
    vocab = resident.args.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (tokens,), generator=g).tolist()
    a = _forward(resident.model, ids)
    del resident
    lazy = load_model(str(path), experts=ExpertOptions(slots=lazy_slots(path)))
    b = _forward(lazy.model, ids)
    chunked, _ = _first_logits(lazy.model, ids, "chunked", chunk)
    layer, ran_layer_major = _first_logits(lazy.model, ids, "layer", chunk)
    return {"file": str(path), "tokens": tokens, "chunk": chunk, "finite": bool(torch.isfinite(a).all()),
            "lazy_equals_resident": bool(torch.equal(a, b)), "lazy_vs_resident_max_abs": float((a - b).abs().max()),
            "layer_major_ran": ran_layer_major, "layer_major_equals_chunked": bool(torch.equal(layer, chunked)),
            "layer_vs_chunked_max_abs": float((layer - chunked).abs().max()),
            "cache_slots": lazy.provider.cache.num_slots, "logits_std": float(a.std()), "last_logits": a[-1]}


def lazy_slots(path: Path) -> int:
    """A cache holding one layer's top-k and a bit: evictions in every layer."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    top_k = int(r.fields[f"{arch}.expert_used_count"].parts[-1][0])
    return top_k + 1
