"""The template: a pre-imported process from which every actor is forked.

It is forked by the supervisor before the supervisor touches ZeroMQ (libzmq's threads do not
survive fork) and after it has imported every module (`preload`), then forks an actor whenever
the supervisor asks and reports each child's start and exit. Nothing is imported into it after
the fork: a page it wrote after forking a child would stop being shared with that child.
Everything dies with the supervisor: the template and each actor hold PR_SET_PDEATHSIG.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import os
import select
import signal
import socket

from setproctitle import setproctitle

from bus import codec

log = logging.getLogger("berth.template")

PR_SET_PDEATHSIG = 1
EXIT_RENEW = 75                 # an actor that asks to be forked afresh (actor.renew): not a crash
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int) -> None:
    """SIGKILL us when the parent goes; if it already went, go now."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def exit_status(wait_status: int) -> int:
    """Shell convention: the exit code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


# Beside the actor modules, what the supervisor, the actors and the shim zygote import anyway.
PRELOAD = ("zmq", "msgpack", "concurrent.futures.thread", "sdnotify", "tenacity", "prometheus_client",
           "sqlite3", "isal.isal_zlib", "zstandard", "bus.router", "bus.worker", "bus.client", "bus.pubsub",
           "actors.metrics", "shimd.main", "shimd.zygote")
M_ARENA_MAX = -8


def preload() -> None:
    """Import every module berthd's processes use, in the supervisor before it forks the
    template: one copy of each, shared by every process forked from it, with the GC frozen so
    those pages stay shared. Two malloc arenas, not eight per core: the actors' threads
    allocate little, and each arena keeps its own free memory."""
    from actors.registry import ACTORS
    _libc.mallopt(M_ARENA_MAX, 2)
    for name in (*PRELOAD, *(spec.module for spec in ACTORS)):
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


class Template:
    """The supervisor's handle on the template process."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock
        self.sock.setblocking(False)

    @classmethod
    def fork(cls, config, keep_out: list[int] = ()) -> "Template":
        """`keep_out`: the supervisor's descriptors (its directory locks) that no child may hold."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            for fd in keep_out:
                os.close(fd)
            code = 1
            try:
                code = _serve(theirs, config, parent)
            except BaseException:
                log.exception("template failed")
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    def fileno(self) -> int:
        return self.sock.fileno()

    def spawn(self, name: str) -> None:
        self.sock.send(codec.pack({"op": "spawn", "name": name}))

    def messages(self) -> list[dict]:
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            if not data:
                out.append({"op": "gone"})
                return out
            out.append(codec.unpack(data))

    def quit(self) -> None:
        try:
            self.sock.send(codec.pack({"op": "quit"}))
        except OSError:
            pass
        os.waitpid(self.pid, 0)


def _serve(sock: socket.socket, config, parent: int) -> int:
    setproctitle("berthd: template")
    die_with_parent(parent)
    os.setpgid(0, 0)                 # a terminal's Ctrl-C reaches the supervisor alone
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children: dict[int, str] = {}
    me = os.getpid()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            ready = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in ready:
            if fd == wake_r:
                _drain(wake_r)
                _reap(children, sock)
                continue
            data = sock.recv(4096)
            msg = codec.unpack(data) if data else {"op": "quit"}
            if msg["op"] == "quit":
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
                return 0
            pid = os.fork()
            if pid == 0:
                _become_actor(msg["name"], config, me, sock, (wake_r, wake_w))
            children[pid] = msg["name"]
            sock.send(codec.pack({"op": "started", "name": msg["name"], "pid": pid}))


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _reap(children: dict[int, str], sock: socket.socket) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        name = children.pop(pid, None)
        if name is not None:
            sock.send(codec.pack({"op": "exited", "name": name, "pid": pid, "status": exit_status(status)}))


def _become_actor(name: str, config, template: int, sock: socket.socket, fds: tuple[int, int]) -> None:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in fds:
            os.close(fd)
        setproctitle(f"berthd: {name}")
        die_with_parent(template)
        from actors.registry import BY_NAME
        from bus.worker import Worker
        actor = BY_NAME[name].build(config)
        worker = Worker(actor, config.actors_address, config.address)
        worker.run()
        worker.close()
        code = EXIT_RENEW if getattr(actor, "renew", False) else 0
    except BaseException:
        logging.getLogger(f"berth.{name}").exception("actor %s failed", name)
    finally:
        logging.shutdown()
        os._exit(code)
