"""MLA with its absorbed per-head matrices held as int8 (a quantized trunk): the one-call C path against
the same int8 values in torch, against the naive per-head reference over the dequantized weights, and
close to the fp32-absorbed model."""
from __future__ import annotations

import pytest
import torch

from moemesh.layers.mla import MultiHeadLatentAttention, naive_cache
from moemesh.loading.loader import load_model
from moemesh.quant import decode_kernels as dk
from test_deepseek import configs, make_checkpoint, prefill_and_decode, prompt, set_absorb


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = configs()["v3-qlora-group-yarn"]
    cfg.moe_intermediate_size = 32  # expert widths the int4 kernel takes
    d = tmp_path_factory.mktemp("mla-int8")
    make_checkpoint(cfg, d)
    return d


def test_int4_trunk_holds_int8_absorbed_matrices_and_matches_the_naive_reference(ckpt):
    model = load_model(str(ckpt), "int4").model
    attn = [layer.attn for layer in model.layers]
    assert all(isinstance(a, MultiHeadLatentAttention) and a.w_uk is None and a.uk_q.dtype == torch.int8 for a in attn)
    ids = prompt(3, 11)
    absorbed = prefill_and_decode(model, model.new_cache(), ids, 6)
    a = model.args
    set_absorb(model, False)  # per-head K/V through the same (dequantized) int8 weights
    naive = prefill_and_decode(model, naive_cache(a.num_layers, a.num_heads, a.mla), ids, 6)
    torch.testing.assert_close(absorbed, naive, atol=1e-4, rtol=1e-4)


def test_int8_absorbed_c_path_equals_torch_and_stays_close_to_fp32(ckpt, monkeypatch):
    ids = prompt(4, 9)
    model = load_model(str(ckpt), "int4").model
    c_path = prefill_and_decode(model, model.new_cache(), ids, 5)
    monkeypatch.setattr(dk, "load", lambda: None)  # every decode kernel on its torch reference
    torch_path = prefill_and_decode(model, model.new_cache(), ids, 5)
    monkeypatch.undo()
    torch.testing.assert_close(c_path, torch_path, atol=1e-4, rtol=1e-4)
    # the same int4 trunk with fp32 absorbed matrices: int8 adds ~0.2% to the int4 trunk's error
    for layer in model.layers:
        layer.attn.w_uk = torch.nn.Parameter(layer.attn.uk(), requires_grad=False)
        layer.attn.w_uv = torch.nn.Parameter(layer.attn.uv().contiguous(), requires_grad=False)
    exact = prefill_and_decode(model, model.new_cache(), ids, 5)
    assert ((c_path - exact).norm(dim=-1) / exact.norm(dim=-1)).max() < 0.02
