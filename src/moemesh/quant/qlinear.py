"""QuantLinear: y = x @ W.T (+ bias) with W stored as fp32, bf16, int8 or int4.

Kernels (torch 2.13 CPU, facts checked against aten/src/ATen/native/cpu/int{4,8}mm_kernel.cpp
and by probing; see tests/test_qlinear.py):

* int4: ``torch._weight_int4pack_mm_for_cpu(x [M,K], packed uint8 [N,K/2], g, sz [K/g,N,2])``
  computes ``W[n,k] = (q[n,k] - 8) * sz[k//g,n,0] + sz[k//g,n,1]`` (q = stored nibble 0..15),
  as one fp32 fma per weight, accumulates in fp32 and rounds the output to x's dtype.
  x and sz must share one dtype (fp32, bf16 or fp16); only bf16 has an AVX-512/AVX2 path, fp32
  and fp16 fall to a scalar loop (measured 30-70x slower). Constraints: N % 16 == 0 (packing),
  K even, g in {32, 64, 128, 256}, K % g == 0.
* int8: ``torch._weight_int8pack_mm(x [M,K], q int8 [N,K], s [N])`` = ``x @ (q * s[:,None]).T``;
  s must have x's dtype; again only bf16 is vectorized (fp32 is 15-30x slower). The bf16 path
  reads K in steps of 16 with aligned loads: K % 16 != 0 or an x not 32-byte aligned reads
  garbage or segfaults (probed).

Symmetric int4 (``symmetric``; GGUF Q4_0's values, zero 0): buffer ``scales`` bf16 [K/g, N_pad]
alone instead of ``scales_and_zeros`` (18 instead of 20 bytes per 32 weights: 10% fewer bytes to
read from disk per lazy expert and from memory per token). The C kernel reads it directly; torch's
kernel gets (scale, 0) pairs built per call (fallback only).

int4, group 32, torch's AVX-512 or AVX2 packing: by default the C kernel of int4_native.py instead
(same buffers; x split into two int8 planes, exact integer dots (AVX-512 VNNI, AVX2 or plain C, the
same bits), fp32 output: ~100x closer to the fp32 reference than the bf16 kernel, and faster,
bench/results/int4_kernel*.md); it is batch invariant too. ``MOEMESH_INT4_NATIVE=0`` (or no
compiler) keeps torch's.

Policy (bench/matmul.py; noisy shared 2-core machine): the int kernels always get bf16
activations. From ``dequant_min_m`` rows on (prefill) the weight is instead dequantized to bf16
for that call (never cached: memory stays at the quantized size) and fed to F.linear, which
beats the kernels' re-dequantization per 4 rows. Outputs are fp32; int8 scales stay fp32 and are
applied to the kernel output. Shapes a kernel cannot take fall back (``self.fallback``).
"""
from __future__ import annotations

import ctypes
import fnmatch
from collections.abc import Sequence
from types import MappingProxyType

import torch
import torch.nn.functional as F

from . import int4_native, int4_ops
from .int4_pack import pad_rows, torch_layout, unpack_int4

MODES = ("fp32", "bf16", "int8", "int4")
INT4_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel accepts
INT4_N_MULTIPLE = 16  # the int4 packer needs out_features % 16 == 0; we pad rows up to it
INT8_K_MULTIPLE = 16  # the bf16 int8 kernel steps K by 16 (reads past the row otherwise)
# Rows (M) from which dequantize-once + bf16 F.linear beats the kernel; bench/matmul.py, 1 thread,
# 576x1536 and 2048x768: int8 wins from M=16 (67 vs 55 GF/s), int4 from M=128 (89 vs 81).
MEASURED_DEQUANT_MIN_M = MappingProxyType({"int8": 16, "int4": 128})
# Off by default: the two paths round differently, so a sequence's tokens would depend on how many
# rows the rest of the batch brought (the server saw 2 of 8 greedy streams diverge from running
# alone). The kernels are row-invariant (tested), so batched == alone holds; prefill pays ~30%.
DEQUANT_MIN_M: MappingProxyType = MappingProxyType({})
NEVER = 1 << 62


def _dequant_min_m(mode: str) -> int:
    """Threshold for ``mode``; the dequant path needs fast bf16 GEMM (avx512_bf16/AMX), without
    which (unmeasured here) we stay on the kernels, whose bf16 path is plain AVX-512/AVX2 fp32 math."""
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()  # private API
    if mode not in DEQUANT_MIN_M or not has_bf16:
        return NEVER
    return DEQUANT_MIN_M[mode]


