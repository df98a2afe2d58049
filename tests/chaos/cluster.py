"""The berthd under test: the one running now, killing one of its actors or all of it, and starting
it again on the same directories.

Every pid killed here is checked (its title) just before the kill and forgotten once it is dead, so
the final cleanup, which kills what it knows by pid, never hits a process that reused a pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading

from tests.support import Daemon, descendants, pid_alive, proc_title, wait_until

READY_TIMEOUT = 90.0          # a daemon started again recovers every shim before it is ready


def alive(pid: int) -> bool:
    try:
        return pid_alive(pid)
    except ProcessLookupError:      # went between the open and the read
        return False


class Cluster:
    def __init__(self):
        self.daemons = [Daemon()]
        self.lock = threading.Lock()       # the killer restarts while workers read `daemon`
        self.actor_kills = 0
        self.restarts = 0

    @property
    def daemon(self) -> Daemon:
        with self.lock:
            return self.daemons[-1]

    @property
    def address(self) -> str:
        return self.daemons[0].address

    def start(self) -> "Cluster":
        self.daemon.start(wait=False).wait_ready(READY_TIMEOUT)
        return self

    def kill_actor(self, name: str) -> int | None:
        """SIGKILL the actor `name`; its pid, or None if it is not up (being restarted)."""
        from bus.errors import BerthError
        daemon = self.daemon
        try:
            pid = daemon.actor_pids().get(name)
        except BerthError:
            return None
        if not pid or proc_title(pid) != f"berthd: {name}":
            return None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 15, what=f"actor {name} (pid {pid}) to die")
        daemon.known_pids.discard(pid)
        self.actor_kills += 1
        return pid

    def restart(self) -> None:
        """kill -9 the supervisor (its actors die with it), wait for every berthd process to go,
        and start berthd again on the same root and state. Shims live on throughout."""
        old = self.daemon
        old.kill9()
        wait_until(lambda: not any(alive(p) for p in old.known_pids), 30, what="every berthd process to die")
        old.known_pids.clear()
        again = Daemon(dir=old.dir)
        with self.lock:
            self.daemons.append(again)
        again.start(wait=False).wait_ready(READY_TIMEOUT)
        self.restarts += 1

    def logged_errors(self) -> list[str]:
        """The ERROR and CRITICAL lines of every berthd log, each distinct one once, with its count."""
        import collections
        import re
        found: collections.Counter = collections.Counter()
        for daemon in self.daemons:
            for line in daemon.log().splitlines() if os.path.exists(daemon.log_path) else []:
                if line.startswith(("ERROR ", "CRITICAL ")):
                    found[re.sub(r"\[\d+\]|\b[0-9a-f]{12,}\b|\d+", "N", line)[:300]] += 1
        return [f"{n} x {line}" for line, n in found.most_common()]

    def keep_logs(self, dest: str) -> list[str]:
        """Copy every berthd log to `dest` (the daemon's directory goes at cleanup)."""
        os.makedirs(dest, exist_ok=True)
        kept = []
        for daemon in self.daemons:
            if os.path.exists(daemon.log_path):
                target = os.path.join(dest, os.path.basename(daemon.log_path))
                shutil.copyfile(daemon.log_path, target)
                kept.append(target)
        return kept

    def cleanup(self) -> None:
        """Stop the running daemon, then remove the directory (the first daemon owns it)."""
        current = self.daemon
        if current.proc is not None and current.proc.poll() is None:
            current.known_pids = {current.proc.pid} | descendants(current.proc.pid)
        for daemon in reversed(self.daemons):
            if daemon is not current:
                daemon.known_pids.clear()          # all seen dead at the restart
            daemon.cleanup()
