"""The physical floor of bench/decode.py's rows: bytes a decode token must read, and how fast this
machine reads memory.

``decode_bytes(model)`` counts what one greedy decode token of moemesh's loaded model streams from
RAM: every trunk tensor (attention, dense MLPs and shared experts, routers, norms, the approximate
head), one embedding row and the rescored head rows, and ``top_k`` routed experts per MoE layer at the
mean expert size (random weights route uniformly: each token's experts are almost never the last
token's). ``python bench/decode_floor.py [--threads 2]`` prints a robust read bandwidth in GB/s:
the median of sustained reads of a 1 GiB buffer (cold to every cache) split over the threads as the
kernels split theirs (bench/read_loop.c). bench/decode.py runs it as a fresh process in every round,
beside the engines, and divides: floor tok/s = GB/s / bytes per token. Both engines read about the
same bytes per token (llama.cpp's Q4_0 GGUF holds bit-identical experts; its trunk and head are Q4_0
where moemesh's int4 trunk carries a zero per group), so neither can decode faster than the floor.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _tensors(module: torch.nn.Module):
    yield from module.parameters(recurse=False)
    yield from (b for b in module.buffers(recurse=False) if b is not None)
    t = getattr(module, "weight", None)  # a plain tensor attribute (routers, norms, the head's table)
    if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
        yield t


def decode_bytes(model) -> dict[str, float]:
    """{"trunk", "experts", "total"} bytes one decode token reads (see the module docstring)."""
    from moemesh.layers.moe import MoEBlock
    from moemesh.weights.page_out import row_tables

    row = lambda t: t[0].numel() * t.element_size()  # noqa: E731
    embed, head = model.embed, model.lm_head  # of these tables a token reads one row, and the rescored head rows
    trunk = (row(embed) if isinstance(embed, torch.Tensor) else 0) + (head.rescore * row(head.weight) if head.approx is not None else 0)
    skip = {t.untyped_storage().data_ptr() for t in row_tables(model)}
    seen: set[tuple[int, int]] = set()
    for m in model.modules():
        for t in _tensors(m):
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen and key[0] not in skip:
                seen.add(key)
                trunk += t.numel() * t.element_size()
    experts = 0.0
    for layer in model.layers:
        if isinstance(layer.ffn, MoEBlock):
            held = layer.ffn.provider.experts[layer.ffn.layer]
            mods = list(held.values() if isinstance(held, dict) else held)
            per = statistics.mean(sum(t.numel() * t.element_size() for m in e.modules() for t in _tensors(m)) for e in mods)
            experts += layer.ffn.router.top_k * per
    return {"trunk": float(trunk), "experts": experts, "total": trunk + experts}


def read_gbs(threads: int, rounds: int = 9, size: int = 1 << 30) -> float:
    """Median GB/s of ``rounds`` sustained reads of one ``size``-byte buffer over ``threads`` threads."""
    from int4_bandwidth import read_library  # bench/read_loop.c, as the int4 kernel benchmark's floor

    lib = read_library()
    buf = torch.ones(size, dtype=torch.uint8)  # touched: every page present
    ptrs, sizes = torch.tensor([buf.data_ptr()], dtype=torch.int64), torch.tensor([size], dtype=torch.int64)
    rates = []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        lib.read_bufs(ptrs.data_ptr(), sizes.data_ptr(), 1, threads)
        if r:  # the first pass warms the thread pool
            rates.append(size / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    print(f"RESULT {read_gbs(args.threads, args.rounds):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
