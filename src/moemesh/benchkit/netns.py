"""Network namespaces for mesh benchmarks: N nodes on one bridge, a netem delay on every hop, and
each node's process in its own cgroup-v1 memory cgroup. Needs root, ``ip`` and ``tc``.

Node i lives in namespace ``{prefix}{i}`` with address ``10.{net}.0.{i+1}/24`` on a veth whose other
end is on the bridge ``{prefix}br`` in the root namespace. ``set_delay(ms)`` puts ``netem delay ms``
on every node's own end (its egress): a message from one node to another crosses one delay, a
round trip two. ``Namespaces`` is a context manager that removes everything it made.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from ..sysinfo import terminate
from .runner import own_memory_cgroup


def available() -> str | None:
    """None when this machine can run it, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, cgroups)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    try:
        own_memory_cgroup()
    except RuntimeError as exc:
        return str(exc)
    return None


def _run(*cmd: str) -> None:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


class Namespaces:
    def __init__(self, n: int, prefix: str = "mm", net: int = 77) -> None:
        self.n, self.prefix, self.net = n, prefix, net
        self.bridge = f"{prefix}br"
        self.made: list[str] = []

    def name(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def addr(self, i: int) -> str:
        return f"10.{self.net}.0.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.name(i)]

    def __enter__(self) -> "Namespaces":
        try:
            self._make()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _make(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self.made.append("bridge")
        _run("ip", "addr", "add", f"10.{self.net}.0.254/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i in range(self.n):
            ns, host, inner = self.name(i), f"{self.prefix}{i}h", f"{self.prefix}{i}n"
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", ns)
            _run("ip", "link", "set", host, "master", self.bridge)
            _run("ip", "link", "set", host, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addr(i)}/24", "dev", inner)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def netem(self) -> bool:
        """Whether this kernel has tc's netem (some VMs lack sch_netem)."""
        if not hasattr(self, "_netem"):
            try:
                self.set_delay(1)
                self.set_delay(0)
                self._netem = True
            except RuntimeError:
                self._netem = False
        return self._netem

    def set_delay(self, ms: float) -> None:
        """netem on every node's egress: ``ms`` per hop (0 removes it)."""
        for i in range(self.n):
            dev = f"{self.prefix}{i}n"
            if ms > 0:
                _run("ip", "netns", "exec", self.name(i), "tc", "qdisc", "replace", "dev", dev, "root", "netem",
                     "delay", f"{ms}ms")
            else:
                subprocess.run(["ip", "netns", "exec", self.name(i), "tc", "qdisc", "del", "dev", dev, "root"],
                               capture_output=True)

    def __exit__(self, *exc) -> None:
        for item in reversed(self.made):
            if item == "bridge":
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            else:
                subprocess.run(["ip", "netns", "del", item], capture_output=True)  # its veth goes with it
        self.made.clear()


class CgroupProcess:
    """A long-running command inside a fresh memory cgroup (limit changeable while it runs)."""

    def __init__(self, cmd: list[str], limit_bytes: int, name: str, log: Path, env: dict | None = None) -> None:
        self.cg = own_memory_cgroup() / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        self.cg.mkdir()
        self.set_limit(limit_bytes)
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cg / "cgroup.procs"),
                                          *cmd], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env)

    def set_limit(self, limit_bytes: int, tries: int = 50) -> bool:
        """Lower or raise the limit; the kernel reclaims page cache to fit (EBUSY while it cannot:
        retried). False when the process's memory stays above it."""
        import errno

        for _ in range(tries):
            try:
                (self.cg / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.1)
        return False

    def usage(self) -> dict:
        def read(name: str) -> int | None:
            try:
                return int((self.cg / name).read_text().split()[0])
            except (OSError, ValueError):
                return None

        return {"max_usage_bytes": read("memory.max_usage_in_bytes"), "failcnt": read("memory.failcnt"),
                "limit_bytes": read("memory.limit_in_bytes")}

    def reset_peak(self) -> None:
        (self.cg / "memory.max_usage_in_bytes").write_text("0")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.proc, grace_s=15)
        try:  # what our child started and left behind (the P2P daemon): by pid, all inside our cgroup
            for pid in (self.cg / "cgroup.procs").read_text().split():
                os.kill(int(pid), 9)
        except (OSError, ValueError):
            pass
        for _ in range(50):
            try:
                self.cg.rmdir()
                return
            except OSError:
                time.sleep(0.1)
