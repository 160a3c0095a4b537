"""A model's shape: its linears and small tensors, split the way moemesh holds them (for ``plan``).

* trunk: attention, dense MLPs, shared experts, routers, norms (always resident, read every token)
* experts: one routed expert = a fused gate_up linear and a down linear (one blob in the store)
* embedding table (mmap'ed; a token reads one row) and output head

Each architecture family declares its shape through its ArchSpec (``ArchSpec.shape``): most use
``standard_shape`` (GQA attention + dense or MoE gated MLPs, read from ModelArgs), with the family's
particulars passed explicitly; MLA families bring their own. Byte counts per format are benchkit's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .args import ModelArgs


@dataclass(frozen=True)
class Linear:
    n_out: int
    n_in: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.n_out * self.n_in + (self.n_out if self.bias else 0)


@dataclass
class ModelShape:
    name: str
    model_type: str
    num_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    vocab_size: int
    hidden_size: int
    trunk_linears: list[Linear] = field(default_factory=list)  # whole model, every token
    expert_linears: list[Linear] = field(default_factory=list)  # one routed expert: [gate_up, down]
    small_params: int = 0  # norms, routers, sinks: kept fp32, read every token
    tied: bool = False
    notes: list[str] = field(default_factory=list)
    # an expert store's real blob size for its quant (e.g. symmetric int4: 10% below blob_bytes' asymmetric count)
    stored_blobs: dict[str, int] = field(default_factory=dict)

    @property
    def expert_params(self) -> int:
        return sum(lin.params for lin in self.expert_linears)

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head(self) -> Linear:
        return Linear(self.vocab_size, self.hidden_size)

    @property
    def trunk_params(self) -> int:
        """Everything but the routed experts (embedding and head included)."""
        head = 0 if self.tied else self.head.params
        return sum(lin.params for lin in self.trunk_linears) + self.small_params + self.embed_params + head

    @property
    def total_params(self) -> int:
        return self.trunk_params + self.moe_layers * self.num_experts * self.expert_params

    @property
    def active_params(self) -> int:
        """Per token, counting the embedding table (the Qwen, Mixtral and DeepSeek convention)."""
        return self.active_params_no_embedding + (0 if self.tied else self.embed_params)  # tied: the head is it

    @property
    def active_params_no_embedding(self) -> int:
        """Per token without the embedding table, which a token reads one row of (gpt-oss's convention)."""
        return (sum(lin.params for lin in self.trunk_linears) + self.small_params + self.head.params
                + self.moe_layers * self.top_k * self.expert_params)

    @property
    def active_matmul_params(self) -> int:
        """Weights multiplied per decode token (2 FLOPs each): linears, head and top-k experts."""
        return (sum(lin.n_out * lin.n_in for lin in self.trunk_linears) + self.head.n_out * self.head.n_in
                + self.moe_layers * self.top_k * sum(lin.n_out * lin.n_in for lin in self.expert_linears))


def gated(d: int, inter: int, bias: bool = False) -> list[Linear]:
    return [Linear(2 * inter, d, bias), Linear(d, inter, bias)]  # gate_up fused, down


def base_shape(args: ModelArgs, name: str) -> ModelShape:
    return ModelShape(name, args.model_type, args.num_layers, len(args.moe_layers), args.num_experts, args.top_k,
                      args.vocab_size, args.hidden_size, tied=args.tie_word_embeddings)


def standard_shape(args: ModelArgs, name: str, expert_bias: bool = False, router_bias: bool = False,
                   sinks: bool = False) -> ModelShape:
    """GQA attention + (dense | MoE) gated MLPs (+ a gated shared expert), from ModelArgs; the
    family says what ModelArgs does not: biases on its experts and router, attention sinks."""
    d, h, kv, hd = args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim
    s = base_shape(args, name)
    s.expert_linears = gated(d, args.moe_intermediate_size, bias=expert_bias)
    per_layer_small = 2 * d  # input and post-attention norms
    if args.qk_norm == "head":
        per_layer_small += 2 * hd
    elif args.qk_norm == "full":
        per_layer_small += h * hd + kv * hd
    if sinks:
        per_layer_small += h
    for i in range(args.num_layers):
        s.trunk_linears += [Linear((h + 2 * kv) * hd, d, args.attention_bias), Linear(d, h * hd, args.o_bias)]
        if not args.is_moe_layer(i):
            s.trunk_linears += gated(d, args.intermediate_size)
            continue
        s.small_params += args.num_experts * d + (args.num_experts if router_bias else 0)  # router (+ its bias)
        if args.shared_expert_intermediate_size:
            s.trunk_linears += gated(d, args.shared_expert_intermediate_size)
            s.small_params += d if args.shared_expert_gate else 0  # shared_expert_gate: Linear(D, 1)
    s.small_params += args.num_layers * per_layer_small + d  # + final norm
    return s
