"""Engine: continuous batching over one model. ``step()`` = schedule -> forward -> sample -> finish.

Sequences join and leave the running batch at every step; prompts are fed in chunks of at most
``max_prefill_tokens`` so one long prompt never stalls the running decodes for long. When experts are
streamed from disk (a lazy provider), a prompt longer than one chunk is prefilled layer-major instead
(engine/layer_prefill.py: each expert read once per prompt): one layer per step, with the other
sequences' decode steps in between.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..batch import BatchLayout
from ..errors import PromptTooLong
from ..kvcache.base import KVCache
from ..kvcache.prefix_cache import PrefixCache
from ..models.media import Media
from ..models.transformer import Transformer
from ..tokenizer.grammar import Matcher
from .constraints import fill_bitmasks
from .decode_plan import PlannedDecode
from .layer_prefill import LayerMajorPrefill, eligible
from .media import has_media, media_inputs
from .memory import WorkingMemory
from .prefix import PrefixReuse
from .sampler import Sampler, make_generator
from .sampling_params import SamplingParams
from .sequence import Sequence, Status


@dataclass
class StepOutput:
    seq: Sequence
    new_token: int | None  # None while the prompt is still being prefilled
    finished: bool


class Engine:
    def __init__(
        self,
        model: Transformer,
        stop_token_ids: frozenset[int] = frozenset(),
        max_batch: int = 16,
        max_prefill_tokens: int = 512,
        context_length: int | None = None,
        cache: KVCache | None = None,
        compiled: bool = False,
        prefill: str = "auto",
        prefix_cache: PrefixCache | None = None,
        planned: bool = True,
    ) -> None:
        """prefill: "chunked", "layer" (layer-major for prompts longer than one chunk, where the cache
        allows) or "auto" (layer-major when experts are streamed from disk).
        prefix_cache: reuse KV blocks of prompts (and outputs) seen before (engine/prefix.py);
        it must have been made for ``cache``. planned: one sequence's decode steps through
        engine/decode_plan.py (False: the modules' forward, the reference)."""
        if prefill not in ("auto", "chunked", "layer"):
            raise ValueError(f"prefill must be auto, chunked or layer, got {prefill!r}")
        self.model = model
        # opt-in: one sequence decoding one token runs as one compiled graph (engine/compiled.py)
        self.compiled = None
        if compiled:
            from .compiled import CompiledDecode

            self.compiled = CompiledDecode(model)
        # one sequence's decode token with the attention blocks as pre-bound C calls (engine/decode_plan.py)
        planned = PlannedDecode(model) if planned and isinstance(model, Transformer) else None
        self.planned = planned if planned is not None and planned.active else None
        self.cache = cache if cache is not None else model.new_cache()  # e.g. model.new_cache("turboquant:3.5")
        if prefix_cache is not None and prefix_cache.kv is not self.cache:
            raise ValueError("the prefix cache was made for another KV cache")
        self.prefix = PrefixReuse(prefix_cache, self.cache) if prefix_cache is not None else None
        self.sampler = Sampler()
        self.stop_token_ids = stop_token_ids
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.context_length = context_length or model.args.max_position_embeddings
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._next_id = 0
        if prefill == "chunked":
            self.layer_major = False
        else:
            self.layer_major = self.cache.supports_starts if prefill == "layer" else eligible(model, self.cache)
        self.job: LayerMajorPrefill | None = None
        self._job_seq: Sequence | None = None
        self.memory = WorkingMemory(model, self.cache, max_prefill_tokens)  # long prompts' KV and activations under --ram

    def add_request(self, prompt_ids: list[int], params: SamplingParams, media: Media | None = None,
                    grammar: Matcher | None = None) -> Sequence:
        """media: the prompt's images (models/qwen3_5_vision.ImageInput.prepare), their tokens in prompt_ids.
        grammar: what the output may be (tokenizer/grammar.py); each sample is masked by it and advances it."""
        params.validate()
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise PromptTooLong(
                f"prompt has {len(prompt_ids)} tokens but the context window is {self.context_length}"
            )
        self.memory.check(len(prompt_ids), params.max_tokens or 0)
        seq = Sequence(self._next_id, list(prompt_ids), params, make_generator(params.seed), self.stop_token_ids)
        seq.media = media
        seq.grammar = grammar
        self._next_id += 1
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            self._finish(seq, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _schedule(self) -> list[Sequence]:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.pop(0)
            seq.status = Status.RUNNING
            self.cache.add_sequence(seq.seq_id)
            if self.prefix is not None and seq.media is None:  # image tokens are placeholders: their KV is not theirs
                self.prefix.restore(seq)
            self.running.append(seq)
        return list(self.running)

    def step(self) -> list[StepOutput]:
        seqs = self._schedule()
        if not seqs:
            self.memory.fit([], 0)  # everything finished: the expert cache takes its slots back
            return []
        if self.memory.active:  # what this step's sequences will hold, before they allocate it
            job = self.job.n if self.job is not None else max(
                (len(s.prompt_ids) - s.num_computed for s in seqs if self.layer_major), default=0)
            self.memory.fit(seqs, job)
        outputs = self._layer_major_step(seqs)  # the job's sequence sits out the rest of this step
        busy = {id(o.seq) for o in outputs}
        seqs = [s for s in seqs if id(s) not in busy and s is not self._job_seq and s.status is Status.RUNNING]
        if not seqs:
            return outputs
        budget = self.max_prefill_tokens
        chunks = []
        for seq in seqs:
            if self.prefix is not None and seq.in_prefill and seq.media is None:
                chunk = self.prefix.chunk(seq, budget)  # ends on a block boundary
            else:
                chunk = seq.next_chunk(budget if seq.in_prefill else 1)
            if seq.in_prefill:
                budget = max(1, budget - len(chunk))
            chunks.append(chunk)
        tokens = torch.tensor([t for c in chunks for t in c], dtype=torch.long)  # [T]
        positions = torch.tensor(
            [p for s, c in zip(seqs, chunks) for p in range(s.num_computed, s.num_computed + len(c))], dtype=torch.long
        )
        layout = BatchLayout([s.seq_id for s in seqs], [len(c) for c in chunks])
        was_prefill = [s.in_prefill for s in seqs]
        t0 = time.perf_counter()
        logits = None
        if has_media(seqs):  # images: their features at the placeholders, M-RoPE positions
            positions, embeds = media_inputs(self.model, seqs, chunks, tokens)
            logits = self.model(tokens, positions, self.cache, layout, embeds=embeds)  # [B, V]
        if logits is None and self.compiled is not None:
            logits = self.compiled.maybe_step(chunks, was_prefill, layout.seq_ids, self.cache)
        if logits is None and self.planned is not None:
            logits = self.planned.maybe_step(chunks, was_prefill, layout.seq_ids, self.cache)
        if logits is None:
            logits = self.model(tokens, positions, self.cache, layout)  # [B, V]
        for seq, chunk in zip(seqs, chunks):
            seq.num_computed += len(chunk)
        if self.prefix is not None:
            plain = [(s, p) for s, p in zip(seqs, was_prefill) if s.media is None]
            self.prefix.after_step([s for s, _ in plain], [p for _, p in plain])  # before _sample frees finished sequences
        ready = [i for i, s in enumerate(seqs) if not s.in_prefill]
        outputs = self._sample(seqs, ready, logits)
        elapsed = time.perf_counter() - t0
        for seq, prefill in zip(seqs, was_prefill):  # charge the step to the phase each was in
            if prefill:
                seq.prefill_seconds += elapsed
            else:
                seq.decode_seconds += elapsed
        done = {id(o.seq) for o in outputs}
        outputs += [StepOutput(s, None, False) for s in seqs if id(s) not in done]
        return outputs

    def _layer_major_step(self, seqs: list[Sequence]) -> list[StepOutput]:
        """Start a layer-major job for a long prompt (one at a time) and advance it one layer;
        when its last layer is done, sample its first token."""
        if self.job is None and self.layer_major:
            seq = next((s for s in seqs if len(s.prompt_ids) - s.num_computed > self.max_prefill_tokens
                        and s.media is None), None)  # prompts with images keep chunked prefill
            if seq is not None:
                self.job = LayerMajorPrefill(self.model, self.cache, seq.seq_id, seq.prompt_ids[seq.num_computed:],
                                             seq.num_computed, self.max_prefill_tokens)
                self._job_seq = seq
        if self.job is None or self._job_seq is None:
            return []
        seq, t0 = self._job_seq, time.perf_counter()
        self.job.step()
        if not self.job.done:
            seq.prefill_seconds += time.perf_counter() - t0
            return [StepOutput(seq, None, False)]
        logits = self.job.finish()  # [1, V]
        seq.num_computed = len(seq.prompt_ids)
        self.job, self._job_seq = None, None
        if self.prefix is not None:  # the prompt's blocks, as a chunked prefill inserts them (before sampling)
            self.prefix.after_step([seq], [True])
        outputs = self._sample([seq], [0], logits)
        seq.prefill_seconds += time.perf_counter() - t0
        return outputs

    def _sample(self, seqs: list[Sequence], ready: list[int], logits: torch.Tensor) -> list[StepOutput]:
        if not ready:
            return []
        rows = [seqs[i] for i in ready]
        bitmasks = None
        if any(s.grammar is not None for s in rows):
            t0 = time.perf_counter()
            bitmasks = fill_bitmasks([s.grammar for s in rows], logits.shape[1])
            spent = time.perf_counter() - t0
            for s in rows:
                if s.grammar is not None:
                    s.grammar_seconds += spent
        result = self.sampler.sample(
            logits[ready], [s.params for s in rows], [s.prompt_ids for s in rows],
            [s.output_ids for s in rows], [s.generator for s in rows], bitmasks,
        )
        now = time.perf_counter()
        outputs = []
        for j, seq in enumerate(rows):
            token = result.token_ids[j]
            seq.output_ids.append(token)
            seq.output_logprobs.append(result.logprobs[j])
            if result.top_logprobs is not None:
                seq.output_top_logprobs.append(result.top_logprobs[j])
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.grammar is not None:
                t0 = time.perf_counter()
                seq.grammar.advance(token)
                seq.grammar_seconds += time.perf_counter() - t0
            reason = self._stop_reason(seq, token)
            if reason:
                self._finish(seq, reason)
            outputs.append(StepOutput(seq, token, reason is not None))
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.stop_token_ids:
            return "stop"
        if seq.grammar is not None and seq.grammar.done and token in self.stop_token_ids:
            return "stop"  # the grammar's end (an end-of-turn token it allowed), also under ignore_eos
        if len(seq.output_ids) >= seq.params.max_tokens:
            return "length"
        if len(seq.prompt_ids) + len(seq.output_ids) >= self.context_length:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq is self._job_seq:  # aborted mid layer-major prefill
            self.job, self._job_seq = None, None
        if self.prefix is not None:
            self.prefix.forget(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.cache.free_sequence(seq.seq_id)
            self.memory.fit(self.running, self.job.n if self.job is not None else 0)  # the cache takes slots back
        if seq in self.waiting:
            self.waiting.remove(seq)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
        on_token: Callable[[StepOutput], None] | None = None, media: list[Media | None] | None = None,
    ) -> list[Sequence]:
        """Run prompts to completion together (continuous batching), in order of the prompts;
        media[i]: prompt i's images (see add_request)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        mlist = media or [None] * len(prompts)
        seqs = [self.add_request(p, sp, m) for p, sp, m in zip(prompts, plist, mlist)]
        while self.has_work():
            for out in self.step():
                if on_token is not None and out.new_token is not None:
                    on_token(out)
        return seqs
