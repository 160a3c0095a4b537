"""Where a lazy decode step's time goes, and what proposed fixes to src/moemesh/experts would buy.

Loads the bench/lazy.py synthetic store with lazy experts (optionally inside a memory cgroup, capped
after load like bench/lazy.py does), decodes the same teacher-forced stream, and prints tokens/s,
the provider's stats and a cProfile of a few steps. ``--fix`` applies prototype versions of the
fixes proposed in the lazy-experts report as monkeypatches on this process only (src/ untouched):

* ``crc-in-io``: verify each blob's crc32 in the I/O thread right after its read, not on the
  compute thread in ``ExpertCache.expert`` (serial ~1 ms per 2.8 MiB blob, ~30+ ms per token).
* ``slot-experts``: build one GatedMLP per cache slot once (its tensors are views of the slot,
  and every blob has the same layout), instead of a fresh module tree per miss.
* ``add``: one-token decode accumulates ``out += y`` instead of ``index_add_``.
* ``mallopt``: after load, ``malloc_trim(0)`` then keep freed heap memory (M_MMAP_THRESHOLD and
  M_TRIM_THRESHOLD 1 GiB) so decode steps stop faulting fresh pages (costly at a cgroup limit).

    .venv/bin/python bench/lazy_profile.py [--cap-pct 25] [--slots N] [--fix crc-in-io,slot-experts,add] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402
from moemesh.benchkit.synth import core as synth

MIB = 2**20


def mallopt_after_load() -> None:
    """Give the load-time transients back (malloc_trim), then stop glibc from returning freed
    memory to the kernel and re-faulting it on every decode step: under a cgroup at its limit each
    fresh page costs a reclaim (measured: the int4 matmuls ran 2x slower under the cap)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    libc.mallopt(M_TOP_PAD, 64 << 20)


def disk_ticks(path: Path) -> int | None:
    """Milliseconds the block device holding the store has spent with I/O in flight (io_ticks in
    /sys/block/DEV/stat): its change over the timed steps / their wall time = disk busy fraction."""
    try:
        dev = os.stat(path).st_dev
        name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        return int(Path(f"/sys/block/{name}/stat").read_text().split()[9])
    except (OSError, IndexError, ValueError):
        return None


