"""Output head: logits over the vocabulary, optionally on a quantized matmul with exact rescoring."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import decode_kernels


class OutputHead(torch.nn.Module):
    """logits = x @ W.T.

    With ``approx`` set, the [V, D] matmul (the largest single read of a small model's decode
    step) runs on the quantized copy, then each row's ``rescore`` best candidates are recomputed
    exactly from the fp32 table. Greedy decoding therefore matches fp32 unless the true argmax is
    not among the approximate top ``rescore`` — the rest of the distribution stays approximate.
    """

    def __init__(self, weight: torch.Tensor | None, approx: torch.nn.Module | None = None, rescore: int = 16) -> None:
        """rescore 0: ``approx`` is the head itself (a BlockLinear over the file's own rows), no table."""
        super().__init__()
        self.weight = weight  # [V, D] as stored (shared with the embedding when tied: no copy)
        self.approx = approx
        self.rescore = rescore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, D] -> [B, V]
        if self.approx is None:
            return F.linear(x, self.weight)  # weight is fp32 here (see Builder.head)
        logits = self.approx(x)  # [B, V]
        if self.rescore == 0:
            return logits
        # one C pass (~0.3 ms of topk, gather and einsum at 49k x 576 before), where it applies
        lib = None if torch.compiler.is_compiling() else decode_kernels.load()
        if (lib is not None and self.weight.is_contiguous()
                and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous() and logits.is_contiguous()
                and decode_kernels.head_rescore(lib, logits, x, self.weight, self.rescore)):
            return logits
        return self.rescore_reference(x, logits)

    def rescore_reference(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """x [B, D], approximate logits [B, V] -> the rows' top ``rescore`` recomputed from the table (in place)."""
        top = logits.topk(self.rescore, dim=-1).indices  # [B, R]
        exact = torch.einsum("bd,brd->br", x, self.weight[top].float())  # [B, R]
        return logits.scatter_(-1, top, exact)

    def nbytes(self) -> int:
        return self.approx.nbytes() if self.approx is not None else self.weight.numel() * 4
