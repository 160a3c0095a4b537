"""`moemesh plan`: parameter counts of well-known models, exact byte counts, the perf model, CLI errors."""
from __future__ import annotations

import json
import time

import pytest
import torch

from moemesh.benchkit import perfmodel
from moemesh.benchkit.known import KNOWN, PUBLISHED
from moemesh.benchkit.probe_check import machine_identity
from moemesh.benchkit.shapes import Linear, blob_bytes, format_bytes, linear_bytes, shape_from_config
from moemesh.cli import main
from moemesh.quant.qlinear import QuantLinear

# gpt-oss's model card counts active parameters without the embedding table, and so do GLM's and MiniMax's
# (with it GLM-4.6 would be 33.6B, not 32B); the others with it
ACTIVE_KEY = {"gpt-oss-20b": "active_params_no_embedding", "gpt-oss-120b": "active_params_no_embedding",
              "GLM-4.6": "active_params_no_embedding", "GLM-5": "active_params_no_embedding",
              "MiniMax-M2": "active_params_no_embedding"}
# MiniMax-M2's card gives one significant digit ("10 billion active"): 10.4B rounds to it
ACTIVE_REL = {"MiniMax-M2": 0.05}

# this machine's identity and today's date: plan refuses a probe of another machine or an old one
PROBE = {"version": 1, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": 2, "quick": True,
         "machine": {"identity": machine_identity()},
         "disk": {"measurements": [{"request_bytes": 2**21, "queue_depth": 1, "bytes_s": 1e9},
                                   {"request_bytes": 2**23, "queue_depth": 8, "bytes_s": 2e9}]},
         "memory": {"bytes_s": 20e9}, "matmul": {f: {"gflops": g} for f, g in (("int4", 40), ("int8", 30), ("bf16", 10))}}


@pytest.mark.parametrize("name", list(KNOWN))
def test_known_models_match_published_counts(name):
    s = shape_from_config(KNOWN[name], name)
    total, active = PUBLISHED[name]
    assert s.total_params / 1e9 == pytest.approx(total, rel=0.02)
    assert getattr(s, ACTIVE_KEY.get(name, "active_params")) / 1e9 == pytest.approx(active, rel=ACTIVE_REL.get(name, 0.03))


def test_transformers_config_dicts_size_like_the_table():
    """config.json as transformers writes it for gpt_oss and deepseek_v3 (defaults: the 120b and V3)."""
    from transformers import DeepseekV3Config, GptOssConfig

    for cfg, name in ((GptOssConfig(), "gpt-oss-120b"), (DeepseekV3Config(), "DeepSeek-V3")):
        a, b = shape_from_config(cfg.to_dict()), shape_from_config(KNOWN[name])
        assert (a.total_params, a.active_params) == (b.total_params, b.active_params), name


@pytest.mark.parametrize("n,k", [(1536, 2048), (2048, 768), (24, 32), (40, 48), (7, 16), (5, 40), (9, 12)])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_linear_bytes_match_quantlinear(n, k, fmt):
    """The byte model follows QuantLinear's storage, fallbacks and padding included."""
    for bias in (False, True):
        ql = QuantLinear.from_float(torch.randn(n, k), torch.randn(n) if bias else None, fmt)
        assert linear_bytes(Linear(n, k, bias), fmt) == ql.nbytes()


def test_tiny_checkpoints_params_and_bytes(tiny_checkpoints):
    """Every tiny HF checkpoint: config-derived params equal the tensors' elements; plan's stored
    bytes equal the tensors' bytes exactly."""
    from safetensors import safe_open

    from moemesh.commands.plan import plan

    for name, (_, d) in tiny_checkpoints.items():
        numel = nbytes = 0
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as sf:
                for key in sf.keys():
                    t = sf.get_tensor(key)
                    numel, nbytes = numel + t.numel(), nbytes + t.numel() * t.element_size()
        r = plan(str(d), 2**30, 1, PROBE)
        assert r["total_params"] == numel, name
        assert r["stored"]["tensor_bytes"] == nbytes, name
        assert r["stored"]["params"] == numel, name


