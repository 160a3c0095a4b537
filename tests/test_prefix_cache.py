"""Prefix caching (kvcache/prefix_cache.py, engine/prefix.py): exact logits with and without the
cache (dense, TurboQuant, DeepSeek's MLA latent), eviction under pressure, --ram accounting."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.prefix import open_prefix_cache
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import MoemeshError
from moemesh.experts.budget import PREFIX_AUTO_MAX, RUNTIME_OVERHEAD, plan_budget
from moemesh.kvcache.prefix_cache import BLOCK_META, PrefixCache, tensors_nbytes
from moemesh.loading.loader import load_model
from test_deepseek import configs as ds_configs
from test_deepseek import make_checkpoint as ds_checkpoint

B = 16  # block size of these tests
GREEDY = SamplingParams(temperature=0, max_tokens=6)


class Recorder(torch.nn.Module):
    """The model, with every step's logits kept (the engine only hands out sampled tokens)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.args, self.logits = model, model.args, []

    def forward(self, *a):
        out = self.model(*a)
        self.logits.append(out.clone())
        return out


def prompts(vocab: int, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """p1; p2 and p3 share p1's first 90 tokens, then differ."""
    g = torch.Generator().manual_seed(seed)
    p1 = torch.randint(3, vocab, (100,), generator=g).tolist()
    return p1, p1[:90] + torch.randint(3, vocab, (30,), generator=g).tolist(), \
        p1[:90] + torch.randint(3, vocab, (25,), generator=g).tolist()


def serve(model, kv: str, requests: list[list[int]], prefix: bool = True, max_prefill: int = 512,
          capacity: int = 2**30, params: SamplingParams = GREEDY):
    """Requests one after another on one engine -> [(tokens, logits per step, cached tokens)], cache."""
    rec = Recorder(model)
    cache = model.new_cache(kv)
    pc = PrefixCache(cache, capacity, B) if prefix else None
    engine = Engine(rec, cache=cache, prefix_cache=pc, max_prefill_tokens=max_prefill, prefill="chunked")  # the recorder sees forward calls
    out = []
    for ids in requests:
        rec.logits.clear()
        (seq,) = engine.generate([ids], params)
        out.append((seq.output_ids, list(rec.logits), seq.cached_tokens))
    return out, pc


def check_reuse(model, kv: str, bitwise: bool, atol: float = 0.0) -> None:
    """A hit's logits equal a cold run's. TurboQuant attends to a chunk's own tokens exactly, so its
    cold run splits the prompt where the hit ends (a chunk boundary a prefill may always have)."""
    p1, p2, p3 = prompts(model.args.vocab_size)
    (_, _, c1), (_, _, c2), (toks, logits, c3) = serve(model, kv, [p1, p2, p3])[0]
    assert c1 == 0 and c3 == 80  # 90 shared tokens: 5 whole blocks
    assert c2 == (80 if "turboquant" not in kv else 0)  # TurboQuant: no saved window at 80 until p2 splits there
    ((ref_toks, ref_logits, c),), _ = serve(model, kv, [p3], max_prefill=80)  # cold: an empty cache
    assert c == 0
    assert toks == ref_toks
    assert len(logits) == len(ref_logits) - 1  # the hit saved the prefix's chunk
    for a, b in zip(logits[::-1], ref_logits[::-1]):
        if bitwise:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("kv", ["dense", "turboquant:3.5", "turboquant:2.5:8"])
def test_dense_model_reuse_is_bit_exact(tiny_checkpoints, kv):
    model = load_model(str(tiny_checkpoints["llama-gqa"][1]), "fp32").model
    check_reuse(model, kv, bitwise=True)


@pytest.mark.parametrize("kv", ["dense", "turboquant:3"])
def test_moe_int4_reuse_is_bit_exact(tiny_checkpoints, kv):
    model = load_model(str(tiny_checkpoints["qwen3_moe-norm"][1]), "int4").model
    check_reuse(model, kv, bitwise=True)


def test_moe_fp32_reuse_within_tolerance(tiny_checkpoints):
    """fp32 experts run one matmul per expert over the tokens routed to it, and torch's fp32 matmul
    may round a row differently for a different row count; so the prefix's KV, computed in p1's
    chunk, can differ in the last bit from a cold run's (chunking alone does the same)."""
    model = load_model(str(tiny_checkpoints["olmoe"][1]), "fp32").model
    check_reuse(model, "dense", bitwise=False, atol=1e-5)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    ds_checkpoint(ds_configs()["v3-qlora-group-yarn"], d)
    return d


@pytest.mark.parametrize("kv", ["dense", "turboquant:3.5"])
def test_mla_latent_reuse_is_bit_exact(deepseek_dir, kv):
    model = load_model(str(deepseek_dir), "int4").model
    check_reuse(model, kv, bitwise=True)


@pytest.mark.parametrize("kv", ["dense", "turboquant:3.5", "turboquant:2:8", "turboquant:3:0"])
def test_restored_state_and_codes_equal_the_exporters(tiny_checkpoints, kv):
    """Export at 64 tokens, import into a new sequence, continue both with the same tokens: every
    buffer (TurboQuant: every code, norm and window entry) is bitwise the same. The exported
    blocks' codes of tokens still in the window equal those the sequence writes when it evicts them."""
    model = load_model(str(tiny_checkpoints["llama-gqa"][1]), "int4").model
    ids = torch.randint(0, 160, (120,), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(kv)

    def feed(sid: int, a: int, b: int) -> torch.Tensor:
        return model(ids[a:b], torch.arange(a, b), cache, BatchLayout([sid], [b - a]))

    cache.add_sequence(0)
    with torch.inference_mode():
        feed(0, 0, 64)
        blocks = cache.export_blocks(0, 0, 64, B)
        tail = cache.export_tail(0) if cache.needs_tail else None
        cache.add_sequence(1)
        assert cache.import_prefix(1, blocks, tail) == 64
        for a, b in ((64, 100), (100, 101), (101, 102), (102, 120)):
            assert torch.equal(feed(0, a, b), feed(1, a, b))
    s0, s1 = cache.seqs[0], cache.seqs[1]
    if kv == "dense":
        assert all(torch.equal(x[:, :120], y[:, :120]) for x, y in zip(s0.keys + s0.values, s1.keys + s1.values))
        return
    assert (s0.length, s0.coded) == (s1.length, s1.coded)
    for l0, l1 in zip(s0.layers, s1.layers):
        for name in ("k_codes", "v_codes", "k_norms", "v_norms"):
            x, y = getattr(l0.hist, name), getattr(l1.hist, name)
            assert torch.equal(x[..., : s0.coded], y[..., : s0.coded]), name
        assert l0.nw == l1.nw and torch.equal(l0.wk[:, : l0.nw], l1.wk[:, : l1.nw])
    later = cache.export_blocks(0, 0, 64, B)  # now every one of those tokens is coded by the sequence
    assert all(torch.equal(x[k], y[k]) for x, y in zip(blocks, later) for k in x)


def test_native_and_torch_encoders_export_the_same_codes(tiny_checkpoints, monkeypatch):
    model = load_model(str(tiny_checkpoints["llama-gqa"][1]), "int4").model
    ids = torch.randint(0, 160, (64,), generator=torch.Generator().manual_seed(4))
    out = []
    for native in (True, False):
        if not native:
            monkeypatch.setenv("MOEMESH_TQ_NATIVE", "0")
        cache = model.new_cache("turboquant:3.5")
        cache.add_sequence(0)
        with torch.inference_mode():
            model(ids, torch.arange(64), cache, BatchLayout([0], [64]))
        out.append(cache.export_blocks(0, 0, 64, B))
    if out[0][0]["k_codes"].shape != out[1][0]["k_codes"].shape:
        pytest.skip("native kernels unavailable")
    assert all(torch.equal(x[k], y[k]) for x, y in zip(*out) for k in x)


def test_generated_tokens_are_reused_by_the_next_turn(tiny_checkpoints):
    """An agent's next prompt repeats the previous answer: its blocks were inserted while decoding."""
    model = load_model(str(tiny_checkpoints["llama-gqa"][1]), "int4").model
    p1 = prompts(160)[0]
    longer = SamplingParams(temperature=0, max_tokens=20)  # decoding crosses the boundary at 112
    (first, _, _), = serve(model, "dense", [p1], params=longer)[0]
    turn2 = p1 + first + [5, 6, 7, 8, 9]
    results, pc = serve(model, "dense", [p1, turn2], params=longer)
    assert results[1][2] == (len(p1) + len(first) - 1) // B * B == 112  # the last sampled token has no KV yet
    ((ref, _, _),), _ = serve(model, "dense", [turn2], prefix=False, params=longer)
    assert results[1][0] == ref
    assert pc.summary()["hit_tokens"] == results[1][2]


def test_eviction_under_pressure_keeps_outputs_and_budget(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama-gqa"][1]), "int4").model
    block_bytes = model.new_cache("dense").bytes_per_token() * B
    p1, p2, p3 = prompts(160)
    others = [prompts(160, seed)[0] for seed in (7, 8, 9)]
    capacity = 9 * block_bytes  # fewer blocks than one request's prompt + answer
    order = [p1, *others, p1, p2, p3]
    results, pc = serve(model, "dense", order, capacity=capacity)
    assert pc.nbytes <= capacity and len(pc.blocks) <= 9
    assert pc.nbytes == sum(b.nbytes for b in pc.blocks.values())
    s = pc.summary()
    assert s["evicted_blocks"] > 0 and s["inserted_blocks"] - s["evicted_blocks"] == len(pc.blocks)
    cold = [serve(model, "dense", [p], prefix=False)[0][0][0] for p in order]
    assert [r[0] for r in results] == cold  # outputs never depend on what was evicted
    assert results[4][2] == 0  # p1 again: its blocks were evicted by the three other prompts'
    assert results[5][2] == 80  # p2 right after p1: the shared blocks are the most recent ones


def test_lru_evicts_leaves_first_and_keeps_recent_chains(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama-gqa"][1]), "int4").model
    cache = model.new_cache("dense")
    fake = {"k": torch.zeros(2, 2, B, 12), "v": torch.zeros(2, 2, B, 12)}
    per_block = tensors_nbytes(fake) + BLOCK_META  # its tensors and what holding it costs
    pc = PrefixCache(cache, 6 * per_block, B)
    a = list(range(3 * B))
    b = list(range(2 * B)) + [7] * B  # shares a's first two blocks
    c = [9] * (3 * B)
    ka, kb, kc = [], [], []
    pc.insert(a, ka, 0, [fake] * 3)
    pc.insert(b, kb, 0, [fake] * 3)  # 4 distinct blocks so far
    assert len(pc.blocks) == 4
    pc.lookup(a, 3 * B + 1, [])  # a's chain is now the most recent
    pc.insert(c, kc, 0, [fake] * 3)  # 7 blocks > 6: one goes - b's leaf, not a shared parent
    assert kb[2] not in pc.blocks and ka[0] in pc.blocks and ka[1] in pc.blocks and ka[2] in pc.blocks
    assert pc.lookup(b, 3 * B + 1, []).tokens == 2 * B
    assert pc.nbytes <= 6 * per_block


def test_whole_prompt_cached_still_computes_its_last_token(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama-gqa"][1]), "int4").model
    p = prompts(160)[0][:96]  # exactly 6 blocks
    results, _ = serve(model, "dense", [p, p])
    assert results[1][2] == 80 and results[1][0] == results[0][0]


def test_budget_takes_the_prefix_cache_out_of_ram():
    mib = 2**20
    ram, trunk, kv, blob = 2048 * mib, 100 * mib, 64 * mib, 2 * mib
    caches = ram - trunk - kv - RUNTIME_OVERHEAD
    off = plan_budget(ram, trunk, kv, blob, 8)
    given = plan_budget(ram, trunk, kv, blob, 8, prefix_cache=300 * mib)
    assert off.prefix_cache == 0 and given.prefix_cache == 300 * mib
    assert given.expert_cache == off.expert_cache - 300 * mib
    # auto: what every expert leaves when they all fit ...
    small = plan_budget(ram, trunk, kv, blob, 8, prefix_cache=None, all_experts=100)
    assert small.prefix_cache == min(PREFIX_AUTO_MAX, caches - 100 * blob) and small.slots >= 100
    # ... else a tenth of the caches' share
    big = plan_budget(ram, trunk, kv, blob, 8, prefix_cache=None, all_experts=10_000)
    assert big.prefix_cache == int(0.10 * caches)
    assert big.prefix_cache + big.expert_cache <= caches
    with pytest.raises(MoemeshError, match="prefix cache 1490 MiB"):
        plan_budget(ram, trunk, kv, blob, 8, prefix_cache=1490 * mib)
    tight = plan_budget(RUNTIME_OVERHEAD + trunk + kv + 8 * blob, trunk, kv, blob, 8, prefix_cache=None, all_experts=10_000)
    assert tight.prefix_cache == 0 and tight.slots == 8  # auto never takes what one layer needs


def test_open_prefix_cache_capacity(tiny_checkpoints):
    model = load_model(str(tiny_checkpoints["llama-gqa"][1]), "int4").model
    kv = model.new_cache("dense")
    assert open_prefix_cache(kv, 0) is None
    assert open_prefix_cache(kv, None).capacity == PREFIX_AUTO_MAX
    assert open_prefix_cache(kv, 5 * 2**20).capacity == 5 * 2**20
    budget = plan_budget(2**31, 2**20, 2**20, 2**20, 1, prefix_cache=7 * 2**20)
    assert open_prefix_cache(kv, None, budget).capacity == 7 * 2**20


def test_layer_major_prefill_inserts_its_blocks(tiny_checkpoints, tmp_path):
    """A long prompt prefilled layer-major (lazy experts) leaves its blocks in the prefix cache when its
    prefill ends, like a chunked prefill (they were only inserted by later decode steps: a request that
    stopped at its first token left nothing), and the next turn's hit gives the cold run's tokens."""
    from moemesh.loading.convert import convert
    from moemesh.loading.experts import ExpertOptions

    store = convert(tiny_checkpoints["qwen3_moe-norm"][1], tmp_path / "s", "int4", progress=False)
    model = load_model(str(store), experts=ExpertOptions(slots=6)).model
    p1, p2, _ = prompts(model.args.vocab_size)
    cache = model.new_cache("dense")
    pc = PrefixCache(cache, 2**30, B)
    engine = Engine(model, cache=cache, prefix_cache=pc, max_prefill_tokens=16)  # prompts > 16: layer-major
    assert engine.layer_major
    (a,) = engine.generate([p1], SamplingParams(temperature=0, max_tokens=1))  # no decode step inserts them
    (b,) = engine.generate([p2], GREEDY)
    assert a.cached_tokens == 0 and b.cached_tokens == 80  # 90 shared tokens: 5 whole blocks
    (cold,) = Engine(model, max_prefill_tokens=16).generate([p2], GREEDY)
    assert b.output_ids == cold.output_ids
