"""Prefix cache: KV blocks of token prefixes, shared by every request that starts with them.

Hashed blocks, as nano-vllm does, rather than SGLang's radix tree: our KV caches keep each
sequence in contiguous per-layer buffers (not pages another sequence could point at), so a hit
is a copy into the new sequence either way, and fixed-size blocks make that copy, the memory
budget, LRU eviction and the files of ``--prompt-cache`` one uniform unit. The price is that a
shared prefix is reused down to a multiple of the block size (< ``block_size`` tokens lost).

Block i's key is blake2b-128(key of block i-1 or the namespace, token ids of block i), so one key
names a whole prefix; the block keeps its tokens and its parent's key and a hit checks both, so
a match never rests on the hash alone. The namespace (model identity, cache layout) keeps
different models and KV formats apart on disk.

Eviction is LRU within ``capacity`` bytes. A lookup or insert touches a chain from its end back
to its root, so a parent is always more recent than its children and the least recent block is a
leaf: evicting it never strands cached descendants.

A cache with ``needs_tail`` (TurboQuant) can only be restored where its exact window was saved
(``Block.tail``): a lookup returns the longest cached prefix that ends at such a block.

Blocks held in RAM live in slots of a BlockPool (kvcache/block_pool.py), not one malloc each: one
by one, they fragmented the heap ~8x beyond their own bytes (issue 20's soak). A lookup's tensors
are slot views, valid until the next lookup or insert. A held block is small beside its bytes: its
tokens packed, no tensor objects (views are made by a lookup), slots in place of a __dict__; as a
tuple of ints and a dict of views it cost ~3.6 KiB of RSS beyond a 16 KiB block, which the 2-hour
soak saw as RSS growing past the cache's slabs. What it still costs (BLOCK_META) counts in its bytes.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch

from .base import KVCache
from .block_pool import BlockPool

Tensors = dict[str, torch.Tensor]
DEFAULT_BLOCK = 32  # tokens per block: the TurboQuant window's default, and a small rounding loss
# A held block's bytes beside its tensors: the Block, its key and packed tokens, its LRU entry
# (~0.7 KiB of RSS at 32 tokens a block: tests/test_prefix_pool.py measures it), counted in the budget.
BLOCK_META = 1024


def tensors_nbytes(tensors: Tensors | None) -> int:
    return 0 if not tensors else sum(t.numel() * t.element_size() for t in tensors.values())


def pack_tokens(tokens: list[int] | tuple[int, ...]) -> bytes:
    """Token ids as int64 bytes (native order): what a block keeps and its key hashes."""
    return array("q", tokens).tobytes()


def unpack_tokens(packed: bytes) -> list[int]:
    return array("q", packed).tolist()


def block_key(parent: bytes, tokens: bytes) -> bytes:
    """tokens: pack_tokens of the block's ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(tokens)
    return h.digest()


@dataclass(eq=False, slots=True)
class Block:
    key: bytes
    parent: bytes
    tokens: bytes  # pack_tokens of its ids
    end: int  # prefix length at the block's end
    data: Tensors | None  # its tensors; None while they sit in a BlockPool slot
    tail: Tensors | None = None  # what restoring at this block's end needs beyond the blocks
    slot: int | None = None  # its BlockPool slot while held in RAM (None: not pooled)
    size: int = field(init=False)  # bytes of its tensors

    def __post_init__(self) -> None:
        self.size = tensors_nbytes(self.data)

    @property
    def nbytes(self) -> int:
        return self.size + tensors_nbytes(self.tail) + BLOCK_META


@dataclass
class Hit:
    tokens: int  # restorable prefix length (a multiple of the block size)
    blocks: list[Tensors] = field(default_factory=list)
    tail: Tensors | None = None
    matched: int = 0  # tokens whose blocks are cached (> tokens when no tail ends the longer match)


