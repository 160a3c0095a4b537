"""The trunk cache (weights/trunk_cache.py): a second load maps the linears the first one converted,
with the same buffers and the same logits bit for bit, the same conversion report, and nothing stale
after the model's files change; a broken cache only costs a conversion."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from moemesh.loading.loader import load_model
from moemesh.weights import trunk_cache
from test_int4_trunk import logits


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "trunks"
    monkeypatch.setenv(trunk_cache.ENV, str(root))
    return root


def buffers(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{b}": t for n, m in model.named_modules() for b, t in m.named_buffers(recurse=False) if t is not None}


def entries(root) -> dict:
    (d,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return trunk_cache.TrunkCache(d, d.name).entries


@pytest.mark.parametrize("name,quant", [("qwen3_moe-norm", "int4"), ("qwen2_moe", "int4"), ("llama-gqa", "int8"),
                                        ("mixtral", "bf16")])
def test_second_load_maps_the_converted_trunk(tiny_checkpoints, cache_dir, capfd, monkeypatch, name, quant):
    _, d = tiny_checkpoints[name]
    first = load_model(str(d), quant).model
    err = capfd.readouterr().err
    assert "is cached in" in err
    stored = entries(cache_dir)
    assert any(k.startswith("head:") for k in stored) and any("self_attn" in k for k in stored)
    assert not any(".experts." in k for k in stored)  # routed experts are not the trunk cache's
    report = [ln for ln in err.splitlines() if "converted" in ln and "relative RMS" in ln]

    second = load_model(str(d), quant).model
    err2 = capfd.readouterr().err
    assert "is cached in" not in err2  # nothing left to convert
    assert [ln for ln in err2.splitlines() if "converted" in ln and "relative RMS" in ln] == report
    b1, b2 = buffers(first), buffers(second)
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
    assert torch.equal(logits(first), logits(second))

    monkeypatch.setenv(trunk_cache.ENV, "0")  # off: converted again, the same logits
    assert torch.equal(logits(load_model(str(d), quant).model), logits(second))


def test_a_changed_model_file_is_a_new_key(tiny_checkpoints, cache_dir, tmp_path):
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for p in d.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    load_model(str(copy), "int4")
    assert len(list(cache_dir.iterdir())) == 1
    weights = next(copy.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an edited file: never read a stale trunk
    load_model(str(copy), "int4")
    assert len([p for p in cache_dir.iterdir() if not p.name.startswith(".")]) == 2
    load_model(str(copy), "int8")  # another quant mode: another key
    assert len([p for p in cache_dir.iterdir() if not p.name.startswith(".")]) == 3


def test_a_corrupt_cache_is_converted_again_with_a_warning(tiny_checkpoints, cache_dir):
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    ref = logits(load_model(str(d), "int4").model)
    (cdir,) = list(cache_dir.iterdir())
    (part,) = list(cdir.glob("part-*.safetensors"))
    part.write_bytes(part.read_bytes()[:100])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = logits(load_model(str(d), "int4").model)
    assert any("unreadable" in str(w.message) and str(cdir) in str(w.message) for w in caught)
    assert torch.equal(got, ref)
    (cdir / "index.json").write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = logits(load_model(str(d), "int4").model)
    assert any("unreadable trunk cache" in str(w.message) for w in caught)
    assert torch.equal(got, ref)


def test_a_partial_build_adds_a_part(tiny_checkpoints, cache_dir):
    """A mesh stage converts some layers; a later full load keeps them and adds the rest."""
    from moemesh.loading.source import arch_and_args, open_source
    from moemesh.models.build import make_builder

    _, d = tiny_checkpoints["qwen3_moe-norm"]
    config, source, _ = open_source(d)
    spec, args = arch_and_args(d, config)
    builder = make_builder(spec, args, source, "int4")
    builder.trunk = trunk_cache.TrunkCache.for_model(d, "int4")
    builder.layer(1, None)  # type: ignore[arg-type]  # one layer's attention (no expert call at build)
    builder.trunk.save()
    part_one = set(entries(cache_dir))
    assert part_one and all(k.startswith("model.layers.1.") for k in part_one)
    model = load_model(str(d), "int4").model
    full = entries(cache_dir)
    assert part_one < set(full) and len({e["part"] for e in full.values()}) == 2
    assert torch.equal(logits(load_model(str(d), "int4").model), logits(model))


def test_off_writes_nothing(tiny_checkpoints, cache_dir, monkeypatch):
    monkeypatch.setenv(trunk_cache.ENV, "0")
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    load_model(str(d), "int4")
    assert not cache_dir.exists()


def test_the_caches_stay_within_their_size_limit(tiny_checkpoints, cache_dir, monkeypatch, capfd):
    old = []
    for i in range(3):  # three earlier caches, 1 MiB each, loaded at times 1000, 2000, 3000
        d = cache_dir / f"old-{i}"
        d.mkdir(parents=True)
        (d / "part-0.safetensors").write_bytes(b"\0" * 2**20)
        (d / "index.json").write_text('{"format": 1, "entries": {}}')
        os.utime(d / "index.json", (1000 * (i + 1), 1000 * (i + 1)))
        old.append(d)
    monkeypatch.setenv(trunk_cache.MAX_ENV, str(1.5 / 1024))  # 1.5 MiB: the newest old one and this one fit
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    load_model(str(d), "int4")  # writes its own (small) cache, then prunes the oldest
    assert "removed the 2 least recently loaded" in capfd.readouterr().err
    assert not old[0].exists() and not old[1].exists() and old[2].exists()
    mine = [p for p in cache_dir.iterdir() if p not in old]
    assert len(mine) == 1 and (mine[0] / "index.json").is_file()


def test_a_bad_size_limit_warns_and_a_dead_save_is_cleaned(tiny_checkpoints, cache_dir, monkeypatch):
    dead = cache_dir / ".tmp-dead"  # what a load killed mid-save leaves
    dead.mkdir(parents=True)
    os.utime(dead, (1000, 1000))
    monkeypatch.setenv(trunk_cache.MAX_ENV, "16G")
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    with pytest.warns(RuntimeWarning, match="expected a number of GiB"):
        load_model(str(d), "int4")
    assert not dead.exists()
