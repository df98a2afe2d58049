"""Test support: a real berthd on its own temporary root and state, and waiting with deadlines."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# One cheap, read-only request per actor (service, method, args), to see that it answers. Every
# actor in actors/registry.py needs one; tests check that none is missing.
ACTOR_PROBES = {
    "events": ("events", "head", {}),
    "metadata": ("metadata", "list_namespaces", {}),
    "content": ("content", "list", {}),
    "snapshot": ("snapshot", "list", {}),
    "transfer": ("transfer", "active_transfers", {}),
    "runtime": ("runtime", "list", {}),
}


def wait_until(condition, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def proc_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except FileNotFoundError:
        return ""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> set[int]:
    """Every live process whose parent chain reaches pid."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


class Daemon:
    """One berthd for one test: its own root, state and socket; everything it started is killed by pid."""

    def __init__(self, env: dict | None = None, metrics: bool = True, args: list[str] = (),
                 dir: str | None = None, command: list[str] | None = None):
        """With `dir`, run on another Daemon's root and state (a restart, or a second berthd on the
        same state); that directory stays its creator's to remove, and this one logs to a file of
        its own in it. `command`: how berthd is started (default: this interpreter, -m)."""
        self.owns_dir = dir is None
        self.dir = tempfile.mkdtemp(prefix="berth-t-", dir="/tmp") if dir is None else dir
        self.root = os.path.join(self.dir, "root")
        self.state = os.path.join(self.dir, "state")
        self.address = os.path.join(self.state, "berth.sock")
        if self.owns_dir:
            self.log_path = os.path.join(self.dir, "berthd.log")
        else:
            fd, self.log_path = tempfile.mkstemp(prefix="berthd-", suffix=".log", dir=self.dir)
            os.close(fd)
        self.env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
        self.args = ["--metrics-address", "127.0.0.1:0" if metrics else "", *args]
        self.command = command or [sys.executable, "-m", "actors.supervisor"]
        self.proc: subprocess.Popen | None = None
        self.known_pids: set[int] = set()

    def start(self, wait: bool = True, env: dict | None = None) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.command, "--root", self.root, "--state", self.state,
             "--log-level", "debug", *self.args],
            stdout=log, stderr=log, env=dict(self.env, **(env or {})), cwd=REPO)
        log.close()
        self.known_pids.add(self.proc.pid)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        from bus.errors import BerthError

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"berthd exited with {self.proc.returncode}:\n{self.log()}")
            client = self.client()
            try:
                return client.info()["ready"]
            except BerthError:
                return False
            finally:
                client.close()
        wait_until(ready, timeout, 0.02, "berthd to be ready")
        self.known_pids |= descendants(self.proc.pid)

    def client(self, namespace: str | None = None, timeout: float = 10.0):
        from berth.client import Client
        return Client(self.address, namespace, timeout=timeout)

    def cli(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60,
            namespace: str | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "berth.cli.main", "-a", self.address]
        if namespace:
            cmd += ["-n", namespace]
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, input=input,
                                timeout=timeout, env=self.env, cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"berth {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def actor_pids(self) -> dict[str, int]:
        client = self.client()
        try:
            return {a["name"]: a["pid"] for a in client.actors()["actors"] if a["pid"]}
        finally:
            client.close()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.known_pids |= descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        """SIGKILL the supervisor (its actors die with it) and reap it."""
        self.known_pids |= descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        for pid in self.known_pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
