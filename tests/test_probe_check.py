"""A machine probe from another machine, or an old one, is detected (benchkit/probe_check.py): `plan`
refuses its tok/s prediction saying why (unless --any-probe); the benchmarks re-run the probe."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from moemesh.benchkit import probe_check
from moemesh.cli import main
from test_plan import PROBE

HERE = probe_check.machine_identity()


def probe_with(**identity) -> dict:
    return {**PROBE, "machine": {"identity": {**HERE, **identity}}}


def test_identity_names_this_machine():
    assert HERE["cores"] >= 1 and HERE["cpu_model"] and HERE["kernel"] and HERE["disk_device"]


def test_same_machine_recent_probe_is_accepted():
    assert probe_check.stale_reason(probe_with()) is None


@pytest.mark.parametrize("key,value", [("cpu_model", "Intel(R) Xeon(R) Platinum 8480+"), ("cores", 64),
                                       ("disk_device", "nvme0n1 Samsung SSD 990"), ("kernel", "5.4.0-old")])
def test_foreign_probe_is_detected_naming_what_differs(key, value):
    why = probe_check.stale_reason(probe_with(**{key: value}))
    assert why and "another machine" in why and key in why and str(value) in why


def test_probe_without_identity_is_not_trusted():
    assert "no machine identity" in probe_check.stale_reason({k: v for k, v in PROBE.items() if k != "machine"})


def test_old_probe_is_stale():
    old = {**probe_with(), "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 45 * 86400))}
    why = probe_check.stale_reason(old)
    assert why and "45 days old" in why
    assert probe_check.stale_reason(old, max_age_days=60) is None


def test_plan_refuses_a_foreign_probe(tmp_path, capsys):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_with(cpu_model="Some Other CPU")))
    argv = ["plan", "Qwen3-30B-A3B", "--ram", "8G", "--probe", str(path)]
    assert main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "another machine" in r["probe_refused"] and "Some Other CPU" in r["probe_refused"]
    assert all(f.get("tokens_per_s") is None for f in r["formats"].values())
    assert main(argv) == 0
    assert "not predicted" in capsys.readouterr().out
    assert main(argv + ["--json", "--any-probe"]) == 0
    assert json.loads(capsys.readouterr().out)["formats"]["int4"]["tokens_per_s"] > 0
    path.write_text(json.dumps(probe_with()))
    assert main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["probe_refused"] is None and r["formats"]["int4"]["tokens_per_s"] > 0


def test_bench_reruns_a_foreign_probe_and_keeps_a_good_one(tmp_path, monkeypatch):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_with(kernel="another-kernel")))
    runs = []
    fresh = {**probe_with(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "fresh": True}

    def fake_run(cmd, **kw):  # the probe itself takes a minute: its child process is faked
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "disk ...\nRESULT " + json.dumps(fresh) + "\n", "")

    monkeypatch.setattr(probe_check.subprocess, "run", fake_run)
    got, note = probe_check.probe_for(path, log=lambda m: None)
    assert len(runs) == 1 and "moemesh.benchkit.probe_main" in runs[0]
    assert got["fresh"] and note["rerun"] and "another machine" in note["why"]
    assert json.loads(path.read_text())["fresh"]  # saved for next time
    got, note = probe_check.probe_for(path, log=lambda m: None)
    assert len(runs) == 1 and not note["rerun"]  # this machine's and recent: used as is
