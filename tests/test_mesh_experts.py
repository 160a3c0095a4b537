"""Expert-shard mode: every node holds the trunk and some experts; a layer's rows routed to
experts held elsewhere go to their holders. Same greedy tokens as one process (fp32 wire), a
vanished holder fails over to another holder, and with none left the error names the experts."""
from __future__ import annotations

import time

import pytest
import torch

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import MoemeshError
from moemesh.experts.provider import ResidentExperts
from moemesh.loading.loader import load_model
from moemesh.mesh.shards.assign import auto_assign, describe, expert_capacity, parse_experts
from moemesh.mesh.shards.expert_server import ExpertServer
from moemesh.mesh.shards.remote_experts import RemoteExperts, build_calls
from moemesh.mesh.stack import MeshStack, StackOptions
from moemesh.mesh.transport.node import MeshOptions

SECRET = "experts-secret"
PROMPTS = [[1, 5, 9, 13, 2, 7], [3, 3, 8], [11, 4, 6, 10, 12]]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    from tiny import configs, make_checkpoint

    out = {}
    for name in ("qwen3_moe-norm", "mixtral"):
        d = tmp_path_factory.mktemp(f"experts-{name}")
        make_checkpoint(configs()[name], d, seed=5)
        out[name] = d
    return out


def opts(peers=None) -> MeshOptions:
    return MeshOptions(mesh_name="experts", secret=SECRET, initial_peers=peers or [], heartbeat=1.0, call_timeout=4.0)


def greedy(model, prompts, n: int = 10) -> list[list[int]]:
    engine = Engine(model, max_batch=4, max_prefill_tokens=4)  # small chunks: prefill spans steps
    seqs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n))
    return [s.output_ids for s in seqs]


def logits(model, tokens: list[int]) -> torch.Tensor:
    """All positions' logits [T, V] of one sequence in one forward."""
    from moemesh.batch import BatchLayout

    cache = model.new_cache()
    cache.add_sequence(0)
    t = torch.tensor(tokens)
    return model(t, torch.arange(len(tokens)), cache, BatchLayout([0], [len(tokens)]), all_logits=True)


