"""The engine thread in process, on the real SmolLM2 engine: a request whose batch step fails is
the only one that fails, the loop survives, and aborts leave the batch at once."""
from __future__ import annotations

import asyncio

import pytest
import torch

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.server.core.engine_loop import EngineLoop, RequestHandle, TokenEvent

POISON = 0  # a token id no chat prompt here contains: its presence makes the batch step fail


class PoisonedEngine(Engine):
    """The real engine, except that sampling fails for any batch holding a prompt with POISON in
    it: a stand-in for a bug that one request triggers deep inside a shared batch step."""

    def _sample(self, seqs, ready, logits):
        if any(POISON in s.prompt_ids for s in seqs):
            raise RuntimeError("poisoned batch")
        return super()._sample(seqs, ready, logits)


@pytest.fixture(scope="module")
def smol():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine thread runs beside the test's own; keep to one core each
    yield load_model("smollm2")
    torch.set_num_threads(threads)


def prompts(smol, n: int) -> list[list[int]]:
    tok = smol.tokenizer
    topics = ["the sea", "a cat", "robots", "winter"]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"One sentence about {t}."}]))
            for t in topics[:n]]


async def collect(handle: RequestHandle, tokens: list[int]) -> TokenEvent:
    """Read a request's events until it ends; tokens are appended as they come."""
    while True:
        event = await handle.events.get()
        if event.token is not None:
            tokens.append(event.token)
        if event.finished:
            return event


def test_one_failing_request_fails_alone_and_the_loop_survives(smol):
    params = SamplingParams(temperature=0, max_tokens=12)
    healthy_prompts = prompts(smol, 3)
    stops = frozenset(smol.tokenizer.eos_token_ids)
    reference = [s.output_ids for s in Engine(smol.model, stop_token_ids=stops).generate(healthy_prompts, params)]

    async def scenario():
        loop = EngineLoop(PoisonedEngine(smol.model, stop_token_ids=stops, max_batch=8))
        loop.start()
        try:
            ev_loop = asyncio.get_running_loop()
            handles = [RequestHandle(p, params, ev_loop) for p in healthy_prompts]
            outputs: list[list[int]] = [[] for _ in handles]
            tasks = [asyncio.ensure_future(collect(h, out)) for h, out in zip(handles, outputs)]
            for h in handles:
                loop.submit(h)
            while min(len(o) for o in outputs) < 3:  # the healthy ones are mid-generation
                await asyncio.sleep(0.01)
            poisoned = RequestHandle(healthy_prompts[0] + [POISON], params, ev_loop)
            loop.submit(poisoned)
            bad = await asyncio.wait_for(collect(poisoned, []), 60)
            ends = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            after = RequestHandle(healthy_prompts[1], params, ev_loop)  # the loop still serves
            after_tokens: list[int] = []
            loop.submit(after)
            after_end = await asyncio.wait_for(collect(after, after_tokens), 60)
            return loop, bad, ends, outputs, after_end, after_tokens
        finally:
            loop.shutdown()

    loop, bad, ends, outputs, after_end, after_tokens = asyncio.run(scenario())
    assert bad.finish_reason == "error" and "poisoned batch" in bad.error and not bad.error_is_client
    assert loop.step_failures >= 1
    assert all(e.error is None and e.finish_reason in ("stop", "length") for e in ends)
    assert outputs == reference  # restarted from prompt + tokens so far: the same greedy text
    assert after_end.finish_reason in ("stop", "length") and after_tokens == reference[1]


def test_abort_leaves_the_batch_and_ignore_eos(smol):
    stops = frozenset(smol.tokenizer.eos_token_ids)
    (prompt,) = prompts(smol, 1)

    async def scenario():
        loop = EngineLoop(Engine(smol.model, stop_token_ids=stops))
        loop.start()
        try:
            ev_loop = asyncio.get_running_loop()
            handle = RequestHandle(prompt, SamplingParams(temperature=0, max_tokens=5000), ev_loop)
            loop.submit(handle)
            tokens: list[int] = []
            while len(tokens) < 3:
                event = await handle.events.get()
                tokens += [event.token] if event.token is not None else []
            loop.abort(handle)
            end = await asyncio.wait_for(collect(handle, tokens), 10)
            await asyncio.sleep(0.2)
            running = loop.num_running
            # ignore_eos: exactly max_tokens even where the model would have ended its turn
            forced = RequestHandle(prompt, SamplingParams(temperature=0, max_tokens=40), ev_loop, ignore_eos=True)
            loop.submit(forced)
            forced_tokens: list[int] = []
            forced_end = await asyncio.wait_for(collect(forced, forced_tokens), 60)
            return end, running, forced_end, forced_tokens
        finally:
            loop.shutdown()

    end, running, forced_end, forced_tokens = asyncio.run(scenario())
    assert end.finish_reason == "abort" and running == 0
    assert forced_end.finish_reason == "length" and len(forced_tokens) == 40