def test_store_blob_and_trunk_match_a_converted_store(tiny_checkpoints, tmp_path):
    """Blob size equals the store's; the int4 trunk estimate equals the loaded model's bytes."""
    from moemesh.loading.convert import convert
    from moemesh.loading.experts import ExpertOptions, model_bytes
    from moemesh.loading.loader import load_model
    from moemesh.store.expert_store import ExpertStore

    for name in ("qwen3_moe-norm", "mixtral"):
        _, d = tiny_checkpoints[name]
        for quant in ("int4", "int8", "bf16"):
            out = convert(d, tmp_path / f"{name}-{quant}", quant, progress=False)
            st = ExpertStore(out)
            shape = shape_from_config(st.config)
            assert blob_bytes(shape, quant) == st.blob_size, (name, quant)
        loaded = load_model(str(tmp_path / f"{name}-int4"), "int4", experts=ExpertOptions(slots=4))
        assert format_bytes(shape_from_config(st.config), "int4").trunk_ram == model_bytes(loaded.model), name


def test_disk_bandwidth_is_a_robust_median_near_the_blob_size():
    probe = {"disk": {"measurements": [{"request_bytes": 2**21, "bytes_s": b} for b in (1.0e9, 1.1e9, 2.3e9)]
                      + [{"request_bytes": 2**24, "bytes_s": 3e9}]}}
    assert perfmodel.disk_bandwidth(probe, 2**21) == pytest.approx(1.1e9)  # one lucky 2.3 GB/s sample ignored
    assert perfmodel.disk_bandwidth(probe, 100 * 2**20) == pytest.approx(3e9)  # none within 4x: nearest size


