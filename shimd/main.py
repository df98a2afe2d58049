"""berth-shim: one process per container that owns the container's life and outlives berthd.

The zygote (shimd.zygote) forks it into its own session, parented by init, and calls `serve`.
It is a child subreaper, so the container's init (and each exec) is re-parented to it and reaped
by it; it drives the OCI runtime through shimd.runtime_cli; it keeps the task's state machine
(shimd.state) and persists every exit status in the task directory before announcing it; it
publishes events through a spooling Publisher, so they wait on disk while berthd is away; and it
serves its methods on a socket of its own in the task directory, where a restarted berthd finds it.

The task directory (made by the runtime actor, mode 0700; the shim writes only inside it):

    shim.sock         the shim's ZeroMQ socket (ipc), mode 0600
    shim.pid          the shim's pid, written atomically once the socket is bound
    shim.json         what this shim serves: namespace, id, bundle, runtime, runtime_root, address, pid
    shim.log          the shim's own log
    runtime.log       the OCI runtime's log (JSON lines), where failures are explained
    init.pid          the container init's pid, written by the runtime
    exec-<id>.json    an exec's OCI process spec, as handed to `runtime exec --process`
    exec-<id>.pid     an exec's pid, written by the runtime
    exit-init.json    the init's exit {container_id, exec_id, pid, exit_status, exited_at}, fsync'd
    exit-<id>.json    an exec's exit, the same (removed when that exec is deleted)
    spool/            events berthd has not acknowledged yet (bus.pubsub.Publisher)
    criu-work/        checkpoint and restore scratch space

Threads: the Worker's loop (requests, exits, answers to waiters, OOM notifications), its pool
(methods that run the runtime), the reaper, the publisher's sender, and the tty-copy threads, each
owned and joined by what started it. Exits are handled only on the loop, where waiters are answered;
`lock` guards the task's state between the loop and the pool, and `op_lock` keeps the lifecycle
commands (create, start, pause, resume, delete, checkpoint, update) from overlapping.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal as signals
import threading
import time
from typing import Callable

from bus import failpoints
from bus.errors import AlreadyExists, BerthError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from bus.validate import Identifier, check_identifier
from bus.worker import Actor, Deferred, method
from shimd import cgroups
from shimd.io import ProcessIO
from shimd.reaper import Exit, Reaper
from shimd.runtime_cli import Runtime, RuntimeCommandError
from shimd.state import Process, Status, Task

log = logging.getLogger("berth.shim")

PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)

IO_DRAIN = 2.0                  # how long delete waits for a tty's last output to be copied
MAX_EARLY_EXITS = 1024


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_atomic(path: str, data: bytes, sync: bool = True) -> None:
    """Replace `path` with `data`: a reader sees the old file or the new one, and with `sync`
    the new one survives a crash once this returns."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if sync:
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _exec_name(exec_id: str) -> str:
    """Validate an exec id ("" means the init)."""
    if exec_id:
        check_identifier(exec_id, "exec_id")
        if exec_id == "init":
            raise InvalidArgument("exec_id 'init' is reserved for the container's init process")
    return exec_id


