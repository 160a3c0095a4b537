"""Layer-major prefill (engine/layer_prefill.py) beside chunked prefill: the same logits and tokens,
each expert read once per layer per prompt, other sequences decoding while a long prompt fills."""
from __future__ import annotations

import pytest
import torch

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model

PROMPT = [(7 * i + 3) % 150 + 5 for i in range(150)]  # 150 tokens (vocab 160): 10 chunks of 16
CHUNK = 16


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    return convert(tiny_checkpoints["qwen3_moe-norm"][1], tmp_path_factory.mktemp("lp") / "store", "int4", progress=False)


def first_logits(model, prefill: str, prompt: list[int] = PROMPT) -> tuple[torch.Tensor, list[int]]:
    """Logits of the prompt's first sampled position (captured from the sampler) and 8 greedy tokens."""
    eng = Engine(model, max_prefill_tokens=CHUNK, prefill=prefill)
    seen: list[torch.Tensor] = []
    sample = eng.sampler.sample

    def spy(logits, *args, **kwargs):
        seen.append(logits.clone())
        return sample(logits, *args, **kwargs)

    eng.sampler.sample = spy  # type: ignore[method-assign]
    assert eng.layer_major == (prefill == "layer")
    seq = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0]
    return seen[0], seq.output_ids


@pytest.mark.parametrize("experts", [None, ExpertOptions(slots=8), ExpertOptions(slots=1000)])
def test_layer_major_equals_chunked(store, experts):
    """Resident experts and lazy ones (a cache holding one token's picks, and one holding everything):
    layer-major prefill gives chunked prefill's logits bit for bit, and the same greedy tokens."""
    model = load_model(str(store), experts=experts).model
    ref, ref_tokens = first_logits(model, "chunked")
    got, tokens = first_logits(model, "layer")
    assert torch.equal(got, ref)
    assert tokens == ref_tokens


def test_layer_major_reads_each_expert_once_per_layer(store):
    """Under a budget too small for a layer's experts, chunked prefill re-reads experts chunk after chunk;
    layer-major reads each routed expert once per layer (misses <= experts used per layer)."""
    misses = {}
    for prefill in ("chunked", "layer"):
        loaded = load_model(str(store), experts=ExpertOptions(slots=8, prefetch=False))
        eng = Engine(loaded.model, max_prefill_tokens=CHUNK, prefill=prefill)
        eng.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1))
        misses[prefill] = loaded.provider.stats()["misses"]
    args = loaded.args
    assert misses["layer"] <= len(args.moe_layers) * args.num_experts
    assert misses["chunked"] > 2 * misses["layer"], misses


def test_auto_picks_layer_major_only_for_streamed_experts(store):
    resident = load_model(str(store)).model
    lazy = load_model(str(store), experts=ExpertOptions(slots=8)).model
    assert not Engine(resident).layer_major and Engine(lazy).layer_major
    assert not Engine(lazy, prefill="chunked").layer_major
    assert not Engine(lazy, cache=lazy.new_cache("turboquant:3.5")).layer_major  # its coding window is per sequence
    with pytest.raises(ValueError, match="prefill must be"):
        Engine(lazy, prefill="sideways")


def test_decodes_continue_during_a_layer_major_prefill(store):
    """A short request decodes a token on every step the long prompt spends on its layers, and both
    give the tokens they give alone."""
    model = load_model(str(store), experts=ExpertOptions(slots=8)).model
    short = [11, 12, 13]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    alone = [Engine(model, max_prefill_tokens=CHUNK).generate([p], params)[0].output_ids for p in (short, PROMPT)]
    eng = Engine(model, max_prefill_tokens=CHUNK)
    s_short = eng.add_request(short, params)
    s_long = eng.add_request(PROMPT, params)
    steps_while_filling = 0
    while eng.has_work():
        eng.step()
        if s_long.in_prefill and s_short.output_ids:
            steps_while_filling += 1
    assert steps_while_filling >= 1 and len(s_short.output_ids) == 6
    assert [s_short.output_ids, s_long.output_ids] == alone


@pytest.mark.parametrize("family,name", [("gpt_oss", "gqa-alt"), ("deepseek", "v3-qlora-group-yarn")])
def test_layer_major_equals_chunked_sinks_windows_and_mla(tmp_path, family, name):
    """gpt-oss (attention sinks, a sliding window of 4 across chunk boundaries) and DeepSeek-V3 (MLA's
    latent cache), lazy experts from a store: layer-major == chunked, bit for bit."""
    import importlib

    mod = importlib.import_module(f"test_{family}")
    mod.make_checkpoint(mod.configs()[name], tmp_path / "hf")
    st = convert(tmp_path / "hf", tmp_path / "store", "int4", progress=False)
    model = load_model(str(st), experts=ExpertOptions(slots=4)).model
    prompt = [t % mod.V for t in PROMPT[:70]]
    (ref, ref_tokens), (got, tokens) = (first_logits(model, p, prompt) for p in ("chunked", "layer"))
    assert torch.equal(got, ref) and tokens == ref_tokens


def test_block_format_experts_take_their_tokens_in_one_call(tmp_path, monkeypatch):
    """Q4_K experts read from a GGUF (benchkit/synth/whole.py's tiny Qwen3-MoE): layer-major prefill
    computes each expert over all its tokens at once (its rows' bits do not depend on the rows beside
    them) and still gives chunked prefill's logits bit for bit."""
    from moemesh.benchkit.synth import whole, whole_write
    from moemesh.layers.mlp import GatedMLP

    path = whole_write.write(whole.tiny_spec("qwen3-30b-a3b"), tmp_path, progress=False)
    model = load_model(str(path), "auto", experts=ExpertOptions(slots=6)).model
    ref, ref_tokens = first_logits(model, "chunked")
    sizes: list[int] = []
    real = GatedMLP.forward
    monkeypatch.setattr(GatedMLP, "forward", lambda self, x: sizes.append(x.shape[0]) or real(self, x))
    got, tokens = first_logits(model, "layer")
    assert torch.equal(got, ref) and tokens == ref_tokens
    assert max(sizes) > CHUNK  # an expert's tokens from several chunks in one call