def test_perfmodel_floors_and_hit_rates():
    s = shape_from_config(KNOWN["Qwen3-30B-A3B"])
    fb = format_bytes(s, "int4")
    everything = perfmodel.predict(s, "int4", perfmodel.ram_to_hold_all(fb), PROBE)
    assert everything.hit_rate == 1.0 and everything.disk_s == 0.0
    assert everything.seconds_per_token == pytest.approx(max(fb.active / 20e9, 2 * s.active_matmul_params / 40e9))
    half = perfmodel.predict(s, "int4", fb.trunk_ram + fb.experts // 2 + 2**30, PROBE)
    assert half.hit_rate == pytest.approx(half.slots / (48 * 128))
    floor = 48 * 8 * (1 - half.hit_rate) * fb.expert / 1.5e9  # 2.8 MiB blobs: median of the 2 and 8 MiB samples
    assert half.disk_s == pytest.approx(floor)
    assert half.seconds_per_token == pytest.approx(everything.seconds_per_token + perfmodel.IO_FACTOR * floor)
    assert not perfmodel.predict(s, "int4", 2**29, PROBE).fits
    # a routing profile where one expert per layer takes every pick: a cache of 48 slots hits always
    skewed = [[100] + [0] * 127 for _ in range(48)]  # each cached pair misses once (cold)
    assert perfmodel.profile_hit_rate(skewed, 48) == pytest.approx(0.99)
    assert perfmodel.profile_hit_rate(skewed, 24) == pytest.approx(0.495)
    assert perfmodel.nodes_to_hold(fb, 8 * 2**30) == -(-(fb.trunk_ram + fb.experts) // (8 * 2**30 - 448 * 2**20))


def test_compute_uses_the_fused_expert_rate_when_probed():
    """int4 routed experts at the probe's fused-expert rate, the trunk and head at the per-linear rate."""
    s = shape_from_config(KNOWN["Qwen3-30B-A3B"])
    experts = 48 * 8 * (2 * 768 * 2048 + 2048 * 768)  # MoE layers x top-k x (gate_up + down) weights
    plain = perfmodel.compute_seconds(s, "int4", PROBE)
    assert plain == pytest.approx(2 * s.active_matmul_params / 40e9)
    fused = {**PROBE, "matmul": {**PROBE["matmul"], "int4": {"gflops": 40, "fused_experts": {"gflops": 80}}}}
    got = perfmodel.compute_seconds(s, "int4", fused)
    assert got == pytest.approx(2 * (s.active_matmul_params - experts) / 40e9 + 2 * experts / 80e9)
    assert got < plain and perfmodel.compute_seconds(s, "int8", fused) == perfmodel.compute_seconds(s, "int8", PROBE)


def test_plan_cli_json_and_table(tmp_path, capsys):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(PROBE))
    assert main(["plan", "DeepSeek-V3", "--ram", "64G", "--nodes", "2", "--json", "--probe", str(probe)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["total_params"] == pytest.approx(671e9, rel=0.01) and r["active_params"] == pytest.approx(37e9, rel=0.03)
    assert set(r["formats"]) == {"bf16", "int8", "int4", "FP8"}  # + the published checkpoint's own format
    assert all(f["tokens_per_s"] is not None and f["nodes_to_hold_all"] >= 6 for f in r["formats"].values())
    assert main(["plan", "qwen/qwen3-30b-a3b", "--ram", "16G", "--probe", str(probe)]) == 0
    out = capsys.readouterr().out
    assert "Qwen3-30B-A3B" in out and "int4" in out and "tok/s @ 16 GiB" in out


def test_plan_cli_routing_trace_replays_the_cache(tmp_path, capsys):
    """--routing {"trace": ...}: the hit rate is the LFU cache's on the trace (after its first tenth),
    so a trace that keeps picking the same experts predicts a full hit rate where uniform routing
    predicts a low one; a bad trace is a clear error."""
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(PROBE))
    trace = [[layer, *range(8)] for _ in range(20) for layer in range(48)]  # every token: experts 0-7
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps({"trace": trace}))
    argv = ["plan", "Qwen3-30B-A3B", "--ram", "8G", "--json", "--probe", str(probe)]
    assert main(argv) == 0
    uniform = json.loads(capsys.readouterr().out)["formats"]["int4"]
    assert main(argv + ["--routing", str(routing)]) == 0
    replay = json.loads(capsys.readouterr().out)["formats"]["int4"]
    assert uniform["hit_rate"] < 0.5 and replay["hit_rate"] == 1.0 and replay["disk_floor_s"] == 0.0
    assert replay["tokens_per_s"] > uniform["tokens_per_s"]
    routing.write_text(json.dumps({"trace": [[0]]}))
    assert main(argv + ["--routing", str(routing)]) == 2
    assert "not a routing profile" in capsys.readouterr().err


def test_plan_nodes_pay_the_stage_calls(tmp_path, capsys):
    """--nodes N pools RAM (fewer misses) and adds (N - 1) x (transport + --rtt-ms) per token."""
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(PROBE))
    base = ["plan", "Qwen3-30B-A3B", "--ram", "64G", "--json", "--probe", str(probe)]  # holds it all
    rows = {}
    for extra in ([], ["--nodes", "3"], ["--nodes", "3", "--rtt-ms", "20"]):
        assert main(base + extra) == 0
        rows[" ".join(extra)] = json.loads(capsys.readouterr().out)["formats"]["int4"]
    one, three, far = rows[""], rows["--nodes 3"], rows["--nodes 3 --rtt-ms 20"]
    assert one["network_s"] == 0.0 and three["network_s"] == pytest.approx(2 * (perfmodel.MESH_HOP_S + 0.0005))
    assert 1 / three["tokens_per_s"] == pytest.approx(1 / one["tokens_per_s"] + three["network_s"])
    assert far["network_s"] == pytest.approx(2 * (perfmodel.MESH_HOP_S + 0.020)) and far["tokens_per_s"] < three["tokens_per_s"]
    assert main(base + ["--nodes", "2"]) == 0 and "stage call" not in capsys.readouterr().out  # JSON: no note
    assert main(base[:-3] + ["--probe", str(probe), "--nodes", "2"]) == 0
    assert "1 stage call(s)" in capsys.readouterr().out
    assert main(base + ["--rtt-ms", "-1"]) == 2 and "--rtt-ms" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["plan", "no-such-model"], "not a file, a directory or a known model"),
    (["plan", "Qwen3-30B-A3B", "--ram", "lots"], "cannot read size"),
    (["plan", "Qwen3-30B-A3B", "--nodes", "0"], "--nodes"),
    (["plan"], "plan needs a MODEL"),
])
def test_plan_bad_input_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_plan_bad_files_exit_2(tmp_path, capsys):
    bad_gguf = tmp_path / "x.gguf"
    bad_gguf.write_bytes(b"nope" * 10)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    empty = tmp_path / "empty"
    empty.mkdir()
    for target, msg in ((bad_gguf, "not a GGUF file"), (cfg, "cannot size model_type 'bert'"), (empty, "neither an HF")):
        assert main(["plan", str(target)]) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick_writes_a_probe_plan_reads(tmp_path, capsys):
    """The whole quick probe (~30-60 s: a 512 MiB scratch file, memory and matmul samples)."""
    out = tmp_path / "probe.json"
    assert main(["bench", "--quick", "--out", str(out), "--threads", "1"]) == 0
    probe = json.loads(out.read_text())
    assert {m["queue_depth"] for m in probe["disk"]["measurements"]} == {1, 8}
    assert probe["memory"]["bytes_s"] > 0 and all(probe["matmul"][f]["gflops"] > 0 for f in ("int4", "int8", "bf16"))
    assert not list(tmp_path.glob("probe-scratch-*"))  # the scratch file is removed
    capsys.readouterr()
    assert main(["plan", "Qwen3-30B-A3B", "--ram", "8G", "--probe", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["formats"]["int4"]["tokens_per_s"] > 0


def test_eager_overhead_adds_per_layer():
    s = shape_from_config(KNOWN["Qwen3-30B-A3B"])
    fb = format_bytes(s, "int4")
    ram = perfmodel.ram_to_hold_all(fb)
    base = perfmodel.predict(s, "int4", ram, PROBE)
    more = perfmodel.predict(s, "int4", ram, {**PROBE, "overhead": {"layer_s": 1e-3}})
    assert more.overhead_s == pytest.approx(48e-3) and base.overhead_s == 0.0
    assert more.seconds_per_token == pytest.approx(base.seconds_per_token + 48e-3)


def test_layer_overhead_runs_the_real_decode_code():
    from moemesh.benchkit.overhead import layer_overhead, step_seconds

    assert step_seconds(2, steps=3) > 0
    r = layer_overhead(steps=3, shallow=1, deep=2)
    assert r["layer_s"] >= 0.0 and r["step_s_deep"] > 0 and r["layers"] == [1, 2]


@pytest.mark.parametrize("name", ["qwen3_moe-norm", "mixtral"])
def test_gguf_sized_like_its_checkpoint(tiny_checkpoints, tmp_path, name):
    """plan reads a MoE GGUF's header (qwen3moe, and Mixtral = llama + expert_count) into the same
    parameter counts as the HF checkpoint the GGUF was written from."""
    from moemesh.commands.plan import plan
    from test_gguf_moe import write_gguf

    _, d = tiny_checkpoints[name]
    gguf = tmp_path / f"{name}.gguf"
    write_gguf(d, gguf)
    from_hf, from_gguf = plan(str(d), 2**30, 1, PROBE), plan(str(gguf), 2**30, 1, PROBE)
    for key in ("total_params", "active_params", "layers", "moe_layers", "experts", "top_k", "vocab_size"):
        assert from_gguf[key] == from_hf[key], (name, key)


def test_plan_native_rows_use_true_block_sizes():
    """MXFP4 for gpt-oss-120b (built in): 17 bytes per 32 weights, the published ~61 GB of experts;
    K-quants at GGML_QUANT_SIZES; rows that are not whole 256-blocks fall back to Q8_0 as llama.cpp does."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from moemesh.benchkit.shapes import NATIVE
    from moemesh.commands.plan import plan

    for name, (block, size) in NATIVE.items():
        if name != "FP8":
            assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (block, size), name
    assert linear_bytes(Linear(768, 2048), "Q4_K") == 768 * 2048 // 256 * 144
    assert linear_bytes(Linear(2880, 2880, bias=True), "Q4_K") == 2880 * 2880 // 32 * 34 + 4 * 2880  # 2880 % 256: Q8_0
    assert linear_bytes(Linear(7168, 2048), "FP8") == 7168 * 2048 // 128 * 132
    r = plan("gpt-oss-120b", 16 * 2**30, 1, None)
    mx = r["formats"]["MXFP4"]
    assert mx["expert_bytes"] < r["formats"]["int4"]["expert_bytes"]
    experts = mx["experts_bytes"]
    assert experts == pytest.approx(36 * 128 * ((5760 + 2880) * 2880 * 17 / 32 + 4 * (5760 + 2880)), rel=0.01)
    assert 59e9 < experts < 62e9  # the published checkpoint's MXFP4 experts: ~60.8 GB


def test_plan_reads_native_format_from_gguf_header(tmp_path):
    """plan FILE.gguf: a row for the experts' own type, its per-expert size read from the header."""
    from gguf import GGMLQuantizationType as Q

    from gguf_write import write_deepseek
    from moemesh.commands.plan import plan
    from test_gguf_families import fresh

    write_deepseek(fresh("deepseek", True, 256, 256), tmp_path / "m.gguf", Q.Q4_K)
    r = plan(str(tmp_path / "m.gguf"), 2**30, 1, None)
    assert r["stored"]["native"] == ["Q4_K"] and "Q4_K" in r["formats"]
    per_expert = 3 * 256 * 256 // 256 * 144  # gate, up, down of 256 x 256
    assert r["stored"]["native_expert_bytes"] == per_expert
    assert per_expert < r["formats"]["Q4_K"]["expert_bytes"] <= per_expert + 4 * 4096
