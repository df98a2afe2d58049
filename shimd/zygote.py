"""The shim zygote: a pre-imported template process from which every shim is forked.

The runtime actor forks it with `Zygote.fork(config)` before it creates any ZeroMQ context
(libzmq's threads do not survive fork). The zygote imports the shim's modules once and freezes
the GC, so every shim shares those pages. It keeps one spare shim ready: forked through a child
that starts a new session and exits at once (the zygote reaps it), so the spare's parent is init
(or the nearest subreaper), never berthd, and nothing that happens to berthd, the runtime actor or
the zygote reaches it. The spare has already closed every inherited descriptor (berthd's
directory locks among them), reset signal dispositions and mask, cleared PR_SET_PDEATHSIG and
pointed its stdio at /dev/null, and made the ZeroMQ context the shim will serve with (the spare
never forks); it waits on a socket of its own for a task. Each `spawn` is
handed to the spare, which logs to its task directory's shim.log and serves, and the zygote
forks the next spare. A spare whose zygote goes exits.

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
import tempfile
import time

import zmq
from setproctitle import setproctitle

from actors.template import die_with_parent
from bus import codec
from bus.errors import DeadlineExceeded, InvalidArgument, Unavailable, from_wire
from bus.pubsub import forward_address
from bus.validate import check_identifier
from shimd.main import failure, tell

log = logging.getLogger("berth.zygote")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
MAX_REQUEST = 64 << 10
PRELOAD = ("shimd.main", "shimd.zygote", "bus.client", "bus.pubsub", "bus.worker", "zmq", "msgpack",
           "concurrent.futures.thread", "setproctitle")
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
                        "forward": forward_address(config.state),
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

        `options`: `address` (berthd's client socket: events go there), `forward` (the events
        actor's own socket, tried first: bus.pubsub), `runtime_root` (the runtime's --root;
        default `<state>/<runtime>/<namespace>`), `state`, `log_level`.
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
    tempfile.gettempdir()                            # found once (it writes a probe file), not by each shim
    gc.collect()
    gc.freeze()
    spare = Spare.fork(sock)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 1)
        except InterruptedError:
            continue
        if not data:
            for fd in fds:
                os.close(fd)
            return 0                                 # the runtime actor is gone (and so goes the spare)
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
        request["options"] = dict(defaults, **(request.get("options") or {}))
        if spare is None or not spare.hand(codec.pack(request), ready):
            _spawn_now(request, ready, sock)
        spare = None
        os.close(ready)
        spare = Spare.fork(sock)


class Spare:
    """A shim forked, detached and waiting before any task asks for one, so that a create does
    not wait for two forks: the zygote hands it the next spawn request over its own socket. It
    exits when that socket closes (the zygote is gone)."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock

    @classmethod
    def fork(cls, zygote_sock: socket.socket) -> "Spare | None":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        zygote = os.getpid()
        try:
            child = os.fork()
        except OSError as e:
            log.warning("no spare shim: fork failed: %s", e.strerror)
            ours.close()
            theirs.close()
            return None
        if child == 0:
            code = 1
            try:
                ours.close()
                zygote_sock.close()
                os.setsid()
                if os.fork() == 0:
                    _wait_as_spare(theirs, zygote)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        os.waitpid(child, 0)                         # it exits as soon as the spare is forked
        return cls(child, ours)

    def hand(self, request: bytes, ready: int) -> bool:
        """Give the spare a spawn request; False if it is gone."""
        try:
            socket.send_fds(self.sock, [request], [ready])
            return True
        except OSError:
            return False
        finally:
            self.sock.close()


def _wait_as_spare(sock: socket.socket, zygote: int) -> None:
    """The spare: detach from everything inherited, then wait for a task, or for the end."""
    ready = -1
    try:
        setproctitle(f"berth-shim: spare of {zygote}")
        ctl = _detach(sock.detach())
        # The shim's ZeroMQ context (shimd.main's Worker takes it) and its threads, which libzmq
        # starts with the first socket: made while the spare is idle rather than while a create
        # waits. From here on nothing sweeps descriptors: the context's are open.
        zmq.Context.instance().socket(zmq.ROUTER).close(linger=0)
        with socket.socket(fileno=ctl) as control:
            data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 1)
        if not data or len(fds) != 1:
            os._exit(0)                              # the zygote is gone: so are we
        request = codec.unpack(data)
        ready = fcntl.fcntl(fds[0], fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(fds[0])
    except BaseException as e:
        log.exception("a spare shim failed")
        tell(ready, {"error": failure(e)})
        os._exit(1)
    _serve_and_exit(request, ready)


def _serve_and_exit(request: dict, ready: int) -> None:
    """In the detached shim: run it, report a failure to start on `ready`, and exit."""
    code = 1
    try:
        code = _run_shim(request, ready)
        ready = -1
    except BaseException as e:
        log.exception("shim %s/%s failed", request.get("namespace"), request.get("id"))
        tell(ready, {"error": failure(e)})
    finally:
        logging.shutdown()
        os._exit(code)


def _spawn_now(request: dict, ready: int, sock: socket.socket) -> None:
    """Without a spare: fork one for this request (through a child that starts a new session)."""
    try:
        child = os.fork()
    except OSError as e:
        tell(ready, {"error": {"code": "ResourceExhausted", "message": f"fork failed: {e.strerror}"}})
        return
    if child == 0:
        code = 1
        try:
            sock.close()
            os.setsid()
            if os.fork() == 0:
                _serve_and_exit(request, _detach(ready))
            code = 0
        except BaseException as e:
            tell(ready, {"error": {"code": "Internal", "message": f"{type(e).__name__}: {e}"}})
        finally:
            os._exit(code)
    os.waitpid(child, 0)                             # it exits as soon as the shim is forked


def _run_shim(request: dict, ready: int) -> int:
    """In the detached shim: its task's log, then serve; the exit code. `ready` is handed on."""
    options = request["options"]
    runtime = request["runtime"]
    state = options.get("state") or "/run/berth"
    spec = {
        "namespace": request["namespace"], "id": request["id"], "bundle": request["bundle"],
        "task_dir": request["task_dir"], "runtime": runtime, "address": options.get("address", ""),
        "forward": options.get("forward", ""),
        "runtime_root": options.get("runtime_root")
        or os.path.join(state, os.path.basename(runtime), request["namespace"]),
    }
    if not spec["address"]:
        raise InvalidArgument("no berthd address to publish events to")
    _log_to(spec["task_dir"], options.get("log_level", "info"))
    from shimd.main import serve
    return serve(spec, ready)


def _detach(keep: int) -> int:
    """Shed everything inherited: descriptors, signal handling, the parent-death signal, the
    working directory. Returns `keep`'s new descriptor (moved out of the way of 0, 1, 2)."""
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
    high = fcntl.fcntl(keep, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(keep)
    _close_fds_except(high)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    os.chdir("/")
    return high


def _log_to(task_dir: str, log_level: str) -> None:
    """stderr, and the logging module, to the task directory's shim.log."""
    os.makedirs(task_dir, mode=0o700, exist_ok=True)
    logfile = os.open(os.path.join(task_dir, "shim.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(logfile, 2)
    os.close(logfile)
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


def _close_fds_except(*keep: int) -> None:
    """Close every descriptor from 3 up, but those in `keep` (0, 1, 2 are left to the caller)."""
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))
