"""A pipeline of mesh nodes on loopback gives the same greedy tokens as one process."""
from __future__ import annotations

import pytest

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.mesh.stack import MeshStack, StackOptions
from moemesh.mesh.transport.node import MeshOptions

SECRET = "test-secret"
PROMPTS = [[1, 5, 9, 13, 2, 7], [3, 3, 8], [11, 4, 6, 10, 12]]


@pytest.fixture(scope="module")
def four_layer_models(tmp_path_factory):
    """A 4-layer tiny llama and qwen3_moe (two stages need more than the 2 layers of tests/tiny)."""
    from transformers import LlamaConfig, Qwen3MoeConfig

    from tiny import V, make_checkpoint

    common = dict(vocab_size=V, num_hidden_layers=4, max_position_embeddings=256)
    cfgs = {
        "llama": LlamaConfig(**common, hidden_size=48, intermediate_size=80, num_attention_heads=4,
                             num_key_value_heads=2),
        "qwen3_moe": Qwen3MoeConfig(**common, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=8,
                                    num_experts_per_tok=2, norm_topk_prob=True),
    }
    out = {}
    for name, cfg in cfgs.items():
        d = tmp_path_factory.mktemp(f"mesh-{name}")
        make_checkpoint(cfg, d, seed=3)
        out[name] = d
    return out


def mesh_options(peers: list[str] | None = None, **kw) -> MeshOptions:
    return MeshOptions(mesh_name="test", secret=SECRET, initial_peers=peers or [], heartbeat=1.0,
                       call_timeout=5.0, **kw)


def greedy(model, prompts, n: int = 12) -> list[list[int]]:
    engine = Engine(model, max_batch=4, max_prefill_tokens=4)  # small chunks: prefill spans steps
    seqs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n))
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_two_stage_pipeline_matches_one_process(four_layer_models, arch):
    path = str(four_layer_models[arch])
    expected = greedy(load_model(path, "fp32").model, PROMPTS)
    tail = MeshStack(StackOptions(path, "2:4", "fp32", api=False, mesh=mesh_options())).start()
    head = None
    try:
        head = MeshStack(StackOptions(path, "0:2", "fp32", mesh=mesh_options(tail.addrs()))).start()
        got = greedy(head.pipeline, PROMPTS)
        assert got == expected
        assert tail.stage.rows > 0  # the second half really ran on the other node
        assert head.pipeline.plan is not None and [s.local for s in head.pipeline.plan] == [True, False]
    finally:
        for stack in (head, tail):
            if stack is not None:
                stack.stop()


def test_bf16_wire_halves_the_bytes_and_stays_close(four_layer_models):
    """--wire bf16: the activations between stages in bf16 (half the bytes); not exact, close."""
    import torch

    from moemesh.batch import BatchLayout

    path = str(four_layer_models["llama"])
    ids = list(range(3, 60))

    def logits(model) -> torch.Tensor:
        cache = model.new_cache()
        cache.add_sequence(0)
        return model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)

    ref = logits(load_model(path, "fp32").model)
    got, sent = {}, {}
    for wire in ("fp32", "bf16"):
        tail = MeshStack(StackOptions(path, "2:4", "fp32", api=False, wire=wire, mesh=mesh_options())).start()
        head = None
        try:
            head = MeshStack(StackOptions(path, "0:2", "fp32", wire=wire, mesh=mesh_options(tail.addrs()))).start()
            before = head.node.stats.bytes_sent
            got[wire] = logits(head.pipeline)
            sent[wire] = head.node.stats.bytes_sent - before
        finally:
            for stack in (head, tail):
                if stack is not None:
                    stack.stop()
    assert torch.equal(got["fp32"], ref)
    diff = (got["bf16"] - ref).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item(), diff  # rounded, not garbage
    assert sent["bf16"] < 0.6 * sent["fp32"]  # the rows dominate the message
