"""MeshStack: everything one mesh node runs, assembled from explicit options.

node (P2P + DHT + membership proof) -> this node's share of the model (pipeline/slice.py: fixed,
or elastic with lazy experts under ``ram``) -> StageServer (runs layer ranges for members, chained)
+ ExpertServer (computes experts for members) -> Membership heartbeat (announces the share, budget
and status) -> optionally a PipelineModel (the engine's model when this node also takes API
requests). Expert-shard mode (``experts``): every layer here; the MoE blocks get a RemoteExperts
provider (or, ``masked``, routers limited to our experts: no traffic at all).
Used by ``moemesh mesh serve``, tests, bench.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import MoemeshError
from ..loading.experts import ExpertOptions
from ..loading.identity import identify
from ..models.args import ModelArgs
from .node_status import NodeStatus, free_memory
from .pipeline.model import PipelineModel
from .pipeline.route import Candidate
from .pipeline.slice import LoadedSlice, load_slice, parse_layers
from .pipeline.stage import StageServer
from .shards.assign import MEMORY_FRACTION, auto_assign, expert_capacity, parse_experts
from .shards.expert_server import ExpertServer
from .shards.owners import Holder
from .transport.membership import Membership, NodeRecord
from .transport.node import MeshNode, MeshOptions


@dataclass
class StackOptions:
    model: str
    layers: str | None = None  # "A:B", "auto" (a plan decides), or None (every layer, offered whole)
    quant: str = "auto"
    kv: str = "dense"
    api: bool = True  # build a PipelineModel for the engine (and keep the embedding + head)
    wire: str = "fp32"  # activations on the wire: fp32 (exact) or bf16 (half the bytes)
    http: str | None = None  # advertised API address
    experts: str | None = None  # expert-shard mode: "auto", "A:B" or "0,3,5:8"; None: pipeline mode
    expert_ram: int | None = None  # bytes "auto" may give to resident experts (default: 80% of free memory)
    masked: bool = False  # expert-shard mode: route only to our own experts (approximate, no traffic)
    ram: int | None = None  # whole-process budget: experts streamed from this node's store (elastic node)
    expert_slots: int | None = None  # TESTS: an exact expert-cache slot count instead of a budget (elastic)
    mesh: MeshOptions = field(default_factory=MeshOptions)

    @property
    def lazy(self) -> bool:
        return self.ram is not None or self.expert_slots is not None


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
        self.status: NodeStatus | None = None
        self.model_id = ""

    @property
    def args(self) -> ModelArgs:
        assert self.slice is not None
        return self.slice.args

    def start(self) -> "MeshStack":
        """Blocking: start the node, load our share, serve and announce it."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "MeshStack":
        o = self.options
        if o.masked and o.experts is None:
            raise MoemeshError("--masked is an option of expert-shard mode: give --experts too")
        if o.experts is not None and o.layers not in (None, "auto"):
            raise MoemeshError("--experts: every node of an expert-sharded mesh holds every layer (leave out --layers)")
        if o.masked and o.lazy and o.experts == "auto":
            raise MoemeshError("--masked with --ram needs an explicit --experts share (auto shares move between nodes)")
        self.model_id = identify(o.model, o.quant, o.lazy)
        self.node.start()
        budget = ExpertOptions(ram=o.ram, slots=o.expert_slots) if o.lazy else None
        choose = self._choose_experts if o.experts is not None and not o.lazy else None
        self.slice = load_slice(o.model, None if o.experts is not None else o.layers, o.quant, with_ends=o.api,
                                choose_experts=choose, experts=budget)
        s = self.slice
        if o.experts is not None and not s.args.num_experts:
            raise MoemeshError("--experts needs an MoE model (this one has no experts)")
        self.stage = StageServer(self.node, s.stage, o.kv)
        self.stage.start()
        record = self._record()
        self.status = NodeStatus(self.node, s, self.stage, record)
        self.membership = Membership(self.node, record, self.status.refresh)
        if s.provider is not None:
            held = s.experts if not s.elastic else {i: range(s.args.num_experts) for i in s.args.moe_layers}
            self.expert_server = ExpertServer(self.node, s.provider, {i: set(h) for i, h in held.items()},
                                              s.args.hidden_size)
            self.expert_server.start()
            self.status.expert_server = self.expert_server
        self.membership.start()
        self.node.spawn(self.status.probe(self.membership))
        wire = {"fp32": torch.float32, "bf16": torch.bfloat16}[o.wire]
        if o.experts is not None:
            self._wire_experts(record, wire)
        elif s.lazy_experts is not None:  # cache only the layers plans give us
            s.lazy_experts.prefetch_filter = lambda layer, _e: self.status.runs_layer(layer)  # type: ignore[union-attr]
        if o.api:
            assert s.ends is not None
            share = tuple(record.share) if record.share is not None else None
            me = Candidate(None, share, s.elastic, float(max(1, record.capacity)))  # type: ignore[arg-type]
            self.pipeline = PipelineModel(s.args, self.model_id, s.ends, s.stage, self.node, self.membership, wire, me)
            self.status.pipeline = self.pipeline
        return self

    def _record(self) -> NodeRecord:
        """What this node announces: its share (layers or experts), whether it is elastic, its capacity."""
        o, s = self.options, self.slice
        assert s is not None
        layers = (s.stage.start, s.stage.end) if not s.elastic else (0, s.args.num_layers)
        if o.experts is not None:
            share: list[int] | None = [0, s.args.num_layers]
            experts = s.held if not s.elastic else parse_experts(o.experts, s.args.num_experts)
        else:
            share = None if o.layers == "auto" else list(parse_layers(o.layers or ":", s.args.num_layers))
            experts = s.held
        capacity = s.budget.expert_cache if s.budget is not None else free_memory()
        if s.budget is None and s.lazy_experts is not None:  # a slot count (tests)
            capacity = s.lazy_experts.cache.nbytes()
        return NodeRecord(
            peer_id=self.node.peer_id.to_base58(), model=self.model_id, layers=layers, num_layers=s.args.num_layers,
            addrs=self.addrs(), experts=experts, free_memory=free_memory(), http=o.http, share=share,
            elastic=s.elastic, capacity=int(capacity), mode="experts" if o.experts is not None else "stages")

    def _choose_experts(self, args: ModelArgs, config: dict, bytes_per_expert: int) -> list[int]:
        """The expert ids a fixed node holds: explicit, or ``auto`` (least-held first, as many as
        fit in memory; the live nodes' records say who holds what)."""
        o = self.options
        held = parse_experts(o.experts or "auto", args.num_experts)
        if held is not None:
            return held
        others = []
        if o.mesh.initial_peers:
            records = self.node.run(Membership(self.node, None).live_nodes(), 15.0)
            others = [r.experts for r in records if r.model == self.model_id and r.layers == (0, args.num_layers)]
        memory = o.expert_ram if o.expert_ram is not None else int(free_memory() * MEMORY_FRACTION)
        capacity = expert_capacity(memory, bytes_per_expert, args.num_experts)
        if o.masked:
            capacity = max(capacity, args.top_k)  # a masked node must fill its own top-k
        return auto_assign(args.num_experts, others, capacity)

    def _wire_experts(self, record: NodeRecord, wire: torch.dtype) -> None:
        """Point every MoE block at our experts: masked routers, or RemoteExperts for the rest."""
        from .shards.masked import mask_model, moe_blocks
        from .shards.remote_experts import RemoteExperts

        s = self.slice
        assert s is not None and s.provider is not None and self.membership is not None
        if self.options.masked:
            mask_model(s.stage, record.experts)
            return
        declared = frozenset(record.experts) if record.experts is not None else None
        me = Holder(record.peer_id, declared, s.elastic, float(max(1, record.capacity)))
        self.remote_experts = RemoteExperts(s.provider, me, self.node, self.live_nodes, self.model_id, wire)
        for block in moe_blocks(s.stage):
            block.provider = self.remote_experts
        if s.lazy_experts is not None:  # cache only our share of the experts
            s.lazy_experts.prefetch_filter = self.remote_experts.owns
        self.status.remote_experts = self.remote_experts  # type: ignore[union-attr]

    def addrs(self) -> list[str]:
        return self.node.run(self.node.visible_addrs(), 10.0)

    def live_nodes(self) -> list[NodeRecord]:
        assert self.membership is not None
        return self.node.run(self.membership.live_nodes(), 10.0)

    def stop(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        self.node.stop()
