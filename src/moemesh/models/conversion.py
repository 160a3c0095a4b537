"""What an explicit ``--quant`` conversion costs: the relative RMS error of the converted linears
against the values the file stores, measured on the first linears converted (dequantizing every
one of a 100 GB model would double the load), reported once after the build."""
from __future__ import annotations

from collections import Counter

import torch

SAMPLE = 6  # linears measured (each one dequantized in full: 48 took ~20% of a 12-layer Qwen3-shaped trunk's load)


class ConversionLog:
    def __init__(self, quant: str) -> None:
        self.quant = quant
        self.count = 0
        self.measured = 0
        self.err2 = 0.0  # sum of squared errors over the measured linears
        self.ref2 = 0.0  # sum of squared stored values
        self.sources: Counter[str] = Counter()  # stored format -> linears converted from it

    def record(self, stored: str, w: torch.Tensor, layer) -> list | None:
        """``w`` [O, I]: the stored values (float); ``layer``: what they became. Returns what was
        recorded ([stored] or [stored, err2, ref2]; None: nothing), for ``replay`` on a later load."""
        if self.quant in ("auto", "fp32"):
            return None  # kept as stored, or decoded exactly to fp32: nothing lost
        self.count += 1
        self.sources[stored] += 1
        if self.measured < SAMPLE and hasattr(layer, "dequantized_weight"):
            got = layer.dequantized_weight().float()
            err2, ref2 = float((got - w.float()).pow(2).sum()), float(w.float().pow(2).sum())
            self.err2, self.ref2, self.measured = self.err2 + err2, self.ref2 + ref2, self.measured + 1
            return [stored, err2, ref2]
        return [stored]

    def replay(self, recorded: list | None) -> None:
        """Count a conversion ``record`` returned on an earlier load (its layer came from the trunk
        cache, weights/trunk_cache.py), so the report reads the same."""
        if not recorded:
            return
        self.count += 1
        self.sources[recorded[0]] += 1
        if len(recorded) == 3 and self.measured < SAMPLE:
            self.err2, self.ref2, self.measured = self.err2 + recorded[1], self.ref2 + recorded[2], self.measured + 1

    def report(self) -> str | None:
        """One line for the user, or None when nothing was converted."""
        if not self.count:
            return None
        rel = (self.err2 / self.ref2) ** 0.5 if self.ref2 else 0.0
        src = ", ".join(f"{n} {t}" for t, n in self.sources.most_common())
        return (f"--quant {self.quant}: converted {self.count} linears ({src}) from the file's values; relative RMS "
                f"error {rel:.4f} (measured over the first {self.measured})")