def wait_nodes(stack: MeshStack, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(stack.live_nodes()) < n:
        assert time.monotonic() < deadline, f"fewer than {n} nodes after {timeout}s"
        time.sleep(0.2)


# --- pieces ----------------------------------------------------------------------------------

def test_parse_and_assign_experts():
    assert parse_experts("auto", 8) is None
    assert parse_experts("2:5", 8) == [2, 3, 4]
    assert parse_experts("0,6:,3", 8) == [0, 3, 6, 7]
    for bad in ("9", "3:2", "x", ","):
        with pytest.raises(MoemeshError, match="--experts"):
            parse_experts(bad, 8)
    assert auto_assign(8, [], 3) == [0, 1, 2]
    assert auto_assign(8, [[0, 1, 2, 3]], 4) == [4, 5, 6, 7]  # the second node covers the rest
    assert auto_assign(8, [[0, 1, 2, 3], [4, 5, 6, 7]], 3) == [0, 1, 2]  # then replicas
    assert auto_assign(4, [None], 2) == [0, 1]
    assert expert_capacity(10 * 100 + 99, 100, 8) == 8 and expert_capacity(350, 100, 8) == 3
    assert describe([0, 1, 2, 5, 7, 8], 10) == "0:3,5,7:9" and describe(list(range(4)), 4) == "all"


def test_build_calls_split_and_regroup():
    """Messages under the cap carry each expert's rows exactly once; unpacking gives them back."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4096, generator=g)  # [T, D]: 300 rows do not fit one 3 MiB message
    ids = torch.randint(0, 6, (300, 2), generator=g)
    w = torch.rand(300, 2, generator=g)
    from moemesh.experts.mixing import group_by_expert

    groups = group_by_expert(ids)
    calls = build_calls(x, w.reshape(-1), groups, torch.float32)
    assert len(calls) > 1
    assert all(c.rows.shape[0] * 4096 * 4 <= 3 * 2**20 for c in calls)
    # what a server computes: weight * f(x[row]); f = identity * 2 here
    outs = [c.x[c.rows] * 2 * c.weights[:, None] for c in calls]
    ys: dict = {}
    RemoteExperts._unpack(ys, calls, outs)
    for e, tok, slots in groups:
        assert torch.equal(ys[e], x[tok] * 2 * w.reshape(-1)[slots, None])


def test_expert_server_rejects_bad_requests():
    server = ExpertServer(None, ResidentExperts({0: {0: torch.nn.Identity()}}), {0: {0}}, hidden_size=4)  # type: ignore[arg-type]
    x, rows, w = torch.zeros(2, 4), torch.tensor([0, 1]), torch.ones(2)
    assert server.check({"layer": 0, "experts": [0], "counts": [2]}, [x, rows, w]) is None
    assert "holds no experts of layer 5" in server.check({"layer": 5, "experts": [0], "counts": [2]}, [x, rows, w])
    assert "does not hold experts [3]" in server.check({"layer": 0, "experts": [3], "counts": [2]}, [x, rows, w])
    assert "shapes" in server.check({"layer": 0, "experts": [0], "counts": [3]}, [x, rows, w])
    assert "out of range" in server.check({"layer": 0, "experts": [0], "counts": [2]}, [x, torch.tensor([0, 2]), w])


# --- meshes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,shares", [("mixtral", ["0:2", "2:4"]), ("qwen3_moe-norm", ["0:3", "3:6", "6:8"])])
def test_expert_sharded_mesh_matches_one_process(moe_models, arch, shares):
    path = str(moe_models[arch])
    single = load_model(path, "fp32").model
    expected = greedy(single, PROMPTS)
    stacks = []
    try:
        head = MeshStack(StackOptions(path, None, "fp32", experts=shares[0], mesh=opts())).start()
        stacks.append(head)
        for share in shares[1:]:
            stacks.append(MeshStack(StackOptions(path, None, "fp32", api=False, experts=share,
                                                 mesh=opts(head.addrs()))).start())
        wait_nodes(head, len(shares))
        head.node.stats.bytes_sent = head.node.stats.bytes_received = 0
        assert greedy(head.pipeline, PROMPTS) == expected
        long = list(range(1, 40))  # bit-identical logits, not just the same argmax
        assert torch.equal(logits(head.pipeline, long), logits(single, long))
        rx = head.remote_experts
        assert rx.remote_rows > 0 and rx.local_rows > 0  # both kinds of experts really ran
        assert all(s.expert_server.calls > 0 for s in stacks[1:])
        assert head.node.stats.bytes_sent > 0 and head.node.stats.bytes_received > 0
        assert [seg.local for seg in head.pipeline.plan] == [True]  # the trunk is all here
    finally:
        for s in stacks:
            s.stop()


def test_vanished_holder_fails_over_then_errors(moe_models):
    path = str(moe_models["qwen3_moe-norm"])
    prompt, n = [1, 5, 9, 13, 2, 7, 4], 16
    expected = greedy(load_model(path, "fp32").model, [prompt], n)[0]
    head = MeshStack(StackOptions(path, None, "fp32", experts="0:4", mesh=opts())).start()
    holders = []
    try:
        holders = [MeshStack(StackOptions(path, None, "fp32", api=False, experts="4:8",
                                          mesh=opts(head.addrs()))).start() for _ in range(2)]
        wait_nodes(head, 3)
        engine = Engine(head.pipeline, max_prefill_tokens=4)
        seq = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=n))
        while len(seq.output_ids) < 5:
            engine.step()
        used = next(h for h in holders if h.expert_server.calls > 0)
        other = next(h for h in holders if h is not used)
        used.stop()  # the holder vanishes (daemon gone: dials fail)
        t0 = time.monotonic()
        while len(seq.output_ids) < 10:
            engine.step()
        assert time.monotonic() - t0 < 30
        assert head.remote_experts.failovers >= 1 and other.expert_server.calls > 0
        other.stop()
        with pytest.raises(MoemeshError, match=r"no live node holds experts \[.*\].*failed"):
            t0 = time.monotonic()
            while len(seq.output_ids) < n:
                engine.step()
        assert time.monotonic() - t0 < 30
        assert seq.output_ids[:10] == expected[:10]
    finally:
        for s in [head, *holders]:
            s.stop()


def test_hung_holder_times_out_and_fails_over(moe_models):
    """A holder that accepts the call but never answers in time: the call times out (bounded) and
    the rows go to the other holder; tokens unchanged."""
    path = str(moe_models["qwen3_moe-norm"])
    expected = greedy(load_model(path, "fp32").model, PROMPTS[:1], 6)
    quick = MeshOptions(mesh_name="experts", secret=SECRET, heartbeat=1.0, call_timeout=1.0)
    head = MeshStack(StackOptions(path, None, "fp32", experts="0:4", mesh=quick)).start()
    holders = []
    try:
        holders = [MeshStack(StackOptions(path, None, "fp32", api=False, experts="4:8",
                                          mesh=opts(head.addrs()))).start() for _ in range(2)]
        wait_nodes(head, 3)
        first = max(holders, key=lambda h: h.node.peer_id.to_base58())  # the one assign() picks first
        real = first.expert_server.compute

        def hang(*args):
            time.sleep(3.0)
            return real(*args)

        first.expert_server.compute = hang
        t0 = time.monotonic()
        assert greedy(head.pipeline, PROMPTS[:1], 6) == expected
        assert head.remote_experts.failovers >= 1
        assert time.monotonic() - t0 < 30
    finally:
        for s in [head, *holders]:
            s.stop()


def test_masked_mode_needs_no_other_node(moe_models):
    """--masked: routers limited to our experts, so a lone node answers; same as mask_model."""
    from moemesh.mesh.shards.masked import mask_model

    path = str(moe_models["qwen3_moe-norm"])
    ref = load_model(path, "fp32").model
    mask_model(ref, [0, 1, 2, 3])
    expected = greedy(ref, PROMPTS)
    head = MeshStack(StackOptions(path, None, "fp32", experts="0:4", masked=True, mesh=opts())).start()
    try:
        assert greedy(head.pipeline, PROMPTS) == expected
        assert head.node.stats.bytes_sent == 0  # nothing crossed the network
    finally:
        head.stop()
    with pytest.raises(MoemeshError, match="--masked"):
        MeshStack(StackOptions(path, None, "fp32", masked=True, mesh=opts())).start()


def test_bad_expert_options_are_clear_errors(moe_models, capsys):
    from moemesh.cli import main

    path = str(moe_models["mixtral"])
    assert main(["mesh", "serve", path, "--masked", "--secret", "s"]) == 2
    assert "--masked is an option of expert-shard mode" in capsys.readouterr().err
    assert main(["mesh", "serve", path, "--experts", "auto", "--expert-ram", "lots", "--secret", "s"]) == 2
    assert "cannot read size" in capsys.readouterr().err
    for experts, layers, message in [("3:9", None, r"ids must lie in \[0, 4\)"),
                                     ("0:2", "0:1", "holds every layer")]:
        with pytest.raises(MoemeshError, match=message):
            MeshStack(StackOptions(path, layers, "fp32", api=False, experts=experts, mesh=opts())).start()
