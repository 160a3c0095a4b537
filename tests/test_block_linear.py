"""BlockLinear's contract (quant/blocks.py): shapes, references, layouts, concat_rows, bad input.

The references here are other projects' own code: gguf.quants.dequantize for GGUF rows,
transformers' MXFP4 (via quant/mxfp4.py, which mirrors it bit for bit) and FP8 block dequantization."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from block_rows import random_rows
from moemesh.quant import fp8, mxfp4
from moemesh.quant.blocks import BlockLinear, block_size, concat_rows, row_bytes, supported_qtypes


def _k_min(q: str) -> int:
    return block_size(q)[0]


@pytest.mark.parametrize("qtype", supported_qtypes())
def test_reference_forward_is_dequantize_then_fp32_matmul(qtype):
    k = 2 * _k_min(qtype)
    raw = random_rows(qtype, 7, k, seed=1)
    bias = torch.randn(7)
    lin = BlockLinear(qtype, raw, k, bias)
    assert (lin.in_features, lin.out_features, lin.qtype) == (k, 7, qtype)
    assert lin.nbytes() == raw.numel() + 4 * 7
    w = lin.dequantize()
    assert w.shape == (7, k) and w.dtype == torch.float32 and torch.isfinite(w).all()
    if qtype != fp8.QTYPE:  # the gguf package's own dequantization, row by row
        ref = gguf_quants.dequantize(raw.numpy(), GGMLQuantizationType[qtype])
        assert np.array_equal(w.numpy(), ref)
    x = torch.randn(3, k)
    torch.testing.assert_close(lin.reference_forward(x), x @ w.T + bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x), x @ w.T + bias, rtol=1e-3, atol=1e-3)  # the kernel: tests/test_block_kernels.py
    assert lin(x.view(3, 1, k)).shape == (3, 1, 7)


def test_raw_is_not_copied():
    big = random_rows("Q4_K", 10, 256)
    lin = BlockLinear("Q4_K", big[2:6], 256)
    assert lin.raw.data_ptr() == big[2:6].data_ptr()


def test_mxfp4_safetensors_layout_matches_transformers_and_gguf():
    w = torch.randn(5, 96) * 3
    blocks, scales = mxfp4.quantize(w)  # safetensors layout [5, 3, 16], [5, 3]
    scales[0, 0], scales[1, 2] = 0, 1  # e8m0 subnormal halves (gguf's special case) and the extremes
    scales[2, 1] = 200  # large but finite
    lin = BlockLinear.from_mxfp4_safetensors(blocks, scales)
    assert lin.raw.shape == (5, 3 * 17)
    ref = mxfp4.dequantize_expert(blocks, scales)  # transformers' convert_moe_packed_tensors, op for op
    assert torch.equal(lin.dequantize(), ref)
    back = mxfp4.from_gguf(lin.raw)
    assert torch.equal(back[0], blocks) and torch.equal(back[1], scales)


def test_fp8_matches_transformers_block_dequantization():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w = (torch.randn(200, 300) * 50).clamp(-440, 440).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3) * 1e-2 + 1e-3
    lin = BlockLinear.from_fp8(w, s)
    assert lin.raw.shape == (200, 3 * 132) and lin.in_features == 300
    ref = _dequantize_fp8_weight(w, s, [128, 128], torch.float32)
    assert torch.equal(lin.dequantize(), ref)
    bits, scales = fp8.unpack(lin.raw, 300)
    assert torch.equal(bits, w.view(torch.uint8)) and torch.equal(scales[130], s[1])


def test_concat_rows():
    a = BlockLinear("Q6_K", random_rows("Q6_K", 3, 512, 1), 512, torch.randn(3))
    b = BlockLinear("Q6_K", random_rows("Q6_K", 4, 512, 2), 512, torch.randn(4))
    c = concat_rows([a, b])
    assert c.out_features == 7
    assert torch.equal(c.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert torch.equal(c.bias, torch.cat([a.bias, b.bias]))
    with pytest.raises(ValueError, match="differ"):
        concat_rows([a, BlockLinear("Q4_K", random_rows("Q4_K", 3, 512), 512)])
    with pytest.raises(ValueError, match="bias"):
        concat_rows([a, BlockLinear("Q6_K", random_rows("Q6_K", 3, 512), 512)])


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unsupported block qtype 'Q9_X'"):
        row_bytes("Q9_X", 256)
    with pytest.raises(ValueError, match="multiple of its block 256"):
        BlockLinear("Q4_K", torch.zeros(2, 144, dtype=torch.uint8), 200)
    with pytest.raises(ValueError, match=r"raw must be uint8 \[N, 144\]"):
        BlockLinear("Q4_K", torch.zeros(2, 143, dtype=torch.uint8), 256)
    with pytest.raises(ValueError, match="bias"):
        BlockLinear("Q8_0", torch.zeros(2, 34, dtype=torch.uint8), 32, torch.zeros(3))
    lin = BlockLinear("Q8_0", torch.zeros(2, 34, dtype=torch.uint8), 32)
    with pytest.raises(ValueError, match=r"wants \[\.\.\., 32\]"):
        lin(torch.zeros(1, 64))
    with pytest.raises(ValueError, match="weight_scale_inv"):
        BlockLinear.from_fp8(torch.zeros(130, 128, dtype=torch.uint8), torch.ones(1, 1))
