"""RSS after loading an expert store lazily, with and without paging out the checkpoint's unused
mapped ranges (weights/page_out.py). Each measurement is a fresh process that loads the store
with lazy experts under ``--ram`` and reads /proc/self/status; "off" disables
``SafetensorsCheckpoint.release_unused`` for that process. Writes bench/results/page_out.{json,md}.

    .venv/bin/python bench/page_out.py [--store DIR] [--ram-mib 952] [--quant int4]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from moemesh.benchkit.results import write_results  # noqa: E402
from moemesh.benchkit.synth import core as synth

WORKER = """
import json, sys
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from moemesh.weights.safetensors_io import SafetensorsCheckpoint
store, mode, ram, quant = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode == "off":
    SafetensorsCheckpoint.release_unused = lambda self, model: 0
lm = load_model(store, quant, experts=ExpertOptions(ram=ram * 2**20))
st = {l.split(":")[0]: int(l.split()[1]) >> 10 for l in open("/proc/self/status")
      if l.startswith(("VmRSS", "RssFile", "RssAnon", "VmHWM"))}
print(json.dumps({**st, "slots": lm.provider.cache.num_slots}))
"""


def measure(store: str, mode: str, ram: int, quant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, store, mode, str(ram), quant], capture_output=True,
                         text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(synth.model_dir(Path("/work/bench-data"), 12, 32768, 0) / "store"))
    ap.add_argument("--ram-mib", type=int, default=952)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--out", default=str(HERE / "results" / "page_out"))
    a = ap.parse_args()
    rows = {mode: measure(a.store, mode, a.ram_mib, a.quant) for mode in ("off", "on", "off", "on")}  # last of each
    md = "\n".join([
        f"# RSS after a lazy load (`--ram {a.ram_mib}M`, `{a.quant}`) with and without the page-out", "",
        f"Store: `{a.store}`.", "",
        "| page-out | VmRSS MiB | RssFile MiB | RssAnon MiB | VmHWM MiB (load peak) | cache slots |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {m} | {r['VmRSS']} | {r['RssFile']} | {r['RssAnon']} | {r['VmHWM']} | {r['slots']} |" for m, r in rows.items()],
        "", f"Command: `.venv/bin/python bench/page_out.py {' '.join(sys.argv[1:])}`.", ""])
    payload = {"bench": "page_out", "store": a.store, "ram_mib": a.ram_mib, "quant": a.quant, "rows": rows}
    out = Path(a.out)
    write_results(out.parent, out.name, payload, md, sys.argv)
    print(md)


if __name__ == "__main__":
    main()
