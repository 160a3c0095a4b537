"""One file per HF ``model_type``; ``get_arch`` looks one up by name."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnsupportedArchitecture
from . import (
    deepseek_v2,
    deepseek_v3,
    glm4_moe,
    glm_moe_dsa,
    gpt_oss,
    kimi_k25,
    llama,
    minimax_m2,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
)
from .spec import ArchSpec

if TYPE_CHECKING:
    from .gguf import Translation

ARCHITECTURES: dict[str, ArchSpec] = {
    m.ARCH.model_type: m.ARCH for m in (llama, qwen3_moe, qwen2_moe, mixtral, olmoe)
}
ARCHITECTURES[gpt_oss.ARCH.model_type] = gpt_oss.ARCH
ARCHITECTURES.update({m.ARCH.model_type: m.ARCH for m in (deepseek_v2, deepseek_v3)})
ARCHITECTURES.update({m.ARCH.model_type: m.ARCH for m in (glm4_moe, glm_moe_dsa, minimax_m2, kimi_k25, qwen3_next, qwen3_5_moe)})
ARCHITECTURES[qwen3_5_moe.TEXT_ARCH.model_type] = qwen3_5_moe.TEXT_ARCH


def get_arch(model_type: str) -> ArchSpec:
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return spec


def gguf_specs() -> list:
    """Every family's models.gguf.GGUFSpec (the GGUF architectures moemesh reads)."""
    return [a.gguf for a in ARCHITECTURES.values() if a.gguf is not None]


def read_gguf_header(file) -> "Translation":
    """A GGUF header (weights.gguf_reader.GGUFFile) read as its family's HF checkpoint:
    config and HF names (models/gguf.py ``translate``)."""
    from .gguf import find_spec, translate

    spec = find_spec(gguf_specs(), file.architecture, file.metadata, file.path)
    return translate(spec, file.path, {n: t.shape for n, t in file.tensors.items()}, file.metadata)
