"""Reaping every child of the shim, and telling the runtime's commands from the container's processes.

The shim is a child subreaper (PR_SET_CHILD_SUBREAPER): when `runc create` or `runc exec --detach`
exits, the container process it started is re-parented to the shim, which must reap it to learn its
exit status. Reaping with `waitpid(-1)` also reaps the runtime commands the shim runs, so every
command is started through `Reaper.spawn` and its status is handed back to whoever waits for it,
the way containerd's reaper Monitor does; any other pid is a container process and goes to
`on_exit`.

Why a thread blocked in waitpid rather than a SIGCHLD handler: the actor's Worker treats every
signal that reaches its wakeup pipe as a request to stop, and blocking SIGCHLD for a signalfd
would leak the blocked mask into runc and on into the container. The thread never spins: when the
shim has no child at all (ECHILD) it sleeps until the next spawn, because a process can only be
re-parented to the shim while one of its ancestors is the shim's child.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import signal
import threading
import time
from typing import Callable

from actors.template import exit_status
from bus.errors import DeadlineExceeded

log = logging.getLogger("berth.shim.reaper")

# What Python ignores and a runtime must not inherit ignored (subprocess's restore_signals).
RESET_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name))


@dataclasses.dataclass(frozen=True, slots=True)
class Exit:
    pid: int
    status: int           # shell convention: the exit code, or 128 + the signal
    at: float             # seconds since the epoch


class Command:
    """A runtime command started through the reaper; `wait` gives its exit status."""

    __slots__ = ("pid", "argv", "done", "status")

    def __init__(self, pid: int, argv: list[str]):
        self.pid = pid
        self.argv = argv
        self.done = threading.Event()
        self.status = 0

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; on timeout the command is killed and DeadlineExceeded raised."""
        if not self.done.wait(timeout):
            log.warning("%s did not finish in %ss; killing pid %d", self.argv[0], timeout, self.pid)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.done.wait()
            raise DeadlineExceeded(f"{' '.join(self.argv[:3])}... did not finish within {timeout}s")
        return self.status


class Reaper:
    def __init__(self, on_exit: Callable[[Exit], None], clock: Callable[[], float] = time.time):
        self.on_exit = on_exit                  # called on the reaper thread
        self.clock = clock
        self.cond = threading.Condition()
        self.commands: dict[int, Command] = {}
        self.spawned = 0                        # bumped after each spawn: wakes a thread that saw ECHILD
        self.closing = False
        self.reaped = 0
        self.thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def spawn(self, argv: list[str], stdin: int, stdout: int, stderr: int) -> Command:
        """Start a command with these descriptors as its stdio; `Command.wait` returns its status.

        posix_spawn (a vfork and an exec in libc, no Python in between) rather than
        subprocess.Popen, whose own bookkeeping cost the shim more than the spawn itself. Every
        other descriptor of the shim is close-on-exec (Python opens them so, and so does every
        library the shim uses), so nothing else reaches the runtime; signal dispositions and the
        mask are reset as Popen's restore_signals does. The working directory is the shim's:
        "/" (shimd.zygote), and every path given to a runtime is absolute."""
        low = [fd for fd in (stdin, stdout, stderr) if fd < 3]
        moved = {fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in low}   # a dup2 onto 0-2 may not clobber a source
        try:
            actions = [(os.POSIX_SPAWN_DUP2, moved.get(fd, fd), target)
                       for target, fd in enumerate((stdin, stdout, stderr))]
            with self.cond:
                pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions,
                                     setsigmask=(), setsigdef=RESET_SIGNALS)
                cmd = Command(pid, argv)
                self.commands[pid] = cmd
                self.spawned += 1
                self.cond.notify_all()
        finally:
            for fd in moved.values():
                os.close(fd)
        return cmd

    def close(self, timeout: float = 1.0) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.warning("reaper still waits for a child at exit")

    def stats(self) -> dict:
        with self.cond:
            return {"commands_running": len(self.commands), "reaped": self.reaped}

    def _run(self) -> None:
        while True:
            with self.cond:
                if self.closing:
                    return
                seen = self.spawned
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:
                with self.cond:
                    while self.spawned == seen and not self.closing:
                        self.cond.wait()
                continue
            self._dispatch(Exit(pid, exit_status(wait_status), self.clock()))

    def _dispatch(self, exit: Exit) -> None:
        with self.cond:
            self.reaped += 1
            cmd = self.commands.pop(exit.pid, None)
            if cmd is not None:
                cmd.status = exit.status
                cmd.done.set()
                return
        try:
            self.on_exit(exit)
        except Exception:
            log.exception("handling the exit of pid %d failed", exit.pid)
