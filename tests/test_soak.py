"""A one-minute soak of ``moemesh serve`` of a lazy MoE under --ram (issue 20 item 4; the benchmark
is bench/soak.py): mixed streamed and plain requests, tools, overlong prompts, bad bodies, client
disconnects and bursts past the queue. No unexplained outcome, no crash, RSS within --ram."""
from __future__ import annotations

import pytest

from moemesh.benchkit.chat_moe import build_chat_moe_store
from moemesh.benchkit.soak import KINDS, Soak, SoakConfig
from moemesh.experts.budget import parse_size
from moemesh.server.launcher import ServerProcess

RAM = "600M"


def soak(tmp_path, seconds: float) -> None:
    store = build_chat_moe_store(tmp_path / "soak")
    server = ServerProcess(str(store), "--ram", RAM, "--threads", "1", "--queue-size", "4", "--max-batch", "4").start()
    try:
        context = server.get_json("/v1/models")["data"][0]["max_model_len"]
        config = SoakConfig(duration=seconds, workers=3, burst_every=seconds / 4, burst_size=10, max_tokens=12)
        report = Soak(server.host, server.port, server.pid, context, config).run()
        assert server._proc.poll() is None and server.get_json("/health")["status"] == "ok"  # no crash
        log = server.output()
    finally:
        server.stop()
    summary = report.summary(warmup=seconds / 5)
    print(summary)
    assert summary["unexplained"] == 0, (summary["unexplained_by_kind"], log[-3000:])
    assert "Traceback" not in log, log[-3000:]
    seen = summary["by_kind"]
    assert all(seen[k].get("ok", 0) > 0 for k in ("chat", "chat_stream", "completion", "anthropic", "anthropic_stream"))
    assert all(seen[k].get("rejected", 0) > 0 for k in ("overlong", "bad")) and seen["disconnect"].get("left", 0) > 0
    assert summary["outcomes"].get("queue_full", 0) > 0  # the bursts went past the queue, and were told so
    assert summary["rss_mib"]["max"] * 2**20 <= parse_size(RAM)
    assert set(seen) == set(KINDS)


def test_one_minute_soak(tmp_path):
    soak(tmp_path, 60.0)


@pytest.mark.slow
def test_thirty_minute_soak(tmp_path):
    soak(tmp_path, 1800.0)
