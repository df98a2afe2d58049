"""The client side of the bus: one ZMTP connection to berthd, request ids, deadlines, optional retries.

The connection speaks ZMTP itself (bus/zmtp.py), not through pyzmq: a `berth` command lives for
a tenth of a second, and importing pyzmq and starting libzmq's threads would be half of its CPU.
A Connection belongs to one thread; berth.Client keeps one per thread.
"""
from __future__ import annotations

import errno
import itertools
import time
from collections.abc import Iterator

from bus import codec, zmtp
from bus.envelope import Reply, Request
from bus.errors import BerthError, DeadlineExceeded, ResourceExhausted, Unavailable

DEFAULT_TIMEOUT = 30.0
RECONNECT_MAX = 0.1        # seconds at most between attempts to reach a berthd not (yet) listening


def zmq_address(address: str) -> str:
    return address if "://" in address else f"ipc://{address}"


def socket_path(address: str) -> str | None:
    if address.startswith("ipc://"):
        return address[len("ipc://"):]
    return None if "://" in address else address


class Connection:
    """With check=True (the default), the connection is made at once, so that a berthd that is
    not there is said at once and plainly; otherwise it is made by the first call."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True):
        self.address = address
        self.timeout = timeout
        self.ids = itertools.count(1)
        self.peer: zmtp.Peer | None = self._connect(timeout) if check else None

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None

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
        """Send one request, connecting (again) first if need be. A berthd that is not listening
        is tried again until the deadline, and so is one that hung up before the request was
        written whole: either way it was not done."""
        rid = next(self.ids)
        deadline = time.monotonic() + timeout
        req = Request(rid, service, method, namespace, lease, time.time() + timeout, args or {})
        message = [req.encode(), *frames]
        if len(message[0]) > codec.MAX_HEADER:       # what berthd would answer, without the trip
            raise ResourceExhausted(f"frame of {len(message[0])} bytes exceeds the limit of {codec.MAX_HEADER}")
        codec.check_frames(message)
        while True:
            if self.peer is None or self.peer.gone():
                self.peer = self._reconnect(deadline, f"{service}.{method}")
            try:
                self.peer.send(message, deadline)
                return rid
            except zmtp.Hangup:
                self.peer = None

    def _recv(self, rid: int, deadline: float, what: str) -> tuple[Reply, list[bytes]]:
        while True:
            try:
                frames = self.peer.recv(deadline)
            except zmtp.Hangup:
                # A berthd that went (killed, restarted) took the requests it held with it:
                # rather than wait out the deadline, say so (an idempotent call is sent again).
                raise Unavailable(f"{what}: berthd at {self.address} went away with the request "
                                  "(it may or may not have been done)") from None
            if frames is None:
                raise DeadlineExceeded(f"{what}: no answer from berthd at {self.address} in time")
            try:
                reply = Reply.decode(frames[0])
            except BerthError:
                continue
            if reply.id == rid or reply.id is None:
                return reply, frames[1:]
            # A late answer to an earlier request that timed out: not ours.

    def _connect(self, timeout: float) -> zmtp.Peer:
        """One attempt; Unavailable, with a message a person can act on, when nothing listens."""
        try:
            return zmtp.connect(self.address, f"berthd at {self._where()}", timeout)
        except OSError as e:
            raise self._unreachable(e) from None

    def _reconnect(self, deadline: float, what: str) -> zmtp.Peer:
        """Attempts until the deadline, as ZeroMQ would reconnect: a restarting berthd is waited for."""
        pause = 0.01
        while True:
            try:
                return zmtp.connect(self.address, f"berthd at {self._where()}",
                                    max(0.01, deadline - time.monotonic()))
            except (OSError, zmtp.Hangup) as e:        # not listening, or gone while greeting
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(f"{what}: {self._unreachable(e)}") from None
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, RECONNECT_MAX)

    def _where(self) -> str:
        return socket_path(self.address) or self.address

    def _unreachable(self, e: Exception) -> Unavailable:
        if isinstance(e, OSError):
            reason = "no such socket" if e.errno == errno.ENOENT else (e.strerror or str(e)).lower()
        else:
            reason = "it closed the connection"
        return Unavailable(f"cannot reach berthd at {self._where()} ({reason}; is it running?)")


def call(address: str, service: str, method: str, args: dict | None = None, **kw):
    """A one-off call for scripts and tests."""
    conn = Connection(address)
    try:
        return conn.call(service, method, args, **kw)
    finally:
        conn.close()
