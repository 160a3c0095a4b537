"""`moemesh bench --list / run`: the registry of bench/ suites, the harness and the shared results
writer. Nothing heavy runs: real scripts only print --help, runs use a fake bench directory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moemesh.benchkit import harness, results, suites
from moemesh.benchkit.suites import SUITES
from moemesh.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
NOPE = "/nonexistent/python"  # a llama.cpp Python that is not there: no import check subprocess

# every registered script's --help in ONE child process (torch and friends imported once)
HELP_ALL = textwrap.dedent("""
    import json, runpy, sys, time
    bench, out = sys.argv[1], {}
    sys.path.insert(0, bench)
    for script in sys.argv[2:]:
        sys.argv, t0 = [script, "--help"], time.perf_counter()
        try:
            runpy.run_path(f"{bench}/{script}", run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        except Exception as exc:  # noqa: BLE001
            code = repr(exc)
        out[script] = [code, time.perf_counter() - t0]
    print("RESULT " + json.dumps(out))
""")


def test_registry_is_consistent():
    names = [s.name for s in SUITES]
    assert len(names) == len(set(names))
    for s in SUITES:
        assert all(r.startswith("results/") or r == "../README.md" for r in s.results), s.name
        assert s.what and s.minutes > 0
    order = [s.name for s in suites.select(["all"])]
    assert order[-2:] == ["plot_caps", "readme_table"]  # the README table is regenerated from the new results
    assert order.index("plan_check") < order.index("lazy")  # lazy.py reads plan_check's machine probe
    assert suites.select(["kv", "all"])[0].name == "kv" and len(suites.select(["kv", "all"])) == len(order)


def test_list_prints_every_suite(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for s in SUITES:
        assert s.name in out and s.what in out
    assert "llama.cpp, root+cgroup" in out and "run all" in out


def test_every_script_exists_and_its_help_runs():
    scripts = sorted({s.script for s in SUITES})
    assert all((ROOT / "bench" / sc).is_file() for sc in scripts)
    r = subprocess.run([sys.executable, "-c", HELP_ALL, str(ROOT / "bench"), *scripts], capture_output=True, text=True,
                       timeout=240, cwd=ROOT)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    got = json.loads(line[7:])
    codes = {k: v[0] for k, v in got.items()}
    assert codes == {sc: 0 for sc in scripts}
    assert max(v[1] for v in got.values()) < 30, got  # seconds per script (imports included)


def test_dry_run_prints_the_documented_command(capsys):
    assert main(["bench", "run", "kv", "decode", "--dry-run", "--llama-python", NOPE, "--", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{sys.executable} bench/kv.py --threads 1 --steps 24 --steps 2" in out
    assert f"bench/decode.py --rounds 3 --llama-python {NOPE} --steps 2" in out
    assert "cannot run here: llama.cpp: no Python at" in out  # reported, not refused, in a dry run


def test_dry_run_all_and_placeholders(capsys, tmp_path):
    assert main(["bench", "run", "all", "--dry-run", "--llama-python", NOPE, "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("[")]
    assert len(lines) == len(suites.select(["all"])) and "readme_table.py" in lines[-1]
    # a prerequisite made once by `moemesh moefy`, then the suite; lazy.py gets --llama-python only when not its default
    assert f"-m moemesh.cli moefy smollm2 {tmp_path}/smol-16-8 --experts 16 --top-k 8 && " in out
    assert f"bench/lazy.py --model gpt-oss-120b --repeats 3 --llama-python {NOPE}" in out
    assert "OMP_WAIT_POLICY=PASSIVE " in out
    o = harness.Options(ROOT / "bench", suites.DEFAULT_LLAMA_PYTHON, tmp_path)
    assert harness.command(suites.BY_NAME["lazy"], o)[2:] == ["--omp-wait-policy", ""]
    (tmp_path / "smol-16-8").mkdir()
    assert harness.setup_command(suites.BY_NAME["masked_quality"], o) is None


def test_unknown_suite_and_bad_usage(capsys):
    assert main(["bench", "run", "kv", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark suite 'nope'" in err and "policies" in err
    assert main(["bench", "run", "all", "--", "--x"]) == 2
    assert "with `all` name the suites" in capsys.readouterr().err
    assert main(["bench", "--quick", "run", "kv"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["bench", "run"])  # no suite: argparse's usage error
    assert exc.value.code == 2


def test_probe_flags_unchanged():
    a = build_parser().parse_args(["bench", "--quick", "--out", "p.json", "--threads", "1", "--disk-dir", "d"])
    assert (a.quick, a.out, a.threads, a.disk_dir, a.bench_command, a.list) == (True, "p.json", 1, "d", None, False)
    assert a.func.__name__ == "run"


def fake_bench(tmp_path: Path, scripts: dict[str, str]) -> Path:
    d = tmp_path / "bench"
    (d / "results").mkdir(parents=True)
    for name, body in scripts.items():
        (d / name).write_text(textwrap.dedent(body))
    return d


WRITER = """
    import json, sys
    from pathlib import Path
    Path(__file__).with_name("results").joinpath("matmul.json").write_text(json.dumps(sys.argv[1:]))
"""


def test_missing_requirements_refuse_before_running(tmp_path, capsys, monkeypatch):
    d = fake_bench(tmp_path, {"decode.py": WRITER, "lazy.py": WRITER, "policies.py": WRITER, "plan_check.py": WRITER})
    assert main(["bench", "run", "policies", "decode", "--bench-dir", str(d), "--llama-python", NOPE]) == 2
    err = capsys.readouterr().err
    assert "decode needs llama.cpp: no Python at /nonexistent/python" in err and "policies" not in err
    assert not (d / "results" / "matmul.json").exists()  # nothing ran, not even the suite that could
    monkeypatch.setattr("moemesh.benchkit.runner.available", lambda: False)
    assert main(["bench", "run", "plan_check", "--bench-dir", str(d)]) == 2
    assert "plan_check needs root: needs root and the cgroup-v1" in capsys.readouterr().err
    # --skip-unavailable runs what can run and lists the rest as skipped
    assert main(["bench", "run", "plan_check", "policies", "--skip-unavailable", "--bench-dir", str(d)]) == 0
    assert "skipped (root+cgroup)" in capsys.readouterr().out
    assert (d / "results" / "matmul.json").exists()


def test_bench_dir_errors(tmp_path):
    with pytest.raises(Exception, match="no such directory"):
        harness.find_bench_dir(str(tmp_path / "none"))
    assert main(["bench", "run", "kv", "--bench-dir", str(tmp_path), "--dry-run"]) == 2  # kv.py is not there
    assert harness.find_bench_dir(None) == ROOT / "bench"


def test_failing_suite_reported_and_the_next_still_runs(tmp_path, capfd):
    d = fake_bench(tmp_path, {"policies.py": "import sys\nprint('policies here')\nsys.exit(3)\n", "matmul.py": WRITER})
    assert main(["bench", "run", "policies", "matmul", "--bench-dir", str(d), "--", "--fast"]) == 1
    out = capfd.readouterr().out
    assert "policies here" in out and "<== policies: exit 3" in out
    assert json.loads((d / "results" / "matmul.json").read_text()) == ["--fast"]  # ran, with the extra args
    assert "wrote results/matmul.json" in out and "not rewritten: results/matmul.md" in out
    summary = out[out.index("summary:"):]
    assert "policies" in summary and "exit 3" in summary and "1 of 2 suites failed: policies (exit 3)" in summary
    (d / "results" / "matmul.json").unlink()
    assert main(["bench", "run", "policies", "matmul", "--bench-dir", str(d), "--stop-on-error"]) == 1
    assert "not run" in capfd.readouterr().out and not (d / "results" / "matmul.json").exists()


def test_write_results_adds_machine_and_command_keeps_existing(tmp_path):
    payload = {"meta": {"a": 1}, "rows": [1, 2]}
    js, md = results.write_results(tmp_path / "r", "x", payload, "# x\n", [str(ROOT / "bench" / "x.py"), "--n", "a b"])
    d = json.loads(js.read_text())
    assert d["meta"] == {"a": 1} and d["rows"] == [1, 2] and payload == {"meta": {"a": 1}, "rows": [1, 2]}
    assert d["command"] == "bench/x.py --n 'a b'"
    assert {"cpu", "cores", "ram_bytes", "torch", "loadavg", "git_commit", "date"} <= set(d["machine"])
    assert md.read_text() == "# x\n" and sorted(p.name for p in js.parent.iterdir()) == ["x.json", "x.md"]
    kept = {"machine": "x86_64", "command": "bench/serve.py --rounds 3", "loadavg_before": [1, 2, 3]}
    js, _ = results.write_results(tmp_path / "r", "x", kept, "again\n", ["whatever"])
    assert json.loads(js.read_text()) == kept  # existing keys, e.g. readme_table's machine fields, untouched
