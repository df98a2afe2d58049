"""The event exchange: a bounded durable log with sequence numbers, fanned out on a PUB socket.

Publishers `forward` events with an id; an id already in the log is acknowledged again without
being appended twice, so a publisher may resend after any crash. Subscribers read the PUB socket
(ZeroMQ topic prefix = event topic) and fill gaps, or resume after a disconnect, with `replay`.
The wire format is in docs/events.md.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import struct
import threading
import time

from actors.durable import fsync_dir
from bus import codec
from bus.errors import BerthError, InvalidArgument
from bus.pubsub import forward_address
from bus.validate import Topic, check_identifier
from bus.worker import Actor, Call, method

log = logging.getLogger("berth.events")

SEGMENT_EVENTS = 10_000
MAX_EVENT_BYTES = 64 << 10
MAX_REPLAY = 5_000
MAX_TIMESTAMP = 253_402_300_800.0    # 10000-01-01: past it, dates do not print
_LEN = struct.Struct("!I")


class EventLog:
    """Append-only segments `<first seq>.log` of length-prefixed msgpack envelopes.

    The newest `size` events (rounded up to whole segments) are kept. A torn record at the end
    of the last segment, left by a crash mid-write, is cut off at startup.
    """

    def __init__(self, directory: str, size: int = 100_000, clock=time.time):
        self.dir = directory
        self.size = max(size, SEGMENT_EVENTS)
        self.clock = clock
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.segments: list[int] = sorted(int(n[:-4]) for n in os.listdir(directory)
                                          if n.endswith(".log") and n[:-4].isdigit())
        self.ids: dict[str, int] = {}
        self.recent: collections.deque[dict] = collections.deque(maxlen=SEGMENT_EVENTS)
        self.head = 0
        self.current = None
        self.dirty = False
        self.dirtied = threading.Event()       # wakes the syncer: something awaits a sync
        self.sync_lock = threading.Lock()      # the syncer thread against rotation and close
        self.syncer: threading.Thread | None = None
        for first in self.segments:
            self._load(first)
        if self.segments:
            self.current = open(self._path(self.segments[-1]), "ab")

    def _path(self, first: int) -> str:
        return os.path.join(self.dir, f"{first:020d}.log")

    def _load(self, first: int) -> None:
        path = self._path(first)
        good = 0
        for envelope, end in _records(path):
            good = end
            self.head = envelope["seq"]
            if envelope.get("id"):
                self.ids[envelope["id"]] = envelope["seq"]
            self.recent.append(envelope)
        if first == self.segments[-1] and good != os.path.getsize(path):
            log.warning("cutting a torn record off %s at byte %d", path, good)
            os.truncate(path, good)

    @property
    def first(self) -> int:
        return self.segments[0] if self.segments else self.head + 1

    def append(self, namespace: str | None, topic: str, event: dict, event_id: str | None = None,
               timestamp: float | None = None) -> tuple[dict, bool]:
        """Append one event; returns (envelope, new). A known id returns its seq, not new."""
        if event_id and event_id in self.ids:
            return {"seq": self.ids[event_id], "id": event_id}, False
        check_event(event, timestamp)
        seq = self.head + 1
        envelope = {"seq": seq, "timestamp": timestamp or self.clock(), "namespace": namespace,
                    "topic": topic, "event": event, "id": event_id}
        record = codec.pack(envelope)
        if len(record) > MAX_EVENT_BYTES:
            raise InvalidArgument(f"event of {len(record)} bytes exceeds {MAX_EVENT_BYTES}")
        if self.current is None or seq - self.segments[-1] >= SEGMENT_EVENTS:
            self._rotate(seq)
        self.current.write(_LEN.pack(len(record)) + record)
        self.current.flush()
        self.dirty = True
        self.dirtied.set()
        self.head = seq
        if event_id:
            self.ids[event_id] = seq
        self.recent.append(envelope)
        return envelope, True

    def _rotate(self, seq: int) -> None:
        with self.sync_lock:
            if self.current is not None:
                self.current.flush()
                os.fdatasync(self.current.fileno())
                self.current.close()
            self.segments.append(seq)
            self.current = open(self._path(seq), "ab")
        fsync_dir(self.dir)
        while len(self.segments) > 1 and seq - self.segments[1] >= self.size:
            dropped = self.segments.pop(0)
            for envelope, _ in _records(self._path(dropped)):
                if envelope.get("id"):
                    self.ids.pop(envelope["id"], None)
            os.unlink(self._path(dropped))

    def sync(self) -> None:
        with self.sync_lock:
            if self.dirty and self.current is not None:
                self.dirty = False
                os.fdatasync(self.current.fileno())

    def sync_every(self, interval: float) -> None:
        """Sync from a thread of the log's own, at most `interval` seconds after an append: an
        fdatasync can take milliseconds, and the actor's loop must not wait for it. The thread
        sleeps while nothing is appended, so an idle daemon is not woken 1/interval times a
        second, and appends in one interval share one sync. stop_syncing() ends and joins it."""
        self.stopping = threading.Event()
        self.syncer = threading.Thread(target=self._sync_loop, args=(interval,), name="event-log-sync")
        self.syncer.start()

    def _sync_loop(self, interval: float) -> None:
        while True:
            self.dirtied.wait()
            if self.stopping.wait(interval):
                return                          # close() syncs what is left
            self.dirtied.clear()                # before sync() reads `dirty`: a later append sets it again
            try:
                self.sync()
            except OSError:
                log.exception("syncing the event log failed")

    def stop_syncing(self) -> None:
        if self.syncer is not None:
            self.stopping.set()
            self.dirtied.set()
            self.syncer.join()
            self.syncer = None

    def replay(self, since: int, limit: int = MAX_REPLAY) -> list[dict]:
        """Events with seq > since, oldest first, at most `limit`."""
        if since >= self.head:
            return []
        if self.recent and since + 1 >= self.recent[0]["seq"]:
            start = since + 1 - self.recent[0]["seq"]
            return [self.recent[i] for i in range(start, min(len(self.recent), start + limit))]
        out = []
        for i, first in enumerate(self.segments):
            following = self.segments[i + 1] if i + 1 < len(self.segments) else None
            if following is not None and following <= since + 1:
                continue
            for envelope, _ in _records(self._path(first)):
                if envelope["seq"] > since:
                    out.append(envelope)
                    if len(out) >= limit:
                        return out
        return out

    def close(self) -> None:
        self.stop_syncing()
        if self.current is not None:
            self.sync()
            self.current.close()
            self.current = None


def check_event(event: dict, timestamp: float | None) -> None:
    """What every reader must be able to print: fields named by strings at every level (as JSON
    needs), a timestamp that is a date. One bad event would otherwise break `berth events`
    for everyone reading the log after it."""
    if timestamp is not None and not (math.isfinite(timestamp) and 0 <= timestamp < MAX_TIMESTAMP):
        raise InvalidArgument(f"event timestamp {timestamp!r} is not seconds since the epoch")
    stack: list = [event]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise InvalidArgument(f"event field names must be strings, not {type(key).__name__}")
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 4 <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        if pos + 4 + n > len(data):
            return
        try:
            envelope = codec.unpack(data[pos + 4: pos + 4 + n])
        except BerthError:
            return
        pos += 4 + n
        yield envelope, pos



class EventsActor(Actor):
    name = "events"

    def __init__(self, log_: EventLog, pub_address: str, forward_address: str = ""):
        self.log = log_
        self.pub_address = pub_address
        self.forward_address = forward_address
        self.pub = None
        self.inbox = None
        self.subscribers = 0

    def on_start(self) -> None:
        import zmq
        from actors import metrics
        self.metrics = metrics
        self.pub = self.worker.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_VERBOSER, 1)     # every (un)subscribe, for the subscriber count
        self.pub.setsockopt(zmq.SNDHWM, 10_000)       # a slow subscriber loses events, never our memory
        self.pub.setsockopt(zmq.LINGER, 0)
        path = self.pub_address[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)
        self.pub.bind(self.pub_address)
        self.worker.add_reader(self.pub, self._on_subscription)
        if self.forward_address:
            # Publishers' own way in (bus.pubsub): a forward that skips the router's two hops.
            self.inbox = self.worker.ctx.socket(zmq.ROUTER)
            self.inbox.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.inbox.setsockopt(zmq.MAXMSGSIZE, 128 << 20)
            self.inbox.setsockopt(zmq.LINGER, 0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.forward_address[len("ipc://"):])
            self.inbox.bind(self.forward_address)
            self.worker.serve_direct(self.inbox)
        self.log.sync_every(0.05)

    def on_stop(self) -> None:
        self.log.close()
        for sock, address in ((self.pub, self.pub_address), (self.inbox, self.forward_address)):
            if sock is not None:
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address[len("ipc://"):])

    def stats(self) -> dict:
        return {"head": self.log.head, "first": self.log.first, "subscribers": self.subscribers}

    def _on_subscription(self) -> None:
        import zmq
        while True:
            try:
                msg = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] in (b"\x00", b"\x01"):
                delta = 1 if msg[:1] == b"\x01" else -1
                self.subscribers += delta
                self.metrics.SUBSCRIBERS.inc(delta)

    @method
    def forward(self, call: Call, topic: Topic, event: dict, id: str | None = None,
                timestamp: float | None = None, namespace: str | None = None) -> dict:
        """Append and fan out one event; acknowledged with its sequence number, and where the
        next ones may be sent without the router (`forward`, see bus.pubsub)."""
        namespace = namespace or call.namespace
        if namespace is not None:
            check_identifier(namespace, "namespace")
        if id is not None and not (0 < len(id) <= 128):
            raise InvalidArgument("event id must be 1 to 128 characters")
        envelope, new = self.log.append(namespace, topic, event, id, timestamp)
        if new:
            self.pub.send_multipart([topic.encode(), codec.pack(envelope)])
            self.metrics.EVENTS_PUBLISHED.labels(topic.split("/")[1]).inc()
        return {"seq": envelope["seq"], "forward": self.forward_address}

    publish = forward

    @method
    def head(self) -> dict:
        """The log's ends, the PUB socket's address, and `forward`: where publishers may send
        `forward` straight to this actor (while it runs; through berth.sock it always works)."""
        return {"head": self.log.head, "first": self.log.first, "address": self.pub_address,
                "forward": self.forward_address}

    @method
    def replay(self, since: int = 0, limit: int = MAX_REPLAY) -> dict:
        """Events after `since`, oldest first; call again from the last seq until caught up."""
        if since < 0 or limit < 1:
            raise InvalidArgument("since must be >= 0 and limit >= 1")
        events = self.log.replay(since, min(limit, MAX_REPLAY))
        return {"events": events, "head": self.log.head, "first": self.log.first}


def build(config) -> EventsActor:
    return EventsActor(EventLog(config.path("events"), config.events_log_size), config.events_address,
                       forward_address(config.state))
