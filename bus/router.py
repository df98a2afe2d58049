"""The front door: routes client requests to actors by service name, and holds them while an
actor restarts.

A request whose actor is down waits in a per-service queue until the actor registers again or
the request's deadline passes. A request an actor was handling when it died is delivered once
more to its successor; if that one dies on it too, the client gets Unavailable.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import struct
import time
from typing import Callable

import zmq

from bus import codec, failpoints
from bus.envelope import Reply, Request
from bus.errors import BerthError, DeadlineExceeded, NotImplementedErr, ResourceExhausted, Unavailable
from bus.worker import MORE, PING, PONG, REDO, REG, REP, REQ

log = logging.getLogger("berth.router")

MAX_QUEUED = 10_000           # requests held for one restarting actor
MAX_WAIT = 60.0               # how long a request without a deadline may wait for its actor
HARD_MESSAGE_LIMIT = 128 << 20  # ZeroMQ drops a peer that sends more than this in one frame


@dataclasses.dataclass(slots=True)
class Flight:
    service: str
    method: str
    rid: int | str
    client: bytes
    header: bytes
    bulk: list[bytes]
    started: float
    deadline: float            # monotonic
    redelivered: bool = False


class Router:
    def __init__(self, ctx: zmq.Context, front: str, back: str, services: set[str],
                 builtin: Callable[[Request], object],
                 observe: Callable[[str, str, str, float], None] = lambda *a: None,
                 on_register: Callable[[str, int], None] = lambda *a: None,
                 on_pong: Callable[[str, dict], None] = lambda *a: None):
        self.front = ctx.socket(zmq.ROUTER)
        self.back = ctx.socket(zmq.ROUTER)
        for sock in (self.front, self.back):
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, HARD_MESSAGE_LIMIT)
            sock.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.front.bind(front)
        self.back.bind(back)
        self.services = services
        self.builtin = builtin
        self.observe = observe
        self.on_register = on_register
        self.on_pong = on_pong
        self.up: dict[str, int] = {}                      # actor -> pid
        self.queued: dict[str, collections.deque[int]] = {s: collections.deque() for s in services}
        self.flights: dict[int, Flight] = {}
        self.tokens = itertools.count(1)

    def stats(self) -> dict:
        return {"in_flight": len(self.flights),
                "queued": {s: len(q) for s, q in self.queued.items() if q},
                "up": dict(self.up)}

    # --- client side ----------------------------------------------------------------------

    def on_front(self) -> None:
        for _ in range(256):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            self._accept(frames[0], frames[1:])

    def _accept(self, client: bytes, frames: list[bytes]) -> None:
        try:
            codec.check_frames(frames)
            req = Request.decode(frames[0])
        except BerthError as e:
            self._reply(client, Reply.failure(None, e))
            return
        started = time.monotonic()
        if req.service == "berth":
            try:
                reply = Reply(req.id, result=self.builtin(req))
            except BerthError as e:
                reply = Reply.failure(req.id, e)
            self._reply(client, reply)
            self.observe(req.service, req.method, "" if reply.ok else reply.error["code"],
                         time.monotonic() - started)
            return
        if req.service not in self.services:
            self._reply(client, Reply.failure(req.id, NotImplementedErr(f"no service {req.service!r}")))
            return
        try:
            failpoints.fail("router.forward", req.service, req.method)
        except BerthError as e:
            self._reply(client, Reply.failure(req.id, e))
            return
        wait = MAX_WAIT if req.deadline is None else req.deadline - time.time()
        token = next(self.tokens)
        self.flights[token] = Flight(req.service, req.method, req.id, client, frames[0], frames[1:],
                                     started, started + wait)
        if req.service in self.up:
            self._forward(token)
        else:
            self._enqueue(token)

    def _forward(self, token: int) -> None:
        f = self.flights[token]
        try:
            kind = REDO if f.redelivered else REQ
            self.back.send_multipart([f.service.encode(), kind, struct.pack("!Q", token), f.client,
                                      f.header, *f.bulk], zmq.NOBLOCK)
        except zmq.ZMQError:
            self._enqueue(token)           # gone between its exit and our noticing: hold it

    def _enqueue(self, token: int) -> None:
        f = self.flights[token]
        queue = self.queued[f.service]
        if len(queue) >= MAX_QUEUED:
            self._finish(token, Reply.failure(f.rid, ResourceExhausted(f"{f.service} is restarting and its queue is full")))
            return
        queue.append(token)

    def _reply(self, client: bytes, reply: Reply, bulk: list[bytes] = ()) -> None:
        self._send_front([client, reply.encode(), *bulk])

    def _send_front(self, frames: list[bytes]) -> None:
        try:
            self.front.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as e:          # the client went away or stopped reading
            log.debug("reply dropped: %s", e)

    def _finish(self, token: int, reply: Reply) -> None:
        f = self.flights.pop(token)
        self._reply(f.client, reply)
        self.observe(f.service, f.method, "" if reply.ok else reply.error["code"], time.monotonic() - f.started)

    # --- actor side -----------------------------------------------------------------------

    def on_back(self) -> None:
        for _ in range(256):
            try:
                frames = self.back.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            name, kind = frames[0].decode(errors="replace"), frames[1]
            if kind in (REP, MORE) and len(frames) >= 6:
                token = struct.unpack("!Q", frames[2])[0]
                f = self.flights.get(token) if kind == MORE else self.flights.pop(token, None)
                if f is None:
                    continue                # answered already (deadline) or redelivered
                self._send_front([frames[3], *frames[5:]])
                if kind == REP:
                    self.observe(f.service, f.method, frames[4].decode(), time.monotonic() - f.started)
            elif kind == REG and len(frames) == 3 and name in self.services:
                self.up[name] = struct.unpack("!I", frames[2])[0]
                self.on_register(name, self.up[name])
                queue = self.queued[name]
                while queue and name in self.up:
                    token = queue.popleft()
                    if token in self.flights:
                        self._forward(token)
            elif kind == PONG and len(frames) == 4:
                try:
                    stats = codec.unpack(frames[3])
                except BerthError:
                    stats = {}
                self.on_pong(name, stats if isinstance(stats, dict) else {})

    def ping(self, name: str) -> bool:
        if name not in self.up:
            return False
        try:
            self.back.send_multipart([name.encode(), PING, b"p"], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def actor_down(self, name: str) -> None:
        """The actor's process is gone: hold its queue, give its unanswered requests one more try."""
        self.up.pop(name, None)
        for token, f in list(self.flights.items()):
            if f.service != name or token in self.queued[name]:
                continue
            if f.redelivered:
                self._finish(token, Reply.failure(f.rid, Unavailable(f"{name} died twice while handling {f.method}")))
            else:
                f.redelivered = True
                self.queued[name].appendleft(token)

    def expire(self) -> None:
        now = time.monotonic()
        for token, f in list(self.flights.items()):
            if f.deadline < now:
                if f.service in self.queued and token in self.queued[f.service]:
                    self.queued[f.service].remove(token)
                self._finish(token, Reply.failure(f.rid, DeadlineExceeded(f"{f.service}.{f.method}: deadline exceeded")))

    def close(self) -> None:
        self.front.close()
        self.back.close()