def apply_fixes(provider, fixes: set[str]) -> None:
    import torch

    cache = provider.cache
    if "crc-in-io" in fixes and cache.verify:
        reader, store = cache.reader, cache.store

        def load(key, protect, may_wait=True, _cache=cache):
            from moemesh.experts.cache import Entry

            slot = _cache._take_slot(protect, may_wait)
            if slot is None:
                return None
            layer, expert = key
            view = _cache.slot_view(slot)

            def read_and_verify():
                n = reader._read(store.offset(layer, expert), view)
                store.verify(layer, expert, view)
                return n

            entry = Entry(key, slot, reader.pool.submit(read_and_verify))
            _cache.entries[key] = entry
            return entry

        cache._load = load
        cache.verify = False  # already verified by the time the future completes
    if "slot-experts" in fixes:
        bs = cache.blob_size
        mods = [cache.store.expert_from_buffer(cache._tensor[s * bs:(s + 1) * bs]) for s in range(cache.num_slots)]
        verify = cache.verify

        def expert(entry, _cache=cache):
            if entry.future is not None:
                t0 = time.perf_counter()
                entry.future.result()
                _cache.stats.stall_seconds += time.perf_counter() - t0
                entry.future = None
                if verify:
                    _cache.store.verify(*entry.key, _cache.slot_view(entry.slot))
                entry.expert = mods[entry.slot]
            return entry.expert

        cache.expert = expert
    if "add" in fixes:
        from moemesh.experts.mixing import group_by_expert

        def run(layer, x, ids, weights, _p=provider):
            if x.shape[0] != 1:
                return type(_p).run(_p, layer, x, ids, weights)
            groups = group_by_expert(ids)
            _p._score_prediction(layer, [e for e, _, _ in groups])
            _p.token_layers += 1
            _p.layers_seen.add(layer)
            out = torch.zeros_like(x)
            w = weights[0].tolist()
            entries = _p.cache.acquire([(layer, e) for e, _, _ in groups])
            try:
                _p._prefetch_next(layer, x, {e.key for e in entries})
                for entry, (_, _, slots) in zip(entries, groups):
                    out += _p.cache.expert(entry)(x) * w[int(slots[0])]
            finally:
                _p.cache.release(entries)
            return out

        provider.run = run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="/work/bench-data")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--cap-pct", type=float, default=25.0, help="cgroup cap (%% of expert bytes), applied after load; 0 = none")
    ap.add_argument("--margin-mib", type=int, default=128)
    ap.add_argument("--slots", type=int, help="exact cache slots instead of the --ram budget")
    ap.add_argument("--io-threads", type=int, default=4, help="reader threads (ExpertOptions.io_threads)")
    ap.add_argument("--prefetch-top", type=int, default=None, help="ExpertOptions.prefetch_top")
    ap.add_argument("--prefetch-threshold", type=float, default=None, help="ExpertOptions.prefetch_threshold (default: its default)")
    ap.add_argument("--fix", default="", help="comma list: crc-in-io, slot-experts, add, mallopt")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    root = synth.model_dir(Path(a.work_dir), a.layers, a.vocab, 0)
    from moemesh.store.expert_store import ExpertStore

    cap = int(ExpertStore(root / "store").expert_bytes() * a.cap_pct / 100) if a.cap_pct else None
    if not a.child and cap:  # re-run self inside a cgroup (load headroom, then the cap)
        cgroup.drop_caches()
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        o = cgroup.run([sys.executable, *sys.argv, "--child"], cap + 3072 * MIB, 600, "lazyprof", env)
        print(o.stdout + o.stderr[-3000:])
        print("cgroup (decode):", o.cgroup)
        return
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(2)
    from moemesh.batch import BatchLayout
    from moemesh.loading.experts import ExpertOptions
    from moemesh.loading.loader import load_model

    ram = cap - a.margin_mib * MIB if cap else 2**40
    lm = load_model(str(root / "store"), "int4", experts=ExpertOptions(ram=None if a.slots else ram, slots=a.slots,
                                                                      io_threads=a.io_threads, prefetch_top=a.prefetch_top,
                                                                      **({} if a.prefetch_threshold is None else
                                                                         {"prefetch_threshold": a.prefetch_threshold})))
    fixes = {f for f in a.fix.split(",") if f}
    if "mallopt" in fixes:
        mallopt_after_load()
    if cap:
        applied = cgroup.apply_cap_to_self(cap)
        print("cap after load:", applied)
        if not applied["applied"]:
            sys.exit("the cap could not be applied after load (anonymous memory above it)")
    prov = lm.provider
    apply_fixes(prov, fixes)
    model = lm.model
    kv = model.new_cache()
    kv.add_sequence(0)
    lay = BatchLayout([0], [1])
    rng = random.Random(1000)
    toks = [rng.randrange(3, a.vocab) for _ in range(a.warmup + 2 * a.tokens)]
    step = lambda i: model(torch.tensor([toks[i]]), torch.tensor([i]), kv, lay)  # noqa: E731
    for i in range(a.warmup):
        step(i)
    s0 = dict(prov.stats())
    disk0 = disk_ticks(root)
    t = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.tokens):
        step(i)
    dt = time.perf_counter() - t
    disk_busy = (disk_ticks(root) - disk0) / 1e3 / dt if disk0 is not None else None
    s1 = prov.stats()
    n = a.tokens
    print(json.dumps({
        "fixes": sorted(fixes), "slots": prov.cache.num_slots, "tokens_per_s": n / dt,
        "hit_rate": (s1["hits"] - s0["hits"]) / max(1, s1["hits"] - s0["hits"] + s1["misses"] - s0["misses"]),
        "MiB_read_per_token": (s1["bytes_read"] - s0["bytes_read"]) / n / MIB,
        "stall_ms_per_token": (s1["stall_seconds"] - s0["stall_seconds"]) / n * 1e3,
        "prefetch_issued_per_token": (s1["prefetch_issued"] - s0["prefetch_issued"]) / n,
        "misses_per_token": (s1["misses"] - s0["misses"]) / n,
        "disk_busy_fraction": disk_busy,
        "prefetch_rank_precision": [None if v is None else round(v, 3) for v in s1.get("prefetch_rank_precision") or []],
    }))
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for i in range(a.warmup + a.tokens, a.warmup + 2 * a.tokens):
            step(i)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(16)


if __name__ == "__main__":
    main()
