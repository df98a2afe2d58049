"""The shim zygote: a pre-imported template process from which every shim is forked.

The runtime actor forks it with `Zygote.fork(config)` before it creates any ZeroMQ context
(libzmq's threads do not survive fork). The zygote imports the shim's modules once and freezes
the GC, so every shim shares those pages; then, for each `spawn`, it forks a child that starts a
new session and forks the shim itself, and exits at once (the zygote reaps it). The shim's parent
is therefore init (or the nearest subreaper), never berthd, and nothing that happens to berthd,
the runtime actor or the zygote reaches it. Before it runs, the shim closes every inherited
descriptor (berthd's directory locks among them), resets signal dispositions and mask, clears
PR_SET_PDEATHSIG, and points its stdio at /dev/null and its task directory's shim.log.

The zygote itself dies with the runtime actor (PR_SET_PDEATHSIG); a new runtime actor forks a new
one. A spawn passes the zygote the write end of a pipe (SCM_RIGHTS); the shim writes
`{"pid": N}` there once its socket is bound (or `{"error": ...}`), so `spawn` returns only when the
shim can be called, and concurrent spawns from several threads never wait for one another.
"""
from __future__ import annotations

import fcntl
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time

from setproctitle import setproctitle

from actors.template import die_with_parent
from bus import codec
from bus.errors import DeadlineExceeded, InvalidArgument, Unavailable, from_wire
from bus.validate import check_identifier
from shimd.main import failure, tell

log = logging.getLogger("berth.zygote")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
MAX_REQUEST = 64 << 10
PRELOAD = ("shimd.main", "shimd.zygote", "bus.client", "bus.pubsub", "bus.worker", "zmq", "msgpack")
PR_SET_PDEATHSIG = 1


