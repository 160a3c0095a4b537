"""What the server holds: its settings, the model once loaded, the engine thread, metrics."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ...engine.engine import Engine
from ...engine.prefix import open_prefix_cache
from ...kvcache.prefix_cache import PrefixCache
from ...layers.moe import ExpertProvider
from ...loading.experts import ExpertOptions
from ...loading.kv_identity import kv_identity
from ...loading.loader import LoadedModel, load_model
from ...loading.sampling_defaults import SamplingDefaults, read_sampling_defaults
from ...loading.source import EMBEDDED
from ...models.qwen3_5_vision import ImageInput
from ...tokenizer.formats.harmony import is_harmony, stop_token_ids
from ...tokenizer.grammar import GrammarCompiler
from ...tokenizer.tokenizer import Tokenizer
from ..common.errors import APIError
from ..common.limits import ConnectionLimits
from .admission import Admission
from .engine_loop import EngineLoop
from .generation import Generation, GenerationRequest
from .images import ImagePolicy
from .metrics import Metrics

log = logging.getLogger("moemesh.server")
T = TypeVar("T")
IMAGE_BODY_BYTES = 64 << 20  # base64 images of a vision model's request, beyond the text's room
PROMPT_THREADS = 2  # templating + tokenizing off the event loop, at most this many prompts at once


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
    model_aliases: tuple[str, ...] = ()  # more names requests may use (--served-model-name NAME ALIAS...)
    accept_any_model: bool = False  # serve whatever model name a request gives (--accept-any-model)
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    prefix_cache: int | None = None  # bytes for reused prompt KV (None: auto, 0: off; engine/prefix.py)
    prompt_cache: str | None = None  # --prompt-cache DIR: the prefix cache's blocks also on disk
    prompt_cache_size: int = 8 * 2**30
    images: ImagePolicy = field(default_factory=ImagePolicy)  # where image inputs may come from

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model if self.model in EMBEDDED else Path(self.model).name

    def accepted_names(self) -> frozenset[str]:
        """The names a request may give in ``model``: the served name and aliases, and the model
        argument as given, as its basename, and (for a file) its basename without the suffix."""
        path = Path(self.model)
        return frozenset({self.model_name, *self.model_aliases, self.model, self.model.rstrip("/"), path.name,
                          path.stem if path.suffix == ".gguf" else path.name})


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
        self.max_token_chars = 0  # characters in the vocabulary's longest token (the cheap length check)
        self.providers: list[ExpertProvider] = []
        self._accepted_names = config.accepted_names()
        self._prompt_pool = ThreadPoolExecutor(PROMPT_THREADS, thread_name_prefix="moemesh-prompt")
        self.prefix_cache: PrefixCache | None = None
        self.kv_bytes_per_token = 0
        self.stop_ids: frozenset[int] = frozenset()  # the engine's end-of-turn tokens
        self._grammars: GrammarCompiler | None = None  # made on the first structured request (~1 s)
        self._grammars_lock = asyncio.Lock()
        self.sampling_defaults = SamplingDefaults()  # the model's recommended sampling (fields a request omits)

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
            self.max_token_chars = max(map(len, loaded.tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)
            tok = loaded.tokenizer  # Harmony's turn ends on <|return|> / <|call|>, not on <|end|>
            stops = stop_token_ids(tok) if is_harmony(tok) else frozenset(tok.eos_token_ids)
            self.stop_ids = stops
            cache = loaded.model.new_cache(self.config.kv)
            self.prefix_cache = self._prefix_cache(cache, loaded, quant)
            engine = Engine(loaded.model, stop_token_ids=stops,
                            max_batch=self.config.max_batch,
                            max_prefill_tokens=self.config.max_prefill_tokens, context_length=self.context_length,
                            cache=cache, prefix_cache=self.prefix_cache)
            self.providers = _providers(loaded)
            self.sampling_defaults = read_sampling_defaults(loaded.path)
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
        identity = kv_identity(loaded.path, quant, c.kv) if c.prompt_cache else None
        return open_prefix_cache(cache, c.prefix_cache, loaded.budget, identity, c.prompt_cache, c.prompt_cache_size)

    def _load_model(self, quant: str) -> LoadedModel:
        """The model the engine runs; ``moemesh mesh serve`` overrides this with a pipeline model."""
        return load_model(self.config.model, quant, experts=self.config.experts)

    def check_model(self, name: str | None) -> None:
        """404 ``model_not_found`` for a model this server does not serve (as OpenAI and vLLM do)."""
        if name is None or self.config.accept_any_model or name in self._accepted_names:
            return
        self.metrics.rejected[404] += 1
        raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r} "
                       "(start it with --served-model-name NAME ALIAS... to accept other names)",
                       param="model", code="model_not_found")

    def body_limit(self) -> int:
        """Bytes a request body may have (413 beyond): room for a full-context prompt by default,
        and for a few base64 images beside it when the model takes images."""
        limit = self.config.limits.body_limit(self.context_length or self.config.ctx or 0)
        if self.config.limits.max_body_bytes is None and self.loaded is not None and self.loaded.images is not None:
            limit += IMAGE_BODY_BYTES
        return limit

    def image_input(self, where: str) -> ImageInput:
        """The model's image path, or a 400 naming the request's image (``where``) when it takes none."""
        images = self.loaded.images if self.loaded is not None else None
        if images is None:
            raise APIError(400, f"{where}: model {self.model_name} does not take images (no vision tower)",
                           param=where)
        return images

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run CPU-heavy request work (templating, tokenizing) on the prompt threads, so that a huge
        prompt never stalls the event loop (/health, streams of other requests)."""
        return await asyncio.get_running_loop().run_in_executor(self._prompt_pool, work)

    def tokenizer_for(self, model: str | None) -> Tokenizer:
        """A generation route's first step: 404 for a model not served, 503 while loading, else the tokenizer."""
        self.check_model(model)
        return self.ready_tokenizer()

    def ready_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a 503 while the model is loading (or failed to)."""
        if self.status != "ready" or self._tokenizer is None:
            self.metrics.rejected[503] += 1
            detail = f": {self.load_error}" if self.load_error else ""
            raise APIError(503, f"model {self.model_name} is {self.status}{detail}", code="model_not_ready",
                           headers={"Retry-After": "1"})
        return self._tokenizer

    async def grammar_compiler(self) -> GrammarCompiler:
        """The model's vocabulary made ready for grammars, built once off the event loop."""
        tokenizer = self.ready_tokenizer()
        async with self._grammars_lock:
            if self._grammars is None:
                self._grammars = await self.off_loop(lambda: GrammarCompiler(tokenizer, self.stop_ids))
        return self._grammars

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

    def extra_metrics(self) -> str:
        """More Prometheus lines for /metrics (the mesh API node: per-peer calls, latency, bytes)."""
        return ""

    def shutdown(self) -> None:
        if self.engine_loop is not None:
            self.engine_loop.shutdown()
        self._prompt_pool.shutdown(wait=False, cancel_futures=True)
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
