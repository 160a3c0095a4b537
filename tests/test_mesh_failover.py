"""A stage killed with SIGKILL mid-generation: the request continues on a replica of the same
layers (replaying its rows there) with the same greedy tokens; when the last replica freezes
(SIGSTOP: its daemon still accepts calls that never answer) the step fails with a clear error.
Bound checked: a failover or a failure takes < FAILOVER_BOUND seconds, never a hang."""
from __future__ import annotations

import os
import signal
import time

import pytest

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import MoemeshError
from moemesh.loading.loader import load_model
from moemesh.mesh.launcher import StageProcess
from moemesh.mesh.stack import MeshStack, StackOptions
from moemesh.mesh.transport.node import MeshOptions
from test_mesh_pipeline import four_layer_models  # noqa: F401  (fixture)

SECRET = "failover-secret"
CALL_TIMEOUT = 3.0
FAILOVER_BOUND = 2 * CALL_TIMEOUT + 4.0  # a hung call times out, then membership + replay


def test_killed_stage_fails_over_to_replica_then_errors_cleanly(four_layer_models):  # noqa: F811
    path = str(four_layer_models["llama"])
    prompt, n = [1, 5, 9, 13, 2, 7, 4], 24
    expected = Engine(load_model(path, "fp32").model).generate([prompt], SamplingParams(temperature=0.0, max_tokens=n))
    head = MeshStack(StackOptions(path, "0:2", "fp32", mesh=MeshOptions(
        mesh_name="test", secret=SECRET, heartbeat=1.0, call_timeout=CALL_TIMEOUT))).start()
    args = ("--quant", "fp32", "--threads", "1", "--heartbeat", "1", "--call-timeout", str(CALL_TIMEOUT))
    stages = [StageProcess(path, "2:4", SECRET, head.addrs(), *args).launch() for _ in range(2)]
    try:
        for s in stages:
            s.wait_ready()
        deadline = time.monotonic() + 20
        while len(head.live_nodes()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        engine = Engine(head.pipeline, max_prefill_tokens=4)
        seq = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=n))
        while len(seq.output_ids) < 8:
            engine.step()
        used = engine.cache.route_peers(seq.seq_id)[1]
        victim = next(s for s in stages if s.peer_id == used)
        victim.kill9()
        t0 = time.monotonic()
        engine.step()  # this step's stage call fails; the sequence moves to the other replica
        failover_s = time.monotonic() - t0
        assert head.pipeline.failovers == 1
        assert failover_s < FAILOVER_BOUND
        assert engine.cache.route_peers(seq.seq_id)[1] not in (used, None)
        while len(seq.output_ids) < 16:
            engine.step()
        assert seq.output_ids == expected[0].output_ids[:16]  # same tokens as one process
        survivor = next(s for s in stages if s is not victim)
        os.kill(survivor.proc.pid, signal.SIGSTOP)  # frozen, its daemon still up: calls hang, must time out
        t0 = time.monotonic()
        with pytest.raises(MoemeshError, match="(?s)layers 2:4.*timed out.*no other live node"):
            engine.step()
        assert time.monotonic() - t0 < FAILOVER_BOUND
        survivor.kill9()
    finally:
        for s in stages:
            s.stop()
        head.stop()
