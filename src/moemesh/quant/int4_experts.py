"""The fused int4 expert kernels' calls (int4_ffn.c, built with int4_native's library).

One token through n experts (``experts_ffn_*``), with their weighted sum (``experts_mix_ptrs``), a MoE
layer from the router's picks for one token (``moe_decode_table``) or T tokens (``moe_batch_table``),
and the gated activation over rows (``act_rows``: the unfused path, so each row keeps the fused bits).
Experts are named by the data pointers of their four int4 buffers (gate_up qweight and scales, down
qweight and scales). An expert other than a plain SwiGLU without biases (gpt-oss's clamped SwiGLU, biased
linears) comes with an ``Epilogue``: its act and a table of its biases' addresses.
"""
from __future__ import annotations

import ctypes

import torch

ACT_SILU, ACT_CLAMP_SWIGLU = 0, 1  # int4_kernel.h I4_ACT_*


class _Epi(ctypes.Structure):
    """int4_kernel.h's i4_epi, field for field."""
    _fields_ = [("act", ctypes.c_int64), ("alpha", ctypes.c_float), ("limit", ctypes.c_float),
                ("bias", ctypes.c_void_p)]


class Epilogue:
    """An expert's act (ACT_*, alpha, limit) and, when any linear has a bias, bias addresses int64
    [rows, 2] (gate_up's, down's; 0 for none), rows indexed like the call's weight table (by expert id)
    or pointer arrays (by position). ``ptr`` is what the kernels take; the object keeps the table alive."""

    def __init__(self, act: tuple[int, float, float], bias: list[list[int]] | None) -> None:
        self.act = act
        self.bias = None if bias is None else torch.tensor(bias, dtype=torch.int64).reshape(-1, 2)  # [rows, 2]
        self._s = _Epi(act[0], act[1], act[2], None if self.bias is None else self.bias.data_ptr())
        self.ptr = ctypes.addressof(self._s)


def epilogue(act: tuple[int, float, float], bias: list[list[int]]) -> Epilogue | None:
    """The Epilogue of experts with this act and these [gate_up, down] bias addresses, or None (a plain
    SwiGLU without biases: the kernels' default)."""
    has_bias = any(b for row in bias for b in row)
    if act[0] == ACT_SILU and not has_bias:
        return None
    return Epilogue(act, bias if has_bias else None)


def _ptr(epi: Epilogue | None) -> int | None:
    return None if epi is None else epi.ptr


def declare(lib: ctypes.CDLL) -> None:
    """The expert entry points' ctypes signatures (int4_native._load calls this once per build)."""
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.i4_experts_ffn.argtypes = [p, i64, i64, i64, p, p, i64, p, p, i64, i32, p, p, i32]
    lib.i4_experts_mix.argtypes = [p, i64, i64, i64, p, p, i64, p, p, i64, i32, p, p, p, i32]
    lib.i4_moe_decode.argtypes = [p, i64, i64, i64, p, p, p, i64, i64, i64, i32, p, p, i32]
    lib.i4_moe_batch.argtypes = [p, i64, i64, i64, i64, p, p, p, i64, i64, i64, i32, p, p, i32]
    lib.i4_silu_mul_rows.argtypes = [p, i64, i64, i64]
    lib.i4_act_rows.argtypes = [p, i64, i64, i64, i64, f32, f32]
    for name in ("i4_experts_ffn", "i4_experts_mix", "i4_moe_decode", "i4_moe_batch", "i4_silu_mul_rows", "i4_act_rows"):
        getattr(lib, name).restype = i32


