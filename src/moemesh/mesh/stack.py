"""MeshStack: everything one mesh node runs, assembled from explicit options.

node (P2P + DHT + membership proof) -> slice of the model -> StageServer (serves our layers to
members) + ExpertServer (serves our experts) -> Membership heartbeat (announces them) ->
optionally a PipelineModel (the engine's model when this node also takes API requests).
Expert-shard mode (``experts``): every layer here, only some experts; the MoE blocks get a
RemoteExperts provider (or, ``masked``, routers limited to our experts: no traffic at all).
Used by ``moemesh mesh serve``, tests, bench.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from ..errors import MoemeshError
from ..experts.provider import ResidentExperts
from ..models.args import ModelArgs
from .pipeline.model import PipelineModel
from .pipeline.slice import LoadedSlice, load_slice
from .pipeline.stage import StageServer
from .shards.assign import MEMORY_FRACTION, auto_assign, expert_capacity, parse_experts
from .shards.expert_server import ExpertServer
from .transport.membership import Membership, NodeRecord
from .transport.node import MeshNode, MeshOptions


def model_id(config: dict) -> str:
    """Nodes agree on a model by its config (paths differ between machines)."""
    canonical = json.dumps(config, sort_keys=True, default=str)
    return f"{config.get('model_type', '?')}/{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def held_ids(experts: dict[int, dict[int, torch.nn.Module]]) -> dict[int, set[int]]:
    """layer -> the expert ids this node holds (its share)."""
    return {layer: set(held) for layer, held in experts.items()}


def free_memory() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class StackOptions:
    model: str
    layers: str | None = None  # "A:B"; None: every layer
    quant: str = "auto"
    kv: str = "dense"
    api: bool = True  # load embedding + head and build a PipelineModel for the engine
    wire: str = "fp32"  # activations on the wire: fp32 (exact) or bf16 (half the bytes)
    http: str | None = None  # advertised API address
    experts: str | None = None  # expert-shard mode: "auto", "A:B" or "0,3,5:8"; None: every expert
    expert_ram: int | None = None  # bytes "auto" may give to experts (default: 80% of free memory)
    masked: bool = False  # expert-shard mode: route only to our own experts (approximate, no traffic)
    mesh: MeshOptions = field(default_factory=MeshOptions)


class MeshStack:
    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.node = MeshNode(options.mesh)
        self.slice: LoadedSlice | None = None
        self.stage: StageServer | None = None
        self.membership: Membership | None = None
        self.pipeline: PipelineModel | None = None
        self.expert_server: ExpertServer | None = None
        self.remote_experts = None  # RemoteExperts in expert-shard mode (not masked)

    @property
    def args(self) -> ModelArgs:
        assert self.slice is not None
        return self.slice.args

    def start(self) -> "MeshStack":
        """Blocking: start the node, load our layers, serve and announce them."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "MeshStack":
        o = self.options
        if o.masked and o.experts is None:
            raise MoemeshError("--masked is an option of expert-shard mode: give --experts too")
        self.node.start()
        choose = self._choose_experts if o.experts is not None else None
        self.slice = load_slice(o.model, o.layers, o.quant, with_ends=o.api, choose_experts=choose)
        s = self.slice
        if o.experts is not None and (s.stage.start, s.stage.end) != (0, s.args.num_layers):
            raise MoemeshError("--experts: every node of an expert-sharded mesh holds every layer (leave out --layers)")
        if o.experts is not None and not s.args.num_experts:
            raise MoemeshError("--experts needs an MoE model (this one has no experts)")
        self.stage = StageServer(self.node, s.stage, o.kv)
        self.stage.start()
        if s.experts:
            self.expert_server = ExpertServer(self.node, ResidentExperts(s.experts), held_ids(s.experts), s.args.hidden_size)
            self.expert_server.start()
        mid = model_id(s.config)
        record = NodeRecord(
            peer_id=self.node.peer_id.to_base58(), model=mid, layers=(s.stage.start, s.stage.end),
            num_layers=s.args.num_layers, addrs=self.addrs(), experts=s.held, free_memory=free_memory(), http=o.http,
        )
        self.membership = Membership(self.node, record, self._refresh)
        self.membership.start()
        wire = {"fp32": torch.float32, "bf16": torch.bfloat16}[o.wire]
        if o.experts is not None and s.held is not None:
            self._wire_experts(mid, wire)
        if o.api:
            assert self.slice.ends is not None
            self.pipeline = PipelineModel(self.slice.args, mid, self.slice.ends, self.slice.stage, self.node,
                                          self.membership, wire)
        return self

    def _choose_experts(self, args: ModelArgs, config: dict, bytes_per_expert: int) -> list[int]:
        """The expert ids this node holds: explicit, or ``auto`` (least-held first, as many as
        fit in memory; the live nodes' records say who holds what)."""
        o = self.options
        held = parse_experts(o.experts or "auto", args.num_experts)
        if held is not None:
            return held
        mid = model_id(config)
        others = []
        if o.mesh.initial_peers:
            records = self.node.run(Membership(self.node, None).live_nodes(), 15.0)
            others = [r.experts for r in records if r.model == mid and r.layers == (0, args.num_layers)]
        memory = o.expert_ram if o.expert_ram is not None else int(free_memory() * MEMORY_FRACTION)
        capacity = expert_capacity(memory, bytes_per_expert, args.num_experts)
        if o.masked:
            capacity = max(capacity, args.top_k)  # a masked node must fill its own top-k
        return auto_assign(args.num_experts, others, capacity)

    def _wire_experts(self, mid: str, wire: torch.dtype) -> None:
        """Point every MoE block at our experts: masked routers, or RemoteExperts for the rest."""
        from .shards.masked import mask_model, moe_blocks
        from .shards.remote_experts import RemoteExperts

        s = self.slice
        assert s is not None and s.held is not None and self.membership is not None
        if self.options.masked:
            mask_model(s.stage, s.held)
            return
        self.remote_experts = RemoteExperts(ResidentExperts(s.experts), held_ids(s.experts), self.node, self.live_nodes, mid,
                                            wire)
        for block in moe_blocks(s.stage):
            block.provider = self.remote_experts

    def _refresh(self, record: NodeRecord) -> None:
        record.load = float(self.stage.load) if self.stage is not None else 0.0
        record.free_memory = free_memory()

    def addrs(self) -> list[str]:
        return self.node.run(self.node.visible_addrs(), 10.0)

    def live_nodes(self) -> list[NodeRecord]:
        assert self.membership is not None
        return self.node.run(self.membership.live_nodes(), 10.0)

    def stop(self) -> None:
        self.node.stop()