class Shim:
    """The logic: one container, its runtime, its processes. No sockets here."""

    def __init__(self, namespace: str, id: str, bundle: str, task_dir: str, runtime: str,
                 runtime_root: str, publisher, clock: Callable[[], float] = time.time):
        self.namespace = namespace
        self.id = id
        self.bundle = bundle
        self.dir = task_dir
        self.publisher = publisher
        self.clock = clock
        self.lock = threading.Lock()
        self.op_lock = threading.Lock()
        self.reaper = Reaper(self._reaped, clock)
        self.runtime = Runtime(runtime, runtime_root, self.reaper, self.path("runtime.log"))
        self.task = Task(id, bundle, self._publish, self._persist)
        self.config = self._read_config()
        self.io: dict[str, ProcessIO] = {}          # exec id ("" for the init) -> its stdio
        self.exec_specs: dict[str, dict] = {}       # exec id -> stdio arguments given to exec()
        self.by_pid: dict[int, Process] = {}
        self.starting = 0                           # creates and starts in flight
        self.init_starting = False
        self.early: dict[int, Exit] = {}            # exits reaped while a start had not said whose
        self.waiters: dict[str, list[Callable[[dict | None, BerthError | None], None]]] = {}
        self.restore_from: dict | None = None       # create(checkpoint=...) defers to start
        self.cgroup_paths: dict[str, str] = {}
        self.oom: cgroups.OomWatcher | None = None
        self.loop = None                            # the Worker serving this shim: add_reader, remove_reader
        self.done = False                           # the task is deleted: the shim may exit
        self.runtime_delete_pending = False
        self.pending: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.closed = False
        self.reaper.start()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _read_config(self) -> dict:
        try:
            with open(os.path.join(self.bundle, "config.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            raise InvalidArgument(f"bundle {self.bundle} has no config.json") from None
        except ValueError as e:
            raise InvalidArgument(f"bundle {self.bundle}: config.json is not JSON: {e}") from None

    @property
    def own_pid_namespace(self) -> bool:
        spaces = self.config.get("linux", {}).get("namespaces", [])
        return any(ns.get("type") == "pid" and not ns.get("path") for ns in spaces)

    # --- events and exit records ----------------------------------------------------------

    def _publish(self, topic: str, event: dict) -> None:
        self.publisher.publish(self.namespace, topic, event)

    def _persist(self, proc: Process) -> None:
        name = f"exit-{proc.exec_id or 'init'}.json"
        write_atomic(self.path(name), json.dumps(proc.exit_record()).encode())

    # --- the loop's own queue: exits and answers happen there -----------------------------

    def post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop (from any thread)."""
        if self.closed:
            return
        self.pending.put(fn)
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    def run_pending(self) -> None:
        """The loop's reader for `wake_r`."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn = self.pending.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception:
                log.exception("%s/%s: handling an event failed", self.namespace, self.id)

    def _reaped(self, exit: Exit) -> None:
        """On the reaper thread: a container process (not a runtime command) exited."""
        self.post(lambda: self._on_exit(exit))

    def _on_exit(self, exit: Exit) -> None:
        kill_all = False
        with self.lock:
            proc = self.by_pid.get(exit.pid)
            if proc is None or (proc is self.task.init and self.init_starting):
                if self.starting or self.init_starting:
                    if len(self.early) < MAX_EARLY_EXITS:
                        self.early[exit.pid] = exit
                else:
                    log.debug("reaped pid %d (status %d): not a process of this task", exit.pid, exit.status)
                return
            del self.by_pid[exit.pid]
            if proc is self.task.init:
                log.info("%s/%s: init (pid %d) exited with status %d", self.namespace, self.id, exit.pid, exit.status)
                if self.oom is not None:
                    self.oom.check()                # an OOM kill is announced before the exit it caused
                stopped = self.task.init_exited(exit.status, exit.at)
                kill_all = not stopped and not self.own_pid_namespace
            else:
                stopped = self.task.exec_exited(proc.exec_id, exit.status, exit.at)
        if kill_all:
            # Without a pid namespace of its own, the init's death does not end the execs.
            try:
                self.runtime.kill(self.id, signals.SIGKILL, all=True)
            except BerthError as e:
                log.warning("killing the rest of task %s failed: %s", self.id, e)
        self._stopped(stopped)

    def _stopped(self, procs: list[Process]) -> None:
        """On the loop: processes that have just become stopped."""
        for proc in procs:
            io = self.io.get(proc.exec_id)
            if io is not None:
                io.exited()
            if proc is self.task.init and self.oom is not None:
                self._unwatch_oom()
            result = self._exit_result(proc)
            for answer in self.waiters.pop(proc.exec_id, []):
                answer(result, None)

    @staticmethod
    def _exit_result(proc: Process) -> dict:
        return {"id": proc.id, "pid": proc.pid, "exit_status": proc.exit_status, "exited_at": proc.exited_at}

    # --- the init -------------------------------------------------------------------------

    def create(self, stdin: str = "", stdout: str = "", stderr: str = "", terminal: bool = False,
               log_path: str = "", checkpoint: str = "") -> dict:
        with self.op_lock:
            with self.lock:
                self.task.init.check(Status.CREATED)
                self.starting += 1
            try:
                pid = self._create(stdin, stdout, stderr, terminal, log_path, checkpoint)
            except BaseException:
                with self.lock:
                    self.starting -= 1
                    self._take_early(0)
                raise
            with self.lock:
                if pid:
                    self.by_pid[pid] = self.task.init
                self.task.created(pid)
                self.starting -= 1
                self._take_early(pid)
            if pid:
                self.cgroup_paths = cgroups.paths_of(pid)
                self._watch_oom()       # before start: a task may hit its limit at once
            return {"pid": pid}

    def _create(self, stdin, stdout, stderr, terminal, log_path, checkpoint) -> int:
        declared = bool(self.config.get("process", {}).get("terminal", False))
        if declared != terminal:
            raise InvalidArgument(f"bundle {self.bundle} has process.terminal={str(declared).lower()} "
                                  f"but create was asked for terminal={str(terminal).lower()}: make them agree")
        io = ProcessIO("init", stdin, stdout, stderr, terminal, log_path)
        self.io[""] = io
        if checkpoint:
            if not os.path.isdir(checkpoint):
                io.failed()
                raise InvalidArgument(f"checkpoint {checkpoint} is not a directory")
            self.restore_from = {"image_path": checkpoint}
            return 0
        try:
            self.runtime.create(self.id, self.bundle, self.path("init.pid"), io.runtime_stdio, io.console_path)
        except BaseException:
            io.failed()
            del self.io[""]
            raise
        try:
            failpoints.fail("shim.create")       # the container created, its pid not yet read
            io.started()
            return read_pid(self.path("init.pid"))
        except BaseException:
            self._abandon_init(io)
            raise

    def _abandon_init(self, io: ProcessIO) -> None:
        io.failed()
        self.io.pop("", None)
        try:
            self.runtime.delete(self.id, force=True)
        except BerthError as e:
            log.warning("cleaning up task %s after a failed create: %s", self.id, e)

    def _take_early(self, pid: int) -> None:
        """Under `lock`, once a start has said its pid: an exit reaped before that is handled now."""
        early = self.early.pop(pid, None) if pid else None
        if not self.starting and not self.init_starting:
            self.early.clear()
        if early is not None:
            self.post(lambda: self._on_exit(early))

    def start(self, exec_id: str = "") -> dict:
        if exec_id:
            return self._start_exec(exec_id)
        with self.op_lock:
            init = self.task.init
            with self.lock:
                init.check(Status.RUNNING)
                self.init_starting = True
            try:
                failpoints.fail("shim.start")
                if self.restore_from is not None:
                    self._restore()
                else:
                    self.runtime.start(self.id)
            except BaseException:
                stopped: list[Process] = []
                with self.lock:
                    self.init_starting = False
                    self._take_early(init.pid)
                    if self.restore_from is not None:
                        # A failed restore made no container: the task ends here, never run.
                        stopped = self.task.init_exited(255, self.clock())
                if stopped:
                    self.post(lambda: self._stopped(stopped))
                raise
            with self.lock:
                init.transition(Status.RUNNING)
                self.init_starting = False
                self._take_early(init.pid)
            return {"pid": init.pid}

    def _restore(self) -> None:
        io = self.io[""]
        work = self.path("criu-work")
        os.makedirs(work, mode=0o700, exist_ok=True)
        self.runtime.restore(self.id, self.bundle, self.restore_from["image_path"], work,
                             self.path("init.pid"), io.runtime_stdio, io.console_path)
        io.started()
        pid = read_pid(self.path("init.pid"))
        self.restore_from = None
        with self.lock:
            self.task.init.pid = pid
            self.by_pid[pid] = self.task.init
        self.cgroup_paths = cgroups.paths_of(pid)
        self._watch_oom()

    def _watch_oom(self) -> None:
        """Once the init is created: its OOM notifications, read on the loop (which owns the poller)."""
        memory = self.cgroup_paths.get("memory")
        if memory and self.oom is None and self.loop is not None:
            watcher = cgroups.OomWatcher(memory, lambda: self._publish("/tasks/oom", {"container_id": self.id}))
            if watcher.start():
                self.post(lambda: self._add_oom_watch(watcher))

    def _add_oom_watch(self, watcher: cgroups.OomWatcher) -> None:
        with self.lock:
            running = self.task.init.status in (Status.CREATED, Status.RUNNING, Status.PAUSED)
        if not running or self.oom is not None:     # it exited already, or is watched already
            watcher.check()                         # an OOM kill that came first is still told
            watcher.close()
            return
        self.oom = watcher
        self.loop.add_reader(watcher.fileno(), self._on_oom_notice)

    def _on_oom_notice(self) -> None:
        if self.oom is not None and not self.oom.check():
            self._unwatch_oom()                     # the cgroup is gone

    def _unwatch_oom(self) -> None:
        self.loop.remove_reader(self.oom.fileno())
        self.oom.close()
        self.oom = None

    def kill(self, signal: int = 15, all: bool = False, exec_id: str = "") -> None:
        if not 0 < signal < 65:
            raise InvalidArgument(f"signal {signal} is not a signal number (1-64)")
        with self.lock:
            proc = self.task.process(_exec_name(exec_id))
            status, pid = proc.status, proc.pid
            exited = self.task.init_has_exited and not exec_id
        if status is Status.NEW or (exec_id and status is Status.CREATED):
            raise FailedPrecondition(f"{proc.describe()} is {status}: nothing to signal yet")
        if status in (Status.STOPPED, Status.DELETED) or exited:
            raise NotFound(f"{proc.describe()} has already exited")
        failpoints.fail("shim.kill")
        if exec_id:
            try:
                os.kill(pid, signal)
            except ProcessLookupError:
                raise NotFound(f"{proc.describe()} has already exited") from None
            return
        try:
            self.runtime.kill(self.id, signal, all=all)
        except RuntimeCommandError as e:
            if "not running" in str(e) or "stopped" in str(e):
                raise NotFound(f"{proc.describe()} has already exited") from None
            raise

    def pause(self) -> None:
        self._freeze(Status.PAUSED, self.runtime.pause)

    def resume(self) -> None:
        self._freeze(Status.RUNNING, self.runtime.resume)

    def _freeze(self, to: Status, command: Callable[[str], None]) -> None:
        with self.op_lock:
            init = self.task.init
            with self.lock:
                init.check(to)
                if to is Status.PAUSED and self.task.init_has_exited:
                    raise FailedPrecondition(f"task {self.id} is exiting, cannot become paused")
            command(self.id)
            with self.lock:
                init.transition(to)

    def delete(self, exec_id: str = "") -> dict:
        exec_id = _exec_name(exec_id)
        if exec_id:
            return self._delete_exec(exec_id)
        with self.op_lock:
            init = self.task.init
            with self.lock:
                init.check(Status.DELETED)
            failpoints.fail("shim.delete")
            io = self.io.pop("", None)
            if io is not None:
                io.close(IO_DRAIN)
            # The runtime's own delete (its state, the cgroups) waits for `finish`, after the
            # answer: nothing of the container runs any more, and berthd reuses the id only once
            # this shim has exited.
            self.runtime_delete_pending = True
            with self.lock:
                for e in [e for e, p in self.task.execs.items() if p.status is Status.CREATED]:
                    self.task.delete_exec(e)
                init.transition(Status.DELETED)
                self.done = True
            for e in list(self.io):
                self.io.pop(e).close(0)
            return self._exit_result(init)

    # --- execs ----------------------------------------------------------------------------

    def exec(self, exec_id: str, spec: dict, stdin: str = "", stdout: str = "", stderr: str = "",
             terminal: bool = False, log_path: str = "") -> None:
        _exec_name(exec_id)
        if not exec_id:
            raise InvalidArgument("exec_id is required")
        args = spec.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise InvalidArgument("spec.args must be a non-empty list of strings")
        # What the caller leaves out comes from the container's own process (env, user, cwd,
        # capabilities, rlimits...), as `ctr task exec` builds an exec from the container's spec.
        base = {k: v for k, v in self.config.get("process", {}).items() if k not in ("args", "terminal", "consoleSize")}
        spec = {**base, **spec, "terminal": terminal}
        spec.setdefault("cwd", "/")
        for what, path in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr), ("log_path", log_path)):
            if path and not os.path.isabs(path):
                raise InvalidArgument(f"{what} must be an absolute path, not {path!r}")
        with self.lock:
            if exec_id in self.task.execs:
                raise AlreadyExists(f"task {self.id} already has an exec {exec_id!r}")
            self.task.require_running("exec a process in")
            write_atomic(self.path(f"exec-{exec_id}.json"), json.dumps(spec).encode(), sync=False)
            self.exec_specs[exec_id] = {"stdin": stdin, "stdout": stdout, "stderr": stderr,
                                        "terminal": terminal, "log_path": log_path}
            self.task.add_exec(exec_id)

    def _start_exec(self, exec_id: str) -> dict:
        _exec_name(exec_id)
        with self.lock:
            self.task.exec_starting(exec_id)
            self.starting += 1
        pid_file = self.path(f"exec-{exec_id}.pid")
        try:
            io = ProcessIO(f"exec-{exec_id}", **self.exec_specs[exec_id])
            self.io[exec_id] = io
            try:
                self.runtime.exec(self.id, self.path(f"exec-{exec_id}.json"), pid_file,
                                  io.runtime_stdio, io.console_path)
                io.started()
                pid = read_pid(pid_file)
            except BaseException:
                io.failed()
                self.io.pop(exec_id, None)
                raise
        except BaseException:
            with self.lock:
                self.starting -= 1
                self._take_early(0)
                released = self.task.exec_start_failed(exec_id)
            if released:
                self.post(lambda: self._stopped(released))
            raise
        with self.lock:
            self.by_pid[pid] = self.task.execs[exec_id]
            self.task.exec_started(exec_id, pid)
            self.starting -= 1
            self._take_early(pid)
        return {"pid": pid}

    def _delete_exec(self, exec_id: str) -> dict:
        with self.lock:
            proc = self.task.delete_exec(exec_id)
        io = self.io.pop(exec_id, None)
        if io is not None:
            io.close(IO_DRAIN)
        self.exec_specs.pop(exec_id, None)
        for name in (f"exit-{exec_id}.json", f"exec-{exec_id}.pid", f"exec-{exec_id}.json"):
            _unlink(self.path(name))
        return self._exit_result(proc)

    # --- questions ------------------------------------------------------------------------

    def state(self) -> dict:
        with self.lock:
            report = self.task.report()
        report.update(namespace=self.namespace, runtime=self.runtime.name, shim_pid=os.getpid())
        if report["status"] == Status.PAUSED:
            for e in report["execs"].values():
                if e["status"] == Status.RUNNING:
                    e["status"] = str(Status.PAUSED)
        return report

    def wait(self, exec_id: str, answer: Callable[[dict | None, BerthError | None], None]) -> dict | None:
        """On the loop: the exit now if there is one, else None and `answer` is called at exit."""
        with self.lock:
            proc = self.task.process(_exec_name(exec_id))
            if proc.status in (Status.STOPPED, Status.DELETED):
                return self._exit_result(proc)
            if proc.status is Status.NEW:
                raise FailedPrecondition(f"{proc.describe()} has not been created")
            self.waiters.setdefault(exec_id, []).append(answer)
            return None

    def pids(self) -> list[dict]:
        with self.lock:
            status = self.task.init.status
            by_pid = {pid: p.exec_id for pid, p in self.by_pid.items()}
        if status in (Status.NEW, Status.STOPPED, Status.DELETED):
            raise FailedPrecondition(f"task {self.id} is {status}: it has no processes")
        return [{"pid": pid, "exec_id": by_pid.get(pid, "")} for pid in self.runtime.ps(self.id)]

    def stats(self) -> dict:
        with self.lock:
            status = self.task.init.status
        if status not in (Status.CREATED, Status.RUNNING, Status.PAUSED) or not self.cgroup_paths:
            raise FailedPrecondition(f"task {self.id} is {status}: it has no cgroup to measure")
        return cgroups.stats(self.cgroup_paths)

    # --- the rest of the runtime's commands -----------------------------------------------

    def update(self, resources: dict) -> None:
        with self.op_lock:
            with self.lock:
                status = self.task.init.status
            if status not in (Status.CREATED, Status.RUNNING, Status.PAUSED):
                raise FailedPrecondition(f"task {self.id} is {status}: nothing to update")
            self.runtime.update(self.id, resources, self.dir)

    def resize_pty(self, exec_id: str, width: int, height: int) -> None:
        if not (0 < width < 65536 and 0 < height < 65536):
            raise InvalidArgument("width and height must be between 1 and 65535")
        with self.lock:
            self.task.process(_exec_name(exec_id))
        io = self.io.get(exec_id)
        if io is None or not io.terminal:
            raise FailedPrecondition(f"process {exec_id or self.id!r} has no terminal")
        io.resize(width, height)

    def close_io(self, exec_id: str = "") -> None:
        with self.lock:
            self.task.process(_exec_name(exec_id))
        io = self.io.get(exec_id)
        if io is not None:
            io.close_stdin()

    def checkpoint(self, path: str, exit: bool = False) -> None:
        if not os.path.isabs(path):
            raise InvalidArgument(f"checkpoint path must be absolute, not {path!r}")
        with self.op_lock:
            with self.lock:
                if self.task.init.status is not Status.RUNNING:
                    raise FailedPrecondition(f"task {self.id} is {self.task.init.status}, not running")
            work = self.path("criu-work")
            os.makedirs(work, mode=0o700, exist_ok=True)
            os.makedirs(path, mode=0o700, exist_ok=True)
            self.runtime.checkpoint(self.id, path, work, leave_running=not exit)

    def shutdown(self, force: bool = False) -> None:
        with self.op_lock:                          # after a create or delete under way
            with self.lock:
                status = self.task.init.status
            if status not in (Status.NEW, Status.DELETED):
                if not force:
                    raise FailedPrecondition(f"task {self.id} is {status}: delete it first, or shut down with force")
                log.warning("%s/%s: forced shutdown of a %s task", self.namespace, self.id, status)
                try:
                    self.runtime.delete(self.id, force=True)
                except NotFound:
                    pass
            self.done = True

    # --- the end --------------------------------------------------------------------------

    def finish(self) -> None:
        """After the loop, before the threads stop: what the delete left to do."""
        if self.runtime_delete_pending:
            self.runtime_delete_pending = False
            try:
                self.runtime.delete(self.id)
            except NotFound:
                pass                                 # a checkpoint with exit=True deletes it already
            except BerthError as e:
                log.error("%s/%s: %s", self.namespace, self.id, e)

    def release_waiters(self) -> None:
        """On the loop, as it ends: whoever still waits for an exit hears that the shim is going."""
        for answers in self.waiters.values():
            for answer in answers:
                answer(None, Unavailable(f"the shim of task {self.id} is shutting down"))
        self.waiters.clear()

    def close(self) -> None:
        """After the loop: stop every thread the shim owns."""
        if self.oom is not None:
            self.oom.close()
        for io in self.io.values():
            io.close(0)
        self.reaper.close()
        self.closed = True                  # a reaper still blocked in waitpid posts nothing now
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)

    def describe(self) -> dict:
        with self.lock:
            return {"task": self.task.init.status.value, "execs": len(self.task.execs),
                    "early_exits": len(self.early), "waiters": sum(map(len, self.waiters.values())),
                    **self.reaper.stats()}


