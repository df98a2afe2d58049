"""The client side of the bus: one DEALER socket, request ids, deadlines, optional retries.

A Connection belongs to one thread (ZeroMQ sockets are not thread-safe); berth.Client keeps one
per thread.
"""
from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from typing import Iterator

import zmq

from bus.envelope import Reply, Request
from bus.errors import BerthError, DeadlineExceeded, Unavailable

DEFAULT_TIMEOUT = 30.0
RESTART_CHECK = 1.0        # seconds between looks at whether berthd's socket is still the same one


def zmq_address(address: str) -> str:
    return address if "://" in address else f"ipc://{address}"


def socket_path(address: str) -> str | None:
    if address.startswith("ipc://"):
        return address[len("ipc://"):]
    return None if "://" in address else address


def probe(address: str) -> None:
    """Fail fast, with a message a person can act on, when nothing listens at the address."""
    path = socket_path(address)
    if path is None:
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        reason = "no such socket" if e.errno == errno.ENOENT else os.strerror(e.errno or 0).lower()
        raise Unavailable(f"cannot reach berthd at {path} ({reason}; is it running?)") from None
    finally:
        s.close()


class Connection:
    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True):
        if check:
            probe(address)
        self.address = address
        self.timeout = timeout
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(zmq_address(address))
        self.ids = itertools.count(1)
        self.path = socket_path(address)
        self.listener = _identity(self.path)

    def close(self) -> None:
        self.sock.close()

    def call(self, service: str, method: str, args: dict | None = None, *,
             namespace: str | None = None, lease: str | None = None, timeout: float | None = None,
             frames: list[bytes] = (), idempotent: bool = False, with_frames: bool = False):
        """One request, one reply. With idempotent=True, Unavailable is retried until the deadline."""
        timeout = self.timeout if timeout is None else timeout
        if not idempotent:
            return self._call_once(service, method, args, namespace, lease, timeout, frames, with_frames)
        import tenacity
        deadline = time.monotonic() + timeout
        for attempt in tenacity.Retrying(retry=tenacity.retry_if_exception_type(Unavailable),
                                         stop=tenacity.stop_before_delay(timeout),
                                         wait=tenacity.wait_exponential(multiplier=0.05, max=1.0),
                                         reraise=True):
            with attempt:
                remaining = max(0.01, deadline - time.monotonic())
                return self._call_once(service, method, args, namespace, lease, remaining, frames, with_frames)

    def _call_once(self, service, method, args, namespace, lease, timeout, frames, with_frames):
        rid = self._send(service, method, args, namespace, lease, timeout, frames)
        reply, bulk = self._recv(rid, time.monotonic() + timeout, f"{service}.{method}")
        result = reply.unwrap()
        return (result, bulk) if with_frames else result

    def stream(self, service: str, method: str, args: dict | None = None, *,
               namespace: str | None = None, lease: str | None = None,
               timeout: float | None = None, frames: list[bytes] = ()) -> Iterator[tuple[object, list[bytes]]]:
        """A request answered by several replies; yields (result, frames) for each."""
        timeout = self.timeout if timeout is None else timeout
        rid = self._send(service, method, args, namespace, lease, timeout, frames)
        deadline = time.monotonic() + timeout
        while True:
            reply, bulk = self._recv(rid, deadline, f"{service}.{method}")
            result = reply.unwrap()
            if not reply.more:
                if result is not None or bulk:
                    yield result, bulk
                return
            yield result, bulk

    def _send(self, service, method, args, namespace, lease, timeout, frames) -> int:
        rid = next(self.ids)
        req = Request(rid, service, method, namespace, lease, time.time() + timeout, args or {})
        self.sock.send_multipart([req.encode(), *frames], copy=len(frames) == 0)
        return rid

    def _recv(self, rid: int, deadline: float, what: str) -> tuple[Reply, list[bytes]]:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"{what}: no answer from berthd at {self.address} in time")
            if not self.sock.poll(int(min(remaining, RESTART_CHECK) * 1000) + 1):
                self._check_listener(what)
                continue
            frames = self.sock.recv_multipart()
            try:
                reply = Reply.decode(frames[0])
            except BerthError:
                continue
            if reply.id == rid or reply.id is None:
                return reply, frames[1:]
            # A late answer to an earlier request that timed out: not ours.


    def _check_listener(self, what: str) -> None:
        """A berthd that went (killed, restarted) took the requests it held with it: rather than
        wait out the deadline, say so (Unavailable: an idempotent call is sent again)."""
        now = _identity(self.path)
        if self.listener is None:
            self.listener = now
        elif now != self.listener:
            self.listener = now
            raise Unavailable(f"{what}: berthd at {self.address} went away with the request "
                              "(it may or may not have been done)")


def _identity(path: str | None) -> tuple[int, int, int] | None:
    """Which socket file is at `path` (berthd makes a new one at each start; its inode number
    may be the old one's, its change time is not)."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return (0, 0, 0)
    return (st.st_dev, st.st_ino, st.st_ctime_ns) if st else None


def call(address: str, service: str, method: str, args: dict | None = None, **kw):
    """A one-off call for scripts and tests."""
    conn = Connection(address)
    try:
        return conn.call(service, method, args, **kw)
    finally:
        conn.close()

