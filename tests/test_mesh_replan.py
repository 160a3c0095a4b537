"""Failover by re-planning (issue 23): three elastic nodes with lazy experts and no replica of any
share. ``kill -9`` of one mid-generation -> the survivors take over its layers (pipeline) or its
experts (shards), the API node replays the affected sequence, and the request completes with the
same greedy tokens as one process, within FAILOVER_BOUND seconds for the step that hit the dead
node. The node started again rejoins (a new peer id) and gets work in the next request's plan."""
from __future__ import annotations

import time

import pytest

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.mesh.launcher import MeshProcess
from moemesh.mesh.stack import MeshStack, StackOptions
from moemesh.mesh.transport.node import MeshOptions
from test_mesh_lazy import stores  # noqa: F401  (fixture)
from test_mesh_pipeline import four_layer_models  # noqa: F401  (fixture)

SECRET = "replan-secret"
CALL_TIMEOUT = 3.0
FAILOVER_BOUND = CALL_TIMEOUT + 5.0  # a lost link fails the step at once; a hung peer costs a timeout + a ping
PROMPT, N = [1, 5, 9, 13, 2, 7, 4], 20


def child(store, mode: list[str], peers: list[str]) -> MeshProcess:
    return MeshProcess(str(store), "--no-api", *mode, "--expert-slots", "4", "--threads", "1", "--heartbeat", "1",
                       "--call-timeout", str(CALL_TIMEOUT), "--secret", SECRET, "--mesh-name", "replan",
                       *[a for p in peers for a in ("--peer", p)]).launch()


def wait_nodes(head: MeshStack, peers: set[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not peers <= {r.peer_id for r in head.live_nodes()}:
        assert time.monotonic() < deadline, "nodes not listed in time"
        time.sleep(0.2)


def decode(engine: Engine, seq, upto: int) -> None:
    while len(seq.output_ids) < upto:
        engine.step()


@pytest.mark.parametrize("mode", [["--layers", "auto"], ["--experts", "auto"]], ids=["stages", "experts"])
def test_kill9_replans_onto_survivors_then_rejoins(stores, mode):  # noqa: F811
    store = stores["qwen3_moe"]
    expected = Engine(load_model(str(store)).model).generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=N))
    expected = expected[0].output_ids
    kw = {"layers": "auto"} if mode[0] == "--layers" else {"experts": "auto"}
    head = MeshStack(StackOptions(str(store), expert_slots=4, mesh=MeshOptions(
        mesh_name="replan", secret=SECRET, heartbeat=1.0, call_timeout=CALL_TIMEOUT), **kw)).start()
    nodes = [child(store, mode, head.addrs()) for _ in range(2)]
    try:
        for n in nodes:
            n.wait_ready(60)
        wait_nodes(head, {n.peer_id for n in nodes})
        head.pipeline.new_plan(force=True)
        engine = Engine(head.pipeline, max_prefill_tokens=4)
        seq = engine.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=N))
        decode(engine, seq, 6)
        if kw.get("layers"):
            route = engine.cache.route_peers(seq.seq_id)
            assert len(route) == 3 and set(route[1:]) == {n.peer_id for n in nodes}  # no replica of any share
            victim = next(n for n in nodes if n.peer_id == route[-1])
        else:
            victim = nodes[0]
            assert head.node.stats.peers[victim.peer_id].calls > 0  # it computed its share of the experts
        victim.kill9()

        def failovers() -> int:
            return head.pipeline.failovers if kw.get("layers") else head.remote_experts.failovers

        # the first step that meets the dead node re-plans onto the survivors, replays and goes on; with
        # expert shards a step whose tokens route to none of the victim's experts never calls it, so step
        # until one does (each step within the bound)
        while failovers() == 0 and len(seq.output_ids) < N:
            t0 = time.monotonic()
            engine.step()
            elapsed = time.monotonic() - t0
            assert elapsed < FAILOVER_BOUND
        print(f"failover ({mode[0]}): the step that met the dead node took {elapsed:.2f} s")
        assert failovers() >= 1
        if kw.get("layers"):
            assert victim.peer_id not in engine.cache.route_peers(seq.seq_id)
            assert len(head.pipeline.plan) == 2  # the head and the survivor split the four layers
        decode(engine, seq, N)
        assert seq.output_ids == expected  # same tokens as one process, before and after the failure

        back = child(store, mode, head.addrs())  # the node restarts (a new peer id) and rejoins
        nodes.append(back)
        back.wait_ready(60)
        wait_nodes(head, {back.peer_id})
        plan = head.pipeline.new_plan(force=True)
        if kw.get("layers"):
            assert back.peer_id in [s.peer for s in plan] and len(plan) == 3  # it has a share again
        calls = head.node.stats.peer(back.peer_id).calls
        again = engine.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=8))
        decode(engine, again, 8)
        assert again.output_ids == expected[:8]
        if kw.get("layers"):  # it ran its layers: its own record says so (ranges run in the last minute)
            deadline = time.monotonic() + 10
            while not next(r for r in head.live_nodes() if r.peer_id == back.peer_id).status.get("serving"):
                assert time.monotonic() < deadline, "the rejoined node reports no layers served"
                time.sleep(0.3)
        else:  # it computed experts for us
            assert head.node.stats.peer(back.peer_id).calls > calls
    finally:
        for n in nodes:
            n.stop()
        head.stop()