class ShimActor(Actor):
    """The wire adapter: each method decodes, calls the Shim, encodes."""

    name = "shim"
    pool_size = 4

    def __init__(self, shim: Shim):
        self.shim = shim

    def on_start(self) -> None:
        self.worker.add_reader(self.shim.wake_r, self.shim.run_pending)
        self.shim.loop = self.worker

    def on_stop(self) -> None:
        self.shim.release_waiters()

    def _finish_if_done(self) -> None:
        if self.shim.done:
            self.worker.stop()

    @method(blocking=True)
    def create(self, stdin: str = "", stdout: str = "", stderr: str = "", terminal: bool = False,
               log_path: str = "", checkpoint: str = "") -> dict:
        return self.shim.create(stdin, stdout, stderr, terminal, log_path, checkpoint)

    @method(blocking=True)
    def start(self, exec_id: str = "") -> dict:
        return self.shim.start(exec_id)

    @method(blocking=True)
    def kill(self, signal: int = 15, all: bool = False, exec_id: str = "") -> None:
        self.shim.kill(signal, all, exec_id)

    @method(blocking=True)
    def exec(self, exec_id: Identifier, spec: dict, stdin: str = "", stdout: str = "", stderr: str = "",
             terminal: bool = False, log_path: str = "") -> None:
        self.shim.exec(exec_id, spec, stdin, stdout, stderr, terminal, log_path)

    @method(blocking=True)
    def delete(self, exec_id: str = "") -> dict:
        result = self.shim.delete(exec_id)
        self._finish_if_done()
        return result

    @method(blocking=True)
    def pause(self) -> None:
        self.shim.pause()

    @method(blocking=True)
    def resume(self) -> None:
        self.shim.resume()

    @method(blocking=True)
    def pids(self) -> list:
        return self.shim.pids()

    @method(blocking=True)
    def update(self, resources: dict) -> None:
        self.shim.update(resources)

    @method
    def stats(self) -> dict:
        """The container's cgroup figures (this shadows Actor.stats, which only the router's
        pings read, and a shim is never pinged by the router: `ping` reports the shim itself)."""
        return self.shim.stats()

    @method
    def state(self) -> dict:
        return self.shim.state()

    @method
    def wait(self, exec_id: str = ""):
        deferred = Deferred()
        result = self.shim.wait(exec_id, lambda value, error: self.worker.resolve(deferred, value, error))
        return deferred if result is None else result

    @method
    def resize_pty(self, width: int, height: int, exec_id: str = "") -> None:
        self.shim.resize_pty(exec_id, width, height)

    @method
    def close_io(self, exec_id: str = "") -> None:
        self.shim.close_io(exec_id)

    @method(blocking=True)
    def checkpoint(self, path: str, exit: bool = False) -> None:
        self.shim.checkpoint(path, exit)

    @method(blocking=True)
    def shutdown(self, force: bool = False) -> None:
        self.shim.shutdown(force)
        self._finish_if_done()

    @method
    def ping(self) -> dict:
        """Is the shim there, and how is it: pid, task status, threads' work in hand."""
        return {"pid": os.getpid(), "namespace": self.shim.namespace, "id": self.shim.id,
                "in_flight": self.worker.in_flight, "served": self.worker.served, **self.shim.describe()}


