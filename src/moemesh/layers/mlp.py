"""Gated MLP (SwiGLU): the dense FFN, every routed expert and the shared expert."""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ..quant import blocks_ffn, int4_experts, int4_native
from ..quant.blocks import BlockLinear
from ..quant.qlinear import QuantLinear

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP(torch.nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, gate_up: QuantLinear, down: QuantLinear, act: str = "silu") -> None:
        super().__init__()
        self.gate_up = gate_up  # [2I, D]
        self.down = down  # [D, I]
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} not supported (have {sorted(ACTIVATIONS)})")
        self.act_name = act
        self._fusable: bool | None = None  # int4 gated MLP the fused kernel reads; decided on first use
        self._kernel_ptrs: list[int] = []  # data_ptr of (gate_up q, scales, down q, scales), set with _fusable
        self._kernel_bias: list[int] = []  # data_ptr of (gate_up bias, down bias), 0 for none
        self._kernel_key: tuple | None = None  # (gate_up q shape, down q shape, kernel fmt, act) when fusable
        self._kernel_table: torch.Tensor | None = None  # int64 [4, 1]: _kernel_ptrs as the kernel's pointer rows
        self._epilogue: int4_experts.Epilogue | None = None  # act and biases, unless a plain SwiGLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        if x.dim() == 2 and x.shape[0] == 1 and not torch.compiler.is_compiling():
            lib = self.fused_int4()
            if lib is not None:  # one token: one C call (int4_ffn.c), same bits as run_fused over a layer
                gu_q, dn_q, fmt, _ = self._kernel_key
                y = int4_experts.experts_ffn_table(lib, x, self.down.in_features, self._kernel_table, gu_q[0], dn_q[0],
                                                   fmt, self._epilogue)
                d = self.down.out_features
                return y if y.shape[1] == d else y[:, :d].contiguous()
        block = self.block_act()
        if block is not None:  # block-format weights: the C activation for every M (blocks_ffn.expert_forward's bits)
            return self.down(blocks_ffn.activation(self.gate_up(x), *block))
        lib = self.fused_int4() if x.dim() == 2 and not torch.compiler.is_compiling() else None
        if lib is not None:  # many rows: the fused call's act, so each row has its one-token bits (batch invariant)
            return self.down(int4_experts.act_rows(lib, self.gate_up(x), self.down.in_features, self.kernel_act()))
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [T, I] each
        return self.down(ACTIVATIONS[self.act_name](gate) * up)

    def block_act(self) -> tuple[str, float, float] | None:
        """(act, alpha, limit) for blocks_ffn when both linears hold block-format weights (BlockLinear)
        and the activation is one blocks_ffn has, else None. Such an MLP computes exactly
        blocks_ffn.expert_forward, so one token through several of them can be one experts_mix call
        (experts/mixing.expert_rows) with the same bits."""
        if self.act_name != "silu" or not (isinstance(self.gate_up, BlockLinear) and isinstance(self.down, BlockLinear)):
            return None
        return "silu", 1.702, 7.0  # alpha, limit: unused by silu

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused path (two kernel calls and torch's silu), for tests of the fused one."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [T, I] each
        return self.down(ACTIVATIONS[self.act_name](gate) * up)

    def kernel_act(self) -> tuple[int, float, float] | None:
        """(int4_experts.ACT_*, alpha, limit): the fused kernels' form of this MLP's activation, or None."""
        return (int4_experts.ACT_SILU, 0.0, 0.0) if self.act_name == "silu" else None

    def fused_int4(self) -> ctypes.CDLL | None:
        """The int4 kernel library when this MLP can run fused (int4 native gate_up and down, an act the
        kernels have, fp32 biases or none), else None."""
        if self._fusable is None:
            gu, dn = self.gate_up, self.down
            self._fusable = (self.kernel_act() is not None and _kernel_bias_ok(gu) and _kernel_bias_ok(dn)
                             and isinstance(gu, QuantLinear) and isinstance(dn, QuantLinear)
                             and gu.native_int4() is not None and dn.native_int4() is not None
                             and gu.out_features == 2 * dn.in_features
                             and gu.kernel_fmt() == dn.kernel_fmt()
                             and all(t.is_contiguous() for t in (gu.qweight, gu.int4_scales(),
                                                                 dn.qweight, dn.int4_scales())))
            if self._fusable:  # expert buffers are never replaced (store views, slot views): pointers stay valid
                self._kernel_ptrs = [t.data_ptr() for t in (gu.qweight, gu.int4_scales(), dn.qweight, dn.int4_scales())]
                self._kernel_bias = [0 if b is None else b.data_ptr() for b in (gu.bias, dn.bias)]
                self._kernel_key = (gu.qweight.shape, dn.qweight.shape, gu.kernel_fmt(), self.kernel_act())
                self._kernel_table = torch.tensor(self._kernel_ptrs, dtype=torch.int64)[:, None]  # [4, 1]
                self._epilogue = int4_experts.epilogue(self.kernel_act(), [self._kernel_bias])
        return int4_native.load_native() if self._fusable else None

    def use_block_scales(self) -> None:
        """Both linears' scales in the kernels' block-major layout, in place (QuantLinear.use_block_scales)."""
        self.gate_up.use_block_scales()
        self.down.use_block_scales()
        self.forget_kernel_pointers()

    def forget_kernel_pointers(self) -> None:
        """Drop the cached pointers and format key: after the linears' buffers moved or changed layout."""
        self._fusable, self._kernel_ptrs, self._kernel_key, self._kernel_table = None, [], None, None
        self._kernel_bias, self._epilogue = [], None

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()


def _kernel_key(mlps: list[GatedMLP]) -> tuple:
    for m in mlps:
        if m._fusable is None:
            m.fused_int4()
    key = mlps[0]._kernel_key
    if key is None:
        raise ValueError("run_fused: not a fusable int4 gated MLP")
    if any(m._kernel_key != key for m in mlps):
        raise ValueError("run_fused: the MLPs of one call must share their shapes, int4 format and act "
                         "(symmetric and asymmetric int4, block and torch scale layouts cannot share one call)")
    return key


def mix_fused(lib: ctypes.CDLL, mlps: list[GatedMLP], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_e w[e] * mlps[e](x) for one token x [1, D], w [n], in one C call -> [1, D]: the bits of
    moe.sum_in_order(x, run_fused(lib, mlps, x), w)."""
    gu_q, dn_q, fmt, act = _kernel_key(mlps)
    return int4_experts.experts_mix_ptrs(lib, x, mlps[0].down.in_features, [m._kernel_ptrs for m in mlps], w,
                                         gu_q[0], dn_q[0], fmt, mlps[0].down.out_features,
                                         int4_experts.epilogue(act, [m._kernel_bias for m in mlps]))


def fused_table(mlps: list[torch.nn.Module]) -> tuple | None:
    """(lib, pointer table int64 [n, 4], I, gate_up N_pad, down N_pad, fmt, epilogue or None): the
    arguments of the one-call MoE kernels (int4_experts.moe_batch_table) when every module is a fusable
    int4 gated MLP of one shape, format and act, else None. Built from each module's cached pointers
    (cheap per layer call)."""
    if not mlps or not all(isinstance(m, GatedMLP) for m in mlps):
        return None
    for m in mlps:
        if m._fusable is None:
            m.fused_int4()
    m0 = mlps[0]
    if not m0._fusable or any(not m._fusable or m._kernel_key != m0._kernel_key for m in mlps):
        return None
    lib = int4_native.load_native()
    if lib is None:
        return None
    gu_q, dn_q, fmt, act = m0._kernel_key
    epi = int4_experts.epilogue(act, [m._kernel_bias for m in mlps])
    return (lib, torch.tensor([m._kernel_ptrs for m in mlps], dtype=torch.int64), m0.down.in_features, gu_q[0],
            dn_q[0], fmt, epi)


def run_fused(lib: ctypes.CDLL, mlps: list[GatedMLP], x: torch.Tensor) -> torch.Tensor:
    """One token x [1, D] through every MLP of ``mlps`` (all fused_int4()) -> [n, D]; row e equals
    mlps[e](x) bit for bit (the kernel computes each expert independently of the others)."""
    gu_q, dn_q, fmt, act = _kernel_key(mlps)
    y = int4_experts.experts_ffn_ptrs(lib, x, mlps[0].down.in_features, [m._kernel_ptrs for m in mlps],
                                      gu_q[0], dn_q[0], fmt, int4_experts.epilogue(act, [m._kernel_bias for m in mlps]))
    d = mlps[0].down.out_features
    return y if y.shape[1] == d else y[:, :d].contiguous()


def _kernel_bias_ok(lin: torch.nn.Module) -> bool:
    """No bias, or one the fused kernels add as they are (fp32, contiguous, one per output row)."""
    b = getattr(lin, "bias", None)
    return b is None or (b.dtype == torch.float32 and b.is_contiguous() and b.dim() == 1
                         and b.shape[0] == getattr(lin, "out_features", -1))
