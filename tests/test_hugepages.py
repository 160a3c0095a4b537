"""Quantized weights in a huge-page arena (hugepages.py): same bits, one mapping, 2 MiB pages."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.loading.convert import convert
from moemesh.loading.loader import load_model
from moemesh.loading.placement import resident_expert_modules
from moemesh.quant.hugepages import ALIGN, HUGE_PAGE, QUANTIZED_BUFFERS, HugePageArena, move_quantized
from moemesh.quant.qlinear import QuantLinear


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def quantized(m: QuantLinear) -> list[torch.Tensor]:
    return [t for n in QUANTIZED_BUFFERS if (t := m._buffers.get(n)) is not None]


def test_arena_pieces_are_page_aligned_and_bounded():
    arena = HugePageArena(4 * ALIGN)
    a, b = arena.take(10), arena.take(ALIGN + 1)
    assert a.data_ptr() % HUGE_PAGE == 0 and b.data_ptr() == a.data_ptr() + ALIGN
    c = arena.take(ALIGN)
    assert c.data_ptr() == a.data_ptr() + 3 * ALIGN and arena.used == arena.nbytes
    with pytest.raises(MemoryError, match="arena"):
        arena.take(1)
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert torch.equal(HugePageArena(64).hold(t), t)


def test_moved_linears_give_the_same_bits():
    g = torch.Generator().manual_seed(0)
    lins = [QuantLinear.from_float(torch.randn(96, 64, generator=g), None, "int4"),
            QuantLinear.from_int4_groups(torch.randint(0, 16, (64, 96), generator=g, dtype=torch.uint8),
                                         scale := torch.rand(64, 3, generator=g) / 8, -8 * scale, None),
            QuantLinear.from_float(torch.randn(32, 64, generator=g), None, "int8")]
    xs = [torch.randn(m, lin.in_features, generator=g) for lin in lins for m in (1, 3)]
    before = [lin(x) for lin in lins for x in xs if x.shape[1] == lin.in_features]
    arena = move_quantized(lins)
    assert arena is not None and arena.used >= sum(lin.qweight.numel() for lin in lins)
    after = [lin(x) for lin in lins for x in xs if x.shape[1] == lin.in_features]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    held = [lin.qweight for lin in lins] + [lins[0].scales_and_zeros, lins[1].scales, lins[2].scales]
    assert len({storage(t) for t in held}) == 1  # all in the one mapping
    assert move_quantized([torch.nn.Linear(2, 2)]) is None


@pytest.mark.parametrize("from_store", [True, False])
def test_loaded_models_hold_quantized_weights_in_arenas(tiny_checkpoints, tmp_path, from_store):
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    src = convert(d, tmp_path / "store", "int4", progress=False) if from_store else d
    lm = load_model(str(src), "int4")
    experts = [m for m in resident_expert_modules(lm.model) if isinstance(m, QuantLinear) and "qweight" in m._buffers]
    trunk = [m for m in lm.model.modules() if isinstance(m, QuantLinear) and "qweight" in m._buffers]
    assert experts and trunk
    expert_maps = {storage(t) for m in experts for t in quantized(m)}
    trunk_maps = {storage(t) for m in trunk for t in quantized(m)}
    assert len(expert_maps) == 1 and len(trunk_maps) == 1
    assert all(m.qweight.data_ptr() % ALIGN == 0 for m in experts + trunk)


def _thp_mode() -> str:
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = p.read_text() if p.exists() else ""
    return text.split("[")[1].split("]")[0] if "[" in text else "never"


@pytest.mark.skipif(_thp_mode() == "never", reason="transparent huge pages are off on this machine")
def test_arena_gets_huge_pages():
    arena = HugePageArena(8 * HUGE_PAGE)
    piece = arena.take(arena.nbytes)
    piece.fill_(1)  # back every page
    start = piece.data_ptr()
    huge_kb = 0
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= start < hi
            elif inside and head == "AnonHugePages:":
                huge_kb = int(line.split()[1])
    assert arena.advised
    assert huge_kb >= 2048, f"no 2 MiB page in the arena's mapping (THP mode {_thp_mode()})"
