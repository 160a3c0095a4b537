"""Working memory under --ram: the KV cache and activations of long prompts, paid for with expert-cache slots.

--ram is split once, at load (experts/budget.py): trunk, a fixed KV reserve, runtime, prefix cache and
the expert cache. What requests hold grows with their length: gpt-oss-120b's fp32 KV cache takes 72 KiB
a token (151 MB for a 2,048-token prompt), and layer-major prefill holds the whole prompt's hidden states
and routed rows ([N, D] fp32 several times over). Past the reserve that memory must come from somewhere,
or the process outgrows its budget (a 2,048-token prompt of a whole gpt-oss-120b was OOM-killed under an
8 GiB cap). Before every step the engine sums what its sequences will hold; past the reserve the expert
cache lends that many bytes of slots (evicting idle experts, their pages given back to the kernel) and
takes them back as sequences finish. A prompt whose KV cache cannot fit even with the cache at its minimum
(the model's top-k slots) is refused when it is added, naming the sizes.
"""
from __future__ import annotations

import math

from ..errors import PromptTooLong
from ..experts.budget import RUNTIME_OVERHEAD
from ..experts.cache import ExpertCache
from ..kvcache.base import KVCache
from ..models.transformer import Transformer
from .sequence import Sequence

ACT_COPIES = 4  # fp32 [N, D] tensors a layer-major job holds besides its routed rows (x, norm, sum, residual)
ATTN_SCRATCH = 64 * 2**20  # the attention's score blocks at most (kvcache/dense.py bounds each to 16 MiB)


def expert_caches(model: Transformer) -> list[ExpertCache]:
    """The budgeted expert caches behind the model's MoE layers (one for a lazy model, none resident)."""
    found: dict[int, ExpertCache] = {}
    for layer in getattr(model, "layers", []):  # (tests wrap models in recorders without layers)
        cache = getattr(getattr(layer.ffn, "provider", None), "cache", None)
        if isinstance(cache, ExpertCache) and cache.reserve_bytes is not None:
            found[id(cache)] = cache
    return list(found.values())


class WorkingMemory:
    def __init__(self, model: Transformer, kv: KVCache, chunk: int) -> None:
        self.caches = expert_caches(model)
        self.chunk, self.per_token, self.heads, self.row_bytes, self.top_k = chunk, 0, 0, 0, 1
        if not self.caches:
            return
        try:
            self.per_token = kv.bytes_per_token()
        except NotImplementedError:
            pass
        self.heads = model.args.num_heads
        self.row_bytes = model.args.hidden_size * 4  # one fp32 hidden state
        self.top_k = max(1, model.args.top_k)

    @property
    def active(self) -> bool:
        return bool(self.caches)

    def need(self, tokens: int, job_tokens: int = 0) -> int:
        """Bytes of ``tokens`` cached tokens (a quarter more: caches grow by a quarter) plus a layer-major
        job of ``job_tokens`` (its hidden states and routed rows) and the attention's scratch."""
        kv = self.per_token * tokens * 5 // 4
        job = job_tokens * self.row_bytes * (ACT_COPIES + self.top_k)
        longest = max(tokens, job_tokens)
        scores = 3 * 4 * self.heads * min(self.chunk, longest) * longest  # fp32 scores, ~3 live copies
        return kv + job + min(ATTN_SCRATCH, scores)

    def most(self) -> int:
        """The working memory reachable: the reserve plus every slot above the caches' minimum."""
        return sum(c.reserve_bytes + (c.capacity - c.min_slots) * c.blob_size for c in self.caches)

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """PromptTooLong when one sequence's KV cache alone could not fit even with the expert cache at its
        minimum and the prefix cache's and runtime's shares of --ram counted; activations are transient and their
        estimate conservative (a 2,084-token prompt of the demo MoE measured 27 MiB of them, estimated 155),
        so they are lent for when they come, as far as the cache allows, but never refused on."""
        if not self.active:
            return
        kv = self.per_token * (prompt_tokens + max_tokens)
        # + the runtime reserve: an estimate with slack (the demo MoE's 2,084-token prompt peaked at 539 MiB
        # under --ram 680M, 141 MiB below it): refused only where the KV cache could not possibly fit
        room = self.most() + sum(c.prefix_bytes for c in self.caches) + RUNTIME_OVERHEAD
        if kv > room:
            raise PromptTooLong(
                f"a prompt of {prompt_tokens} tokens (+ {max_tokens} to generate) needs {kv / 2**20:.1f} MiB of KV "
                f"cache, but --ram leaves at most {room / 2**20:.1f} MiB for it even with the expert cache at its "
                "minimum: raise --ram or send a shorter prompt")

    def fit(self, seqs: list[Sequence], job_tokens: int) -> None:
        """Lend (or take back) expert-cache slots so that what ``seqs`` hold fits beside the cache."""
        if not self.active:
            return
        tokens = sum(len(s.prompt_ids) + len(s.output_ids) + 1 for s in seqs)
        excess = self.need(tokens, job_tokens)
        for cache in self.caches:
            excess -= cache.reserve_bytes
        for cache in self.caches:
            lend = max(0, math.ceil(excess / cache.blob_size))
            got = cache.limit(cache.capacity - lend)
            excess -= (cache.capacity - got) * cache.blob_size
