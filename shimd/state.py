"""The task's state machine: one table of transitions, each publishing its event.

A task is the container's init process plus the processes exec'd into it. Each has a status;
`TRANSITIONS` says which changes are allowed and what each one announces on the event bus, for an
init and for an exec. Nothing here starts a process or touches a file: the shim (shimd.main)
runs the OCI runtime and calls these when something has happened, and the unit tests call them
directly.

Ordering rules kept here, as containerd's shim keeps them:
- create → start → exit → delete for the init; exec-added → exec-started → exit for an exec.
- An exec's exit is published before its container's init exit: when the init dies while execs
  are still running (or starting), the init's exit is held until the last of them has exited.
- An exit status is persisted (the `persist` callback) before its event is published.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Callable

from bus.errors import AlreadyExists, FailedPrecondition, NotFound


class Status(enum.StrEnum):
    NEW = "new"              # the shim is up, the runtime has not created the process yet
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


INIT, EXEC = "init", "exec"
REFUSED = None               # this kind of process may not make this change
SILENT = ""                  # allowed, and announces nothing

#                   from            to                 the init publishes   an exec publishes
TRANSITIONS: dict[tuple[Status, Status], tuple[str | None, str | None]] = {
    (Status.NEW,     Status.CREATED): ("/tasks/create",    "/tasks/exec-added"),
    (Status.CREATED, Status.RUNNING): ("/tasks/start",     "/tasks/exec-started"),
    (Status.CREATED, Status.STOPPED): ("/tasks/exit",      "/tasks/exit"),
    (Status.CREATED, Status.DELETED): (REFUSED,            SILENT),
    (Status.RUNNING, Status.PAUSED):  ("/tasks/paused",    REFUSED),
    (Status.RUNNING, Status.STOPPED): ("/tasks/exit",      "/tasks/exit"),
    (Status.PAUSED,  Status.RUNNING): ("/tasks/resumed",   REFUSED),
    (Status.PAUSED,  Status.STOPPED): ("/tasks/exit",      REFUSED),
    (Status.STOPPED, Status.DELETED): ("/tasks/delete",    SILENT),
}

# The same table read the other way: kind -> from -> the statuses it may become.
ALLOWED: dict[str, dict[Status, frozenset[Status]]] = {
    kind: {s: frozenset(to for (frm, to), topics in TRANSITIONS.items()
                        if frm is s and topics[column] is not REFUSED)
           for s in Status}
    for column, kind in enumerate((INIT, EXEC))
}

# What the shim refuses, in words a person can act on, where the bare table would say less.
HINTS = {
    (INIT, Status.CREATED, Status.DELETED): "kill it and wait for its exit first",
    (INIT, Status.RUNNING, Status.DELETED): "kill it and wait for its exit first",
    (INIT, Status.PAUSED, Status.DELETED): "resume and kill it first",
    (EXEC, Status.RUNNING, Status.DELETED): "kill it and wait for its exit first",
    (EXEC, Status.RUNNING, Status.PAUSED): "pause the task, not one of its execs",
}

Publish = Callable[[str, dict], None]          # (topic, event fields)
Persist = Callable[["Process"], None]          # store an exit status durably


@dataclasses.dataclass
class Process:
    """One process of a task: the init (exec_id "") or an exec."""

    container_id: str
    publish: Publish
    exec_id: str = ""
    bundle: str = ""
    pid: int = 0
    status: Status = Status.NEW
    exit_status: int | None = None
    exited_at: float | None = None

    @property
    def kind(self) -> str:
        return EXEC if self.exec_id else INIT

    @property
    def id(self) -> str:
        """The process's id in events: the exec id, or the container id for the init."""
        return self.exec_id or self.container_id

    def describe(self) -> str:
        return f"exec {self.exec_id} of task {self.container_id}" if self.exec_id else f"task {self.container_id}"

    def check(self, to: Status) -> str:
        """The topic the change to `to` publishes ("" for none); FailedPrecondition if refused."""
        topics = TRANSITIONS.get((self.status, to))
        topic = None if topics is None else topics[0 if self.kind == INIT else 1]
        if topic is REFUSED:
            hint = HINTS.get((self.kind, self.status, to))
            raise FailedPrecondition(f"{self.describe()} is {self.status}, cannot become {to}"
                                     + (f": {hint}" if hint else ""))
        return topic

    def transition(self, to: Status) -> None:
        topic = self.check(to)
        self.status = to
        if topic:
            self.publish(topic, self.event(topic))

    def exited(self, status: int, at: float, persist: Persist) -> None:
        """Record an exit: persisted first, then the change to stopped and its event."""
        self.check(Status.STOPPED)
        self.exit_status, self.exited_at = status, at
        persist(self)
        self.transition(Status.STOPPED)

    def event(self, topic: str) -> dict:
        fields = {"container_id": self.container_id}
        if topic == "/tasks/create":
            fields.update(bundle=self.bundle, pid=self.pid)
        elif topic == "/tasks/start":
            fields.update(pid=self.pid)
        elif topic == "/tasks/exec-added":
            fields.update(exec_id=self.exec_id)
        elif topic == "/tasks/exec-started":
            fields.update(exec_id=self.exec_id, pid=self.pid)
        elif topic == "/tasks/exit":
            fields.update(id=self.id, pid=self.pid, exit_status=self.exit_status, exited_at=self.exited_at)
        elif topic == "/tasks/delete":
            fields.update(pid=self.pid, exit_status=self.exit_status, exited_at=self.exited_at)
        return fields

    def exit_record(self) -> dict:
        return {"container_id": self.container_id, "exec_id": self.exec_id, "pid": self.pid,
                "exit_status": self.exit_status, "exited_at": self.exited_at}

    def report(self) -> dict:
        return {"id": self.id, "exec_id": self.exec_id, "pid": self.pid, "status": str(self.status),
                "exit_status": self.exit_status, "exited_at": self.exited_at}


