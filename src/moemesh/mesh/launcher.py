"""Run ``moemesh mesh serve`` nodes as child processes (tests, benchmarks): ``StageProcess`` for
``--no-api`` stages, ``MeshProcess`` for any command line (an API node: ``http_url`` once it
listens)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..server.launcher import _die_with_parent
from ..sysinfo import terminate

_ADDR = re.compile(r"mesh address (\S+)")
_HTTP = re.compile(r"listening on (http://\S+)")


class MeshProcess:
    """``moemesh mesh serve ARGS...`` in a child with its own $MOEMESH_HOME (Nostr key, state)."""

    def __init__(self, *args: str) -> None:
        self.cmd = [sys.executable, "-m", "moemesh.cli", "mesh", "serve", *args]
        self._log = Path(tempfile.mkstemp(prefix="moemesh-stage-", suffix=".log")[1])
        self._home = tempfile.mkdtemp(prefix="moemesh-home-")
        self.proc: subprocess.Popen | None = None
        self.addr: str | None = None

    @property
    def home(self) -> str:
        return self._home

    def http_url(self) -> str | None:
        m = _HTTP.search(self.output())
        return m.group(1) if m else None

    def wait_http(self, timeout: float = 60.0) -> str:
        """Wait until the node's API answers /health 200; returns its base URL."""
        import urllib.error
        import urllib.request

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mesh node exited with {self.proc.returncode}:\n{self.output()}")
            url = self.http_url()
            m = _ADDR.search(self.output())
            self.addr = m.group(1) if m else self.addr
            if url is not None:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                        if r.status == 200:
                            return url
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.1)
        out = self.output()  # before stop() removes the log
        self.stop()
        raise RuntimeError(f"mesh API not ready after {timeout}s:\n{out}")

    def launch(self) -> "MeshProcess":
        with open(self._log, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", "MOEMESH_HOME": self._home},
                                         preexec_fn=_die_with_parent)
        return self

    def output(self) -> str:
        return self._log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> "MeshProcess":
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stage exited with {self.proc.returncode}:\n{self.output()}")
            m = _ADDR.search(self.output())
            if m:
                self.addr = m.group(1)
                return self
            time.sleep(0.05)
        out = self.output()  # before stop() removes the log
        self.stop()
        raise RuntimeError(f"stage not ready after {timeout}s:\n{out}")

    @property
    def peer_id(self) -> str:
        assert self.addr is not None
        return self.addr.rsplit("/p2p/", 1)[1]

    def kill9(self) -> None:
        """The machine vanishes: SIGKILL the node and its P2P daemon, no goodbye."""
        assert self.proc is not None
        children = _children(self.proc.pid)
        self.proc.kill()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, kill=self.kill9)
        self._log.unlink(missing_ok=True)
        shutil.rmtree(self._home, ignore_errors=True)


class StageProcess(MeshProcess):
    def __init__(self, model: str, layers: str, secret: str, peers: list[str] = (), *extra: str,
                 mesh_name: str = "test") -> None:
        super().__init__(model, "--layers", layers, "--no-api", "--secret", secret, "--mesh-name", mesh_name,
                         *[a for p in peers for a in ("--peer", p)], *extra)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out
