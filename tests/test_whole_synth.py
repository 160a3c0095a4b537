"""The whole-model generators (benchkit/synth/whole*.py) on tiny shapes, the code path that writes the
61 GB gpt-oss-120b and 17 GB Qwen3-30B-A3B: valid GGUFs that gguf-py, llama.cpp and moemesh read, lazy ==
resident and layer-major == chunked on the first 2 layers copied out of the file, resumable, reused
when finished, refused with the bytes needed when the disk is too small."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from moemesh.benchkit.suites import DEFAULT_LLAMA_PYTHON
from moemesh.benchkit.synth import whole, whole_check, whole_write
from moemesh.errors import MoemeshError

MODELS = list(whole.SPECS)


@pytest.mark.parametrize("name", MODELS)
def test_tiny_whole_gguf_is_valid(tmp_path, name):
    spec = whole.tiny_spec(name)
    path = whole_write.write(spec, tmp_path, progress=False)
    r = GGUFReader(str(path))
    got = {t.name: t for t in r.tensors}
    want = whole.tensors(spec)
    assert [t.name for t in r.tensors] == [n for n, *_ in want]
    for n, shape, qtype, _ in want:
        assert got[n].tensor_type.name == qtype
        assert tuple(int(x) for x in reversed(got[n].shape)) == shape  # gguf-py lists ggml's order
        assert got[n].n_bytes == whole.nbytes(shape, qtype)
    exps = np.asarray(got["blk.0.ffn_gate_exps.weight"].data).reshape(-1)
    if spec.expert_type == "MXFP4":
        e8m0 = exps.reshape(-1, 17)[:, 0]
        assert e8m0.min() >= 119 and e8m0.max() <= 121 and len(set(e8m0.tolist())) == 3
    else:
        d = exps.reshape(-1, 144)[:, :4].copy().view(np.float16)
        assert (d == np.float16(2**-11)).all()
    assert len(set(exps[:4096].tolist())) > 200  # the rest: random bits


@pytest.mark.parametrize("name", MODELS)
def test_first_two_layers_exact(tmp_path, name):
    """The first 2 layers copied byte for byte out of a 4-layer file: lazy == resident and layer-major ==
    chunked prefill, bit for bit (what the benchmark checks on the whole 61/17 GB files)."""
    spec = whole.tiny_spec(name, layers=4)
    path = whole_write.write(spec, tmp_path, progress=False)
    first = whole_check.write_prefix(path, spec, 2, tmp_path)
    a, b = GGUFReader(str(path)), GGUFReader(str(first))
    assert len(b.tensors) < len(a.tensors)
    src = {t.name: t for t in a.tensors}
    for t in b.tensors:
        assert np.array_equal(np.asarray(t.data), np.asarray(src[t.name].data))
    res = whole_check.check(first, tokens=40, chunk=8)
    assert res["finite"] and res["layer_major_ran"]
    assert res["lazy_equals_resident"], res
    assert res["layer_major_equals_chunked"], res
    # the benchmark's way (the whole file read in place as its first 2 layers) computes the same function
    view = whole_check.check(path, tokens=40, chunk=8, layers=2)
    assert view["lazy_equals_resident"] and view["layer_major_equals_chunked"] and view["layer_major_ran"]
    assert torch.equal(view["last_logits"], res["last_logits"])
    assert not torch.equal(whole_check.check(path, tokens=40, chunk=8)["last_logits"], res["last_logits"])


@pytest.mark.skipif(not Path(DEFAULT_LLAMA_PYTHON).is_file(), reason="llama-cpp-python peer not installed (make peers)")
@pytest.mark.parametrize("name", MODELS)
def test_llama_cpp_reads_it(tmp_path, name):
    path = whole_write.write(whole.tiny_spec(name), tmp_path, progress=False)
    code = ("import sys, numpy as np; from llama_cpp import Llama; l = Llama(model_path=sys.argv[1], n_ctx=64, "
            "verbose=False); l.eval(list(range(5, 21))); x = np.ctypeslib.as_array(l._ctx.get_logits(), "
            "shape=(l.n_vocab(),)); print(bool(np.isfinite(x).all()), float(np.abs(x).max()))")
    out = subprocess.run([DEFAULT_LLAMA_PYTHON, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    finite, peak = out.stdout.split()[-2:]
    assert finite == "True" and float(peak) > 0


def test_resume_gives_the_same_bytes(tmp_path):
    spec = whole.tiny_spec("gpt-oss-120b", layers=3)
    ref = whole_write.write(spec, tmp_path / "ref", progress=False).read_bytes()
    stop_at = 20

    def dying(i, name, shape, qtype, role, nbytes):
        if i == stop_at:
            raise KeyboardInterrupt
        from moemesh.benchkit.synth.whole_fill import pool, tensor_chunks

        return tensor_chunks(role, shape, qtype, nbytes, spec.seed, i, pool(spec.seed))

    with pytest.raises(KeyboardInterrupt):
        whole_write.write(spec, tmp_path / "run", progress=False, chunks=dying)
    root = whole_write.model_dir(spec, tmp_path / "run")
    assert json.loads((root / "progress.json").read_text())["tensors_done"] == stop_at
    assert not (root / "DONE").exists() and whole_write.finished(spec, tmp_path / "run") is None
    with open(root / "model.gguf.partial", "ab") as f:
        f.write(b"half a tensor of garbage")  # what a kill mid-tensor leaves
    seen = []
    got = whole_write.write(spec, tmp_path / "run", progress=False, log=seen.append)
    assert any("continuing" in s for s in seen)
    assert got.read_bytes() == ref
    assert not (root / "progress.json").exists() and not (root / "model.gguf.partial").exists()
    mtime = got.stat().st_mtime_ns
    assert whole_write.write(spec, tmp_path / "run", progress=False) == got and got.stat().st_mtime_ns == mtime


def test_progress_of_another_spec_restarts(tmp_path):
    spec = whole.tiny_spec("qwen3-30b-a3b", layers=2)
    root = whole_write.model_dir(spec, tmp_path)
    root.mkdir(parents=True)
    other = {**spec.as_dict(), "seed": 7}
    (root / "progress.json").write_text(json.dumps({"spec": other, "data_start": 64, "tensors_done": 3}))
    (root / "model.gguf.partial").write_bytes(b"x" * 10000)
    seen = []
    path = whole_write.write(spec, tmp_path, progress=False, log=seen.append)
    assert not any("continuing" in s for s in seen)
    assert path.read_bytes() == whole_write.write(spec, tmp_path / "fresh", progress=False).read_bytes()


def test_too_small_disk_is_refused_with_the_bytes_needed(tmp_path, monkeypatch):
    import shutil

    spec = whole.SPECS["gpt-oss-120b"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 << 30, 90 << 30, 10 << 30))
    with pytest.raises(MoemeshError, match=r"needs 6[0-9]\.\d GB more .* 10\.7 GB are free"):
        whole_write.write(spec, tmp_path, progress=False)
    assert not (whole_write.model_dir(spec, tmp_path) / "model.gguf.partial").exists()  # refused before writing


def test_real_specs_sizes():
    """The published shapes give the published file sizes (gpt-oss-120b's MXFP4 GGUF ~61-63 GB, Qwen3-30B-A3B
    Q4_K ~17 GB)."""
    g, q = whole.SPECS["gpt-oss-120b"], whole.SPECS["qwen3-30b-a3b"]
    assert 60e9 < whole.expert_bytes(g) < 62e9 and 62e9 < whole.file_bytes(g) < 64e9
    assert 16e9 < whole.expert_bytes(q) < 17e9 and 17e9 < whole.file_bytes(q) < 18e9
