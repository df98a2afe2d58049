"""The tasks service: bundles, shims, and finding them again after a restart (containerd's
runtime/v2 shim manager with services/tasks in front of it).

A task is a container's running instance. `create` reads the container record, makes the task
directory `<state>/tasks/<namespace>/<id>` (mode 0700), which is also the OCI bundle:

    config.json       the record's spec, root.path "rootfs"
    rootfs/           the snapshot's mounts, mounted here with mount(2)
    task.json         what this actor needs to clean up after the shim: runtime, stdio, times
    deleting          present once a delete has been asked of the shim
    (the shim's own files: shim.sock, shim.pid, shim.json, exit-*.json, spool/ ... see shimd.main)

then has the zygote spawn the shim (`berth-shim: <ns>/<id>`, outliving berthd) and calls its
`create`. Every other method relays to the task's shim over its socket, from a pool thread.

Dead shims. Each shim is watched through a pidfd. When one dies without having been asked to
delete its task (kill -9, OOM killer), or is found dead when berthd starts, its task is cleaned
up as containerd's shim manager does: the runtime's `delete --force` (which kills what is left of
the container and removes its cgroups), the events the shim had spooled but not delivered are
forwarded, then `/tasks/exit` (unless the shim had recorded and announced the exit itself) and
`/tasks/delete`, the rootfs is unmounted and the task directory removed. The exit status is the
one the shim persisted (exit-init.json), else 137: the init was killed, by us or with the shim.
containerd reports 255 for an exit it never saw; a kill is what happened here, so 137 says more.
The result stays answerable by `wait` for a while (a wait in flight when the shim died gets it).

Connections to shims. ZeroMQ sockets belong to one thread at a time; each shim has a small pool of
connections, and a pool thread takes one for the length of a call and puts it back. A socket moves
between threads only through the pool's lock (ZeroMQ allows that across a full memory barrier),
so a shim costs as many connections as calls to it ever ran at once, not one per thread of the
actor's pool, and they are all closed when its task goes. Every call waits on the socket and the
shim's pidfd together, so a shim that dies mid-call is noticed at once, not at the deadline.

Restart. `build` forks the zygote before anything here opens a ZeroMQ socket, then `recover` reads
every task directory: a shim whose pid is alive, carries its title and answers `state` is adopted;
the others are cleaned up as above once the actor runs (`begin`) (on its own job threads).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import itertools
import json
import logging
import os
import select
import shutil
import subprocess
import threading
import time
from typing import Callable

from actors import checkpoint as checkpoints
from bus.errors import (AlreadyExists, BerthError, DeadlineExceeded, FailedPrecondition, Internal,
                        InvalidArgument, NotFound, ResourceExhausted, Unavailable)
from bus import failpoints
from bus.validate import Identifier, check_digest, check_identifier
from bus.worker import Actor, Call, Deferred, method

log = logging.getLogger("berth.runtime")

MAX_SOCKET_PATH = 107              # sun_path holds 108 bytes, the last a NUL
SHIM_CALL_TIMEOUT = 60.0
SHIM_EXIT_GRACE = 10.0             # how long a deleted task's shim may take to exit
STATE_TIMEOUT = 5.0                # a shim that does not answer `state` this fast is reported as unknown
REPLY_GRACE = 0.5                  # a reply sent just before the shim exited may still be on its way
WAIT_CAP = 5.0                     # seconds one `wait` request is held before the client is told to ask again
MAX_WAITS = 1024                   # wait requests held at once; beyond, ResourceExhausted
RECOVER_CONCURRENCY = 8            # shims asked at once when berthd starts again
TOMBSTONES = 4096                  # exits of tasks cleaned up after their shim died, kept for `wait`
KILLED = 137                       # 128 + SIGKILL
RUNTIMES = ("runc", "crun")
RUNTIME_ALIASES = {"io.containerd.runc.v1": "runc", "io.containerd.runc.v2": "runc",
                   "io.containerd.runtime.v1.linux": "runc", "io.containerd.crun.v2": "crun"}


# --- mounting the rootfs ------------------------------------------------------------------------

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_REMOUNT, MS_MANDLOCK, MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME = 32, 64, 128, 1024, 2048
MS_BIND, MS_REC, MS_SILENT = 4096, 16384, 32768
MS_UNBINDABLE, MS_PRIVATE, MS_SLAVE, MS_SHARED = 1 << 17, 1 << 18, 1 << 19, 1 << 20
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MNT_DETACH = 2
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# option -> (flag, set it?)  as containerd's mount_linux.go reads them
_FLAGS = {
    "async": (MS_SYNCHRONOUS, False), "atime": (MS_NOATIME, False), "bind": (MS_BIND, True),
    "defaults": (0, False), "dev": (MS_NODEV, False), "diratime": (MS_NODIRATIME, False),
    "dirsync": (MS_DIRSYNC, True), "exec": (MS_NOEXEC, False), "mand": (MS_MANDLOCK, True),
    "noatime": (MS_NOATIME, True), "nodev": (MS_NODEV, True), "nodiratime": (MS_NODIRATIME, True),
    "noexec": (MS_NOEXEC, True), "nomand": (MS_MANDLOCK, False), "norelatime": (MS_RELATIME, False),
    "nostrictatime": (MS_STRICTATIME, False), "nosuid": (MS_NOSUID, True), "rbind": (MS_BIND | MS_REC, True),
    "relatime": (MS_RELATIME, True), "remount": (MS_REMOUNT, True), "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False), "strictatime": (MS_STRICTATIME, True), "suid": (MS_NOSUID, False),
    "sync": (MS_SYNCHRONOUS, True),
}
_PROPAGATION = {"private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC, "shared": MS_SHARED,
                "rshared": MS_SHARED | MS_REC, "slave": MS_SLAVE, "rslave": MS_SLAVE | MS_REC,
                "unbindable": MS_UNBINDABLE, "runbindable": MS_UNBINDABLE | MS_REC}

_libc = ctypes.CDLL(None, use_errno=True)
_cwd_lock = threading.Lock()       # the process's working directory, borrowed for long overlay options


def _sys_mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: None if s is None else s.encode()       # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def parse_options(options: list[str]) -> tuple[int, int, list[str]]:
    """(mount flags, propagation flags, the rest as filesystem data)."""
    flags, propagation, data = 0, 0, []
    for option in options:
        if option in _FLAGS:
            flag, on = _FLAGS[option]
            flags = flags | flag if on else flags & ~flag
        elif option in _PROPAGATION:
            propagation |= _PROPAGATION[option]
        else:
            data.append(option)
    return flags, propagation, data


def mount_one(m: dict, target: str) -> None:
    """Mount one {type, source, options} on `target`.

    Overlay options longer than a page (mount(2) copies one page of data) come from long layer
    chains: then, as containerd does, the lowerdirs are given relative to their common parent
    and the mount is made from inside it. The working directory is the process's, so that is
    done under a lock, and only then."""
    kind = m.get("type") or ""
    source = m.get("source") or kind
    flags, propagation, data = parse_options(list(m.get("options") or []))
    text = ",".join(data)
    if flags & MS_BIND:
        _sys_mount(source, target, None, flags & ~MS_RDONLY, None)
        if flags & MS_RDONLY:        # a bind mount takes its flags only on a remount
            _sys_mount(None, target, None, flags | MS_REMOUNT, None)
    elif kind == "overlay" and len(text) >= PAGE_SIZE - 1:
        base, data = _relative_lowerdirs(data)
        text = ",".join(data)
        if len(text) >= PAGE_SIZE - 1:
            raise InvalidArgument(f"overlay options for {target} are {len(text)} bytes even with relative "
                                  f"layer paths; mount(2) takes at most {PAGE_SIZE - 1}")
        with _cwd_lock:
            here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.chdir(base)
                _sys_mount(source, target, kind, flags, text)
            finally:
                os.fchdir(here)
                os.close(here)
    else:
        _sys_mount(source, target, kind, flags, text or None)
    if propagation:
        _sys_mount(None, target, None, propagation, None)


def _relative_lowerdirs(data: list[str]) -> tuple[str, list[str]]:
    for i, option in enumerate(data):
        if option.startswith("lowerdir="):
            dirs = option[len("lowerdir="):].split(":")
            base = os.path.commonpath(dirs)
            if base in dirs:
                base = os.path.dirname(base)
            relative = [os.path.relpath(d, base) for d in dirs]
            return base, data[:i] + ["lowerdir=" + ":".join(relative)] + data[i + 1:]
    raise InvalidArgument("overlay mount without lowerdir")


def mount_all(mounts: list[dict], target: str) -> None:
    """Mount each in order on `target`; on failure, what was mounted is unmounted again."""
    done = 0
    try:
        for m in mounts:
            mount_one(m, target)
            done += 1
    except OSError as e:
        for _ in range(done):
            unmount(target)
        raise FailedPrecondition(f"mounting the root filesystem on {target} failed: {e.strerror}") from None


def unmount(target: str) -> bool:
    """Unmount what is mounted on `target` (every layer of it); False if nothing was."""
    any_ = False
    while True:
        if _libc.umount2(target.encode(), 0) == 0:
            any_ = True
            continue
        err = ctypes.get_errno()
        if err == errno.EBUSY:                    # still in use somewhere: detach it now, it goes when free
            if _libc.umount2(target.encode(), MNT_DETACH) == 0:
                any_ = True
                continue
            err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):   # not a mount point (any more), or no such path
            return any_
        raise OSError(err, os.strerror(err), target)


def check_dev(rec: "TaskRecord") -> None:
    """The image's /dev must be a directory (or absent). runc 1.1 makes /dev/fd, /dev/stdin, ...
    and /dev/ptmx by plain path joins, after removing any ptmx there: through a /dev that is a
    symlink it would make and remove them wherever the link points on the host."""
    dev = os.path.join(rec.rootfs, "dev")
    if os.path.islink(dev) or (os.path.lexists(dev) and not os.path.isdir(dev)):
        kind = "a symbolic link" if os.path.islink(dev) else "not a directory"
        raise FailedPrecondition(f"{rec.describe()}: /dev in its root filesystem is {kind}; the runtime "
                                 "would follow it out of the root filesystem, so the task is refused")


def is_mount_point(path: str) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


# --- talking to one shim ------------------------------------------------------------------------

class ShimClient:
    """Calls to one shim: a pool of connections (see the module docstring) and its pidfd."""

    def __init__(self, task_dir: str, pid: int, pidfd: int):
        self.address = f"ipc://{task_dir}/shim.sock"
        self.pid = pid
        self.pidfd = pidfd
        self.lock = threading.Lock()
        self.idle: list = []
        self.ids = itertools.count(1)
        self.closed = False

    def exited(self) -> bool:
        return bool(select.select([self.pidfd], [], [], 0)[0]) if self.pidfd >= 0 else True

    def _socket(self):
        with self.lock:
            if self.closed:
                raise Unavailable("the task's shim is gone")
            if self.idle:
                return self.idle.pop()
        import zmq
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        return sock

    def _release(self, sock, healthy: bool) -> None:
        with self.lock:
            if healthy and not self.closed:
                self.idle.append(sock)
                return
        sock.close()

    def call(self, method: str, args: dict | None = None, timeout: float = SHIM_CALL_TIMEOUT,
             what: str = "task"):
        """One request to the shim; Unavailable if it exits before answering."""
        return self.call_until(method, args or {}, time.time() + timeout, what)

    def call_until(self, method: str, args: dict, deadline: float, what: str = "task"):
        import zmq

        from bus.envelope import Reply, Request
        sock = self._socket()
        healthy = False
        try:
            rid = next(self.ids)
            sock.send_multipart([Request(rid, "shim", method, None, None, deadline, args).encode()])
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            if self.pidfd >= 0:
                poller.register(self.pidfd, zmq.POLLIN)
            gone_at = None
            while True:
                now = time.time()
                limit = deadline if gone_at is None else min(deadline, gone_at + REPLY_GRACE)
                if now >= limit:
                    if gone_at is not None:
                        raise Unavailable(f"the shim of {what} (pid {self.pid}) exited")
                    raise DeadlineExceeded(f"shim.{method} of {what}: no answer in time")
                ready = dict(poller.poll(max(1, int((limit - now) * 1000))))
                if sock in ready:
                    frames = sock.recv_multipart()
                    reply = Reply.decode(frames[0])
                    if reply.id != rid:
                        continue                      # a late answer to an abandoned call
                    healthy = True
                    return reply.unwrap()
                if self.pidfd in ready and gone_at is None:
                    gone_at = time.time()
                    poller.unregister(self.pidfd)
        finally:
            self._release(sock, healthy)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
        for sock in idle:
            sock.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


# --- the tasks --------------------------------------------------------------------------------

CREATING, RUNNING, DELETING, DEAD = "creating", "running", "deleting", "dead"


@dataclasses.dataclass(eq=False)
class TaskRecord:
    namespace: str
    id: str
    dir: str
    runtime: str                            # runc or crun
    runtime_root: str
    phase: str = CREATING                   # creating -> running -> deleting | dead -> (gone)
    shim: ShimClient | None = None
    gone: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: dict | None = None              # set when the task was cleaned up after its shim died
    abandoned: bool = False                 # its shim was never asked to create: shut it down
    stdio: dict = dataclasses.field(default_factory=dict)   # the FIFOs (or files) it was created with

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.id

    @property
    def rootfs(self) -> str:
        return os.path.join(self.dir, "rootfs")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def describe(self) -> str:
        return f"task {self.id}" if self.namespace == "default" else f"task {self.namespace}/{self.id}"


def runtime_binary(runtime: dict | str | None) -> str:
    """The OCI runtime a container record names: runc (default) or crun; containerd's names for
    the runc shim (`io.containerd.runc.v2`) mean runc, or the BinaryName in its options."""
    if isinstance(runtime, str):
        runtime = {"name": runtime}
    runtime = runtime or {}
    name = runtime.get("name") or "runc"
    options = runtime.get("options") if isinstance(runtime.get("options"), dict) else {}
    binary = options.get("BinaryName") or options.get("binary_name") or ""
    if binary:
        binary = os.path.basename(str(binary))
    base = name if name in RUNTIMES else RUNTIME_ALIASES.get(name)
    if base is None:
        raise InvalidArgument(f"runtime {str(name)[:100]!r} is not supported: use runc, crun or "
                              "io.containerd.runc.v2")
    if binary:
        if binary not in RUNTIMES:
            raise InvalidArgument(f"runtime binary {binary[:100]!r} is not supported: use runc or crun")
        return binary
    return base


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: str, value: dict, mode: int = 0o600) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with open(fd, "w") as f:
        json.dump(value, f)
    os.rename(tmp, path)


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _proc_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _pidfd(pid: int) -> int:
    """A pidfd for `pid`, or -1 if there is no such process."""
    if pid <= 0:
        return -1
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1


class TaskManager:
    """The logic: task directories, shims, and their cleanup. No actor, no router.

    `zygote` spawns shims (shimd.zygote.Zygote); `publisher` has `publish(ns, topic, event)` and
    a `spool_dir`; `log_level` is handed to shims."""

    def __init__(self, state: str, root: str, zygote, publisher, log_level: str = "info",
                 clock: Callable[[], float] = time.time):
        self.state_dir = state
        self.root = root
        self.tasks_dir = os.path.join(state, "tasks")
        self.zygote = zygote
        self.publisher = publisher
        self.log_level = log_level
        self.clock = clock
        self.lock = threading.Lock()
        self.tasks: dict[tuple[str, str], TaskRecord] = {}
        self.tombstones: collections.OrderedDict[tuple[str, str], dict] = collections.OrderedDict()
        self.adopted = 0
        self.cleaned = 0
        self.jobs = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="runtime-job")
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.closing = False
        self.monitor = threading.Thread(target=self._watch, name="shim-monitor")
        os.makedirs(self.tasks_dir, mode=0o711, exist_ok=True)

    # --- life of the manager -------------------------------------------------------------

    def begin(self) -> None:
        """Watch the shims, and clean up after those found dead by `recover`."""
        self.monitor.start()
        with self.lock:
            dead = [r for r in self.tasks.values() if r.phase == DEAD]
            deleted = [r for r in self.tasks.values() if r.phase == DELETING]
        for rec in dead:
            self._job(self._cleanup_dead, rec)
        for rec in deleted:
            self._job(self._shut_down if rec.abandoned else self._finish_delete, rec)

    def close(self) -> None:
        self.closing = True
        self._wake()
        if self.monitor.is_alive():
            self.monitor.join()
        self.jobs.shutdown(wait=True)
        with self.lock:
            records = list(self.tasks.values())
        for rec in records:
            if rec.shim is not None:
                rec.shim.close()
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)

    def stats(self) -> dict:
        with self.lock:
            phases = collections.Counter(r.phase for r in self.tasks.values())
        return {"tasks": dict(phases), "adopted": self.adopted, "cleaned_up": self.cleaned,
                "zygote": self.zygote.pid}

    def _job(self, fn, *args) -> None:
        def run():
            try:
                fn(*args)
            except Exception:
                log.exception("runtime job %s failed", getattr(fn, "__name__", fn))
        self.jobs.submit(run)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"x")

    # --- finding the shims again -----------------------------------------------------------

    def recover(self) -> None:
        """Read every task directory: adopt the live shims, note the dead ones for `begin`.
        The shims are asked how they are several at a time: a restart waits for the slowest."""
        if not os.path.isdir(self.tasks_dir):
            return
        found = []
        for ns in sorted(os.listdir(self.tasks_dir)):
            ns_dir = os.path.join(self.tasks_dir, ns)
            if not os.path.isdir(ns_dir):
                continue
            for id in sorted(os.listdir(ns_dir)):
                try:
                    check_identifier(ns, "namespace")
                    check_identifier(id, "id")
                except InvalidArgument:
                    log.warning("ignoring %s: not a task directory", os.path.join(ns_dir, id))
                    continue
                found.append((ns, id, os.path.join(ns_dir, id)))

        def recover_one(ns: str, id: str, task_dir: str) -> None:
            try:
                self._recover_one(ns, id, task_dir)
            except Exception:
                log.exception("recovering task %s/%s failed", ns, id)
        with concurrent.futures.ThreadPoolExecutor(RECOVER_CONCURRENCY, thread_name_prefix="recover") as pool:
            for task in found:
                pool.submit(recover_one, *task)

    def _recover_one(self, ns: str, id: str, task_dir: str) -> None:
        info = _read_json(os.path.join(task_dir, "task.json")) or {}
        runtime = info.get("runtime") if info.get("runtime") in RUNTIMES else "runc"
        rec = TaskRecord(ns, id, task_dir, runtime,
                         info.get("runtime_root") or os.path.join(self.state_dir, runtime, ns),
                         stdio={k: info.get(k, "") for k in ("stdin", "stdout", "stderr", "terminal")})
        pid = _read_int(rec.path("shim.pid"))
        pidfd = _pidfd(pid)
        alive = pidfd >= 0 and _proc_title(pid) == f"berth-shim: {ns}/{id}"
        if pidfd >= 0 and not alive:
            os.close(pidfd)
            pidfd = -1
        rec.shim = ShimClient(task_dir, pid, pidfd)
        if alive:
            try:
                state = rec.shim.call("state", timeout=STATE_TIMEOUT, what=rec.describe())
                log.info("adopted the shim of %s (pid %d): %s", rec.describe(), pid, state.get("status"))
                if state.get("status") == "deleted":
                    rec.phase = DELETING          # deleted just before berthd went: finish that
                elif state.get("status") == "new":
                    # berthd went between spawning the shim and its create, or during it: nobody
                    # waits for this task any more (a create sent again makes a new one).
                    rec.phase, rec.abandoned = DELETING, True
                else:
                    rec.phase = RUNNING
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(rec.path("deleting"))     # that delete was refused
            except Unavailable:
                alive = False
            except DeadlineExceeded:
                # Alive but not answering: keep it (a request may get through later), and say so.
                log.warning("the shim of %s (pid %d) does not answer; keeping it", rec.describe(), pid)
                rec.phase = RUNNING
        if not alive:
            log.warning("the shim of %s is gone (pid %s); cleaning up", rec.describe(), pid or "unknown")
            rec.phase = DEAD
        with self.lock:
            self.tasks[rec.key] = rec
            self.adopted += alive

    # --- watching the shims ----------------------------------------------------------------

    def _watch(self) -> None:
        """The monitor thread: a shim's pidfd becomes readable when it exits."""
        while not self.closing:
            with self.lock:
                watched = {r.shim.pidfd: r for r in self.tasks.values()
                           if r.shim is not None and r.shim.pidfd >= 0 and r.phase in (CREATING, RUNNING)}
            poller = select.poll()
            poller.register(self.wake_r, select.POLLIN)
            for fd in watched:
                poller.register(fd, select.POLLIN)
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            for fd, _ in ready:
                if fd == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 4096):
                            pass
                    continue
                rec = watched.get(fd)
                if rec is None:
                    continue
                with self.lock:
                    unexpected = rec.phase in (CREATING, RUNNING) and self.tasks.get(rec.key) is rec
                    if unexpected:
                        rec.phase = DEAD
                if unexpected:
                    log.warning("the shim of %s (pid %d) died", rec.describe(), rec.shim.pid)
                    self._job(self._cleanup_dead, rec)

    # --- the table ---------------------------------------------------------------------------

    def _get(self, ns: str, id: str, live: bool = True) -> TaskRecord:
        """The task's record: only running ones (whose shim serves) are visible, and with `live`
        False those whose shim died too (a wait is answered from their cleanup)."""
        with self.lock:
            rec = self.tasks.get((ns, id))
        if rec is None or rec.phase in (CREATING, DELETING):
            raise NotFound(f"task {id} not found" if ns == "default" else f"task {ns}/{id} not found")
        if live and rec.phase == DEAD:
            raise NotFound(f"{rec.describe()}: its shim died; the task is being cleaned up")
        return rec

    def _call(self, rec: TaskRecord, method: str, args: dict | None = None, timeout: float = SHIM_CALL_TIMEOUT):
        return rec.shim.call(method, args or {}, timeout, what=rec.describe())

    # --- create ----------------------------------------------------------------------------

    def task_dir(self, ns: str, id: str) -> str:
        check_identifier(ns, "namespace")
        check_identifier(id, "container id")
        task_dir = os.path.join(self.tasks_dir, ns, id)
        sock = os.path.join(task_dir, "shim.sock")
        if len(sock.encode()) > MAX_SOCKET_PATH:
            raise InvalidArgument(
                f"namespace {ns!r} and container id {id!r} are too long together: the shim's socket "
                f"would be {sock} ({len(sock.encode())} bytes), and a socket path has at most "
                f"{MAX_SOCKET_PATH}; use a shorter id or namespace")
        return task_dir

    def create(self, ns: str, id: str, resolve: Callable[[], tuple[dict, list[dict]]], stdin: str = "",
               stdout: str = "", stderr: str = "", terminal: bool = False, checkpoint: str = "",
               unpack_checkpoint: Callable[[str, str], None] | None = None) -> dict:
        """Create the task of container `id`: `resolve()` gives its record and rootfs mounts.
        With `checkpoint` (the digest of a checkpoint blob in the content store), the task is
        restored from it when started; `unpack_checkpoint(digest, dir)` puts the CRIU image there."""
        task_dir = self.task_dir(ns, id)
        for what, path in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
            if path and (not isinstance(path, str) or not os.path.isabs(path) or "\0" in path):
                raise InvalidArgument(f"{what} must be an absolute path, not {str(path)[:200]!r}")
        if checkpoint:
            check_digest(checkpoint)
        rec = self._reserve(ns, id, task_dir)
        try:
            container, mounts = resolve()
            spec = container.get("spec")
            if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
                raise FailedPrecondition(f"container {id} has no OCI spec to run")
            rec.runtime = runtime_binary(container.get("runtime"))
            rec.runtime_root = os.path.join(self.state_dir, rec.runtime, ns)
            spec = dict(spec, root=dict(spec.get("root") or {}, path="rootfs"))
            rec.stdio = {"stdin": stdin, "stdout": stdout, "stderr": stderr, "terminal": terminal}
            self._make_bundle(rec, spec, mounts, rec.stdio)
            image_path = ""
            if checkpoint:
                image_path = rec.path("checkpoint")
                unpack_checkpoint(checkpoint, image_path)
            failpoints.fail("runtime.create")     # the bundle made and mounted, no shim yet
            pid = self.zygote.spawn(ns, id, rec.dir, rec.dir, rec.runtime, {"log_level": self.log_level})
            rec.shim = ShimClient(rec.dir, pid, _pidfd(pid))
            failpoints.fail("runtime.spawn")      # the shim serving, not yet asked to create
            with self.lock:
                rec.phase = RUNNING
            self._wake()
            created = self._call(rec, "create", {"stdin": stdin, "stdout": stdout, "stderr": stderr,
                                                 "terminal": terminal, "checkpoint": image_path})
            failpoints.fail("runtime.created")    # the task created, its answer not yet sent
            return created
        except BaseException:
            self._abandon(rec)
            raise

    def _reserve(self, ns: str, id: str, task_dir: str) -> TaskRecord:
        deadline = time.monotonic() + SHIM_EXIT_GRACE
        while True:
            with self.lock:
                old = self.tasks.get((ns, id))
                if old is None:
                    rec = TaskRecord(ns, id, task_dir, "runc", "")
                    self.tasks[rec.key] = rec
                    self.tombstones.pop(rec.key, None)
                    return rec
            if old.phase in (CREATING, RUNNING):
                raise AlreadyExists(f"container {id} already has a task; delete it first")
            # The last task is on its way out (its shim exiting, or the cleanup after a dead one).
            if not old.gone.wait(max(0.0, deadline - time.monotonic())):
                raise AlreadyExists(f"container {id} still has a task being removed; try again")

    def _make_bundle(self, rec: TaskRecord, spec: dict, mounts: list[dict], stdio: dict) -> None:
        os.makedirs(os.path.dirname(rec.dir), mode=0o711, exist_ok=True)
        if os.path.lexists(rec.dir):
            log.warning("removing a stale task directory %s", rec.dir)
            self._remove_dir(rec)
        os.mkdir(rec.dir, 0o700)
        _write_json(rec.path("task.json"), {"namespace": rec.namespace, "id": rec.id, "runtime": rec.runtime,
                                            "runtime_root": rec.runtime_root, "created_at": self.clock(),
                                            **stdio})
        _write_json(rec.path("config.json"), spec)
        os.mkdir(rec.rootfs, 0o755)
        mount_all(mounts, rec.rootfs)
        check_dev(rec)

    def _abandon(self, rec: TaskRecord) -> None:
        """Undo a create that failed part way: the shim (if any), the mounts, the directory."""
        with self.lock:
            dead = rec.phase == DEAD             # the shim died under the create: its cleanup runs
            if not dead:
                rec.phase = DELETING
        if dead:
            rec.gone.wait(SHIM_EXIT_GRACE * 6)
            return
        self._wake()
        if rec.shim is not None and not rec.shim.exited():
            try:
                self._call(rec, "shutdown", {"force": True}, timeout=30)
            except BerthError as e:
                log.warning("shutting down the shim of %s after a failed create: %s", rec.describe(), e)
            self._wait_shim_exit(rec)
        if os.path.isdir(rec.dir) and rec.runtime_root:
            self._runtime_delete(rec)
        self._remove_dir(rec)
        self._forget(rec)

    # --- delete ------------------------------------------------------------------------------

    def delete(self, ns: str, id: str, exec_id: str = "") -> dict:
        rec = self._get(ns, id)
        if exec_id:
            return self._call(rec, "delete", {"exec_id": exec_id})
        with self.lock:
            if rec.phase != RUNNING:
                raise FailedPrecondition(f"{rec.describe()} is being deleted already")
            rec.phase = DELETING
        self._wake()
        try:
            with open(rec.path("deleting"), "w"):
                pass
            failpoints.fail("runtime.delete")     # marked deleting, not yet asked of the shim
            result = self._call(rec, "delete")
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rec.path("deleting"))
            with self.lock:
                if rec.phase == DELETING:
                    rec.phase = RUNNING
            self._wake()
            if isinstance(e, Unavailable) and rec.shim.exited():
                self._monitor_missed(rec)
            raise
        self._unmount(rec)
        self._job(self._finish_delete, rec)
        return result

    def _monitor_missed(self, rec: TaskRecord) -> None:
        with self.lock:
            if rec.phase == RUNNING:
                rec.phase = DEAD
            else:
                return
        self._job(self._cleanup_dead, rec)

    def _shut_down(self, rec: TaskRecord) -> None:
        """A shim whose create was cut off: stop it (once any create under way is done: the
        runtime's container goes too), then clean up as after a delete."""
        try:
            self._call(rec, "shutdown", {"force": True}, timeout=SHIM_CALL_TIMEOUT * 2)
        except BerthError as e:
            log.warning("shutting down the shim of %s: %s", rec.describe(), e)
        self._finish_delete(rec)

    def _finish_delete(self, rec: TaskRecord) -> None:
        """After a delete: once the shim has exited (it delivers its last events and deletes the
        runtime's state first), forward what it could not deliver, delete what runtime state
        it left (it was killed on the way), and remove the directory."""
        self._wait_shim_exit(rec)
        self._runtime_delete(rec)
        self._adopt_spool(rec)
        self._remove_dir(rec)
        self._forget(rec)

    def _wait_shim_exit(self, rec: TaskRecord) -> None:
        shim = rec.shim
        if shim is None or shim.pidfd < 0:
            return
        if not select.select([shim.pidfd], [], [], SHIM_EXIT_GRACE)[0]:
            log.warning("the shim of %s (pid %d) did not exit after its task went; killing it",
                        rec.describe(), shim.pid)
            with contextlib.suppress(ProcessLookupError):
                import signal
                signal.pidfd_send_signal(shim.pidfd, signal.SIGKILL)
            select.select([shim.pidfd], [], [], SHIM_EXIT_GRACE)

    def _forget(self, rec: TaskRecord) -> None:
        with self.lock:
            if self.tasks.get(rec.key) is rec:
                del self.tasks[rec.key]
            if rec.result is not None:
                self.tombstones[rec.key] = rec.result
                while len(self.tombstones) > TOMBSTONES:
                    self.tombstones.popitem(last=False)
        self._wake()
        if rec.shim is not None:
            rec.shim.close()
        rec.gone.set()

    def _unmount(self, rec: TaskRecord) -> None:
        try:
            unmount(rec.rootfs)
        except OSError as e:
            log.error("unmounting %s: %s", rec.rootfs, e)

    def _remove_dir(self, rec: TaskRecord) -> None:
        self._unmount(rec)
        if is_mount_point(rec.rootfs):
            log.error("%s is still mounted; leaving %s in place", rec.rootfs, rec.dir)
            return
        shutil.rmtree(rec.dir, ignore_errors=True)

    def _runtime_delete(self, rec: TaskRecord) -> None:
        """`<runtime> delete --force`: kills what is left of the container, removes its state."""
        from shimd.runtime_cli import command
        if not os.path.isdir(os.path.join(rec.runtime_root, rec.id)):
            return
        argv = command(rec.runtime, rec.runtime_root, "delete", "--force", rec.id)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("%s delete --force %s: %s", rec.runtime, rec.id, e)
            return
        if done.returncode != 0 and "does not exist" not in done.stderr:
            log.error("%s delete --force %s failed: %s", rec.runtime, rec.id, done.stderr.strip()[-500:])

    # --- after a shim died -------------------------------------------------------------------

    def _cleanup_dead(self, rec: TaskRecord) -> None:
        """containerd's cleanupAfterDeadShim: the runtime's state, the exit, the directory."""
        init_pid = _read_int(rec.path("init.pid"))
        exit_record = _read_json(rec.path("exit-init.json"))
        deleted = os.path.exists(rec.path("deleting"))
        if os.path.isdir(rec.dir):
            self._runtime_delete(rec)
        self._adopt_spool(rec)
        if exit_record is not None and isinstance(exit_record.get("exit_status"), int):
            status, exited_at = exit_record["exit_status"], exit_record.get("exited_at") or self.clock()
        else:
            status, exited_at = KILLED, self.clock()
            if os.path.exists(rec.path("shim.json")) and init_pid:
                # The shim never saw the exit, so it never announced it.
                self.publisher.publish(rec.namespace, "/tasks/exit", {
                    "container_id": rec.id, "id": rec.id, "pid": init_pid, "exit_status": status,
                    "exited_at": exited_at})
        if init_pid and not deleted:
            self.publisher.publish(rec.namespace, "/tasks/delete", {
                "container_id": rec.id, "pid": init_pid, "exit_status": status, "exited_at": exited_at})
        rec.result = {"id": rec.id, "pid": init_pid, "exit_status": status, "exited_at": exited_at}
        self._remove_dir(rec)
        self.cleaned += 1
        log.info("cleaned up %s after its shim died: exit status %d", rec.describe(), status)
        self._forget(rec)

    def _adopt_spool(self, rec: TaskRecord) -> None:
        """Move the events a shim spooled but never delivered into our own spool, in order, ahead
        of anything we publish for it next (the publisher sends in name order)."""
        spool = rec.path("spool")
        try:
            names = sorted(n for n in os.listdir(spool) if not n.startswith("."))
        except FileNotFoundError:
            return
        for name in names:
            with open(os.path.join(spool, name), "rb") as f:
                data = f.read()
            target = f"{time.time_ns():020d}-{name[-8:] if len(name) >= 8 else '00000000'}"
            tmp = os.path.join(self.publisher.spool_dir, f".{target}")
            with open(tmp, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            os.rename(tmp, os.path.join(self.publisher.spool_dir, target))
            os.unlink(os.path.join(spool, name))
        if names:
            log.info("forwarding %d events the shim of %s left undelivered", len(names), rec.describe())

    # --- the rest: relayed to the shim -----------------------------------------------------------

    def start(self, ns: str, id: str, exec_id: str = "") -> dict:
        result = self._call(self._get(ns, id), "start", {"exec_id": exec_id})
        failpoints.fail("runtime.started")        # the task started, its answer not yet sent
        return result

    # --- requests delivered again (their first actor died holding them) -------------------------

    def created(self, ns: str, id: str, stdio: dict) -> dict | None:
        """What a create that is being done again did the first time: the task, if it is there
        with the same stdio; None if it is not this create's."""
        with self.lock:
            rec = self.tasks.get((ns, id))
        if rec is None or rec.phase != RUNNING or rec.stdio != stdio:
            return None
        state = self._call(rec, "state", timeout=STATE_TIMEOUT)
        return {"pid": state.get("pid", 0)} if state.get("status") != "new" else None

    def started(self, ns: str, id: str) -> dict | None:
        """What a start of the init that is being done again did the first time: the init's pid,
        if it was started (it may have exited since)."""
        rec = self._get(ns, id)
        state = self._call(rec, "state", timeout=STATE_TIMEOUT)
        return {"pid": state.get("pid", 0)} if state.get("status") in ("running", "paused", "stopped") else None

    def kill(self, ns: str, id: str, signal: int = 15, all: bool = False, exec_id: str = "") -> None:
        self._call(self._get(ns, id), "kill", {"signal": signal, "all": all, "exec_id": exec_id})

    def exec(self, ns: str, id: str, exec_id: str, spec: dict, stdin: str = "", stdout: str = "",
             stderr: str = "", terminal: bool = False) -> None:
        self._call(self._get(ns, id), "exec", {"exec_id": exec_id, "spec": spec, "stdin": stdin,
                                                "stdout": stdout, "stderr": stderr, "terminal": terminal})

    def pause(self, ns: str, id: str) -> None:
        self._call(self._get(ns, id), "pause")

    def resume(self, ns: str, id: str) -> None:
        self._call(self._get(ns, id), "resume")

    def pids(self, ns: str, id: str) -> list:
        return self._call(self._get(ns, id), "pids")

    def update(self, ns: str, id: str, resources: dict) -> None:
        self._call(self._get(ns, id), "update", {"resources": resources})

    def metrics(self, ns: str, id: str) -> dict:
        return self._call(self._get(ns, id), "stats")

    def resize_pty(self, ns: str, id: str, width: int, height: int, exec_id: str = "") -> None:
        self._call(self._get(ns, id), "resize_pty", {"width": width, "height": height, "exec_id": exec_id})

    def close_io(self, ns: str, id: str, exec_id: str = "") -> None:
        self._call(self._get(ns, id), "close_io", {"exec_id": exec_id})

    def checkpoint(self, ns: str, id: str, keep: Callable[[str], dict], exit: bool = False) -> dict:
        """CRIU-dump the task into a scratch directory, `keep(dir)` it (into the content store:
        its descriptor is the answer), and remove the directory whatever happens."""
        rec = self._get(ns, id)
        path = os.path.join(self.root, "checkpoints", ns, f"{id}-{time.time_ns()}")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            self._call(rec, "checkpoint", {"path": path, "exit": exit}, timeout=600)
            return keep(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def state(self, ns: str, id: str) -> dict:
        rec = self._get(ns, id)
        return self._describe(rec, self._call(rec, "state", timeout=STATE_TIMEOUT))

    def _describe(self, rec: TaskRecord, state: dict) -> dict:
        return {"container_id": rec.id, "pid": state.get("pid", 0), "status": state.get("status", "unknown"),
                "exit_status": state.get("exit_status"), "exited_at": state.get("exited_at"),
                "runtime": rec.runtime, "shim_pid": rec.shim.pid if rec.shim else 0,
                "execs": state.get("execs", {}), "bundle": rec.dir, "stdio": rec.stdio}

    def list(self, ns: str) -> list[dict]:
        with self.lock:
            records = sorted((r for r in self.tasks.values() if r.namespace == ns and r.phase == RUNNING),
                             key=lambda r: r.id)
        out = []
        for rec in records:
            try:
                out.append(self._describe(rec, self._call(rec, "state", timeout=STATE_TIMEOUT)))
            except BerthError as e:
                log.debug("state of %s: %s", rec.describe(), e)
                out.append({"container_id": rec.id, "pid": 0, "status": "unknown", "exit_status": None,
                            "runtime": rec.runtime, "shim_pid": rec.shim.pid if rec.shim else 0})
        return out

    def wait(self, ns: str, id: str, exec_id: str, deadline: float) -> dict:
        """The process's exit, relayed from the shim's wait, by `deadline` (epoch seconds) or
        DeadlineExceeded (the client asks again)."""
        with self.lock:
            rec = self.tasks.get((ns, id))
            tomb = self.tombstones.get((ns, id))
        if rec is None and tomb is not None and not exec_id:
            return tomb
        rec = self._get(ns, id, live=False)
        if rec.phase != DEAD:
            try:
                return rec.shim.call_until("wait", {"exec_id": exec_id}, deadline, what=rec.describe())
            except Unavailable:
                if not rec.shim.exited():
                    raise
                self._monitor_missed(rec)
        # The shim died: the answer is what its cleanup finds.
        if not rec.gone.wait(max(0.0, deadline - time.time())):
            raise DeadlineExceeded(f"{rec.describe()}: its shim died and cleanup is still running")
        if exec_id or rec.result is None:
            raise NotFound(f"{rec.describe()}: its shim died; "
                           + (f"the exit of exec {exec_id} is unknown" if exec_id else "no exit was recorded"))
        return rec.result


class RuntimeActor(Actor):
    """The wire adapter over TaskManager; the container record and its mounts come from the
    metadata and snapshot actors."""

    name = "runtime"
    pool_size = 16

    def __init__(self, tasks: TaskManager):
        self.tasks = tasks
        # Waits block for as long as the client allows: on threads of their own, not the pool's,
        # whose every thread they could otherwise hold while creates and deletes queue behind.
        self.waits = concurrent.futures.ThreadPoolExecutor(MAX_WAITS, thread_name_prefix="runtime-wait")
        self.waits_lock = threading.Lock()
        self.waiting = 0

    def on_start(self) -> None:
        self.tasks.begin()

    def on_stop(self) -> None:
        self.waits.shutdown(wait=False, cancel_futures=True)
        self.tasks.close()
        self.tasks.zygote.close()
        self.tasks.publisher.close()

    def stats(self) -> dict:
        with self.waits_lock:
            return dict(self.tasks.stats(), waits=self.waiting)

    def _resolve(self, ns: str, container_id: str) -> Callable[[], tuple[dict, list[dict]]]:
        def resolve():
            container = self.call("metadata", "get_container", {"id": container_id}, namespace=ns)
            mounts = []
            if container.get("snapshot_key"):
                mounts = self.call("snapshot", "mounts", {"key": container["snapshot_key"],
                                                          "snapshotter": container["snapshotter"]}, namespace=ns)
            return container, mounts
        return resolve

    @method(blocking=True)
    def create(self, ns, container_id: Identifier, call: Call, stdin: str = "", stdout: str = "",
               stderr: str = "", terminal: bool = False, checkpoint: str = "") -> dict:
        def unpack(digest: str, dest: str) -> None:
            checkpoints.fetch(self.call, ns, digest, dest, self.tasks.tasks_dir)
        try:
            return self.tasks.create(ns, container_id, self._resolve(ns, container_id), stdin, stdout, stderr,
                                     terminal, checkpoint, unpack)
        except AlreadyExists:
            stdio = {"stdin": stdin, "stdout": stdout, "stderr": stderr, "terminal": terminal}
            done = self.tasks.created(ns, container_id, stdio) if call.redelivered else None
            if done is None:
                raise
            return done

    @method(blocking=True)
    def start(self, ns, container_id: Identifier, call: Call, exec_id: str = "") -> dict:
        try:
            return self.tasks.start(ns, container_id, exec_id)
        except FailedPrecondition:
            done = self.tasks.started(ns, container_id) if call.redelivered and not exec_id else None
            if done is None:
                raise
            return done

    @method(blocking=True)
    def kill(self, ns, container_id: Identifier, signal: int = 15, all: bool = False, exec_id: str = "") -> None:
        self.tasks.kill(ns, container_id, signal, all, exec_id)

    @method(blocking=True)
    def exec(self, ns, container_id: Identifier, exec_id: Identifier, spec: dict, stdin: str = "",
             stdout: str = "", stderr: str = "", terminal: bool = False) -> None:
        self.tasks.exec(ns, container_id, exec_id, spec, stdin, stdout, stderr, terminal)

    @method(blocking=True)
    def delete(self, ns, container_id: Identifier, exec_id: str = "") -> dict:
        return self.tasks.delete(ns, container_id, exec_id)

    @method(blocking=True)
    def pause(self, ns, container_id: Identifier) -> None:
        self.tasks.pause(ns, container_id)

    @method(blocking=True)
    def resume(self, ns, container_id: Identifier) -> None:
        self.tasks.resume(ns, container_id)

    @method(blocking=True)
    def pids(self, ns, container_id: Identifier) -> list:
        return self.tasks.pids(ns, container_id)

    @method(blocking=True)
    def update(self, ns, container_id: Identifier, resources: dict) -> None:
        self.tasks.update(ns, container_id, resources)

    @method(blocking=True)
    def metrics(self, ns, container_id: Identifier) -> dict:
        return self.tasks.metrics(ns, container_id)

    @method
    def wait(self, ns, call: Call, container_id: Identifier, exec_id: str = "") -> Deferred:
        """The exit, once there is one; or DeadlineExceeded (ask again) just before the request's
        deadline or after WAIT_CAP seconds, whichever is first."""
        deadline = min((call.deadline or time.time() + WAIT_CAP) - 0.25, time.time() + WAIT_CAP)
        with self.waits_lock:
            if self.waiting >= MAX_WAITS:
                raise ResourceExhausted(f"{MAX_WAITS} waits are held already; ask again")
            self.waiting += 1
        deferred = Deferred()

        def run() -> None:
            result = error = None
            try:
                result = self.tasks.wait(ns, container_id, exec_id, deadline)
            except BerthError as e:
                error = e
            except Exception:
                log.exception("runtime.wait failed")
                error = Internal("runtime.wait: internal error")
            finally:
                with self.waits_lock:
                    self.waiting -= 1
            self.worker.resolve_soon(deferred, result, error)
        self.waits.submit(run)
        return deferred

    @method(blocking=True)
    def state(self, ns, container_id: Identifier) -> dict:
        return self.tasks.state(ns, container_id)

    get = state

    @method(blocking=True)
    def list(self, ns) -> list:
        return self.tasks.list(ns)

    @method(blocking=True)
    def resize_pty(self, ns, container_id: Identifier, width: int, height: int, exec_id: str = "") -> None:
        self.tasks.resize_pty(ns, container_id, width, height, exec_id)

    @method(blocking=True)
    def close_io(self, ns, container_id: Identifier, exec_id: str = "") -> None:
        self.tasks.close_io(ns, container_id, exec_id)

    @method(blocking=True)
    def checkpoint(self, ns, container_id: Identifier, call: Call, exit: bool = False) -> dict:
        """The task's CRIU image as a blob in the content store (held by the caller's lease)."""
        def keep(image_dir: str) -> dict:
            return checkpoints.store(self.call, ns, call.lease, image_dir, os.path.dirname(image_dir),
                                     f"checkpoint-{container_id}-{time.time_ns()}")
        return self.tasks.checkpoint(ns, container_id, keep, exit)


def build(config) -> RuntimeActor:
    # The zygote first: this process has no ZeroMQ context yet, and must not until it is forked.
    from bus.pubsub import Publisher
    from shimd.zygote import Zygote
    zygote = Zygote.fork(config)
    try:
        publisher = Publisher(config.address, config.path("spool", "runtime"))
        tasks = TaskManager(config.state, config.root, zygote, publisher, getattr(config, "log_level", "info"))
        tasks.recover()
    except BaseException:
        zygote.close()
        raise
    return RuntimeActor(tasks)