def serve(spec: dict, ready_fd: int = -1) -> int:
    """Run the shim in this process until its task is deleted (or it is shut down).

    `spec`: namespace, id, bundle, task_dir, runtime, runtime_root, address (berthd's client
    socket, where events go), forward (the events actor's own socket, if known), log_level.
    `ready_fd`: where `{"pid": N}` (or `{"error": ...}`) is written once the socket is bound; -1
    for none.
    """
    from setproctitle import setproctitle

    from bus.pubsub import Publisher
    from bus.worker import Worker

    namespace, id, task_dir = spec["namespace"], spec["id"], spec["task_dir"]
    setproctitle(f"berth-shim: {namespace}/{id}")
    worker = publisher = shim = None
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        os.makedirs(task_dir, mode=0o700, exist_ok=True)
        os.chmod(task_dir, 0o700)
        publisher = Publisher(spec["address"], os.path.join(task_dir, "spool"), spec.get("forward", ""))
        shim = Shim(namespace, id, spec["bundle"], task_dir, spec["runtime"], spec["runtime_root"], publisher)
        sock = os.path.join(task_dir, "shim.sock")
        _unlink(sock)
        worker = Worker(ShimActor(shim), bind=f"ipc://{sock}")
        os.chmod(sock, 0o600)
        write_atomic(os.path.join(task_dir, "shim.json"), json.dumps(
            {"namespace": namespace, "id": id, "bundle": spec["bundle"], "runtime": shim.runtime.binary,
             "runtime_root": spec["runtime_root"], "address": spec["address"], "pid": os.getpid(),
             "started_at": time.time()}).encode(), sync=False)
        # Atomic but not synced: both describe a live process, which a machine crash ends too.
        write_atomic(os.path.join(task_dir, "shim.pid"), f"{os.getpid()}\n".encode(), sync=False)
    except BaseException as e:
        log.exception("shim %s/%s failed to start", namespace, id)
        _report(ready_fd, {"error": failure(e)})
        for closer in (shim and shim.close, publisher and (lambda: publisher.close(0)), worker and worker.close):
            if closer:
                closer()
        return 1
    _report(ready_fd, {"pid": os.getpid()})
    log.info("shim %s/%s serving on %s", namespace, id, sock)
    try:
        worker.run()
        shim.finish()
    finally:
        shim.close()
        publisher.close(2.0)
        worker.close()
        _unlink(sock)
        log.info("shim %s/%s exiting (%d events still spooled)", namespace, id, publisher.pending())
    return 0


def failure(e: BaseException) -> dict:
    """An exception as the wire carries it ({code, message}), for the ready pipe."""
    if isinstance(e, BerthError):
        return e.to_wire()
    return {"code": "Internal", "message": f"{type(e).__name__}: {e}"}


def tell(fd: int, message: dict) -> None:
    """One JSON line on the ready pipe the zygote waits on; a reader that went away is no error."""
    if fd < 0:
        return
    try:
        os.write(fd, json.dumps(message).encode() + b"\n")
    except OSError:
        pass


def _report(fd: int, message: dict) -> None:
    """The shim's last word on the ready pipe, which it then closes."""
    if fd < 0:
        return
    try:
        tell(fd, message)
    finally:
        os.close(fd)