class Zygote:
    """The runtime actor's handle on the zygote process."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock

    @classmethod
    def fork(cls, config=None) -> "Zygote":
        """Fork the zygote. `config` (actors.config.Config or anything with `address`, `state` and
        `log_level`) gives spawn's defaults: berthd's client socket for events, and the state
        directory under which each runtime keeps its root (`<state>/<runtime>/<namespace>`).
        Call it before this process creates a ZeroMQ context."""
        defaults = {}
        if config is not None:
            defaults = {"address": config.address, "state": config.state,
                        "log_level": getattr(config, "log_level", "info")}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                code = _serve(theirs, defaults, parent)
            except BaseException:
                log.exception("the shim zygote failed")
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    def spawn(self, namespace: str, id: str, bundle: str, task_dir: str, runtime: str = "runc",
              options: dict | None = None, timeout: float = 30.0) -> int:
        """Start the shim of one task; returns its pid once its socket answers.

        `options`: `address` (berthd's client socket: events go there), `runtime_root` (the
        runtime's --root; default `<state>/<runtime>/<namespace>`), `state`, `log_level`.
        Safe to call from several threads at once."""
        check_identifier(namespace, "namespace")
        check_identifier(id, "id")
        for what, path in (("bundle", bundle), ("task_dir", task_dir)):
            if not os.path.isabs(path):
                raise InvalidArgument(f"{what} must be an absolute path, not {path!r}")
        request = codec.pack({"op": "spawn", "namespace": namespace, "id": id, "bundle": bundle,
                              "task_dir": task_dir, "runtime": runtime, "options": dict(options or {})})
        if len(request) > MAX_REQUEST:
            raise InvalidArgument("spawn options are too large")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                socket.send_fds(self.sock, [request], [ready_w])
            except OSError as e:
                raise Unavailable(f"the shim zygote (pid {self.pid}) is gone: {e.strerror}") from None
            finally:
                os.close(ready_w)
            reply = _read_line(ready_r, timeout, f"the shim of {namespace}/{id}")
        finally:
            os.close(ready_r)
        if not reply:
            raise Unavailable(f"the shim of {namespace}/{id} exited while starting; see {task_dir}/shim.log")
        message = json.loads(reply)
        if "pid" in message:
            return int(message["pid"])
        error = message.get("error") if isinstance(message.get("error"), dict) else {}
        raise from_wire({"code": error.get("code", "Internal"),
                         "message": f"the shim of {namespace}/{id} failed to start: {error.get('message')}"})

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def close(self) -> None:
        """Stop the zygote and reap it. The shims it forked live on."""
        try:
            self.sock.send(codec.pack({"op": "quit"}))
        except OSError:
            pass
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _read_line(fd: int, timeout: float, what: str) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise DeadlineExceeded(f"{what} did not start within {timeout}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


# --- inside the zygote -----------------------------------------------------------------------

def _serve(sock: socket.socket, defaults: dict, parent: int) -> int:
    setproctitle("berthd: shim-zygote")
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # a terminal's Ctrl-C is berthd's to handle
    _close_fds_except(0, 1, 2, sock.fileno())
    for module in PRELOAD:                           # imported once, shared by every shim
        importlib.import_module(module)
    gc.collect()
    gc.freeze()
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 1)
        except InterruptedError:
            continue
        if not data:
            for fd in fds:
                os.close(fd)
            return 0                                 # the runtime actor is gone
        try:
            request = codec.unpack(data)
        except Exception:
            request = {}
        if request.get("op") == "quit":
            return 0
        if request.get("op") != "spawn" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        ready = fds[0]
        try:
            child = os.fork()
        except OSError as e:
            tell(ready, {"error": {"code": "ResourceExhausted", "message": f"fork failed: {e.strerror}"}})
            os.close(ready)
            continue
        if child == 0:
            _intermediate(request, defaults, ready, sock)
        os.close(ready)
        os.waitpid(child, 0)                         # it exits as soon as the shim is forked


def _intermediate(request: dict, defaults: dict, ready: int, sock: socket.socket) -> None:
    """Between the zygote and the shim: a new session, then the shim as an orphan."""
    try:
        sock.close()
        os.setsid()
        if os.fork() == 0:
            _become_shim(request, defaults, ready)
    except BaseException as e:
        tell(ready, {"error": {"code": "Internal", "message": f"{type(e).__name__}: {e}"}})
    os._exit(0)


def _become_shim(request: dict, defaults: dict, ready: int) -> None:
    code = 1
    try:
        options = dict(defaults, **request.get("options", {}))
        runtime = request["runtime"]
        state = options.get("state") or "/run/berth"
        spec = {
            "namespace": request["namespace"], "id": request["id"], "bundle": request["bundle"],
            "task_dir": request["task_dir"], "runtime": runtime, "address": options.get("address", ""),
            "runtime_root": options.get("runtime_root")
            or os.path.join(state, os.path.basename(runtime), request["namespace"]),
        }
        if not spec["address"]:
            raise InvalidArgument("no berthd address to publish events to")
        ready = _detach(ready, spec["task_dir"], options.get("log_level", "info"))
        from shimd.main import serve
        handed, ready = ready, -1                     # serve reports on it and closes it
        code = serve(spec, handed)
    except BaseException as e:
        log.exception("shim %s/%s failed", request.get("namespace"), request.get("id"))
        tell(ready, {"error": failure(e)})
    finally:
        logging.shutdown()
        os._exit(code)


def _detach(ready: int, task_dir: str, log_level: str) -> int:
    """Shed everything inherited: descriptors, signal handling, the parent-death signal, logging.
    Returns the ready pipe's (new) descriptor."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)    # as Python starts: EPIPE is an error, not death
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    high = fcntl.fcntl(ready, fcntl.F_DUPFD_CLOEXEC, 3)   # out of the way of 0, 1, 2
    os.close(ready)
    _close_fds_except(high)
    os.makedirs(task_dir, mode=0o700, exist_ok=True)
    null = os.open(os.devnull, os.O_RDWR)
    logfile = os.open(os.path.join(task_dir, "shim.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(logfile, 2)
    for fd in (null, logfile):
        if fd > 2:
            os.close(fd)
    os.chdir("/")
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    return high


def _close_fds_except(*keep: int) -> None:
    """Close every descriptor from 3 up, but those in `keep` (0, 1, 2 are left to the caller)."""
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))