def _pointer_arrays(ptrs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """The kernel's four pointer arrays (gate_up qweight, gate_up scales, down qweight, down scales
    of each expert) as rows of one int64 tensor [4, n] (ctypes arrays cost ~20x more per call):
    the tensor (keep it alive through the call) and the address of each row."""
    tables = torch.tensor(ptrs, dtype=torch.int64).t().contiguous()  # [4, n]
    return tables, [tables.data_ptr() + 8 * len(ptrs) * r for r in range(4)]


def experts_ffn_ptrs(lib: ctypes.CDLL, x: torch.Tensor, inter: int, ptrs: list[list[int]], gu_npad: int,
                     dn_npad: int, fmt: int = 0, epi: Epilogue | None = None) -> torch.Tensor:
    """One token through n int4 experts in one call (int4_ffn.c): x fp32 [1, D] -> fp32 [n, N_pad].
    Expert e is named by the data pointers of its four buffers, ptrs[e] = (gate_up qweight, gate_up
    scales, down qweight, down scales) of its QuantLinears (contiguous; all of one ``fmt``,
    QuantLinear.kernel_fmt: checked by the callers, GatedMLP keeps the row and its format key); ``epi``
    their act and biases by position. The buffers must stay alive during the call."""
    d, n = x.shape[1], len(ptrs)
    x = x.float().contiguous()
    tables, (gq, gs, dq, ds) = _pointer_arrays(ptrs)
    y = torch.empty(n, dn_npad)
    rc = lib.i4_experts_ffn(x.data_ptr(), d, inter, n, gq, gs, gu_npad, dq, ds, dn_npad,
                            fmt, _ptr(epi), y.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"experts_ffn: kernel rejected D={d}, I={inter}, n={n}")
    return y


def experts_ffn_table(lib: ctypes.CDLL, x: torch.Tensor, inter: int, table: torch.Tensor, gu_npad: int, dn_npad: int,
                      fmt: int, epi: Epilogue | None = None) -> torch.Tensor:
    """``experts_ffn_ptrs`` over a pointer table built once by the caller (``_pointer_arrays``' layout:
    int64 [4, n], rows gate_up qweight, gate_up scales, down qweight, down scales): a dense FFN's
    decode token pays one C call and no per-call table (~10 us of torch.tensor on a small model's
    layer). x fp32 [1, D] contiguous -> [n, N_pad]."""
    n = table.shape[1]
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    y = torch.empty(n, dn_npad)
    base, row = table.data_ptr(), 8 * n
    rc = lib.i4_experts_ffn(x.data_ptr(), x.shape[1], inter, n, base, base + row, gu_npad, base + 2 * row,
                            base + 3 * row, dn_npad, fmt, _ptr(epi), y.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"experts_ffn: kernel rejected D={x.shape[1]}, I={inter}, n={n}")
    return y


def experts_mix_ptrs(lib: ctypes.CDLL, x: torch.Tensor, inter: int, ptrs: list[list[int]], w: torch.Tensor,
                     gu_npad: int, dn_npad: int, fmt: int, d: int, epi: Epilogue | None = None) -> torch.Tensor:
    """One token through n experts (as ``experts_ffn_ptrs``) and their weighted sum in the given
    order, in one call: x fp32 [1, D], w fp32 [n] -> [1, d]; the bits of layers/moe.sum_in_order
    over the experts' outputs (int4_ffn.c ``i4_experts_mix``)."""
    n = len(ptrs)
    x = x.float().contiguous()
    w = w.float().contiguous()
    tables, (gq, gs, dq, ds) = _pointer_arrays(ptrs)
    out = torch.empty(1, d)
    rc = lib.i4_experts_mix(x.data_ptr(), x.shape[1], inter, n, gq, gs, gu_npad, dq, ds,
                            dn_npad, fmt, _ptr(epi), w.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"experts_mix: kernel rejected D={x.shape[1]}, I={inter}, n={n}, d={d}")
    return out


def moe_decode_table(lib: ctypes.CDLL, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     table: torch.Tensor, inter: int, gu_npad: int, dn_npad: int, fmt: int,
                     epi: Epilogue | None = None) -> torch.Tensor:
    """One token's MoE layer from the router's picks: x fp32 [1, D], ids int64 [1, A], weights
    fp32 [1, A], table int64 [E, 4] (experts/mixing.expert_table), ``epi`` by expert id -> [1, D]; the
    picks summed in expert-id order (int4_ffn.c ``i4_moe_decode``: sort, pointer gather, experts, weighted sum)."""
    x = x.float().contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.float().contiguous()
    table = table.contiguous()
    out = torch.empty_like(x)
    rc = lib.i4_moe_decode(x.data_ptr(), x.shape[1], inter, ids.shape[1], ids.data_ptr(), weights.data_ptr(),
                           table.data_ptr(), table.shape[0], gu_npad, dn_npad, fmt, _ptr(epi), out.data_ptr(),
                           torch.get_num_threads())
    if rc == -2:
        raise ValueError(f"moe_decode: an expert id outside [0, {table.shape[0]}) in {ids.tolist()}")
    if rc:
        raise ValueError(f"moe_decode: kernel rejected D={x.shape[1]}, I={inter}, A={ids.shape[1]}")
    return out


def moe_batch_table(lib: ctypes.CDLL, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    table: torch.Tensor, inter: int, gu_npad: int, dn_npad: int, fmt: int,
                    epi: Epilogue | None = None) -> torch.Tensor:
    """T tokens' MoE layer from the router's picks in one call: x fp32 [T, D], ids int64 [T, A],
    weights fp32 [T, A], table int64 [E, 4], ``epi`` by expert id -> [T, D]; the grouped loop's bits
    (slots grouped by expert id, each expert over its tokens, weighted rows added in expert-id order:
    int4_ffn.c ``i4_moe_batch``)."""
    x = x.float().contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.float().contiguous()
    table = table.contiguous()
    out = torch.empty_like(x)
    rc = lib.i4_moe_batch(x.data_ptr(), x.shape[0], x.shape[1], inter, ids.shape[1], ids.data_ptr(), weights.data_ptr(),
                          table.data_ptr(), table.shape[0], gu_npad, dn_npad, fmt, _ptr(epi), out.data_ptr(),
                          torch.get_num_threads())
    if rc == -2:
        raise ValueError(f"moe_batch: an expert id outside [0, {table.shape[0]}) in the picks")
    if rc:
        raise ValueError(f"moe_batch: kernel rejected T={x.shape[0]}, D={x.shape[1]}, I={inter}, A={ids.shape[1]}")
    return out


def act_rows(lib: ctypes.CDLL, h: torch.Tensor, inter: int, act: tuple[int, float, float] = (ACT_SILU, 0.0, 0.0)
             ) -> torch.Tensor:
    """[gate | up] rows h fp32 [M, >= 2I] -> act(gate, up) [M, I] with the fused kernels' act (silu(gate)
    * up, or gpt-oss's clamped SwiGLU: int4_ffn.c ``i4_act_rows``; h is overwritten: pass a tensor of
    your own)."""
    if h.dtype != torch.float32 or not h.is_contiguous():
        h = h.float().contiguous()
    if lib.i4_act_rows(h.data_ptr(), h.shape[0], h.shape[1], inter, act[0], act[1], act[2]):
        raise ValueError(f"act_rows: rows of {h.shape[1]} cannot hold gate and up of {inter} (act {act[0]})")
    return h[:, :inter]
