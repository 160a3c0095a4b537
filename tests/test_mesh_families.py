"""Hybrid (qwen3_next: Gated DeltaNet + gated attention) and sparse-attention (glm_moe_dsa: MLA +
indexer) models in mesh pipeline stages: each stage's cache is built over its own layers, numbered
per kind (attention KV, recurrent states, indexer keys) and seen through the layers' own numbers;
two stages on loopback give the greedy tokens of one process, and stage slices compose to the whole
model's logits. A stage cannot start on a layer that reuses the previous layer's sparse pick."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.mesh.pipeline.slice import load_slice
from moemesh.mesh.stack import MeshStack, StackOptions
from moemesh.mesh.transport.node import MeshOptions
from test_hybrid import make_qwen3_next, qwen3_next_configs
from tiny_families import make_text_checkpoint, text_configs

SECRET = "test-secret"
PROMPTS = [[1, 5, 9, 13, 2, 7, 20, 31, 4], [3, 3, 8], [11, 4, 6, 10, 12, 40, 41]]
SPLITS = {"qwen3_next": 2, "qwen3_next-gqa-dense": 3, "glm_moe_dsa": 2}  # stage 2 starts at this layer


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for name, cfg in qwen3_next_configs().items():
        d = tmp_path_factory.mktemp(name)
        make_qwen3_next(cfg, d)
        out[name] = d
    d = tmp_path_factory.mktemp("glm_moe_dsa")
    make_text_checkpoint(text_configs()["glm_moe_dsa"], d)
    out["glm_moe_dsa"] = d
    return out


def greedy(model, prompts, n: int = 12) -> list[list[int]]:
    engine = Engine(model, max_batch=4, max_prefill_tokens=4)  # small chunks: prefill spans steps
    seqs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n))
    return [s.output_ids for s in seqs]


def mesh_options(peers: list[str] | None = None) -> MeshOptions:
    return MeshOptions(mesh_name="test", secret=SECRET, initial_peers=peers or [], heartbeat=1.0, call_timeout=5.0)


@pytest.mark.parametrize("name", ["qwen3_next", "glm_moe_dsa"])
def test_two_stage_pipeline_matches_one_process(ckpts, name):
    path, cut = str(ckpts[name]), SPLITS[name]
    one = load_model(path, "fp32")
    expected = greedy(one.model, PROMPTS)
    n = one.args.num_layers
    tail = MeshStack(StackOptions(path, f"{cut}:{n}", "fp32", api=False, mesh=mesh_options())).start()
    head = None
    try:
        head = MeshStack(StackOptions(path, f"0:{cut}", "fp32", mesh=mesh_options(tail.addrs()))).start()
        assert greedy(head.pipeline, PROMPTS) == expected
        assert tail.stage.rows > 0  # the second half really ran on the other node
    finally:
        for stack in (head, tail):
            if stack is not None:
                stack.stop()


@pytest.mark.parametrize("name", list(SPLITS))
def test_stage_slices_compose_to_the_whole_model(ckpts, name):
    """Two slices' logits over a prefill and decode steps equal the whole model's; with more
    than one sequence in the batch, so every per-sequence state is looked up through the view."""
    path, cut = str(ckpts[name]), SPLITS[name]
    model = load_model(path, "fp32").model
    n = model.args.num_layers
    a, b = load_slice(path, f"0:{cut}", "fp32"), load_slice(path, f"{cut}:{n}", "fp32", with_ends=False)
    whole, caches = model.new_cache(), [a.stage.new_cache(), b.stage.new_cache()]
    for c in [whole, *caches]:
        c.add_sequence(0)
        c.add_sequence(1)
    steps = [([PROMPTS[0], PROMPTS[2]], [0, 0])] + [([[9 + i], [30 + i]], [9 + i, 7 + i]) for i in range(3)]
    for toks, starts in steps:
        flat = torch.tensor([t for ts in toks for t in ts])
        pos = torch.cat([torch.arange(s, s + len(ts)) for ts, s in zip(toks, starts)])
        batch = BatchLayout([0, 1], [len(ts) for ts in toks])
        ref = model(flat, pos, whole, batch, all_logits=True)
        x = a.ends.embed[flat].float()
        for stage, c in zip((a.stage, b.stage), caches):
            x = stage(x, pos, c, batch)
        torch.testing.assert_close(a.ends.head(a.ends.norm(x)), ref, atol=1e-5, rtol=1e-5)


def test_a_stage_cannot_start_on_a_shared_sparse_layer(ckpts):
    s = load_slice(str(ckpts["glm_moe_dsa"]), "1:3", "fp32", with_ends=False)  # layer 1 is "S"
    cache = s.stage.new_cache()
    cache.add_sequence(0)
    with pytest.raises(ValueError, match="reuses the sparse-attention pick of layer 0"):
        s.stage(torch.zeros(2, s.args.hidden_size), torch.arange(2), cache, BatchLayout([0], [2]))