def int4_quantize(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 per (row, group of g): w fp32 [N, K] -> q int32 [N, K] in 0..15 and
    bf16-exact fp32 scale, zero [N, K/g] with w ~ (q - 8) * scale + zero (the kernel's formula)."""
    n, k = w.shape
    wg = w.view(n, k // g, g)  # [N, K/g, g]
    lo, hi = torch.aminmax(wg, dim=-1)  # [N, K/g] (one pass)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    # quantize against the bf16-rounded scale/zero the kernel will actually use
    scale_b = scale.to(torch.bfloat16).float()
    zero_b = (lo + 8 * scale).to(torch.bfloat16).float()
    q = wg - zero_b[..., None]  # [N, K/g, g]; then in place: each new tensor of this size costs its page faults
    q.div_(scale_b[..., None]).add_(8).round_().clamp_(0, 15)  # (round half even, like torch.round)
    return q.view(n, k).to(torch.int32), scale_b, zero_b


class QuantLinear(torch.nn.Module):
    """Linear layer over a stored (possibly quantized) weight; build with from_float/from_int4_groups.

    Attributes: in_features, out_features, mode (what is stored), requested_mode, group_size (int4),
    fallback (why mode/group differ from the request, else None), dequant_min_m (M threshold).
    """

    def __init__(self, in_features: int, out_features: int, mode: str, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode = self.requested_mode = mode
        self.group_size = 0
        self.fallback: str | None = None
        self.dequant_min_m = _dequant_min_m(mode)
        self._int4_layout: tuple[int, bool] | None = None  # (block_n, halves) once verified
        self.symmetric = False  # int4 with zero 0: ``scales`` [K/g, N_pad] instead of scales_and_zeros
        self.scale_blocks = False  # int4 scales rewritten 1-D in the C kernels' block-major layout (use_block_scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, mode: str,
                   group_size: int = 32) -> QuantLinear:
        """Quantize an fp32 weight [out, in]: int8 symmetric per output row (fp32 scales), int4
        asymmetric min/max per (row, group of ``group_size`` along in), bf16 scale and zero.

        Fallbacks (recorded in ``self.fallback``, never an error): int4 uses the largest kernel
        group <= group_size dividing in (smaller groups are only more accurate), else int8;
        int8 needs in % 16 == 0, else bf16. int4 pads out to a multiple of 16 with zero rows
        (counted by nbytes, sliced off the output)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        w = weight.detach().float()  # [N, K]
        n, k = w.shape
        layer = cls(k, n, mode, bias)
        if mode == "int4":
            groups = [g for g in INT4_GROUPS if g <= group_size and k % g == 0]
            if groups:
                return layer._set_int4_from_float(w, groups[0], group_size)
            layer._fall_back("int8", f"in_features={k} has no int4 group (32..256) dividing it")
        if layer.mode == "int8":
            if k % INT8_K_MULTIPLE == 0:
                return layer._set_int8(w)
            layer._fall_back("bf16", f"in_features={k} is not a multiple of {INT8_K_MULTIPLE}")
        layer.register_buffer("weight", w.to(torch.bfloat16 if layer.mode == "bf16" else torch.float32))
        return layer

    @classmethod
    def from_int4_groups(cls, q: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
                         bias: torch.Tensor | None, group_size: int = 32) -> QuantLinear:
        """Weights given exactly as ``w = q * scale + minv`` (GGUF Q4_0: minv = -8*scale; Q4_1).

        q: uint8 [out, in] in 0..15; scale, minv: fp32 [out, in // group_size].
        When every ``z`` is 0 (Q4_0) the layer is stored ``symmetric`` (scales only). Otherwise
        stored as kernel zero ``z = minv + 8 * scale`` (computed in fp32) and scale, both rounded
        to bf16 because the fast kernel needs bf16 scales (bf16: 8 significant bits, relative
        rounding u = 2^-8). Hence per weight ``|dw| <= 2^-8 * (|q - 8| * |scale| + |z|)``:
        for Q4_0 (z = 0 exactly) at most 8 * 2^-8 = 3.1% of one quantization step, for Q4_1
        plus 2^-8 |z| (z is about the block midpoint). Tested; on random blocks the mean |dw|
        is ~1/3 of the bound and ||dw|| / ||w|| ~ 0.17%.
        If the group size is not one the kernel takes (or in % group_size != 0) the weight is
        dequantized exactly in fp32 and stored as bf16 (relative error <= 2^-8).
        """
        n, k = q.shape  # q: [N, K]
        if q.numel() and int(q.max()) > 15:
            raise ValueError("from_int4_groups: q must hold values 0..15")
        layer = cls(k, n, "int4", bias)
        scale_f, minv_f = scale.float(), minv.float()  # [N, ceil(K/g)]
        if group_size in INT4_GROUPS and k % group_size == 0:
            zero = minv_f + 8 * scale_f
            return layer._set_int4(q.to(torch.int32), scale_f, zero, group_size, symmetric=not bool(zero.any()))
        expand = lambda t: t.repeat_interleave(group_size, dim=1)[:, :k]  # noqa: E731  [N, K]
        layer._fall_back("bf16", f"group_size={group_size}, in_features={k}: no int4 kernel")
        layer.register_buffer("weight", (q.float() * expand(scale_f) + expand(minv_f)).to(torch.bfloat16))
        return layer

    def _fall_back(self, mode: str, why: str) -> None:
        step = f"{self.mode} -> {mode} ({why})"
        self.fallback = step if self.fallback is None else f"{self.fallback}; {step}"
        self.mode = mode
        self.dequant_min_m = _dequant_min_m(mode)

    def _set_int8(self, w: torch.Tensor) -> QuantLinear:
        amax = w.abs().amax(dim=1).clamp_min(1e-12)  # [N]
        scale = amax / 127.0  # [N] fp32, kept exact: applied to the kernel output in fp32
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.contiguous())
        self.register_buffer("_ones", torch.ones(self.out_features, dtype=torch.bfloat16), persistent=False)
        return self

    def _set_int4_from_float(self, w: torch.Tensor, g: int, requested: int) -> QuantLinear:
        q, scale_b, zero_b = int4_quantize(w, g)
        if g != requested:
            self.fallback = f"int4 group {requested} -> {g} (in_features={w.shape[1]} not divisible)"
        return self._set_int4(q, scale_b, zero_b, g)

    def _set_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int,
                  symmetric: bool = False) -> QuantLinear:
        """q int32 [N, K] in 0..15, scale/zero fp32 [N, K/g] (kernel formula (q-8)*s+z); with
        ``symmetric`` the zeros (all 0) are not stored."""
        n, k = q.shape
        n_pad = -(-n // INT4_N_MULTIPLE) * INT4_N_MULTIPLE  # padded rows are zero weights
        q, scale, zero = pad_rows(q, n_pad), pad_rows(scale, n_pad), pad_rows(zero, n_pad)
        packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # [N_pad, K/2] uint8
        self.group_size, self.symmetric = g, symmetric
        self.register_buffer("qweight", packed)
        if symmetric:
            self.register_buffer("scales", scale.t().to(torch.bfloat16).contiguous())  # [K/g, N_pad]
        else:
            self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16)
                                 .contiguous())  # [K/g, N_pad, 2]
        self._int4_layout = next(((b, h) for b, h in ((64, True), (32, True), (32, False))
                                  if torch.equal(unpack_int4(packed, n_pad, k, b, h), q.to(torch.uint8))),
                                 None)
        if self._int4_layout is None:  # only the kernel can decode it: no dequant-once path
            self.dequant_min_m = NEVER
        return self

    # ---------------------------------------------------------------- weights
    def int4_scales(self) -> torch.Tensor:
        """The scale buffer the C kernel reads: ``scales`` (symmetric) or ``scales_and_zeros``, in the
        layout ``kernel_fmt`` names."""
        return self.scales if self.symmetric else self.scales_and_zeros

    def kernel_fmt(self) -> int:
        """The C kernels' ``fmt`` for this layer's buffers (int4_native.FMT_SYM | FMT_BLOCKS | FMT_B32)."""
        return ((int4_native.FMT_SYM if self.symmetric else 0) | (int4_native.FMT_BLOCKS if self.scale_blocks else 0)
                | int4_native.layout_fmt(self._int4_layout))

    def use_block_scales(self) -> bool:
        """Rewrite the int4 scale buffer, in place (its memory stays where it is: a huge-page arena,
        an expert's blob), into the C kernels' block-major layout (int4_native.block_scales), when
        this layer runs the C kernel. Same values, same results; torch paths get torch's layout back
        from ``torch_scales_and_zeros``. Call before anything caches the buffer (fused experts'
        pointers, compiled plans). True if the layer now uses block scales."""
        if self.scale_blocks or self.native_int4() is None:
            return self.scale_blocks
        name = "scales" if self.symmetric else "scales_and_zeros"
        flat = self._buffers[name].view(-1)  # same storage
        flat.copy_(int4_native.block_scales(self._buffers[name]))
        self._buffers[name] = flat
        self.scale_blocks = True
        return True

    def torch_int4_scales(self) -> torch.Tensor:
        """int4_scales in torch's layout: [K/g, N_pad] (symmetric) or [K/g, N_pad, 2]."""
        s = self.int4_scales()
        if not self.scale_blocks:
            return s
        return int4_native.unblock_scales(s, self.in_features // self.group_size, self.qweight.shape[0], self.symmetric)

    def torch_scales_and_zeros(self) -> torch.Tensor:
        """bf16 [K/g, N_pad, 2] for torch's int4 kernel (built for a symmetric layer: zeros 0)."""
        s = self.torch_int4_scales()
        return s if not self.symmetric else torch.stack([s, torch.zeros_like(s)], -1)

    def _int4_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized int4 weight [N_pad, K] in dtype, computed in fp32 like the kernel."""
        n_pad, k, g = self.qweight.shape[0], self.in_features, self.group_size
        if self._int4_layout is None:  # unknown packing: let the kernel decode (slow, exact)
            sz32 = self.torch_scales_and_zeros().float()
            eye = torch.eye(k, dtype=torch.float32)
            return torch._weight_int4pack_mm_for_cpu(eye, self.qweight, g, sz32).t().to(dtype)
        q = unpack_int4(self.qweight, n_pad, k, *self._int4_layout)  # [N_pad, K] uint8
        s, z = self.torch_scales_and_zeros().float().permute(2, 1, 0)  # [N_pad, K/g] each
        # (q - 8) * s is exact in fp32 (4-bit int times 8-bit mantissa), so this matches the fma
        w = q.view(n_pad, k // g, g).float().sub_(8).mul_(s[..., None]).add_(z[..., None])
        return w.view(n_pad, k).to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer represents, fp32 [out, in] (the reference for forward)."""
        if self.mode == "int8":
            return self.qweight.float() * self.scales[:, None]
        if self.mode == "int4":
            return self._int4_weight(torch.float32)[: self.out_features]
        return self.weight.float()

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def nbytes(self) -> int:
        """Bytes held: weight (incl. int4 row padding), scales/zeros and bias."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "_ones")

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N] fp32
        if torch.compiler.is_compiling():
            return self._graph_forward(x)
        flat = x.dim() == 2  # the usual [M, K]: no reshapes (a decode step pays ~3 us per tensor op)
        lead = x.shape[:-1]
        x2 = x if flat else x.reshape(-1, self.in_features)  # [M, K]
        m = x2.shape[0]
        if m == 0 or self.mode == "fp32":
            w = self.weight if self.mode == "fp32" else self.dequantized_weight()
            return F.linear(x2.float(), w, self.bias).view(*lead, self.out_features)
        lib = self.native_int4() if self.mode == "int4" and m < self.dequant_min_m else None
        if lib is not None:
            # C kernel (int4_native.py): same packed buffers, two int8 activation planes, batch invariant
            y = int4_native.int4_matmul(lib, x2, self.qweight, self.int4_scales(), self.kernel_fmt())  # [M, N_pad]
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features].contiguous()  # [M, N]
            if self.bias is not None:
                y = torch.add(y, self.bias)
            return y if flat else y.view(*lead, self.out_features)
        xb = x2.to(torch.bfloat16)  # [M, K]; a fresh (so aligned) tensor unless x was bf16
        if xb.data_ptr() == x2.data_ptr() or not xb.is_contiguous() or xb.data_ptr() % 64:
            xb = xb.clone(memory_format=torch.contiguous_format)  # int8 kernel: aligned loads
        bias = self.bias
        if self.mode == "int8":
            if m >= self.dequant_min_m:  # int8 -> bf16 is exact; the scale is applied below
                y = F.linear(xb, self.qweight.to(torch.bfloat16))
            else:
                y = torch._weight_int8pack_mm(xb, self.qweight, self._ones)  # [M, N] bf16
            # bf16 * fp32 promotes: fp32 scales applied exactly, one op
            y = torch.mul(y, self.scales) if bias is None else torch.addcmul(bias, y, self.scales)
            return y.view(*lead, self.out_features)
        if self.mode == "bf16":
            y = F.linear(xb, self.weight)
        elif m >= self.dequant_min_m or not self._torch_reads_packing():
            y = F.linear(xb, self._int4_weight(torch.bfloat16))
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group_size, self.torch_scales_and_zeros())
        y = y[:, : self.out_features]  # [M, N]: drops int4 padding rows
        y = y.float() if bias is None else torch.add(y, bias)  # fp32, contiguous
        return y.view(*lead, self.out_features)

    def _torch_reads_packing(self) -> bool:
        """Whether torch's int4 kernel reads ``qweight``: packed on this kind of machine (or of unknown
        layout, which only that kernel decodes). A store written on an AVX-512 machine read on an AVX2
        one (or back) is not: torch's fallback then runs on the dequantized weight (slow, exact)."""
        return self._int4_layout is None or self._int4_layout == torch_layout()

    # ---------------------------------------------------------------- in a compiled graph
    def prepare_graph(self) -> str | None:
        """Before a compiled decode step traces this layer (engine/compiled.py): pick its kernel in the
        graph and build what that kernel reads. int4 linears of >= ``int4_ops.NATIVE_LINEAR_MIN_BYTES``
        packed call moemesh's C kernel as the graph op ``moemesh::int4_linear`` (the eager layer's bits
        for the same input); smaller ones torch's kernel on a bf16 input (a Python custom op costs ~8 us
        a call: more than these save), which reads torch's scale layout: (scale, zero) pairs built once
        here (unblocked where the eager kernel reads block-major scales). Returns None (every mode runs
        in a graph)."""
        if self.mode == "int4":
            self._graph_native = (self.native_int4() is not None
                                  and self.qweight.numel() >= int4_ops.NATIVE_LINEAR_MIN_BYTES)
            self._graph_sz = None if self._graph_native else self.torch_scales_and_zeros()
        return None

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` inside a compiled graph, for a few rows (M < dequant_min_m): the same kernels as
        graph ops (``prepare_graph`` ran first). x: [..., K] -> [..., N] fp32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        bias = self.bias
        if self.mode == "fp32":
            return F.linear(x2, self.weight, bias).view(*lead, self.out_features)
        if self.mode == "int4" and self._graph_native:  # fp32 x straight into the C kernel, as eager
            y = torch.ops.moemesh.int4_linear(x2, self.qweight, self.int4_scales(), self.out_features, self.kernel_fmt())
            y = y if bias is None else torch.add(y, bias)
            return y.view(*lead, self.out_features)
        xb = x2.to(torch.bfloat16)  # a fresh allocation in the graph: aligned for the int8 kernel
        if self.mode == "int4":
            y = torch._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group_size, self._graph_sz)
            y = y[:, : self.out_features]
        elif self.mode == "int8":
            y = torch._weight_int8pack_mm(xb, self.qweight, self._ones)
            y = torch.mul(y, self.scales) if bias is None else torch.addcmul(bias, y, self.scales)
            return y.view(*lead, self.out_features)
        else:  # bf16
            y = F.linear(xb, self.weight)
        y = y.float() if bias is None else torch.add(y, bias)
        return y.view(*lead, self.out_features)

    def native_int4(self) -> ctypes.CDLL | None:
        """The C int4 kernel library when it is enabled (MOEMESH_INT4_NATIVE) and reads this
        layer's packing, else None; resolved once per layer (layers are also built by from_state)."""
        if "_native_ok" not in self.__dict__:  # a bool, so the module still pickles/deep-copies
            self._native_ok = self.mode == "int4" and int4_native.supports(self._int4_layout, self.group_size,
                                                                           self.in_features)
        return int4_native.load_native() if self._native_ok else None

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}{', symmetric' if self.symmetric else ''}" if self.mode == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{g}, "
                f"bias={self.bias is not None}" + (f", fallback={self.fallback!r}" if self.fallback else ""))


def quantize_model_linears(module: torch.nn.Module, mode: str, group_size: int = 32,
                           exclude: Sequence[str] = ()) -> list[str]:
    """Replace every torch.nn.Linear inside ``module`` by a QuantLinear in place.

    ``exclude`` holds fnmatch patterns tried on the qualified name and on its last part
    (so "lm_head" and "*.gate" both work). The root module itself is never replaced.
    Returns the names that were replaced.
    """
    targets = [(name, mod) for name, mod in module.named_modules()
               if isinstance(mod, torch.nn.Linear) and name
               and not any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p)
                           for p in exclude)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, QuantLinear.from_float(lin.weight, lin.bias, mode, group_size))
    return [name for name, _ in targets]
