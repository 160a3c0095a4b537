"""Every architecture's decode step traced as one graph from the model's own module code (Dynamo with
fullgraph=True; backend "eager" runs the traced graph op by op, so each model takes seconds, not a
C++ compile): a layer type that cannot be traced fails here, and the traced step must give eager's
tokens. MoE layers run in a graph through their provider's ``decode_op`` (resident int4 SwiGLU
experts on the C kernel); providers without one decline the model with a reason, and stay eager.
"""
from __future__ import annotations

import pytest
import torch

import test_deepseek
import test_gpt_oss
from moemesh.batch import BatchLayout
from moemesh.engine.compiled import CompiledDecoder, unsupported_reason
from moemesh.kvcache.dense import DenseKVCache
from moemesh.loading.loader import load_model
from moemesh.quant.int4_native import load_native
from test_compiled import decode_both
from tiny import configs as tiny_configs
from tiny import make_checkpoint as tiny_checkpoint

NATIVE = load_native() is not None
# widths the int4 C kernel takes (multiples of its group of 32), so MoE experts get their graph op
KERNEL = dict(hidden_size=64, moe_intermediate_size=32)
# (id, config source, config name, quant, config overrides); MoE models in int4: their experts' graph
# op is the C kernel's
ARCHS = [
    ("llama-fp32", "tiny", "llama-gqa", "fp32", {}),
    ("llama-int8", "tiny", "llama-mha-tied", "int8", {}),
    ("llama-int4", "tiny", "llama-gqa", "int4", {}),
    ("qwen3_moe-qknorm-head", "tiny", "qwen3_moe-norm", "int4", KERNEL),
    ("qwen2_moe-shared", "tiny", "qwen2_moe", "int4", dict(KERNEL, shared_expert_intermediate_size=32)),
    ("mixtral", "tiny", "mixtral", "int4", dict(hidden_size=64, intermediate_size=32)),
    ("olmoe-qknorm-full", "tiny", "olmoe", "int4", dict(hidden_size=64, intermediate_size=32)),
    ("deepseek_v3-mla", "deepseek", "v3-qlora-group-yarn", "int4", dict(moe_intermediate_size=32)),
    ("deepseek_v2-mla-bias", "deepseek", "v2-group-yarn-bias", "int4", dict(moe_intermediate_size=32)),
    ("gpt_oss-sinks", "gpt_oss", "gqa-alt", "int4", {}),
]
SOURCES = {"tiny": (tiny_configs, tiny_checkpoint), "deepseek": (test_deepseek.configs, test_deepseek.make_checkpoint),
           "gpt_oss": (test_gpt_oss.configs, test_gpt_oss.make_checkpoint)}


@pytest.mark.parametrize("arch", ARCHS, ids=[a[0] for a in ARCHS])
def test_every_architecture_traces_as_one_graph_and_decodes_like_eager(arch, tmp_path):
    _, source, name, quant, overrides = arch
    make_configs, make_checkpoint = SOURCES[source]
    config = make_configs()[name]
    for key, value in overrides.items():
        setattr(config, key, value)
    make_checkpoint(config, tmp_path)
    model = load_model(str(tmp_path), quant).model
    moe = any(hasattr(layer.ffn, "provider") for layer in model.layers)
    reason = unsupported_reason(model)
    if source == "gpt_oss" or (moe and not NATIVE):
        # clamped-SwiGLU experts with biases (and any experts without the C kernel) have no graph form
        assert reason is not None and "experts" in reason and "no graph form" in reason, reason
        return
    assert reason is None, reason
    le, lc, toks_e, toks_c = decode_both(model, CompiledDecoder(model, backend="eager"), [5, 6, 7, 8, 9, 10, 11], 12)
    rel = ((le - lc).norm(dim=-1) / le.norm(dim=-1)).max().item()
    # fp32: the same ops; quantized: small int4 linears run torch's bf16-input kernel in a graph (the C
    # kernel eagerly), int8/bf16 the same kernels: bf16 roundings differ by op order only
    assert rel < (1e-5 if quant == "fp32" else 0.03), rel
    assert toks_e == toks_c


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("values_in_keys", [False, True])
def test_one_token_view_in_a_graph_equals_the_dense_cache(window, values_in_keys, monkeypatch):
    """The cache's one-token view, traced (sinks, a sliding window, MLA's values-in-keys), against the
    eager cache's torch attend for the same decode token (the eager C kernel is compared with that
    reference in tests/test_decode_kernels.py and tests/test_decode_paths.py)."""
    from moemesh.quant import decode_kernels

    monkeypatch.setattr(decode_kernels, "load", lambda: None)
    hq, hkv, dh, dv, n = 6, 2, 8, (4 if values_in_keys else 8), 9
    g = torch.Generator().manual_seed(0)
    sinks = torch.randn(hq, generator=g)
    eager, traced = (DenseKVCache(1, hkv, dh, value_dim=dv, values_in_keys=values_in_keys) for _ in range(2))
    prompt = (torch.randn(n, hq, dh, generator=g), torch.randn(n, hkv, dh, generator=g), torch.randn(n, hkv, dv, generator=g))
    for c in (eager, traced):
        c.add_sequence(3)
        batch = BatchLayout([3], [n])
        c.begin(batch)
        c.attend(0, prompt[0], prompt[1], None if values_in_keys else prompt[2], batch, 0.3, window, sinks)
        c.end(batch)

    def step(q, k, v, keys, values, pos, cache):
        view = cache.decode_view(keys, values, pos)
        return view.attend(0, q, k, v, BatchLayout([0], [1]), 0.3, window, sinks)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    one = BatchLayout([3], [1])
    for _ in range(4):  # crosses the window and one capacity doubling (16 -> 32 needs 17 tokens: not here)
        q, k, v = torch.randn(1, hq, dh, generator=g), torch.randn(1, hkv, dh, generator=g), torch.randn(1, hkv, dv, generator=g)
        v = None if values_in_keys else v
        eager.begin(one)
        want = eager.attend(0, q, k, v, one, 0.3, window, sinks)
        eager.end(one)
        pos = torch.tensor([traced.length(3)])
        keys, values = traced.decode_buffers(3)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            got = compiled(q, k, v, keys, values, pos, traced)
        traced.end(one)
        assert torch.equal(got, want)
