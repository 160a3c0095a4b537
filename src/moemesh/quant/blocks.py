"""A linear computed straight from its file's block format: GGUF's quant types and FP8 e4m3 blocks.

``BlockLinear(qtype, raw, in_features)`` holds W [N, K] as the raw bytes of its rows, uint8
[N, row_bytes], exactly as a GGUF tensor stores them (row_bytes = K / block * type_size,
gguf.constants.GGML_QUANT_SIZES), or for ``FP8_E4M3_B128`` as quant/fp8.py lays them out (e4m3
bytes with their 128x128 block scales beside, 132 bytes per 128 weights). Rows are independent, so
a linear's rows can be cut or concatenated (``concat_rows``: gate rows + up rows -> one gate_up).
Nothing is copied at construction: ``raw`` may be a view into a cache slot or an mmap.

``dequantize()`` is the reference (gguf.quants.dequantize; fp8.dequantize for FP8) and ``forward``
is the fast path: the C kernels of quant/blocks_native.py where they load, else the reference
then an fp32 matmul.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from . import blocks_native, fp8, mxfp4

GGUF_QTYPES = ("MXFP4", "Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")


def supported_qtypes() -> tuple[str, ...]:
    """Every qtype BlockLinear computes: GGUF type names (GGMLQuantizationType) and FP8_E4M3_B128."""
    return (*GGUF_QTYPES, fp8.QTYPE)


def block_size(qtype: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of ``qtype``."""
    if qtype == fp8.QTYPE:
        return fp8.BLOCK, fp8.TYPE_SIZE
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"unsupported block qtype {qtype!r} (have {', '.join(supported_qtypes())})")
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]


def row_bytes(qtype: str, in_features: int) -> int:
    """Bytes of one row of K = ``in_features`` weights; raises ValueError when K does not fit the
    type's blocks (FP8 pads its last block, so any K > 0 fits)."""
    block, size = block_size(qtype)
    if qtype == fp8.QTYPE:
        if in_features <= 0:
            raise ValueError(f"{qtype}: in_features must be positive, got {in_features}")
        return fp8.row_bytes(in_features)
    if in_features <= 0 or in_features % block:
        raise ValueError(f"{qtype}: in_features {in_features} is not a positive multiple of its block {block}")
    return in_features // block * size


class BlockLinear(torch.nn.Module):
    """y = x @ W.T (+ bias), W [N, K] kept in its file's block format (rows of raw block bytes)."""

    def __init__(self, qtype: str, raw: torch.Tensor, in_features: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        want = row_bytes(qtype, in_features)
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != want:
            raise ValueError(f"{qtype} [{raw.shape[0] if raw.dim() else '?'}, {in_features}]: raw must be uint8 "
                             f"[N, {want}], got {raw.dtype} {tuple(raw.shape)}")
        if raw.stride(1) != 1:
            raise ValueError(f"{qtype}: raw rows must be contiguous bytes (stride {tuple(raw.stride())})")
        if bias is not None and tuple(bias.shape) != (raw.shape[0],):
            raise ValueError(f"{qtype}: bias {tuple(bias.shape)} does not match {raw.shape[0]} output rows")
        self.qtype = qtype
        self.raw = raw  # uint8 [N, row_bytes]; a plain attribute: never copied, never in a state_dict
        self.in_features = int(in_features)
        self.out_features = int(raw.shape[0])
        self.bias = None if bias is None else bias.float().contiguous()  # fp32 [N]

    def extra_repr(self) -> str:
        return f"{self.qtype}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"

    def prepare_graph(self) -> str:
        """Block-format linears have no graph op: a model holding one decodes eagerly."""
        return f"{self.qtype} block-format linear (K-quants, MXFP4 ...) is not in the compiled step"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> fp32 [..., N]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.qtype} linear wants [..., {self.in_features}] inputs, got {tuple(x.shape)}")
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, self.in_features)  # [M, K]
        lib = blocks_native.load_native()
        if lib is None:
            y = self.reference_forward(x2)
        else:
            y = blocks_native.matmul(lib, self.qtype, x2, self.raw, self.in_features, self.bias)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: dequantize() then an fp32 matmul (+ bias). x [M, K] -> fp32 [M, N]."""
        y = x.float() @ self.dequantize().T  # [M, N]
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: gguf.quants.dequantize of the rows (fp8.dequantize for FP8_E4M3_B128)."""
        if self.qtype == fp8.QTYPE:
            return fp8.dequantize(self.raw, self.in_features)
        w = gguf_quants.dequantize(self.raw.numpy(), GGMLQuantizationType[self.qtype])  # [N, K]
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))

    def nbytes(self) -> int:
        """Bytes held: the raw rows and the bias."""
        return self.raw.shape[0] * self.raw.shape[1] + (0 if self.bias is None else 4 * self.bias.numel())

    @classmethod
    def from_mxfp4_safetensors(cls, blocks: torch.Tensor, scales: torch.Tensor,
                               bias: torch.Tensor | None = None) -> BlockLinear:
        """gpt-oss's ``*_blocks`` uint8 [N, K/32, 16] and ``*_scales`` uint8 [N, K/32] -> an MXFP4 linear
        in GGUF's byte layout (a lossless shuffle, mxfp4.to_gguf; a new buffer of the same size)."""
        if blocks.dim() != 3:
            raise ValueError(f"MXFP4 blocks must be [N, K/32, 16], got {tuple(blocks.shape)}")
        return cls("MXFP4", mxfp4.to_gguf(blocks, scales), blocks.shape[1] * mxfp4.GROUP, bias)

    @classmethod
    def from_fp8(cls, weight_e4m3: torch.Tensor, scale_inv: torch.Tensor,
                 bias: torch.Tensor | None = None) -> BlockLinear:
        """weight e4m3 (float8_e4m3fn or uint8 bits) [N, K] and scale_inv [ceil(N/128), ceil(K/128)] ->
        an FP8_E4M3_B128 linear (fp8.pack: a new buffer, scales beside each row's blocks)."""
        return cls(fp8.QTYPE, fp8.pack(weight_e4m3, scale_inv), weight_e4m3.shape[1], bias)


def concat_rows(parts: list[BlockLinear]) -> BlockLinear:
    """One linear whose rows are the parts' rows in order (a new raw buffer): e.g. gate + up -> gate_up.
    The parts must share qtype and in_features; biases are kept when every part has one."""
    if not parts:
        raise ValueError("concat_rows: no parts")
    q, k = parts[0].qtype, parts[0].in_features
    if any(p.qtype != q or p.in_features != k for p in parts):
        raise ValueError("concat_rows: parts differ in qtype or in_features: "
                         + ", ".join(f"{p.qtype}[{p.out_features}, {p.in_features}]" for p in parts))
    has_bias = [p.bias is not None for p in parts]
    if any(has_bias) and not all(has_bias):
        raise ValueError("concat_rows: some parts have a bias and some do not")
    bias = torch.cat([p.bias for p in parts]) if all(has_bias) else None
    return BlockLinear(q, torch.cat([p.raw for p in parts]), k, bias)
