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
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Callable

from actors.template import exit_status
from bus.errors import DeadlineExceeded

log = logging.getLogger("berth.shim.reaper")


@dataclasses.dataclass(frozen=True, slots=True)
class Exit:
    pid: int
    status: int           # shell convention: the exit code, or 128 + the signal
    at: float             # seconds since the epoch


class Command:
    """A runtime command started through the reaper; `wait` gives its exit status."""

    __slots__ = ("proc", "done", "status")

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.done = threading.Event()
        self.status = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; on timeout the command is killed and DeadlineExceeded raised."""
        if not self.done.wait(timeout):
            log.warning("%s did not finish in %ss; killing pid %d", self.proc.args[0], timeout, self.pid)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.done.wait()
            raise DeadlineExceeded(f"{' '.join(map(str, self.proc.args[:3]))}... did not finish within {timeout}s")
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

    def spawn(self, argv: list[str], **popen_kw) -> Command:
        """Start a command (subprocess.Popen arguments) whose status `Command.wait` returns.
        Never call the Popen's own wait or poll: this thread reaps it."""
        with self.cond:
            cmd = Command(subprocess.Popen(argv, **popen_kw))
            self.commands[cmd.pid] = cmd
            self.spawned += 1
            self.cond.notify_all()
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
                cmd.proc.returncode = exit.status     # so subprocess never waits on a reused pid
                cmd.done.set()
                return
        try:
            self.on_exit(exit)
        except Exception:
            log.exception("handling the exit of pid %d failed", exit.pid)
