"""What the server holds: its settings, the model once loaded, the engine thread, metrics."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine.engine import Engine
from ..engine.prefix import open_prefix_cache
from ..kvcache.prefix_cache import PrefixCache
from ..layers.moe import ExpertProvider
from ..loading.experts import ExpertOptions
from ..loading.identity import model_identity
from ..loading.loader import LoadedModel, load_model
from ..loading.source import EMBEDDED
from ..tokenizer.tokenizer import Tokenizer
from .admission import Admission
from .engine_loop import EngineLoop
from .errors import APIError
from .generation import Generation, GenerationRequest
from .harmony import is_harmony, stop_token_ids
from .metrics import Metrics

log = logging.getLogger("moemesh.server")


@dataclass
class ServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    experts: ExpertOptions | None = None  # how MoE experts are held (resident, or lazy under --ram)
    kv: str = "dense"  # KV cache spec: dense | turboquant:BITS[:WINDOW]
    max_batch: int = 8
    max_prefill_tokens: int = 512
    queue_size: int = 64
    ctx: int | None = None
    quant: str = "auto"
    threads: int | None = None
    served_model_name: str | None = None
    prefix_cache: int | None = None  # bytes for reused prompt KV (None: auto, 0: off; engine/prefix.py)
    prompt_cache: str | None = None  # --prompt-cache DIR: the prefix cache's blocks also on disk
    prompt_cache_size: int = 8 * 2**30

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model if self.model in EMBEDDED else Path(self.model).name


class ServerState:
    """Loading -> ready (or failed). Everything but load() runs on the asyncio thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model_name = config.model_name
        self.status = "loading"  # loading | ready | failed
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.created = int(time.time())
        self.metrics = Metrics(self.model_name)
        self.admission = Admission(config.queue_size)
        self.loaded: LoadedModel | None = None
        self._tokenizer: Tokenizer | None = None
        self.engine_loop: EngineLoop | None = None
        self.context_length = 0
        self.providers: list[ExpertProvider] = []
        self.prefix_cache: PrefixCache | None = None
        self.kv_bytes_per_token = 0

    def load(self) -> None:
        """Blocking: load the model and start the engine thread (run off the event loop)."""
        import torch

        t0 = time.perf_counter()
        try:
            if self.config.threads:
                torch.set_num_threads(self.config.threads)
            quant = "fp32" if self.config.quant == "none" else self.config.quant
            loaded = self._load_model(quant)
            if loaded.tokenizer is None:
                raise APIError(500, f"{loaded.path}: no tokenizer found; the server needs one")
            self.context_length = self.config.ctx or loaded.args.max_position_embeddings
            tok = loaded.tokenizer  # Harmony's turn ends on <|return|> / <|call|>, not on <|end|>
            stops = stop_token_ids(tok) if is_harmony(tok) else frozenset(tok.eos_token_ids)
            cache = loaded.model.new_cache(self.config.kv)
            self.prefix_cache = self._prefix_cache(cache, loaded, quant)
            engine = Engine(loaded.model, stop_token_ids=stops,
                            max_batch=self.config.max_batch,
                            max_prefill_tokens=self.config.max_prefill_tokens, context_length=self.context_length,
                            cache=cache, prefix_cache=self.prefix_cache)
            self.providers = _providers(loaded)
            self.engine_loop = EngineLoop(engine)
            self.engine_loop.start()
            self.loaded, self._tokenizer = loaded, loaded.tokenizer
            self.load_seconds = time.perf_counter() - t0
            self.status = "ready"
        except Exception as exc:  # reported by /health and the serve command
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.status = "failed"
            log.error("model load failed: %s", self.load_error)

    def _prefix_cache(self, cache, loaded: LoadedModel, quant: str) -> PrefixCache | None:
        try:
            self.kv_bytes_per_token = cache.bytes_per_token()
        except NotImplementedError:  # a mesh pipeline's cache
            pass
        c = self.config
        identity = model_identity(loaded.path, quant, c.kv) if c.prompt_cache else None
        return open_prefix_cache(cache, c.prefix_cache, loaded.budget, identity, c.prompt_cache, c.prompt_cache_size)

    def _load_model(self, quant: str) -> LoadedModel:
        """The model the engine runs; ``moemesh mesh serve`` overrides this with a pipeline model."""
        return load_model(self.config.model, quant, experts=self.config.experts)

    def ready_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a 503 while the model is loading (or failed to)."""
        if self.status != "ready" or self._tokenizer is None:
            self.metrics.rejected[503] += 1
            detail = f": {self.load_error}" if self.load_error else ""
            raise APIError(503, f"model {self.model_name} is {self.status}{detail}", code="model_not_ready",
                           headers={"Retry-After": "1"})
        return self._tokenizer

    def start_generation(self, request: GenerationRequest, tool_id_prefix: str = "call_") -> Generation:
        tokenizer = self.ready_tokenizer()
        assert self.engine_loop is not None
        try:
            slot = self.admission.acquire()
        except APIError as exc:
            self.metrics.rejected[exc.status] += 1
            raise
        request.tool_id_prefix = tool_id_prefix
        generation = Generation(request, self.engine_loop, tokenizer, self.metrics, slot)
        generation.start()
        return generation

    def queue_sizes(self) -> tuple[int, int]:
        """(running, waiting): the engine's batch, and admitted requests not yet in it."""
        if self.engine_loop is None:
            return 0, 0
        running = self.engine_loop.num_running
        return running, max(self.engine_loop.num_waiting, self.admission.active - running)

    def expert_stats(self) -> list[dict]:
        stats = []
        for provider in self.providers:
            try:
                stats.append(dict(provider.stats()))
            except Exception as exc:  # a provider's bug must not break /metrics
                log.warning("ExpertProvider.stats() failed: %s", exc)
                stats.append({})
        return stats

    def shutdown(self) -> None:
        if self.engine_loop is not None:
            self.engine_loop.shutdown()
        if self.prefix_cache is not None and self.prefix_cache.store is not None:
            self.prefix_cache.store.flush(10.0)  # queued --prompt-cache files reach the disk


def _providers(loaded: LoadedModel) -> list[ExpertProvider]:
    """The distinct ExpertProviders behind the model's MoE layers (none for a dense model)."""
    seen: dict[int, ExpertProvider] = {}
    for layer in loaded.model.layers:
        provider = getattr(layer.ffn, "provider", None)
        if provider is not None:
            seen.setdefault(id(provider), provider)
    return list(seen.values())
