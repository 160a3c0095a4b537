"""A GGUF header -> (HF-style config, exact stored bytes) for ``moemesh plan``, through the same
translator the loader uses (each family's GGUFSpec, models/gguf.py): no weight byte is read."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..models import read_gguf_header
from ..weights.gguf_reader import open_gguf_file
from .shapes import NATIVE
from .stored import Stored


def gguf_config(path: Path) -> tuple[dict[str, Any], Stored]:
    file = open_gguf_file(path)
    cfg = read_gguf_header(file).config
    stored = Stored("gguf", len(file.files), 0, 0, 0)
    experts: dict[str, int] = {}  # expert weight type -> bytes
    n_experts = 0
    for t in file.tensors.values():
        n = t.nbytes
        stored.tensor_bytes += n
        stored.params += math.prod(t.shape)
        stored.dtypes[t.type_name] = stored.dtypes.get(t.type_name, 0) + n
        if "_exps." in t.name:
            stored.expert_bytes += n
            if t.name.endswith(".weight"):
                experts[t.type_name] = experts.get(t.type_name, 0) + n
                n_experts += t.shape[0] if "ffn_down_exps" in t.name else 0
    stored.native = [k for k, _ in sorted(experts.items(), key=lambda kv: -kv[1]) if k in NATIVE]
    if n_experts:
        stored.native_expert_bytes = stored.expert_bytes // n_experts
    return cfg, stored
