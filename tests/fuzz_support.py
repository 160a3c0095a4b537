"""Shared harness of the reader fuzz tests (tests/test_fuzz_*.py, issue 20 item 2).

``guarded(reader, name, fn)`` runs one fuzz case: ``fn`` may return or raise the project's own error
whose message names ``name`` (the file, or the field for in-memory parsers); anything else fails the
case, and so do a run past ``CASE_SECONDS`` (a hang: SIGALRM interrupts it) and a Python-heap peak
past ``PEAK_BYTES`` (numpy and the json/msgpack parsers allocate through tracemalloc's hooks: a
length taken from the input and allocated before it was checked shows up here).

Example counts: ``FUZZ_EXAMPLES`` (environment, default 60 per property: the bounded default suite;
the slow tests ask for more). ``MOEMESH_FUZZ_REPORT=path`` appends one JSON line per property with
the cases it ran and how they ended (bench/fuzz_readers.py sums them for the README).
"""
from __future__ import annotations

import json
import os
import signal
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings

from moemesh.errors import MoemeshError

CASE_SECONDS = 10
PEAK_BYTES = 64 << 20
DEFAULT_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))


class Hang(Exception):
    """A fuzz case ran past CASE_SECONDS."""


def fuzz_settings(examples: int | None = None) -> settings:
    """Reproducible (derandomized, no example database written into the tree), no deadline flakiness
    on a shared machine (hangs are caught by the alarm instead)."""
    return settings(max_examples=examples or DEFAULT_EXAMPLES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@contextmanager
def _alarm(seconds: int):
    def fire(signum, frame):
        raise Hang(f"fuzz case still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Tally:
    """How the cases of one property ended: 'ok' (accepted) or the error class that refused them."""

    reader: str
    outcomes: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def report(self) -> None:
        path = os.environ.get("MOEMESH_FUZZ_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"reader": self.reader, "cases": sum(self.outcomes.values()),
                                    "outcomes": dict(self.outcomes),
                                    "seconds": round(time.monotonic() - self.started, 2)}) + "\n")


def guarded(tally: Tally, name: str, fn: Callable[[], object], errors: tuple[type[BaseException], ...] = (MoemeshError,)):
    """Run one case; returns fn's result or None when it was refused with a proper error."""
    tracemalloc.start()
    try:
        with _alarm(CASE_SECONDS):
            result = fn()
        tally.outcomes["ok"] += 1
        return result
    except errors as exc:
        assert name in str(exc), f"error does not name {name!r}: {exc!r}"
        tally.outcomes[type(exc).__name__] += 1
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"{tally.reader}: a case allocated {peak / 2**20:.0f} MiB"