@dataclass
class PrefixStats:
    lookups: int = 0
    query_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of which restored from the cache
    disk_hit_tokens: int = 0  # of which read from --prompt-cache files
    inserted_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, kv: KVCache, capacity: int, block_size: int = DEFAULT_BLOCK, namespace: bytes = b"",
                 store=None) -> None:
        """kv: the engine's KV cache (its block format and needs_tail); capacity: bytes of blocks
        held in RAM; store: a PromptStore (kvcache/prompt_store.py) behind the RAM blocks, or None."""
        if not kv.supports_prefix:
            raise ValueError(f"{type(kv).__name__} does not support prefix caching")
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        self.kv, self.capacity, self.block_size, self.store = kv, capacity, block_size, store
        block_spec = kv.block_spec(block_size)
        spec = repr(sorted((k, str(d), s) for k, (d, s) in block_spec.items()))
        self.pool = BlockPool(block_spec)
        self.root = hashlib.blake2b(namespace + b"|" + spec.encode(), digest_size=16).digest()
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # LRU order: least recent first
        self.nbytes = 0
        self.stats = PrefixStats()

    # -- keys --------------------------------------------------------------------------------
    def extend_keys(self, ids: list[int], keys: list[bytes], n_blocks: int) -> list[bytes]:
        """Grow ``keys`` (block keys of ids, computed so far) to the first n_blocks blocks."""
        b = self.block_size
        while len(keys) < n_blocks:
            i = len(keys)
            keys.append(block_key(keys[-1] if keys else self.root, pack_tokens(ids[i * b : (i + 1) * b])))
        return keys

    def parent_of(self, keys: list[bytes], i: int) -> bytes:
        return keys[i - 1] if i else self.root

    # -- lookup --------------------------------------------------------------------------------
    def lookup(self, ids: list[int], max_tokens: int, keys: list[bytes]) -> Hit:
        """The longest cached, restorable prefix of ids of at most max_tokens tokens (its blocks
        are valid until the next lookup or insert)."""
        self.pool.settle()
        self.stats.lookups += 1
        self.stats.query_tokens += len(ids)
        b = self.block_size
        self.extend_keys(ids, keys, max(0, max_tokens) // b)
        chain: list[Block] = []
        from_disk: list[Block] = []
        for i in range(max(0, max_tokens) // b):
            tokens = pack_tokens(ids[i * b : (i + 1) * b])
            block = self.blocks.get(keys[i])
            if block is None and self.store is not None:
                block = self.store.load(keys[i], self.parent_of(keys, i), tokens, (i + 1) * b)
                if block is not None:
                    from_disk.append(block)
            if block is None or block.parent != self.parent_of(keys, i) or block.tokens != tokens:
                break
            chain.append(block)
        matched = len(chain)
        tail = None
        while chain and self.kv.needs_tail:  # restorable only where an exact window was saved
            tail = chain[-1].tail
            if tail is None and self.store is not None:
                tail = self.store.load_tail(chain[-1].key, len(chain) * b)
                if tail is not None:
                    self._attach(chain[-1], tail)
            if tail is not None:
                break
            chain.pop()
        for block in from_disk:
            self._add(block)
        self._touch([blk.key for blk in chain])
        n = len(chain) * b
        self.stats.hit_tokens += n
        self.stats.disk_hit_tokens += b * sum(1 for blk in from_disk if blk in chain)
        return Hit(n, [self._tensors(blk) for blk in chain], tail, matched * b)

    def _tensors(self, block: Block) -> Tensors:
        return block.data if block.slot is None else self.pool.views(block.slot)  # type: ignore[return-value]

    # -- insert --------------------------------------------------------------------------------
    def first_missing(self, keys: list[bytes], start: int, stop: int) -> int:
        """The first block index in [start, stop) not held in RAM (stop when all are)."""
        for i in range(start, stop):
            if keys[i] not in self.blocks:
                return i
        return stop

    def insert(self, ids: list[int], keys: list[bytes], first: int, data: list[Tensors],
               tail: Tensors | None = None, stop: int | None = None) -> bool:
        """Blocks first, first + 1, ... of ids (their exported data), then touch the chain up to
        block ``stop`` (default: the last one given). ``tail``: the restore data at the chain's
        end, attached if that block has none yet; returns whether it was."""
        self.pool.settle()
        b = self.block_size
        stop = first + len(data) if stop is None else stop
        self.extend_keys(ids, keys, stop)
        for i, d in zip(range(first, stop), data):
            if keys[i] not in self.blocks:
                block = Block(keys[i], self.parent_of(keys, i), pack_tokens(ids[i * b : (i + 1) * b]), (i + 1) * b, d)
                self._add(block)
                self.stats.inserted_blocks += 1
                if self.store is not None and block.key in self.blocks:
                    # the exported tensors, not the slot: its writer may run after an eviction reused it
                    self.store.save(replace(block, data=d, slot=None))
        self._touch(keys[:stop])
        end = self.blocks.get(keys[stop - 1]) if stop else None
        if tail is None or end is None or end.tail is not None:
            return False
        self.set_tail(end.key, tail)
        return end.key in self.blocks

    def set_tail(self, key: bytes, tail: Tensors | None) -> None:
        """Attach (or, with None, drop) the restore data at a block's end."""
        block = self.blocks.get(key)
        if block is None:
            return
        self._attach(block, tail)
        if self.store is not None:
            self.store.save_tail(block, tail)

    def _attach(self, block: Block, tail: Tensors | None) -> None:
        if block.key in self.blocks:  # held: its bytes change (a block not held yet counts them when added)
            self.nbytes += tensors_nbytes(tail) - tensors_nbytes(block.tail)
        block.tail = tail
        if block.key in self.blocks:
            self._evict(keep=block.key)

    # -- memory --------------------------------------------------------------------------------
    def _add(self, block: Block) -> None:
        if block.key in self.blocks or block.nbytes > self.capacity:
            return
        block.slot = self.pool.take(block.data)  # type: ignore[arg-type]
        if block.slot is not None:
            block.data = None  # (its tensors are the slot's now)
        self.blocks[block.key] = block
        self.nbytes += block.nbytes
        self._evict(keep=block.key)

    def _evict(self, keep: bytes | None = None) -> None:
        while self.nbytes > self.capacity and self.blocks:
            key, block = next(iter(self.blocks.items()))
            if key == keep:  # the newest block alone is over the budget: drop it
                self.blocks.move_to_end(key)
                if len(self.blocks) == 1:
                    self._drop(key)
                continue
            self._drop(key)
            self.stats.evicted_blocks += 1

    def _drop(self, key: bytes) -> None:
        block = self.blocks.pop(key)
        self.nbytes -= block.nbytes
        if block.slot is not None:
            self.pool.give(block.slot)
            block.slot = None

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the chain's end first: its root ends up the most recent
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0
        self.pool.clear()

    def summary(self) -> dict:
        s = self.stats
        out = {
            "block_tokens": self.block_size, "blocks": len(self.blocks), "bytes": self.nbytes,
            "capacity_bytes": self.capacity, "pool_bytes": self.pool.nbytes, "lookups": s.lookups, "query_tokens": s.query_tokens,
            "hit_tokens": s.hit_tokens, "hit_rate": s.hit_tokens / s.query_tokens if s.query_tokens else 0.0,
            "disk_hit_tokens": s.disk_hit_tokens, "inserted_blocks": s.inserted_blocks,
            "evicted_blocks": s.evicted_blocks,
        }
        if self.store is not None:
            out["disk"] = self.store.summary()
        return out
