"""The model's recommended sampling (generation_config.json, GGUF general.sampling.*) fills the
fields a request leaves out, and only those."""
from __future__ import annotations

import json

import pytest

from moemesh.loading.sampling_defaults import SamplingDefaults, read_sampling_defaults
from moemesh.server.core.sampling import make_params


def write_gguf(path, metadata: dict) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_generation_config_json(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0, "repetition_penalty": 1.05,
         "do_sample": True}))
    d = read_sampling_defaults(tmp_path)
    assert d.values() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05}
    assert d.source == str(tmp_path / "generation_config.json")


@pytest.mark.parametrize("config", [{"eos_token_id": 2}, {"temperature": None, "top_p": 7, "top_k": -1,
                                                          "repetition_penalty": 0, "min_p": "x"}, [1, 2], "junk"])
def test_nothing_or_nonsense_recommends_nothing(tmp_path, config):
    (tmp_path / "generation_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert read_sampling_defaults(tmp_path) == SamplingDefaults()


def test_no_file_recommends_nothing(tmp_path):
    assert read_sampling_defaults(tmp_path) == SamplingDefaults()


def test_gguf_sampling_keys(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, {"general.sampling.temp": 0.7, "general.sampling.top_k": 40, "general.sampling.top_p": 0.8})
    d = read_sampling_defaults(path)
    assert d.values() == pytest.approx({"temperature": 0.7, "top_k": 40, "top_p": 0.8})
    assert isinstance(d.top_k, int) and d.source == str(path)
    plain = tmp_path / "plain.gguf"
    write_gguf(plain, {})
    assert read_sampling_defaults(plain) == SamplingDefaults()


def test_defaults_fill_only_what_the_request_leaves_out():
    d = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1)
    p = make_params(prompt_len=5, context_length=100, max_tokens=None, max_tokens_field="max_tokens", defaults=d)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.6, 0.95, 20, 0.05, 1.1)
    p = make_params(prompt_len=5, context_length=100, max_tokens=None, max_tokens_field="max_tokens", defaults=d,
                    temperature=0, top_p=1.0, top_k=-1, min_p=0.0, repetition_penalty=1.0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.0, 1.0, 0, 0.0, 1.0)
    p = make_params(prompt_len=5, context_length=100, max_tokens=None, max_tokens_field="max_tokens")
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 0)  # no recommendation: the API's defaults
