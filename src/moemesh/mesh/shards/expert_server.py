"""ExpertServer: runs this node's experts for mesh members (expert-shard mode).

``moemesh.experts.run``: header {layer, experts [G], counts [G], wire}, tensors
[x [n, D] (wire dtype: the distinct token rows), rows [N] i64 (index into x, grouped by expert in
the order of ``experts``), weights [N] fp32] -> {rows: N, compute_s}, [y [N, D] (wire dtype)]
where y's rows are ``weight * expert(x[row])``: one row per (token, expert) pair, not summed, so
the caller adds every expert's rows in expert-id order exactly as one process would.

Experts are stateless: a call carries everything it needs, and a caller whose holder vanished
re-sends the same rows to another holder. All torch work runs on one worker thread.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind.p2p import P2PContext

from ...experts.mixing import GroupedProvider
from ..transport.node import MeshNode
from ..transport.wire import DTYPES

RUN = "moemesh.experts.run"


class ExpertServer:
    def __init__(self, node: MeshNode, local: GroupedProvider, held: dict[int, set[int]], hidden_size: int) -> None:
        # local computes the experts (the same mixing code as one process); held: layer -> expert ids served
        self.node, self.local, self.held, self.hidden_size = node, local, held, hidden_size
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="moemesh-experts")
        self.calls = 0
        self.rows = 0

    def start(self) -> None:
        self.node.run(self.node.add_handler(RUN, self._on_run), 30.0)

    def check(self, header: dict, tensors: list) -> str | None:
        """What is wrong with a request, or None."""
        layer = header.get("layer")
        experts, counts = header.get("experts"), header.get("counts")
        if layer not in self.held:
            return f"this node holds no experts of layer {layer}"
        if not isinstance(experts, list) or not isinstance(counts, list) or len(experts) != len(counts):
            return "experts and counts must be lists of one length"
        missing = [e for e in experts if e not in self.held[layer]]
        if missing:
            return f"this node does not hold experts {missing} of layer {layer}"
        if len(tensors) != 3:
            return "expected tensors x, rows, weights"
        x, rows, w = tensors
        n = sum(int(c) for c in counts)
        if x.dim() != 2 or x.shape[1] != self.hidden_size or rows.shape != (n,) or w.shape != (n,) \
                or rows.dtype != torch.int64 or w.dtype != torch.float32 or any(int(c) < 0 for c in counts):
            return "shapes or dtypes disagree"
        if n and (int(rows.min()) < 0 or int(rows.max()) >= x.shape[0]):
            return "row index out of range"
        return None

    async def _on_run(self, header: dict, tensors: list, ctx: P2PContext) -> tuple[dict, list]:
        problem = self.check(header, tensors)
        if problem is None and header.get("wire", "fp32") not in DTYPES:
            problem = f"unknown wire dtype {header.get('wire')!r}"
        if problem is not None:
            return {"error": f"bad experts request: {problem}"}, []
        x, rows, w = tensors
        t0 = time.perf_counter()
        y = await asyncio.get_running_loop().run_in_executor(
            self._worker, self.compute, int(header["layer"]), list(header["experts"]), list(header["counts"]),
            x, rows, w)
        self.calls += 1
        self.rows += int(y.shape[0])
        return {"rows": int(y.shape[0]), "compute_s": time.perf_counter() - t0}, [y.to(DTYPES[header.get("wire", "fp32")])]

    @torch.inference_mode()
    def compute(self, layer: int, experts: list[int], counts: list[int], x: torch.Tensor, rows: torch.Tensor,
                w: torch.Tensor) -> torch.Tensor:
        """[N, D]: each expert over its rows, times its weights (the local provider's weighted_outputs:
        the same code and bits as one process)."""
        x = x.float()  # [n, D]
        groups, offset = [], 0
        for e, n in zip(experts, counts):
            slots = torch.arange(offset, offset + n)  # this expert's entries of rows / w
            groups.append((e, rows[offset : offset + n], slots))
            offset += n
        ys = self.local.weighted_outputs(layer, x, groups, w) if groups else []
        return torch.cat(ys) if ys else x.new_zeros((0, x.shape[1]))
