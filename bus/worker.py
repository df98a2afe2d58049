"""The actor side of the bus: the loop that decodes a request, calls a method, encodes the reply.

An actor is a plain class of `@method`s wrapped around its service logic. Quick methods run on
the loop; `@method(blocking=True)` ones run on a small thread pool and hand their replies back
through a queue, so the loop never waits on disk or network. Signals arrive as bytes on a wakeup
pipe and become ordinary events on the loop.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import logging
import os
import queue
import signal
import struct
import threading
import time
import traceback
from typing import Callable

import zmq

from bus import codec, failpoints
from bus.envelope import Reply, Request
from bus.errors import BerthError, DeadlineExceeded, Internal, InvalidArgument, NotImplementedErr
from bus.validate import Schema, check_identifier

log = logging.getLogger("berth.worker")
_libc = ctypes.CDLL(None)

# Control words on the actors socket (docs/wire.md, "Router and actors").
REG, REQ, REDO, REP, MORE, PING, PONG = b"REG", b"REQ", b"REDO", b"REP", b"MORE", b"PING", b"PONG"


@dataclasses.dataclass(slots=True)
class Call:
    """What a method may want to know about the request beyond its args."""
    id: int | str
    namespace: str | None
    lease: str | None
    deadline: float | None
    frames: list[bytes]
    redelivered: bool = False       # delivered once before, to an actor that died holding it


@dataclasses.dataclass(slots=True)
class Bulk:
    """A result with raw byte frames attached (blob chunks travel outside msgpack)."""
    result: object
    frames: list[bytes]


@dataclasses.dataclass(slots=True)
class Deferred:
    """Returned by a loop method that answers later (a wait for an exit): the actor keeps it
    and calls `worker.resolve(deferred, result)` when the answer is known."""
    call: Call | None = None
    route: list | None = None


@dataclasses.dataclass(slots=True)
class MethodSpec:
    fn: Callable
    schema: Schema
    blocking: bool
    stream: bool
    wants_ns: bool
    wants_call: bool


def method(fn=None, *, blocking: bool = False, stream: bool = False):
    """Expose a method on the bus; its signature is its schema (bus.validate.Schema)."""
    def mark(f):
        f.__bus_method__ = (blocking, stream)
        return f
    return mark(fn) if fn is not None else mark


class Actor:
    """Base of every actor: `name`, `@method`s, optional `on_start`, `on_stop`, `stats`, timers."""

    name = ""
    pool_size = 4
    methods: dict[str, MethodSpec]
    worker: "Worker"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        table = {}
        for attr in dir(cls):
            fn = getattr(cls, attr, None)
            flags = getattr(fn, "__bus_method__", None)
            if flags is None:
                continue
            params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
            table[attr] = MethodSpec(fn, Schema.of(fn), flags[0], flags[1], "ns" in params, "call" in params)
        cls.methods = table

    peer_address = ""                   # the router's client socket, set by the worker
    _peers = threading.local()

    def call(self, service: str, method: str, args: dict | None = None, **kw):
        """Call another actor through the router. Only from blocking methods: the loop never waits."""
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError(f"{self.name}: call({service}.{method}) from the actor's loop would block it")
        conn = getattr(self._peers, "conn", None)
        if conn is None:
            from bus.client import Connection
            conn = self._peers.conn = Connection(self.peer_address, timeout=30.0, check=False)
        return conn.call(service, method, args, **kw)

    # Hooks, overridden where needed.
    def on_start(self) -> None: ...

    def on_stop(self) -> None: ...

    def stats(self) -> dict:
        return {}


class Worker:
    """Runs one actor and serves until told to stop: either registered with the router
    (`actors_address`: berthd's actors) or on a socket of its own (`bind`: a shim)."""

    def __init__(self, actor: Actor, actors_address: str | None = None, peer_address: str = "",
                 ctx: zmq.Context | None = None, bind: str | None = None):
        self.actor = actor
        actor.peer_address = peer_address
        self.ctx = ctx or zmq.Context.instance()
        self.direct = bind is not None
        if self.direct:
            self.sock = self.ctx.socket(zmq.ROUTER)
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.sock.setsockopt(zmq.MAXMSGSIZE, 128 << 20)
            self.sock.bind(bind)
        else:
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.IDENTITY, actor.name.encode())
            self.sock.connect(actors_address)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.pool = concurrent.futures.ThreadPoolExecutor(actor.pool_size, thread_name_prefix=actor.name)
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.timers: list[list] = []       # [next_due, interval, fn]
        self.readers: dict = {}            # extra sockets or fds the actor serves on this loop
        self.poller: zmq.Poller | None = None
        self.in_flight = 0
        self.served = 0
        self.stopping = False
        actor.worker = self

    def stop(self) -> None:
        """End the loop after the current message (an actor that decides to exit, e.g. a shim)."""
        self.stopping = True
        self._wake()                     # from a timer or a thread: not after the next poll's timeout

    def resolve(self, deferred: "Deferred", result: object = None, error: BerthError | None = None) -> None:
        """Answer a request whose method returned a Deferred. Only from the loop thread."""
        reply = Reply.failure(deferred.call.id, error) if error else Reply(deferred.call.id, result=result)
        self._send_reply(deferred.route, reply, [])

    def resolve_soon(self, deferred: "Deferred", result: object = None, error: BerthError | None = None) -> None:
        """`resolve` from any thread: done on the loop, once the method that made `deferred` has
        returned it."""
        self.outbox.put((deferred, result, error))
        self._wake()

    def add_reader(self, sock, fn: Callable[[], None]) -> None:
        """Call `fn` on the loop whenever `sock` (a ZeroMQ socket or a descriptor) is readable.
        Before `run`, or from the loop itself."""
        self.readers[sock] = fn
        if self.poller is not None:
            self.poller.register(sock, zmq.POLLIN)

    def remove_reader(self, sock) -> None:
        """Stop serving `sock` (from the loop); its owner closes it."""
        if self.readers.pop(sock, None) is not None and self.poller is not None:
            self.poller.unregister(sock)

    def serve_direct(self, sock) -> None:
        """Take requests on a ROUTER socket of the actor's own as well, as a shim does on its
        only one: for peers that call it often, a hop through the router saved each time."""
        self.add_reader(sock, lambda: self._drain_socket(sock, direct=True))

    def every(self, interval: float, fn: Callable[[], None]) -> None:
        self.timers.append([time.monotonic() + interval, interval, fn])

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        old_wakeup = signal.set_wakeup_fd(self.sig_w)
        old_handlers = {signum: signal.signal(signum, lambda *_: None) for signum in (signal.SIGTERM, signal.SIGINT)}
        self.actor.on_start()
        poller = self.poller = zmq.Poller()
        for sock in (self.sock, self.wake_r, self.sig_r, *self.readers):
            poller.register(sock, zmq.POLLIN)
        if not self.direct:
            self.sock.send_multipart([REG, struct.pack("!I", os.getpid())])
        trimmed_at = self.served
        while not self.stopping:
            timeout = self._run_timers()
            ready = poller.poll(timeout)
            if not ready and trimmed_at != self.served and not self.in_flight:
                trimmed_at = self.served
                _libc.malloc_trim(0)      # idle again: hand the requests' freed heap back to the system
            for item, _ in ready:
                if item is self.sock:
                    self._drain_socket(self.sock, self.direct)
                elif item == self.wake_r:
                    _drain_fd(self.wake_r)
                    self._flush_outbox()
                elif item == self.sig_r:
                    if _drain_fd(self.sig_r):
                        self.stopping = True
                else:
                    fn = self.readers.get(item)     # None: removed by a handler a moment ago
                    if fn is not None:
                        fn()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._flush_outbox()
        self.actor.on_stop()
        self.sock.close(linger=1000)
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)

    def close(self) -> None:
        """In a process about to exit: let queued replies go out, and end ZeroMQ's threads."""
        self.ctx.destroy(linger=1000)

    def _run_timers(self) -> int:
        if not self.timers:
            return 1000
        now = time.monotonic()
        for timer in self.timers:
            if timer[0] <= now:
                timer[0] = now + timer[1]
                try:
                    timer[2]()
                except Exception:
                    log.exception("%s: timer %s failed", self.actor.name, timer[2])
        return max(0, int((min(t[0] for t in self.timers) - time.monotonic()) * 1000)) + 1

    def _drain_socket(self, sock, direct: bool) -> None:
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if direct:
                if len(frames) >= 2:
                    try:
                        codec.check_frames(frames[1:])       # the router's limits, here without one
                    except BerthError as e:
                        self._send_reply([b"", frames[0], sock], Reply.failure(None, e), [])
                        continue
                    self._on_request(b"", frames[0], frames[1], frames[2:], reply_to=sock)
                continue
            kind = frames[0]
            if kind in (REQ, REDO) and len(frames) >= 4:
                self._on_request(frames[1], frames[2], frames[3], frames[4:], redelivered=kind == REDO)
            elif kind == PING and len(frames) == 2:
                stats = dict(self.actor.stats(), in_flight=self.in_flight, served=self.served,
                             pid=os.getpid())
                self.sock.send_multipart([PONG, frames[1], codec.pack(stats)])

    def _on_request(self, token: bytes, client: bytes, header: bytes, bulk: list[bytes],
                    redelivered: bool = False, reply_to=None) -> None:
        route = [token, client, reply_to]             # reply_to: the ROUTER a direct request came on
        try:
            req = Request.decode(header)
        except BerthError as e:
            self._send_reply(route, Reply.failure(None, e), [])
            return
        self.served += 1
        try:
            spec, kwargs, call = self._bind(req, bulk)
        except BerthError as e:
            self._send_reply(route, Reply.failure(req.id, e), [])
            return
        call.redelivered = redelivered
        if spec.blocking:
            self.in_flight += 1
            self.pool.submit(self._run_in_thread, spec, kwargs, call, route)
        else:
            self._invoke(spec, kwargs, call, route, self._send_reply)

    def _bind(self, req: Request, bulk: list[bytes]):
        spec = self.actor.methods.get(req.method)
        if spec is None or req.method.startswith("_"):
            raise NotImplementedErr(f"{self.actor.name} has no method {req.method!r}")
        if req.expired():
            raise DeadlineExceeded(f"{req.service}.{req.method}: deadline passed before it ran")
        kwargs = spec.schema.bind(req.args)
        if spec.wants_ns:
            if req.namespace is None:
                raise InvalidArgument("namespace is required")
            kwargs["ns"] = check_identifier(req.namespace, "namespace")
        call = Call(req.id, req.namespace, req.lease, req.deadline, bulk)
        if spec.wants_call:
            kwargs["call"] = call
        return spec, kwargs, call

    def _invoke(self, spec: MethodSpec, kwargs: dict, call: Call, route: list, send) -> None:
        try:
            failpoints.fail("worker.dispatch", self.actor.name, spec.fn.__name__)
            result = spec.fn(self.actor, **kwargs)
            if spec.stream:
                for item in result:
                    result_frames = _split(item)
                    send(route, Reply(call.id, result=result_frames[0], more=True), result_frames[1])
                result = None
            if isinstance(result, Deferred):
                result.call, result.route = call, route   # answered later by Worker.resolve
                return
            result, frames = _split(result)
            send(route, Reply(call.id, result=result), frames)
        except BerthError as e:
            send(route, Reply.failure(call.id, e), [])
        except Exception:
            log.error("%s.%s failed:\n%s", self.actor.name, spec.fn.__name__, traceback.format_exc())
            send(route, Reply.failure(call.id, Internal(f"{self.actor.name}.{spec.fn.__name__}: internal error")), [])

    def _run_in_thread(self, spec, kwargs, call, route) -> None:
        # A stream's items wake the loop one by one; a single reply waits for the end marker,
        # so that the loop is woken once per call, not twice.
        try:
            self._invoke(spec, kwargs, call, route, self._post_reply if spec.stream else self._queue_reply)
        finally:
            self.outbox.put(None)        # marks the end of one blocking call
            self._wake()

    def _queue_reply(self, route, reply, frames) -> None:
        self.outbox.put((route, reply, frames))

    def _post_reply(self, route, reply, frames) -> None:
        self._queue_reply(route, reply, frames)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass                         # the pipe is full: the loop is already awake

    def _flush_outbox(self) -> None:
        while True:
            try:
                item = self.outbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self.in_flight -= 1
            elif isinstance(item[0], Deferred):
                self.resolve(*item)
            else:
                self._send_reply(*item)

    def _send_reply(self, route: list, reply: Reply, frames: list[bytes]) -> None:
        if route[2] is not None:
            try:
                route[2].send_multipart([route[1], reply.encode(), *frames], zmq.NOBLOCK)
            except zmq.ZMQError as e:           # the client went away
                log.debug("%s: reply dropped: %s", self.actor.name, e)
            return
        kind = MORE if reply.more else REP
        code = b"" if reply.ok else str(reply.error.get("code", "")).encode()
        self.sock.send_multipart([kind, route[0], route[1], code, reply.encode(), *frames])


def _split(item) -> tuple[object, list[bytes]]:
    if isinstance(item, Bulk):
        return item.result, item.frames
    return item, []


def _drain_fd(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk
