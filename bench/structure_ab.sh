#!/bin/bash
# Issue 17's "speed unchanged" check: bench/decode_split.py of the tree before the restructure (OLD, a
# worktree of d401ea9: git worktree add /tmp/old d401ea9 --detach) against this tree, alternated, fresh
# processes, on the 12-layer synthetic Qwen3 in /work/bench-data. NATIVE=0 compares the two on torch's
# int4 kernel (the restructure alone); the default compares the default paths (this machine has no
# AVX-512, which the old C kernel needed). Output: one line per run; results in bench/results/structure_ab.md.
OLD=${OLD:-/tmp/old}
NEW=$(cd "$(dirname "$0")/.." && pwd)
for i in 1 2 3; do
  for side in old new; do
    if [ $side = old ]; then T=$OLD; else T=$NEW; fi
    echo "=== round $i $side load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$T" && MOEMESH_INT4_NATIVE=${NATIVE:-1} PYTHONPATH=$T/src timeout 600 "$NEW/.venv/bin/python" bench/decode_split.py \
        --tokens 30 --repeats 1 --out "/tmp/structure_ab_${side}_$i" 2>&1 | grep -E "^repeat" | tail -1)
  done
done
