"""An expert store whose trunk linears were quantized to int4 at convert time (weights/int4_trunk.py)
decodes exactly like a float-trunk store quantized at load, and reads a smaller trunk file."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from moemesh.quant import int4_trunk
from moemesh.quant.qlinear import QuantLinear
from moemesh.quant.qlinear_rows import from_float_rows
from moemesh.weights.safetensors_io import SafetensorsCheckpoint
from moemesh.weights.source import SafetensorsSource

PROMPT = [1, 5, 9, 2, 7, 3, 11, 4]
MOE = ["qwen3_moe-norm", "qwen3_moe-nonorm-dense1", "qwen2_moe", "mixtral", "olmoe"]


def logits(model) -> torch.Tensor:
    ids = torch.tensor(PROMPT)
    cache = model.new_cache()
    cache.add_sequence(0)
    out = [model(ids[:4], torch.arange(4), cache, BatchLayout([0], [4]), all_logits=True)]  # prefill
    for i in range(4, len(PROMPT)):  # then decode one token at a time
        out.append(model(ids[i : i + 1], torch.tensor([i]), cache, BatchLayout([0], [1])))
    return torch.cat(out)  # [T, V]


def test_quantize_round_trip_matches_quantlinear():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    parts = int4_trunk.quantize(w)
    assert parts[".q4"].shape == (48, 48) and parts[".q4_scale"].dtype == torch.bfloat16
    q, s, m = int4_trunk.groups(parts[".q4"], parts[".q4_scale"], parts[".q4_zero"])
    a, b = QuantLinear.from_float(w, None, "int4"), QuantLinear.from_int4_groups(q, s, m, None)
    assert not b.symmetric and torch.equal(a.qweight, b.qweight) and torch.equal(a.scales_and_zeros, b.scales_and_zeros)
    assert torch.equal(int4_trunk.dequantize(parts[".q4"], parts[".q4_scale"], parts[".q4_zero"]), a.dequantized_weight())


@pytest.mark.parametrize("name", MOE)
def test_int4_trunk_store_equals_load_time_quantization(tiny_checkpoints, tmp_path, name):
    _, d = tiny_checkpoints[name]
    keep = convert(d, tmp_path / "keep", "int4", progress=False)
    small = convert(d, tmp_path / "int4", "int4", progress=False, trunk_quant="int4")
    ck = SafetensorsCheckpoint(small)
    quantized = [n.removesuffix(".q4") for n in ck.names() if n.endswith(".q4")]
    assert quantized and all(".mlp.experts." not in n and not n.endswith("norm.weight") for n in quantized)
    head = [n for n in quantized if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert len(head) == 1 and ck.has(head[0])  # the head's table: float kept (rows, rescoring) + its int4 copy
    src = SafetensorsSource(ck)
    assert all(src.has(n) and not ck.has(n) for n in quantized if n not in head)  # linears: int4 only
    assert (small / "trunk.safetensors").stat().st_size < (keep / "trunk.safetensors").stat().st_size
    at_load, stored = load_model(str(keep), "int4").model, load_model(str(small), "int4").model
    for (name, m1), (_, m2) in zip(at_load.named_modules(), stored.named_modules()):  # every kernel buffer equal
        for (buf, t1), (_, t2) in zip(m1.named_buffers(recurse=False), m2.named_buffers(recurse=False)):
            assert (t1 is None and t2 is None) or torch.equal(t1, t2), (name, buf)
    ref, got = logits(at_load), logits(stored)
    # not bitwise: the float tensors left in the file (router, norms) sit at other mmap offsets, and
    # torch's fp32 matvec rounds differently with the alignment (seen: 1 ulp at some decode steps)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()  # measured up to 1e-5 (int4 activation rounding amplifies an ulp)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    lazy = load_model(str(small), "int4", experts=ExpertOptions(slots=3))
    assert torch.equal(logits(lazy.model), got)  # same file: lazy == resident, bit for bit
    # a float run of the int4 trunk dequantizes it (what int4 represents), it does not fail
    assert torch.isfinite(logits(load_model(str(small), "fp32").model)).all()


def test_plan_counts_an_int4_trunk_like_the_float_one(tiny_checkpoints, tmp_path):
    from moemesh.commands.plan import plan

    _, d = tiny_checkpoints["qwen3_moe-norm"]
    keep = convert(d, tmp_path / "keep", "int4", progress=False)
    small = convert(d, tmp_path / "int4", "int4", progress=False, trunk_quant="int4")
    a, b = plan(str(keep), 2**30, 1, None)["stored"], plan(str(small), 2**30, 1, None)["stored"]
    assert a["params"] == b["params"] and b["tensor_bytes"] < a["tensor_bytes"]
    assert "int4 (trunk linears)" in b["dtypes"]


def test_cached_lazy_store_gets_an_int4_trunk(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path))
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    lm = load_model(str(d), "int4", experts=ExpertOptions(slots=4))
    assert any(n.endswith(".q4") for n in SafetensorsCheckpoint(lm.path).names())


def test_head_from_stored_int4_equals_quantizing_the_table():
    """A vocab-sized table in several row chunks: the head built from its stored int4 tensors has
    the buffers of from_float_rows on the float table (padding rows: 9000 is not a multiple of 64)."""
    from moemesh.models.build import int4_head

    table = torch.randn(9000, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    parts = int4_trunk.quantize(table, rows=4096)
    got, ref = int4_head((parts[".q4"], parts[".q4_scale"], parts[".q4_zero"])), from_float_rows(table, "int4")
    assert got.out_features == ref.out_features == 9000 and not got.symmetric
    assert torch.equal(got.qweight, ref.qweight) and torch.equal(got.scales_and_zeros, ref.scales_and_zeros)


def test_convert_cli_trunk_quant(tiny_checkpoints, tmp_path, capsys):
    from moemesh.cli import main

    _, d = tiny_checkpoints["mixtral"]
    assert main(["convert", str(d), str(tmp_path / "s"), "--trunk-quant", "int4", "--quiet"]) == 0
    assert any(n.endswith(".q4") for n in SafetensorsCheckpoint(tmp_path / "s").names())
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice (exit 2, usage on stderr)
        main(["convert", str(d), str(tmp_path / "t"), "--trunk-quant", "int3"])
    assert not (tmp_path / "t").exists()
