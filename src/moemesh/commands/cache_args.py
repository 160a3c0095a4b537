"""Command-line options for the prefix cache (kvcache/prefix_cache.py), shared by generate and serve."""
from __future__ import annotations

import argparse

from ..engine.prefix import open_prefix_cache
from ..errors import MoemeshError
from ..experts.budget import PREFIX_AUTO_MAX, parse_size
from ..kvcache.base import KVCache
from ..kvcache.prefix_cache import PrefixCache
from ..loading.kv_identity import kv_identity
from ..loading.loader import LoadedModel


def add_cache_args(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group("prefix cache (KV of prompts seen before, reused across requests)")
    g.add_argument("--prefix-cache", default=default, metavar="SIZE|auto|off",
                   help="RAM for KV blocks of earlier prompts and answers, reused by any request that starts with "
                        "them (evicted LRU). Under --ram it comes out of that budget (auto: the room all experts "
                        f"leave, at least {10}%% of the caches' share, at most {PREFIX_AUTO_MAX >> 30} GiB); without "
                        f"--ram auto is {PREFIX_AUTO_MAX >> 30} GiB (default: %(default)s)")
    g.add_argument("--prompt-cache", default=None, metavar="DIR",
                   help="also keep the blocks in files under DIR (keyed by model identity + token prefix, "
                        "checksummed), so a restarted process skips the prefill of prompts it has seen")
    g.add_argument("--prompt-cache-size", default="8G", metavar="SIZE",
                   help="disk budget of --prompt-cache (least recently used files removed; default %(default)s)")


def requested_prefix_bytes(args: argparse.Namespace) -> int | None:
    """Bytes asked for (None: auto, 0: off); 'off' with --prompt-cache is refused."""
    text = str(args.prefix_cache).strip().lower()
    if text == "auto":
        value = None
    elif text in ("off", "0", "none"):
        value = 0
    else:
        value = parse_size(args.prefix_cache)
    if value == 0 and args.prompt_cache:
        raise MoemeshError("--prompt-cache needs the prefix cache (--prefix-cache auto or a size, not off)")
    parse_size(args.prompt_cache_size)  # a bad size fails before the model loads
    return value


def build_prefix_cache(args: argparse.Namespace, loaded: LoadedModel, kv: KVCache, quant: str,
                       kv_spec: str) -> PrefixCache | None:
    identity = kv_identity(loaded.path, quant, kv_spec) if args.prompt_cache else None
    return open_prefix_cache(kv, requested_prefix_bytes(args), loaded.budget, identity, args.prompt_cache,
                             parse_size(args.prompt_cache_size))
