"""``moemesh mesh status``: the live nodes of a mesh, as their signed membership records describe
them (share, what they serve now, budget, hit rate, tok/s, ping time to each other node)."""
from __future__ import annotations

import json

from ..mesh.transport.node import MeshOptions


def show_status(options: MeshOptions, as_json: bool) -> int:
    from ..mesh.transport.membership import Membership
    from ..mesh.transport.node import MeshNode

    node = MeshNode(options).start()
    membership = Membership(node, None)
    try:
        records = node.run(membership.live_nodes(), 15.0)
    finally:
        node.stop()
    if as_json:
        print(json.dumps([r.__dict__ | {"layers": list(r.layers)} for r in records], indent=2))
        return 0
    if not records:
        extra = f" ({membership.rejected} record(s) not signed with this mesh's secret)" if membership.rejected else ""
        print(f"no live nodes{extra}")
        return 0
    print(status_table(records))
    return 0


def status_table(records: list) -> str:
    """One row per node: share, what it serves now, budget, hit rate, tok/s, links (ms to each peer)."""
    from ..mesh.shards.assign import describe

    short = {r.peer_id: r.peer_id[-6:] for r in records}
    lines = [f"{'node':<8} {'model':<28} {'share':>7} {'serving':>12} {'experts':>10} {'budget':>9} {'hit':>6} "
             f"{'tok/s':>7} {'load':>4}  links ms / http"]
    for r in records:
        st = r.status or {}
        share = "auto" if r.share is None else f"{r.share[0]}:{r.share[1]}"
        serving = ",".join(f"{a}:{b}" for a, b in st.get("serving", [])) or "-"
        experts = st.get("experts") or (describe(r.experts) if r.experts is not None else "-")
        budget = f"{st['budget']['ram'] / 2**30:.1f}G" if st.get("budget") else "-"
        hit = f"{st['hit_rate']:.3f}" if st.get("hit_rate") is not None else "-"
        links = " ".join(f"{short.get(p, p[-6:])}={ms}" for p, ms in sorted(st.get("links_ms", {}).items()))
        lines.append(f"{short[r.peer_id]:<8} {r.model[:28]:<28} {share:>7} {serving[:12]:>12} {experts[:10]:>10} "
                     f"{budget:>9} {hit:>6} {st.get('tok_s', 0):>7} {r.load:>4.0f}  {links or '-'}"
                     f"{'  ' + r.http if r.http else ''}")
    return "\n".join(lines)
