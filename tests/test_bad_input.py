"""Broken checkpoints and bad prompts give a clear message and a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from moemesh.errors import CheckpointError, PromptTooLong, UnsupportedArchitecture
from moemesh.loading.loader import load_model


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def ckpt(tiny_checkpoints, tmp_path):
    """A writable copy of a tiny MoE checkpoint."""
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    dst = tmp_path / "ckpt"
    shutil.copytree(d, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(str(tmp_path / "nope"))


def test_truncated_safetensors_names_file_and_tensor(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated.*tensor '"):
        load_model(str(ckpt))


def test_missing_tensor_is_named(ckpt):
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.experts.3.up_proj.weight"):
        load_model(str(ckpt))


def test_unsupported_architecture_lists_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "bert"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="llama.*mixtral.*olmoe.*qwen2_moe.*qwen3_moe"):
        load_model(str(ckpt))


def test_prompt_longer_than_context(ckpt):
    from moemesh.engine.engine import Engine
    from moemesh.engine.sampling_params import SamplingParams

    engine = Engine(load_model(str(ckpt)).model, context_length=16)
    with pytest.raises(PromptTooLong, match="16"):
        engine.add_request(list(range(3, 40)), SamplingParams())


def test_cli_errors_are_clean(ckpt, tmp_path):
    r = cli("generate", str(tmp_path / "missing"), "--prompt-ids", "1,2")
    assert r.returncode == 2 and "moemesh: error:" in r.stderr and "Traceback" not in r.stderr
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 5)
    r = cli("generate", str(ckpt), "--prompt-ids", "1,2")
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_cli_prompt_too_long_and_bad_ids(tiny_checkpoints):
    _, d = tiny_checkpoints["llama-gqa"]  # max_position_embeddings = 256
    r = cli("generate", str(d), "--prompt-ids", ",".join(["5"] * 300), "-n", "2")
    assert r.returncode == 2 and "context window is 256" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", str(d), "--prompt-ids", "1,x")
    assert r.returncode == 2 and "comma-separated" in r.stderr
    r = cli("generate", str(d), "--prompt-ids", "1,99999")
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr


def test_cli_generate_json(tiny_checkpoints):
    _, d = tiny_checkpoints["mixtral"]
    r = cli("generate", str(d), "--prompt-ids", "5,6,7", "-n", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 6 and out["prompt_tokens"] == 3
    assert out["decode_tok_s"] > 0 and out["prefill_tok_s"] > 0 and out["peak_rss_bytes"] > 10**7
