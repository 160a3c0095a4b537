"""Command-line options for how experts are held, shared by generate and serve."""
from __future__ import annotations

import argparse

from ..errors import MoemeshError
from ..experts.budget import parse_size
from ..experts.policy import POLICIES
from ..loading.experts import PREFETCH_THRESHOLD, ExpertOptions


def add_expert_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experts (MoE models)")
    g.add_argument("--ram", default=None,
                   help="whole-process RAM budget (e.g. 8G): experts stay on disk in an expert store and a "
                        "cache gets what the trunk, KV reserve and runtime leave; without it every expert is resident")
    g.add_argument("--cache-policy", choices=sorted(POLICIES), default="lfu",
                   help="expert cache eviction: lfu = decayed frequency (default), lru")
    g.add_argument("--no-prefetch", action="store_true", help="do not prefetch the next layer's predicted experts")
    g.add_argument("--prefetch-top", type=int, default=None, metavar="N",
                   help="prefetch at most each token's N most likely next-layer experts (default: every rank "
                        "that passes --prefetch-threshold)")
    g.add_argument("--prefetch-threshold", type=float, default=PREFETCH_THRESHOLD, metavar="P",
                   help="prefetch a prediction rank (a token's r-th most likely next-layer expert) only while its "
                        "measured precision on this run is at least P (default %(default)s; 0 = every predicted expert)")
    g.add_argument("--no-verify", action="store_true", help="skip the checksum of each expert read")
    g.add_argument("--io-threads", type=int, default=4, help="expert reader threads")


def expert_options(args: argparse.Namespace, kv_reserve: int = 64 * 2**20) -> ExpertOptions:
    if not 0.0 <= args.prefetch_threshold <= 1.0:
        raise MoemeshError(f"--prefetch-threshold {args.prefetch_threshold}: a precision between 0 and 1 "
                           "(0 = prefetch every predicted expert)")
    if args.prefetch_top is not None and args.prefetch_top < 1:
        raise MoemeshError(f"--prefetch-top {args.prefetch_top}: at least 1 (or leave it out)")
    if args.io_threads < 1:
        raise MoemeshError(f"--io-threads {args.io_threads}: at least 1")
    return ExpertOptions(
        ram=parse_size(args.ram) if args.ram else None,
        policy=args.cache_policy,
        verify=not args.no_verify,
        prefetch=not args.no_prefetch,
        prefetch_top=args.prefetch_top,
        prefetch_threshold=args.prefetch_threshold,
        io_threads=args.io_threads,
        kv_reserve=kv_reserve,
    )
