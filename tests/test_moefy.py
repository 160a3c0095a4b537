"""MoEfication: partition exactness, transformers parity of the moefied checkpoint, lazy == resident."""
from __future__ import annotations

import json

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import MoemeshError
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from moemesh.moefy.cluster import balanced_kmeans, neuron_features
from moemesh.moefy.pipeline import MoefyOptions, moefy
from moemesh.moefy.router_fit import fit_router, routing_error, topk_mask
from moemesh.moefy.split import DenseFFN, expert_outputs, members, split_experts
from tiny import V, make_checkpoint


def tiny_llama():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=V, num_hidden_layers=2, max_position_embeddings=256, hidden_size=48,
                       intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense-llama")
    make_checkpoint(tiny_llama(), d, seed=3)
    return d


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def logits(model, tokens: list[int]) -> torch.Tensor:
    cache = model.new_cache()
    cache.add_sequence(0)
    return model(torch.tensor(tokens), torch.arange(len(tokens)), cache, BatchLayout([0], [len(tokens)]), all_logits=True)


def test_sum_of_experts_is_the_dense_ffn():
    g = torch.Generator().manual_seed(0)
    ffn = DenseFFN(torch.randn(64, 24, generator=g), torch.randn(64, 24, generator=g), torch.randn(24, 64, generator=g))
    x = torch.randn(10, 24, generator=g)
    labels = torch.randperm(64, generator=g) % 8  # an arbitrary equal partition
    experts = split_experts(ffn, labels, 8)
    total = sum(e.forward(x) for e in experts)
    torch.testing.assert_close(total, ffn.forward(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(expert_outputs(ffn.hidden(x), ffn.down, members(labels, 8)).sum(0), ffn.forward(x),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        members(torch.tensor([0, 0, 0, 1]), 2)  # unequal sizes are refused


def test_balanced_kmeans_recovers_coactive_groups():
    """4 planted groups of 6 neurons, each group firing on its own tokens: recovered exactly, equal sizes."""
    g = torch.Generator().manual_seed(1)
    truth = torch.randperm(24, generator=g) % 4
    h = torch.randn(200, 24, generator=g) * 0.05
    token_group = torch.arange(200) % 4
    h += (token_group[:, None] == truth[None, :]).float() * (1 + torch.rand(200, 24, generator=g))
    labels = balanced_kmeans(neuron_features(h, torch.ones(3, 24), active=0.25), 4, seed=0)
    assert torch.bincount(labels).tolist() == [6, 6, 6, 6]
    for c in range(4):  # each found cluster is one planted group
        assert len(set(truth[labels == c].tolist())) == 1


def test_router_fit_beats_random_routing():
    """Expert norms that depend linearly on x: the fitted router's choice is close to the oracle's."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 16, generator=g)
    w = torch.randn(6, 16, generator=g)
    y = torch.randn(6, 400, 8, generator=g)
    y = y / y.norm(dim=2, keepdim=True) * (x @ w.T).exp().T[:, :, None]  # ||y_e|| = exp(w_e . x)
    norms = y.norm(dim=2).T
    router = fit_router(x, norms)
    learned = routing_error(y, topk_mask(x @ router.T, 2))
    oracle = routing_error(y, topk_mask(norms, 2))
    random = routing_error(y, topk_mask(torch.rand(400, 6, generator=g), 2))
    assert oracle <= learned < random


def test_top_k_all_equals_dense(dense_dir, tmp_path):
    """With top_k == experts every expert runs and the MoE is the dense model (fp32 tolerance)."""
    out = moefy(str(dense_dir), tmp_path / "moe", MoefyOptions(experts=4, top_k=4, router_scale=1e-6, calib_tokens=256),
                progress=False)
    moe = load_model(str(out), "fp32")
    assert moe.args.model_type == "mixtral" and moe.args.num_experts == 4 and moe.args.moe_intermediate_size == 24
    dense = load_model(str(dense_dir), "fp32").model
    tokens = ids(5, 20)
    torch.testing.assert_close(logits(moe.model, tokens), logits(dense, tokens), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def moe_dir(dense_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "moe"
    return moefy(str(dense_dir), out, MoefyOptions(experts=8, top_k=2, calib_tokens=512), progress=False)


def test_transformers_loads_moefied_and_matches_engine(moe_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.tie_word_embeddings
    ours = load_model(str(moe_dir), "fp32").model
    tokens = ids(6, 17)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    assert (logits(ours, tokens) - ref).abs().max().item() < 1e-4
    report = json.loads((moe_dir / "moefy.json").read_text())
    assert len(report["layers"]) == 2 and report["mean_oracle_error"] <= report["mean_router_error"]


def test_moefied_runs_lazily_like_resident(moe_dir, tmp_path):
    store = convert(moe_dir, tmp_path / "store", "fp32", progress=False)
    prompt = ids(7, 9)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    resident = Engine(load_model(str(store)).model).generate([prompt], params)[0].output_ids
    lazy = load_model(str(store), experts=ExpertOptions(slots=3))
    assert Engine(lazy.model).generate([prompt], params)[0].output_ids == resident
    assert lazy.provider.stats()["misses"] > 0
    direct = Engine(load_model(str(moe_dir), "fp32").model).generate([prompt], params)[0].output_ids
    assert direct == resident  # the store holds the checkpoint's fp32 experts


def test_moefy_refuses_bad_input(dense_dir, moe_dir, tmp_path):
    with pytest.raises(MoemeshError, match="must divide"):
        moefy(str(dense_dir), tmp_path / "a", MoefyOptions(experts=7), progress=False)
    with pytest.raises(MoemeshError, match="top-k"):
        moefy(str(dense_dir), tmp_path / "b", MoefyOptions(experts=4, top_k=5), progress=False)
    with pytest.raises(MoemeshError, match="already exists"):
        moefy(str(dense_dir), moe_dir, MoefyOptions(), progress=False)
    with pytest.raises(MoemeshError, match="dense llama"):
        moefy(str(moe_dir), tmp_path / "c", MoefyOptions(experts=4, top_k=2), progress=False)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
def test_smollm2_moe_answers_paris(tmp_path):
    """The real model with the default split still knows the capital of France (chat, greedy)."""
    out = moefy("smollm2", tmp_path / "smol-moe", MoefyOptions(), progress=False)
    loaded = load_model(str(out))
    tok = loaded.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    seq = Engine(loaded.model, stop_token_ids=tok.eos_token_ids).generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert "Paris" in tok.decode(seq.output_ids)
