"""Run ``moemesh serve`` as a child process on a free loopback port (tests and benchmarks).

The server picks its own port (--port 0) and prints it, so two launches never race for one.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

_LISTENING = re.compile(r"listening on http://[^:]+:(\d+)")

from ..sysinfo import terminate


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the launching process dies, so a killed
    test run or benchmark never leaves a server behind."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    def __init__(self, model: str, *args: str, host: str = "127.0.0.1") -> None:
        self.model = model
        self.args = list(args)
        self.host = host
        self.port: int | None = None
        self.health_codes: list[int] = []  # /health answers seen while waiting (503s, then 200)
        self._log = Path(tempfile.mkstemp(prefix="moemesh-serve-", suffix=".log")[1])
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def output(self) -> str:
        return self._log.read_text(errors="replace")

    def start(self, timeout: float = 120.0) -> ServerProcess:
        """Launch and wait until /health says 200; raises with the server's output if it does not."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> ServerProcess:
        """Start the process without waiting (launch several, then wait: they load side by side)."""
        cmd = [sys.executable, "-m", "moemesh.cli", "serve", self.model, "--host", self.host, "--port", "0",
               *self.args]
        with open(self._log, "w") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent)
        return self

    def wait_listening(self, timeout: float = 120.0) -> ServerProcess:
        """Wait for the HTTP server and its first /health answer (a 503 while the model loads)."""
        self._wait(lambda: self.port is not None and self._health() != 0, timeout, "listening")
        return self

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        if not self.health_codes or self.health_codes[-1] != 200:
            self._wait(lambda: self.port is not None and self._health() == 200, timeout, "ready")
        return self

    def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        assert self._proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moemesh serve exited with {self._proc.returncode}:\n{self.output()}")
            if self.port is None:
                m = _LISTENING.search(self.output())
                self.port = int(m.group(1)) if m else None
            if done():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moemesh serve not {what} after {timeout}s:\n{self.output()}")

    def _health(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as resp:
                code = resp.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        except OSError:
            return 0
        self.health_codes.append(code)
        return code

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=30) as resp:
            return json.loads(resp.read())

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=30) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc)
        self._log.unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
