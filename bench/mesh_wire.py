"""bench/mesh.py --part wire: what a bf16 wire (activations between stages in bf16, half the bytes)
does to the logits, measured on real weights.

Three pipeline stages in one process (the API node and two stage nodes on loopback, chained),
``--wire fp32`` and ``--wire bf16``, against the same model in one process; teacher-forced over a
fixed English text (every position's logits), then a greedy continuation. Reported: max |logit
difference|, mean KL(one process || mesh) in nats, top-1 agreement over the positions, and how
many of the greedy tokens equal one process's. The fp32 wire is the control (0, 0, 100%, all).
"""
from __future__ import annotations

import time
from pathlib import Path

TEXT = ("The history of the city begins with a small settlement on the river. Over the centuries, merchants "
        "built warehouses along the banks, and the town grew into a center of trade. Today it is known for its "
        "museums, its old bridges and a market that has been held every Saturday for six hundred years.")


def _logits(model, ids: list[int]):
    import torch

    from moemesh.batch import BatchLayout

    cache = model.new_cache()
    cache.add_sequence(0)
    out = model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)
    cache.free_sequence(0)
    return out


def _greedy(model, ids: list[int], n: int) -> list[int]:
    from moemesh.engine.engine import Engine
    from moemesh.engine.sampling_params import SamplingParams

    seq = Engine(model).generate([ids], SamplingParams(temperature=0.0, max_tokens=n))[0]
    return seq.output_ids


def wire_effect(model: str, greedy_tokens: int = 48) -> list[dict]:
    import torch

    from moemesh.loading.loader import load_model
    from moemesh.mesh.stack import MeshStack, StackOptions
    from moemesh.mesh.transport.node import MeshOptions

    single = load_model(model, "fp32")
    ids = single.tokenizer.encode(TEXT)
    ref = _logits(single.model, ids)  # [T, V]
    ref_greedy = _greedy(single.model, ids[:24], greedy_tokens)
    n = single.args.num_layers
    cuts = [0, n // 3, 2 * n // 3, n]
    rows = []
    for wire in ("fp32", "bf16"):
        mesh = dict(mesh_name=f"wire-{wire}", secret="bench-wire", heartbeat=1.0, call_timeout=60.0)
        tail = [MeshStack(StackOptions(model, f"{a}:{b}", "fp32", api=False, wire=wire,
                                       mesh=MeshOptions(**mesh))).start() for a, b in zip(cuts[2:3], cuts[3:])]
        mid = MeshStack(StackOptions(model, f"{cuts[1]}:{cuts[2]}", "fp32", api=False, wire=wire,
                                     mesh=MeshOptions(**mesh, initial_peers=tail[0].addrs()))).start()
        head = MeshStack(StackOptions(model, f"{cuts[0]}:{cuts[1]}", "fp32", wire=wire,
                                      mesh=MeshOptions(**mesh, initial_peers=tail[0].addrs()))).start()
        try:
            deadline = time.monotonic() + 30
            while len(head.live_nodes()) < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            got = _logits(head.pipeline, ids)
            p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
            kl = (p.exp() * (p - q)).sum(-1)  # [T]
            greedy = _greedy(head.pipeline, ids[:24], greedy_tokens)
            same = next((i for i, (a, b) in enumerate(zip(greedy, ref_greedy)) if a != b), len(greedy))
            rows.append({"model": Path(model).name, "wire": wire, "positions": len(ids), "stages": [list(c) for c in
                         zip(cuts, cuts[1:])], "max_abs_logit_diff": float((got - ref).abs().max()),
                         "mean_kl_nats": float(kl.mean()), "max_kl_nats": float(kl.max()),
                         "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                         "greedy_same_prefix": same, "greedy_tokens": greedy_tokens,
                         "wire_bytes_per_row": single.args.hidden_size * (4 if wire == "fp32" else 2)})
            print(rows[-1], flush=True)
        finally:
            for s in (head, mid, *tail):
                s.stop()
    return rows


def markdown(rows: list[dict]) -> list[str]:
    lines = ["", "## bf16 wire: effect on logits (real weights, 3 chained stages vs one process)", "",
             f"Teacher-forced over a fixed {rows[0]['positions']}-token English text (every position), then "
             f"{rows[0]['greedy_tokens']} greedy tokens from its first 24; fp32 weights so the wire is the only "
             "difference.", "",
             "| model | wire | bytes/row | max abs logit diff | mean KL nats | max KL nats | top-1 agree | greedy "
             "tokens equal |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['wire']} | {r['wire_bytes_per_row']} | {r['max_abs_logit_diff']:.4g} | "
                     f"{r['mean_kl_nats']:.3g} | {r['max_kl_nats']:.3g} | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['greedy_same_prefix']} of {r['greedy_tokens']} |")
    models = ",".join(dict.fromkeys(r["model"] for r in rows))
    return lines + ["", f"Command: `.venv/bin/python bench/mesh.py --part wire --wire-models {models}` (model paths "
                    "shortened to their names)"]