class Task:
    """A container's init and its execs, and the rules between them."""

    def __init__(self, container_id: str, bundle: str, publish: Publish, persist: Persist):
        self.publish = publish
        self.persist = persist
        self.init = Process(container_id, publish, bundle=bundle)
        self.execs: dict[str, Process] = {}
        self.live_execs = 0                     # execs starting or running: the init's exit waits for them
        self.init_exit: tuple[int, float] | None = None    # the init's exit, held while live_execs > 0

    @property
    def id(self) -> str:
        return self.init.container_id

    def process(self, exec_id: str = "") -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"task {self.id} has no exec {exec_id!r}") from None

    # --- the init ------------------------------------------------------------------------

    def created(self, pid: int) -> None:
        self.init.pid = pid
        self.init.transition(Status.CREATED)

    def init_exited(self, status: int, at: float) -> list[Process]:
        """The init's pid was reaped. Returns the processes that are now stopped (to answer
        their waiters): none while execs are still live, whose exits must come first."""
        if self.init_exit is not None or self.init.status in (Status.STOPPED, Status.DELETED):
            return []
        self.init_exit = (status, at)
        return self._release_init_exit()

    def _release_init_exit(self) -> list[Process]:
        if self.live_execs or self.init_exit is None or self.init.status in (Status.STOPPED, Status.DELETED):
            return []
        self.init.exited(*self.init_exit, self.persist)
        return [self.init]

    @property
    def init_has_exited(self) -> bool:
        return self.init_exit is not None

    # --- execs ---------------------------------------------------------------------------

    def add_exec(self, exec_id: str) -> Process:
        if exec_id in self.execs:
            raise AlreadyExists(f"task {self.id} already has an exec {exec_id!r}")
        self.require_running("exec a process in")
        proc = Process(self.id, self.publish, exec_id=exec_id)
        proc.transition(Status.CREATED)
        self.execs[exec_id] = proc
        return proc

    def require_running(self, what: str) -> None:
        if self.init.status is not Status.RUNNING or self.init_has_exited:
            state = "exiting" if self.init_has_exited and self.init.status is Status.RUNNING else self.init.status
            raise FailedPrecondition(f"cannot {what} task {self.id}: it is {state}, not running")

    def exec_starting(self, exec_id: str) -> Process:
        """Before the runtime is asked to start an exec: counted as live from here on."""
        proc = self.process(exec_id)
        proc.check(Status.RUNNING)
        self.require_running("start an exec in")
        self.live_execs += 1
        return proc

    def exec_started(self, exec_id: str, pid: int) -> None:
        proc = self.process(exec_id)
        proc.pid = pid
        proc.transition(Status.RUNNING)

    def exec_start_failed(self, exec_id: str) -> list[Process]:
        self.live_execs -= 1
        return self._release_init_exit()

    def exec_exited(self, exec_id: str, status: int, at: float) -> list[Process]:
        proc = self.process(exec_id)
        if proc.status not in (Status.CREATED, Status.RUNNING):
            return []
        was_live = proc.status is Status.RUNNING
        proc.exited(status, at, self.persist)
        if was_live:
            self.live_execs -= 1
        return [proc, *self._release_init_exit()]

    def delete_exec(self, exec_id: str) -> Process:
        proc = self.process(exec_id)
        proc.transition(Status.DELETED)
        del self.execs[exec_id]
        return proc

    def report(self) -> dict:
        return dict(self.init.report(), bundle=self.init.bundle,
                    execs={e: p.report() for e, p in self.execs.items()})
