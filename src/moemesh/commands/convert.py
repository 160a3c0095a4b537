"""``moemesh convert SRC OUT``: write an expert store from an HF MoE checkpoint directory or a GGUF."""
from __future__ import annotations

import argparse

from ..loading.convert import STORE_QUANTS, TRUNK_QUANTS, convert
from ..store.expert_store import ExpertStore


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="write an expert store (trunk + one aligned blob per expert)")
    p.add_argument("src", help="HF checkpoint directory or GGUF file of a supported MoE architecture")
    p.add_argument("out", help="new store directory (must not exist)")
    p.add_argument("--quant", choices=STORE_QUANTS, default="int4", help="expert weight format (default int4)")
    p.add_argument("--trunk-quant", choices=TRUNK_QUANTS, default="keep",
                   help="trunk linears (attention, dense MLPs, shared experts): 'keep' as the source stores them "
                        "(quantized at load by --quant), or 'int4' once now (a quarter of bf16's bytes to read and "
                        "map; the same values --quant int4 gives at load)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = convert(args.src, args.out, args.quant, progress=not args.quiet, trunk_quant=args.trunk_quant)
    store = ExpertStore(out)
    n = sum(len(b) for b in store.blobs.values())
    print(f"wrote {out}: {n} experts x {store.blob_size / 2**20:.2f} MiB ({store.quant}), "
          f"trunk {store.trunk_path.stat().st_size / 2**20:.1f} MiB")
    return 0
